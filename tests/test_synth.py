"""A corpus sampled from the parent (flextron.synth): deterministic, resumable byte for byte, deduplicated, real
validation text, provenance; open_cache; ``flextron sample-corpus`` and ``flextron train --tokens-cache``."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

import flextron_kernels
from flextron import synth
from flextron.cli.sample import STOPPED
from flextron.data import STORIES260K_DIR, TINYSTORIES_EXCERPT, load_stories260k
from flextron.tokens import SEPARATOR, open_cache, read_documents, tokenize_files, tokenizer_fingerprint
from tests.test_cli import assert_one_line_error, run_cli

SMALL = dict(tokens=1200, val_text_files=[TINYSTORIES_EXCERPT], seq_len=64, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def parent():
    return load_stories260k()


def sample(parent, out, **kw):
    model, tok = parent
    with flextron_kernels.cpu_reference():
        return synth.sample_corpus(model, tok, out, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def reference(parent, tmp_path_factory):
    """One uninterrupted run with the SMALL settings."""
    return sample(parent, tmp_path_factory.mktemp("ref") / "corpus")


def _bytes(d) -> bytes:
    return (d / "train.bin").read_bytes()


def test_deterministic_with_provenance_and_real_validation_text(parent, reference, tmp_path):
    model, tok = parent
    again = sample(parent, tmp_path / "again")
    assert _bytes(again.path) == _bytes(reference.path)  # same seed: the same corpus
    other = sample(parent, tmp_path / "other", seed=1, tokens=100)
    assert _bytes(other.path)[:200] != _bytes(reference.path)[:200]  # another seed: another corpus

    m = reference.meta
    assert m["synthetic"] is True and m["seed"] == 0 and m["format_version"] == 1
    assert len(reference.train) == m["tokens"]["train"] >= SMALL["tokens"]
    s = m["sampler"]
    assert (s["temperature"], s["top_k"], s["top_p"], s["seq_len"], s["prompts"]) == (1.0, 0, 1.0, 64, {"kind": "bos"})
    assert m["tokenizer"] == tokenizer_fingerprint(tok)
    assert m["parent"]["sha256"] == synth.model_checksum(model) and m["parent"]["parameters"] == 260_032
    g = m["generated"]
    assert g["documents"] == g["batches"] * 8 == m["documents"]["train"] + g["duplicates_dropped"] + g["empty_dropped"]
    assert (reference.path / "hashes.bin").stat().st_size == 16 * m["documents"]["train"]
    assert reference.train[0] == tok.bos_token_id and tok.decode(reference.train[1:4]).strip()

    # val.bin is the held-out split of the real text, by tokenize_files' own rule
    real = tokenize_files(TINYSTORIES_EXCERPT, tok, tmp_path / "tok", progress=False)
    assert np.array_equal(np.asarray(reference.val), np.asarray(real.val))
    assert m["documents"]["val"] == real.meta["documents"]["val"] == 13
    held = read_documents([TINYSTORIES_EXCERPT], SEPARATOR)[-13]
    assert tok.decode(reference.val[1:40]).strip() in held


def test_checksum_covers_every_weight(parent):
    model, _ = parent
    c = copy.deepcopy(model)
    assert synth.model_checksum(c) == synth.model_checksum(model)
    with torch.no_grad():
        c.model.layers[3].mlp.down_proj.weight[5, 7] += 1e-6
    assert synth.model_checksum(c) != synth.model_checksum(model)


def test_time_limit_stops_and_resume_is_byte_identical(parent, reference, tmp_path):
    out = tmp_path / "c"
    assert sample(parent, out, time_limit_s=0) is None  # stops after the first batch, folder resumable
    p = synth.progress_state(out)
    assert p["batches_done"] == 1 and not (out / "tokens.json").exists()
    with pytest.raises(ValueError, match=rf"{out}.* unfinished synthetic corpus \({p['train_tokens']:,} of 1,200 "
                                         r"training tokens\).* again to continue"):
        open_cache(out)
    done = sample(parent, out)  # a fresh call, as a new process would make it
    assert _bytes(out) == _bytes(reference.path)
    assert done.meta["generated"] == reference.meta["generated"]
    assert (out / "hashes.bin").read_bytes() == (reference.path / "hashes.bin").read_bytes()


def test_crash_mid_write_then_resume_is_byte_identical(parent, reference, tmp_path, monkeypatch):
    out = tmp_path / "c"
    real_append = synth._fsync_append
    calls = []

    def dying_append(path, data):
        calls.append(path.name)
        if path.name == synth.PARTIAL and calls.count(synth.PARTIAL) == 2:  # the second batch, half written
            real_append(path, data[: len(data) // 2])
            raise KeyboardInterrupt("killed mid-write")
        real_append(path, data)

    monkeypatch.setattr(synth, "_fsync_append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        sample(parent, out)
    monkeypatch.undo()
    p = synth.progress_state(out)
    assert p["batches_done"] == 1 and (out / synth.PARTIAL).stat().st_size > 2 * p["train_tokens"]
    sample(parent, out)
    assert _bytes(out) == _bytes(reference.path)
    # a larger target continues the same corpus: the smaller one is its prefix
    more = sample(parent, out, tokens=1700)
    assert len(more.train) >= 1700 and _bytes(out).startswith(_bytes(reference.path))


def test_exact_duplicates_are_dropped_across_batches_and_resumes(parent, tmp_path):
    tok = parent[1]
    picked, starts = [], set()
    for s in read_documents([TINYSTORIES_EXCERPT], SEPARATOR):  # 5 stories whose first 8 tokens differ
        start = tuple(tok(s, add_special_tokens=False)["input_ids"][:8])
        if start not in starts:
            starts.add(start)
            picked.append(s)
    a, b, c, d, e = picked[:5]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{s}\n{SEPARATOR}\n" for s in (a, a, b, c, d, e)), encoding="utf-8")
    # near-greedy: a prompt always gets the same document. Rows of batch 0: a a b c; batch 1: d e a a
    kw = dict(prompts=[prompts], temperature=1e-4, seq_len=16, batch_size=4, tokens=65)
    out = tmp_path / "c"
    assert sample(parent, out, time_limit_s=0, **kw) is None
    assert synth.progress_state(out)["duplicates"] == 1
    data = sample(parent, out, **kw)  # resumed: batch 1's copies of a are recognised from the hash record
    g = data.meta["generated"]
    assert (g["batches"], g["documents"], g["duplicates_dropped"], data.meta["documents"]["train"]) == (2, 8, 3, 5)
    docs = np.split(np.asarray(data.train), np.flatnonzero(np.asarray(data.train) == 1)[1:])
    assert len(docs) == 5 and len({x.tobytes() for x in docs}) == 5
    assert data.meta["sampler"]["prompts"]["documents"] == 6 and data.meta["sampler"]["prompts"]["prompt_tokens"] == 8
    ids = tok(a, add_special_tokens=False)["input_ids"][:8]
    assert docs[0][1:9].tolist() == ids  # documents start with their prompt
    with pytest.raises(synth.SamplingStalled, match="no new document"):
        sample(parent, out, max_stalled_batches=2, **{**kw, "tokens": 10_000})


def test_refusals_and_open_cache(parent, reference, tmp_path):
    with pytest.raises(ValueError, match="other settings \\(differing: seed\\)"):
        sample(parent, reference.path, seed=3)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty and holds no synthetic corpus"):
        sample(parent, tmp_path / "foreign")
    with pytest.raises(ValueError, match="is not a token cache"):
        open_cache(tmp_path / "foreign")
    with pytest.raises(ValueError, match="does not exist"):
        open_cache(tmp_path / "nope")
    tokenize_files(TINYSTORIES_EXCERPT, parent[1], tmp_path / "tok", progress=False)
    assert len(open_cache(tmp_path / "tok").train) > 0  # a tokenize_files cache opens too
    broken = tmp_path / "broken"
    shutil.copytree(reference.path, broken)
    with open(broken / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="train.bin is 100 bytes"):
        open_cache(broken)


@flextron_kernels.cpu_reference()  # the plain-torch ops, as a CPU run executes them: this test is of the commands
def test_command_line_samples_resumes_and_trains(parent, tmp_path, capsys):
    out = tmp_path / "corpus"
    argv = ["sample-corpus", "--model", STORIES260K_DIR, "--out", out, "--tokens", 300, "--val-text",
            TINYSTORIES_EXCERPT, "--seq-len", 32, "--batch-size", 8, "--device", "cpu", "--no-progress"]
    rc, stdout, err = run_cli(argv + ["--time-limit", 0], capsys)
    assert rc == STOPPED, err
    assert "stopped by --time-limit" in stdout
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "continuing" in stdout and "tokens/s" in stdout and "val 5,757 tokens of real text" in stdout
    assert open_cache(out).meta["parent"]["sha256"] == synth.model_checksum(parent[0])
    assert open_cache(out).meta["parent"]["dtype"] == "float32"

    # --dtype bfloat16: the parent samples in bf16, and the corpus says so (dtype and the bf16 weights' checksum)
    rc, stdout, err = run_cli(argv[:4] + [tmp_path / "bf16"] + argv[5:] + ["--dtype", "bfloat16"], capsys)
    assert rc == 0, err
    meta = open_cache(tmp_path / "bf16").meta
    assert meta["parent"]["dtype"] == "bfloat16"
    assert meta["parent"]["sha256"] == synth.model_checksum(copy.deepcopy(parent[0]).to(torch.bfloat16))
    assert meta["tokens"]["train"] >= 300

    train = ["train", "--model", STORIES260K_DIR, "--tokens-cache", out, "--out", tmp_path / "run", "--mlp", "0.5,1",
             "--heads", "0.5,1", "--rank-windows", "2", "--steps", "1", "--batch-size", "1", "--seq-len", "16",
             "--k-random", "0", "--eval-windows", "1", "--eval-widths", "0.5,1", "--no-progress"]
    rc, stdout, err = run_cli(train, capsys)
    assert rc == 0, err
    assert (tmp_path / "run" / "model" / "flextron.json").is_file()

    # a cache of another tokenizer is refused
    other = tmp_path / "other"
    shutil.copytree(out, other)
    meta = json.loads((other / "tokens.json").read_text())
    meta["tokenizer"]["vocab_sha256"] = "0" * 64
    (other / "tokens.json").write_text(json.dumps(meta))
    rc, _, err = run_cli(train[:4] + [other] + train[5:], capsys)
    assert_one_line_error(rc, err, "train", f"'{other}' was made with another tokenizer")




def test_command_line_bad_input(tmp_path, capsys):
    base = ["sample-corpus", "--model", STORIES260K_DIR, "--out", tmp_path / "c", "--tokens", "100", "--val-text",
            TINYSTORIES_EXCERPT, "--device", "cpu", "--no-progress"]
    cases = [
        (["--tokens", "0"], "argument --tokens: 0 is not a positive integer"),
        (["--temperature", "0"], "argument --temperature: 0.0 is not a number > 0"),
        (["--prompts", "bos", str(TINYSTORIES_EXCERPT)], "--prompts takes 'bos' alone or text files"),
        (["--prompts", str(tmp_path / "nope.txt")], "argument --prompts:", "does not exist"),
        (["--seq-len", "4096"], "seq_len=4096 exceeds the model's 512 positions"),
        (["--seq-len", "8", "--prompts", str(TINYSTORIES_EXCERPT)], "leaves no room to sample"),
        (["--device", "gpu7"], "is not a device"),
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["--cache", "paged"], "argument --cache: invalid choice: 'paged'"),
    ]
    for extra, *fragments in cases:
        rc, _, err = run_cli(base + extra, capsys)
        assert_one_line_error(rc, err, "sample-corpus", *fragments)
    assert not (tmp_path / "c").exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("x")
    rc, _, err = run_cli(base, capsys)
    assert_one_line_error(rc, err, "sample-corpus", "not empty and holds no synthetic corpus")

    unfinished = tmp_path / "u"
    unfinished.mkdir()
    (unfinished / "progress.json").write_text(json.dumps({"train_tokens": 10, "target_tokens": 100}))
    rc, _, err = run_cli(["train", "--model", STORIES260K_DIR, "--tokens-cache", unfinished, "--out", tmp_path / "r"],
                         capsys)
    assert_one_line_error(rc, err, "train", "unfinished synthetic corpus (10 of 100 training tokens)")
    rc, _, err = run_cli(["train", "--model", STORIES260K_DIR, "--tokens-cache", unfinished, "--data",
                          TINYSTORIES_EXCERPT, "--out", tmp_path / "r"], capsys)
    assert_one_line_error(rc, err, "train", "not allowed with argument")
    rc, _, err = run_cli(["train", "--model", STORIES260K_DIR, "--tokens-cache", unfinished, "--cache",
                          tmp_path / "t", "--out", tmp_path / "r"], capsys)
    assert_one_line_error(rc, err, "train", "--cache is where --data is tokenised")
    assert not (tmp_path / "r").exists()


def test_static_cache_samples_the_same_documents(parent, reference, tmp_path, monkeypatch):
    """``cache="static"``: transformers' fixed-size cache (compiled decode steps on a GPU). In fp32 on the CPU it
    samples what the dynamic cache samples under the same seeds; the corpus records the cache, and a folder started
    with one cache is not continued with the other."""
    model = parent[0]
    asked, generate = [], model.generate

    def spy(*args, **kwargs):
        asked.append(kwargs["generation_config"].cache_implementation)
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    static = sample(parent, tmp_path / "static", cache="static")
    assert asked and set(asked) == {"static"}
    assert _bytes(static.path) == _bytes(reference.path)
    assert static.meta["sampler"]["cache"] == "static" and "cache" not in reference.meta["sampler"]
    with pytest.raises(ValueError, match="differing: sampler"):
        sample(parent, tmp_path / "static", cache="dynamic", tokens=SMALL["tokens"] * 2)
    with pytest.raises(ValueError, match="cache must be one of"):
        sample(parent, tmp_path / "bad", cache="paged")
