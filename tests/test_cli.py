"""The ``flextron`` command: the tokenizer rule (the model's own or --tokenizer, never a guess) and bad input
answered in one line on stderr with exit status 2 (``--debug``: the traceback)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from flextron import ElasticSpace, FlextronModel
from flextron.budget import routing
from flextron.cli import main
from flextron.data import STORIES260K_DIR, TINYSTORIES_EXCERPT
from tests.model_utils import VOCAB, tiny_model
from tests.test_latency import synthetic

ROOT = Path(__file__).resolve().parents[1]
STORIES_VOCAB = 512  # len() of the bundled stories260K tokenizer


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """``flextron.cli.main(argv)`` -> (exit status, stdout, stderr); argparse's exits included."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, command, *fragments):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"flextron {command}: error: " if command else "flextron: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def save_checkpoint(fm: FlextronModel, path: Path, tokenizer=None) -> Path:
    """A flextron checkpoint, with ``tokenizer`` when given (none otherwise)."""
    fm.tokenizer = None
    fm.save_pretrained(path, tokenizer=tokenizer)
    return path


def table_file(fm: FlextronModel, path: Path) -> Path:
    """A synthetic latency table of ``fm`` (one entry per width and head choice) written to ``path``."""
    n_mlp, n_heads = len(fm.mlp_choices(0)), len(fm.head_choices(0))
    table = synthetic(fm, mlp_ms=tuple(1.0 + i for i in range(n_mlp)), attn_ms=tuple(1.0 + i for i in range(n_heads)))
    table.save(path)
    return path


@pytest.fixture(scope="module")
def stories_tok():
    tok = AutoTokenizer.from_pretrained(STORIES260K_DIR)
    assert len(tok) == STORIES_VOCAB
    return tok


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A flextron checkpoint of a model with a 96-token vocabulary and no tokenizer, and its latency table."""
    d = tmp_path_factory.mktemp("small")
    fm = FlextronModel.from_hf(tiny_model("llama"), ElasticSpace(mlp=(0.5, 1.0), heads=(0.5, 1.0)))
    return save_checkpoint(fm, d / "ckpt"), table_file(fm, d / "table.json")


def _stories_shaped(seed: int = 0) -> FlextronModel:
    torch.manual_seed(seed)  # a tiny random Llama with the stories260K vocabulary
    m = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=48,
                                     vocab_size=STORIES_VOCAB, num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=8, max_position_embeddings=64))
    return FlextronModel.from_hf(m.eval(), ElasticSpace(mlp=(0.5, 1.0), heads=(0.5, 1.0)))


@pytest.fixture(scope="module")
def stories_vocab(tmp_path_factory, stories_tok):
    """Checkpoints of a model with the stories260K vocabulary, without and with its tokenizer; a HF folder of it."""
    d = tmp_path_factory.mktemp("stories")
    fm = _stories_shaped()
    fm.model.save_pretrained(d / "hf")
    return {"bare": save_checkpoint(fm, d / "bare"), "with_tok": save_checkpoint(fm, d / "with_tok", stories_tok),
            "hf": d / "hf", "table": table_file(fm, d / "table.json")}


ROUTE_FAST = ["--kind", "static", "--sm-steps", "1", "--sm-warmup", "0", "--joint-steps", "1", "--batch-size", "2",
              "--seq-len", "16", "--calibrate-windows", "0"]


# -- A: the tokenizer rule ----------------------------------------------------------------------------------------
def test_route_refuses_a_checkpoint_without_tokenizer(stories_vocab, tmp_path, capsys):
    """No tokenizer in the checkpoint and no --tokenizer: refused, nothing trained or written (no guess)."""
    out = tmp_path / "routed"
    rc, _, err = run_cli(["route", stories_vocab["bare"], "--table", stories_vocab["table"], "--out", out]
                         + ROUTE_FAST, capsys)
    line = assert_one_line_error(rc, err, "route", "holds no tokenizer", "pass --tokenizer DIR",
                                 "save_pretrained(path, tokenizer=...)", str(stories_vocab["bare"]))
    assert "stories260K" not in line
    assert not out.exists()


def test_route_refuses_a_tokenizer_larger_than_the_embedding(small_vocab, tmp_path, capsys):
    ckpt, table = small_vocab
    out = tmp_path / "routed"
    rc, _, err = run_cli(["route", ckpt, "--table", table, "--tokenizer", STORIES260K_DIR, "--out", out]
                         + ROUTE_FAST, capsys)
    assert_one_line_error(rc, err, "route", f"has {STORIES_VOCAB} tokens", f"embeds only {VOCAB}",
                          str(STORIES260K_DIR))
    assert not out.exists()


def test_route_uses_the_checkpoints_tokenizer_or_the_one_given(stories_vocab, stories_tok, tmp_path, capsys,
                                                              monkeypatch):
    """Its own tokenizer, or --tokenizer for a checkpoint without one; the tokenizer given is saved with the routed
    checkpoint, so the next command finds it there."""
    import flextron.data as data_mod

    seen = []
    real = data_mod.token_windows

    def spy(tok, stories, seq_len, *a, **kw):
        seen.append(tok.name_or_path)
        return real(tok, stories, seq_len, *a, **kw)

    monkeypatch.setattr(data_mod, "token_windows", spy)
    rc, out, err = run_cli(["route", stories_vocab["with_tok"], "--table", stories_vocab["table"],
                            "--out", tmp_path / "a"] + ROUTE_FAST, capsys)
    assert rc == 0, err
    assert seen == [str(stories_vocab["with_tok"])]
    assert routing(FlextronModel.from_pretrained(tmp_path / "a")).static is not None
    rc, out, err = run_cli(["route", stories_vocab["bare"], "--table", stories_vocab["table"], "--tokenizer",
                            STORIES260K_DIR, "--out", tmp_path / "b"] + ROUTE_FAST, capsys)
    assert rc == 0, err
    assert seen[-1] == str(STORIES260K_DIR)
    saved = AutoTokenizer.from_pretrained(tmp_path / "b")
    assert saved.get_vocab() == stories_tok.get_vocab()


def _train_args(model, tmp_path, *extra):
    return ["train", "--model", model, "--data", TINYSTORIES_EXCERPT, "--out", tmp_path / "run", "--cache",
            tmp_path / "tok", "--mlp", "0.5,1", "--heads", "0.5,1", "--rank-windows", "2", "--steps", "1",
            "--batch-size", "1", "--seq-len", "16", "--k-random", "0", "--eval-windows", "1", "--eval-widths",
            "0.5,1", "--no-progress", *extra]


def test_train_refuses_a_model_without_tokenizer(stories_vocab, small_vocab, tmp_path, capsys):
    """A HF folder or a flextron checkpoint without tokenizer files: refused before tokenising or writing."""
    for model in (stories_vocab["hf"], stories_vocab["bare"]):
        rc, _, err = run_cli(_train_args(model, tmp_path), capsys)
        assert_one_line_error(rc, err, "train", "holds no tokenizer", "--tokenizer", str(model))
    rc, _, err = run_cli(_train_args(small_vocab[0], tmp_path, "--tokenizer", STORIES260K_DIR), capsys)
    assert_one_line_error(rc, err, "train", f"has {STORIES_VOCAB} tokens", f"embeds only {VOCAB}")
    assert not (tmp_path / "run").exists() and not (tmp_path / "tok").exists()


def test_train_writes_the_tokenizer_with_the_model(stories_vocab, stories_tok, tmp_path, capsys):
    """``--tokenizer`` for a HF folder without one: the trained OUT/model holds it, so ``route`` needs no flag."""
    rc, out, err = run_cli(_train_args(stories_vocab["hf"], tmp_path, "--tokenizer", STORIES260K_DIR), capsys)
    assert rc == 0, err
    model = tmp_path / "run" / "model"
    assert AutoTokenizer.from_pretrained(model).get_vocab() == stories_tok.get_vocab()
    rc, out, err = run_cli(["route", model, "--table", stories_vocab["table"], "--out", tmp_path / "routed"]
                           + ROUTE_FAST, capsys)
    assert rc == 0, err


def test_train_with_text_mixed_in(stories_vocab, tmp_path, capsys):
    """``--mix-data`` with ``--mix-share``: the mixed-in text gets its own token cache (never --data's folder), and the
    run trains; the two flags only together, the share in (0, 1)."""
    args = _train_args(stories_vocab["hf"], tmp_path, "--tokenizer", STORIES260K_DIR)
    rc, _, err = run_cli(args + ["--mix-data", TINYSTORIES_EXCERPT, "--mix-share", "0.5"], capsys)
    assert rc == 0, err
    assert (tmp_path / "tok" / "tokens.json").is_file() and (tmp_path / "tok" / "mix" / "tokens.json").is_file()
    assert (tmp_path / "run" / "model").is_dir()
    for extra, fragment in ((["--mix-share", "0.5"], "--mix-data and --mix-share go together"),
                            (["--mix-data", TINYSTORIES_EXCERPT, "--mix-share", "1"], "--mix-share must be in (0, 1)"),
                            (["--mix-data", TINYSTORIES_EXCERPT, "--mix-share", "0.5", "--data-mode", "sequential"],
                             "needs --data-mode random")):
        out = tmp_path / "bad"
        rc, _, err = run_cli(_train_args(stories_vocab["hf"], out, "--tokenizer", STORIES260K_DIR, *extra), capsys)
        assert_one_line_error(rc, err, "train", fragment)
        assert not (out / "run").exists()


# -- B: bad input in one line -------------------------------------------------------------------------------------
def test_missing_paths(tmp_path, capsys):
    missing = tmp_path / "nope"
    cases = [
        ("profile", ["profile", missing, "--out", tmp_path / "t.json"]),
        ("route", ["route", missing]),
        ("train", _train_args(missing, tmp_path)),
    ]
    for command, argv in cases:
        rc, _, err = run_cli(argv, capsys)
        assert_one_line_error(rc, err, command, f"'{missing}' does not exist")
    rc, _, err = run_cli(["train", "--model", STORIES260K_DIR, "--data", missing, "--out", tmp_path / "run"], capsys)
    assert_one_line_error(rc, err, "train", "argument --data", f"'{missing}' does not exist")


def test_hf_folder_where_a_flextron_checkpoint_is_needed(stories_vocab, tmp_path, capsys):
    hf = stories_vocab["hf"]
    for command, argv in (("profile", ["profile", hf, "--out", tmp_path / "t.json"]), ("route", ["route", hf])):
        rc, _, err = run_cli(argv, capsys)
        assert_one_line_error(rc, err, command, "is a Hugging Face model folder, not a flextron checkpoint",
                              "flextron train --model HF_DIR", "FlextronModel.from_hf(", ".save_pretrained(OUT)")
    rc, _, err = run_cli(["route", tmp_path], capsys)  # an empty folder
    assert_one_line_error(rc, err, "route", "is not a flextron checkpoint (no flextron.json)")


@pytest.mark.parametrize("argv, fragment", [
    (["--mlp", "1.5"], "argument --mlp: 1.5 is not a fraction in (0, 1]"),
    (["--heads", "0.5,0"], "argument --heads: 0.0 is not a fraction in (0, 1]"),
    (["--eval-widths", "abc"], "argument --eval-widths: 'abc' is not a number"),
    (["--val-fraction", "1"], "argument --val-fraction: 1.0 is not in [0, 1)"),
    (["--alpha", "2"], "argument --alpha: 2.0 is not in [0, 1]"),
    (["--steps", "0"], "argument --steps: 0 is not a positive integer"),
    (["--seq-len", "1"], "argument --seq-len: 1 is not an integer >= 2"),
    (["--distill", "teacher"], "argument --distill: invalid choice: 'teacher'"),
    (["--betas", "0.9"], "argument --betas: '0.9' is not two comma-separated numbers"),
])
def test_train_values_out_of_range(argv, fragment, tmp_path, capsys):
    rc, _, err = run_cli(_train_args(STORIES260K_DIR, tmp_path, *argv), capsys)
    assert_one_line_error(rc, err, "train", fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec, fragment", [
    ("llama-random:64,128,x,2", "must be H,I,HEADS,LAYERS[,KV_HEADS]"),
    ("llama-random:64,128,4", "must be H,I,HEADS,LAYERS[,KV_HEADS]"),
    ("llama-random:64,128,0,2", "must be H,I,HEADS,LAYERS[,KV_HEADS]"),
    ("llama-random:64,128,3,2", "HEADS=3 must divide H=64"),
    ("llama-random:64,128,4,2,3", "KV_HEADS=3 must divide HEADS=4"),
])
def test_profile_malformed_llama_random(spec, fragment, tmp_path, capsys):
    rc, _, err = run_cli(["profile", spec, "--out", tmp_path / "t.json"], capsys)
    assert_one_line_error(rc, err, "profile", "argument model", fragment)
    assert not (tmp_path / "t.json").exists()


def test_other_commands_values_out_of_range(small_vocab, tmp_path, capsys):
    ckpt, table = small_vocab
    cases = [
        ("demo", ["demo", "--widths", "0.5,1.5"], "argument --widths: 1.5 is not a fraction in (0, 1]"),
        ("demo", ["demo", "--batch-size", "0"], "argument --batch-size: 0 is not a positive integer"),
        ("profile", ["profile", ckpt, "--out", tmp_path / "t.json", "--repeats", "0"],
         "argument --repeats: 0 is not a positive integer"),
        ("profile", ["profile", ckpt, "--out", tmp_path], "argument --out: "),
        ("profile", ["profile", ckpt, "--out", tmp_path / "t.json", "--device", "gpu7"], "is not a device"),
        ("route", ["route", ckpt, "--lam", "-1"], "argument --lam: -1.0 is not a number >= 0"),
        ("route", ["route", ckpt, "--tokenizer", tmp_path], "argument --tokenizer: ", "holds no tokenizer"),
        (None, ["prune"], "argument COMMAND: invalid choice: 'prune'"),
    ]
    for command, argv, *fragments in cases:
        rc, _, err = run_cli(argv, capsys)
        assert_one_line_error(rc, err, command, *fragments)


def test_route_without_a_table_and_profile_attach_on_random_model(stories_vocab, tmp_path, capsys):
    rc, _, err = run_cli(["route", stories_vocab["with_tok"]] + ROUTE_FAST, capsys)
    assert_one_line_error(rc, err, "route", "route needs a latency table: pass --table or run `flextron profile")
    rc, _, err = run_cli(["profile", "llama-random:32,64,4,1", "--out", tmp_path / "t.json", "--attach"], capsys)
    assert_one_line_error(rc, err, "profile", "--attach stores the table in a checkpoint")
    other = FlextronModel.from_hf(tiny_model("llama", seed=1), ElasticSpace(mlp=(0.5, 1.0), heads=(0.5, 1.0)))
    rc, _, err = run_cli(["route", stories_vocab["with_tok"], "--table", table_file(other, tmp_path / "o.json")]
                         + ROUTE_FAST, capsys)
    assert_one_line_error(rc, err, "route", "table was profiled for another model")


def test_debug_shows_the_traceback(stories_vocab, capsys):
    from flextron.cli.args import UsageError

    argv = ["route", str(stories_vocab["bare"]), "--table", str(stories_vocab["table"])] + ROUTE_FAST
    with pytest.raises(UsageError, match="holds no tokenizer"):
        main(["--debug"] + argv)
    with pytest.raises(UsageError, match="holds no tokenizer"):
        main(argv + ["--debug"])


def test_bugs_are_not_turned_into_one_liners(monkeypatch, tmp_path):
    """Only input errors are one line: an exception from the work itself keeps its type and traceback."""
    import flextron.latency as latency
    from flextron.cli.args import UsageError

    def broken(*a, **kw):
        raise ValueError("internal")

    monkeypatch.setattr(latency, "profile", broken)
    with pytest.raises(ValueError, match="internal") as info:
        main(["profile", "llama-random:32,64,4,1", "--out", str(tmp_path / "t.json"), "--device", "cpu"])
    assert not isinstance(info.value, UsageError)


def test_command_line_process_prints_one_line(stories_vocab, tmp_path):
    """The real process: stderr is one line, exit status 2, no traceback; --debug prints the traceback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    argv = [sys.executable, "-m", "flextron", "route", str(stories_vocab["bare"]), "--table",
            str(stories_vocab["table"])]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "Traceback" not in p.stderr
    assert p.stderr.startswith("flextron route: error: ")
    p = subprocess.run(argv[:3] + ["--debug"] + argv[3:], capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 1 and "Traceback" in p.stderr and "UsageError" in p.stderr


def test_every_option_documents_its_values_and_default():
    from flextron.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"demo", "train", "profile", "route", "generate", "sample-corpus"}
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        assert p.description, name
        assert helps.get(name), name
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help != argparse.SUPPRESS, (name, a.dest)
            if not (a.default is None or a.default is False or a.default == argparse.SUPPRESS) or a.choices:
                assert "default" in a.help, (name, a.dest, a.help)
        assert "%(" not in p.format_help()
    assert "--debug" in parser.format_help()
