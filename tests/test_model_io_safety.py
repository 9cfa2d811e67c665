"""Checkpoints: what save_pretrained may replace at its path, the tokenizer stored with the model, and how
load_pretrained builds the model (eval mode, no random initialisation, buffers as saved)."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest
import torch

from flextron import FlextronModel, Subnet
from flextron import io as fio
from flextron.data import load_stories260k

from .model_utils import tiny_model, tokens

TEXT = "Once upon a time, there was a little girl named Lily. She loved to play outside."


def _snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative path -> bytes)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _logits(fm: FlextronModel, seed: int = 5) -> torch.Tensor:
    with torch.no_grad():
        return fm(input_ids=tokens(seed=seed)).logits


def _meta(d: Path) -> dict:
    return json.loads((d / fio.META).read_text())


def _user_folder(d: Path) -> None:
    d.mkdir()
    (d / "notes.txt").write_text("my experiment notes\n")
    (d / "sub").mkdir()
    (d / "sub" / "data.txt").write_text("results\n")


# -- what save_pretrained may replace -------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_save_refuses_an_existing_file(tmp_path, overwrite):
    target = tmp_path / "model.bin"
    target.write_bytes(b"the user's file")
    fm = FlextronModel.from_hf(tiny_model("llama"))
    with pytest.raises(FileExistsError, match=re.escape(repr(str(target)))):
        fm.save_pretrained(target, overwrite=overwrite)
    assert target.is_file() and target.read_bytes() == b"the user's file"
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]  # no temporary folder left behind


@pytest.mark.parametrize("overwrite", [False, True])
def test_save_refuses_a_non_empty_folder_that_is_not_a_checkpoint(tmp_path, overwrite):
    """A user's folder (notes, a tokenizer) and a plain Hugging Face model folder are never written into."""
    user = tmp_path / "user"
    _user_folder(user)
    _, tok = load_stories260k()
    tok.save_pretrained(user)
    hf = tmp_path / "hf"
    tiny_model("llama").save_pretrained(hf)
    before = {d: _snapshot(d) for d in (user, hf)}
    fm = FlextronModel.from_hf(tiny_model("llama"))
    for d in (user, hf):
        with pytest.raises(FileExistsError, match=re.escape(repr(str(d))) + ".*not empty.*no flextron checkpoint"):
            fm.save_pretrained(d, overwrite=overwrite)
        assert _snapshot(d) == before[d]
    assert sorted(os.listdir(tmp_path)) == ["hf", "user"]


def test_save_into_an_empty_folder_writes_into_it(tmp_path):
    """The folder itself stays (same inode); a symbolic link to an empty folder stays a link."""
    fm = FlextronModel.from_hf(tiny_model("llama"))
    empty = tmp_path / "empty"
    empty.mkdir()
    inode = empty.stat().st_ino
    fm.save_pretrained(empty)
    assert empty.stat().st_ino == inode
    assert torch.equal(_logits(FlextronModel.from_pretrained(empty)), _logits(fm))
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real, target_is_directory=True)
    fm.save_pretrained(link)
    assert link.is_symlink() and (real / fio.META).is_file()
    assert sorted(os.listdir(real)) == _meta(real)["files"]
    assert torch.equal(_logits(FlextronModel.from_pretrained(link)), _logits(fm))


def test_existing_checkpoint_needs_overwrite(tmp_path):
    fm = FlextronModel.from_hf(tiny_model("llama"))
    path = tmp_path / "ckpt"
    fm.save_pretrained(path)
    before = _snapshot(path)
    fm.rank([tokens()])
    with pytest.raises(FileExistsError, match=re.escape(repr(str(path))) + ".*overwrite=True"):
        fm.save_pretrained(path)
    assert _snapshot(path) == before
    fm.save_pretrained(path, overwrite=True)
    assert FlextronModel.from_pretrained(path).importance is not None


def test_saving_back_into_the_loaded_folder_keeps_other_files(tmp_path):
    d = tmp_path / "ckpt"
    FlextronModel.from_hf(tiny_model("llama")).save_pretrained(d)
    (d / "notes.txt").write_text("my experiment notes\n")
    (d / "sub").mkdir()
    (d / "sub" / "data.txt").write_text("results\n")
    fm = FlextronModel.from_pretrained(d)
    fm.rank([tokens()])
    fm.set_subnet(fm.uniform_subnet(mlp=0.5, heads=0.5))
    fm.save_pretrained(d, overwrite=True)
    assert (d / "notes.txt").read_text() == "my experiment notes\n"
    assert (d / "sub" / "data.txt").read_text() == "results\n"
    assert sorted(os.listdir(d)) == sorted(_meta(d)["files"] + ["notes.txt", "sub"])  # no temporary files left
    back = FlextronModel.from_pretrained(d)
    assert back.subnet == fm.subnet
    assert all(torch.equal(a, b) for a, b in zip(back.importance["mlp"], fm.importance["mlp"]))
    assert torch.equal(_logits(back), _logits(fm))


def test_overwrite_removes_the_previous_checkpoints_files_only(tmp_path):
    """A checkpoint saved with a tokenizer, overwritten by one without: the old tokenizer files go, the user's stay."""
    model, tok = load_stories260k()
    fm = FlextronModel.from_hf(model, tokenizer=tok)
    d = tmp_path / "ckpt"
    fm.save_pretrained(d)
    assert _meta(d)["tokenizer"] is True and (d / "tokenizer_config.json").is_file()
    (d / "notes.txt").write_text("keep me\n")
    fm.tokenizer = None
    fm.save_pretrained(d, overwrite=True)
    assert _meta(d)["tokenizer"] is False
    assert sorted(os.listdir(d)) == sorted(_meta(d)["files"] + ["notes.txt"])
    assert not (d / "tokenizer_config.json").exists() and not (d / "tokenizer.json").exists()
    assert FlextronModel.from_pretrained(d).tokenizer is None


def test_overwrite_installs_flextron_json_last_and_an_interrupted_one_is_detected(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    fm = FlextronModel.from_hf(tiny_model("llama"))
    fm.save_pretrained(d)
    (d / "notes.txt").write_text("keep me\n")
    fm.rank([tokens()])
    replace, moved = os.replace, []

    def spy(src, dst):
        moved.append((Path(dst).name, (d / fio.META).exists()))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    fm.save_pretrained(d, overwrite=True)
    monkeypatch.undo()
    assert moved[-1] == (fio.META, False)  # flextron.json last, and absent while the other files were moved
    assert all(not present for _, present in moved)
    assert sorted(m for m, _ in moved) == _meta(d)["files"]

    calls = []

    def dies_second_time(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted while moving files into place")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_second_time)
    with pytest.raises(KeyboardInterrupt):
        fm.save_pretrained(d, overwrite=True)
    monkeypatch.undo()
    assert not (d / fio.META).exists()
    with pytest.raises(ValueError, match=re.escape(repr(str(d))) + ".*interrupted.*overwrite=True"):
        FlextronModel.from_pretrained(d)
    with pytest.raises(FileExistsError, match="interrupted.*overwrite=True"):
        fm.save_pretrained(d)
    fm.save_pretrained(d, overwrite=True)
    assert sorted(os.listdir(d)) == sorted(_meta(d)["files"] + ["notes.txt"])
    assert (d / "notes.txt").read_text() == "keep me\n"
    back = FlextronModel.from_pretrained(d)
    assert back.importance is not None and torch.equal(_logits(back), _logits(fm))


# -- how load_pretrained builds the model ---------------------------------------------------------------------------
def test_load_returns_eval_mode(tmp_path):
    fm = FlextronModel.from_hf(tiny_model("mistral"))
    fm.rank([tokens()])
    slim = fm.extract(Subnet(mlp=[fm.mlp_choices(0)[2], fm.mlp_choices(1)[-1]], heads=[6, 3]))
    for name, m in (("full", fm), ("slim", slim)):
        m.train()
        m.save_pretrained(tmp_path / name)
        back = FlextronModel.from_pretrained(tmp_path / name)
        assert back.training is False
        assert [n for n, sub in back.named_modules() if sub.training] == []


def test_load_does_not_randomly_initialise_weights(tmp_path, monkeypatch):
    """The model is built with its parameters on the meta device: no initialiser touches a real tensor."""
    fm = FlextronModel.from_hf(tiny_model("llama_gqa"))
    fm.save_pretrained(tmp_path / "full")
    fm.extract(Subnet(mlp=[72, 48], heads=[6, 4])).save_pretrained(tmp_path / "slim")
    touched = []
    for method in ("normal_", "uniform_", "zero_", "fill_"):
        original = getattr(torch.Tensor, method)

        def spy(t, *args, _original=original, _name=method, **kwargs):
            if t.device.type != "meta" and t.numel() > 1:
                touched.append((_name, tuple(t.shape)))
            return _original(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, spy)
    for name in ("full", "slim"):
        back = FlextronModel.from_pretrained(tmp_path / name)
        assert touched == [], name
        assert not any(t.is_meta for t in [*back.model.parameters(), *back.model.buffers()])


def _bf16_params_only(model):
    """bf16 weights, rotary frequencies left in float32 (as ``from_pretrained(dtype=torch.bfloat16)`` gives)."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


@pytest.mark.parametrize("variant", ["llama_gqa", "gpt2", "qwen2", "bf16", "bf16_params_only", "slim"])
def test_logits_and_buffers_exact_after_load(tmp_path, variant):
    """Buffers the weights file does not hold (rotary inv_freq) come back with the values and dtypes they had."""
    if variant == "bf16":
        model = tiny_model("llama").to(torch.bfloat16)
    elif variant == "bf16_params_only":
        model = _bf16_params_only(tiny_model("llama"))
    else:
        model = tiny_model("mistral" if variant == "slim" else variant)
    fm = FlextronModel.from_hf(model)
    if variant == "slim":
        fm = fm.extract(Subnet(mlp=[fm.mlp_choices(0)[1], fm.mlp_choices(1)[-1]], heads=[3, 6]))
    fm.save_pretrained(tmp_path / "ckpt")
    back = FlextronModel.from_pretrained(tmp_path / "ckpt")
    bufs, back_bufs = dict(fm.model.named_buffers()), dict(back.model.named_buffers())
    assert bufs.keys() == back_bufs.keys()
    for k, b in bufs.items():
        assert back_bufs[k].device.type == "cpu" and back_bufs[k].dtype == b.dtype and torch.equal(back_bufs[k], b), k
    for (n, p), (m, q) in zip(fm.model.named_parameters(), back.model.named_parameters()):
        assert n == m and q.dtype == p.dtype and torch.equal(q, p), n
    assert torch.equal(_logits(back), _logits(fm))
    if variant == "llama_gqa":  # tied: one Parameter, as before saving
        assert back.model.lm_head.weight is back.model.model.embed_tokens.weight


def test_generation_config_round_trip(tmp_path):
    fm = FlextronModel.from_hf(tiny_model("llama"))
    fm.model.generation_config.max_new_tokens = 7
    fm.save_pretrained(tmp_path / "ckpt")
    assert FlextronModel.from_pretrained(tmp_path / "ckpt").model.generation_config.max_new_tokens == 7


# -- tokenizer ------------------------------------------------------------------------------------------------------
def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    model, tok = load_stories260k()
    fm = FlextronModel.from_hf(model, tokenizer=tok)
    fm.save_pretrained(tmp_path / "own")  # fm.tokenizer
    FlextronModel.from_hf(load_stories260k()[0]).save_pretrained(tmp_path / "arg", tokenizer=tok)  # tokenizer=
    ids = tok(TEXT)["input_ids"]
    for name in ("own", "arg"):
        d = tmp_path / name
        assert _meta(d)["tokenizer"] is True
        assert AutoTokenizer.from_pretrained(d)(TEXT)["input_ids"] == ids
        back = FlextronModel.from_pretrained(d)
        assert back.tokenizer is not None and len(back.tokenizer) == len(tok)
        assert back.tokenizer(TEXT)["input_ids"] == ids
        assert back.tokenizer.decode(ids) == tok.decode(ids)
        assert (back.tokenizer.bos_token_id, back.tokenizer.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
        assert torch.equal(_logits(back), _logits(fm))


def test_checkpoint_without_tokenizer(tmp_path):
    FlextronModel.from_hf(tiny_model("llama")).save_pretrained(tmp_path / "ckpt")
    assert _meta(tmp_path / "ckpt")["tokenizer"] is False
    assert not any("tokenizer" in f for f in os.listdir(tmp_path / "ckpt"))
    assert FlextronModel.from_pretrained(tmp_path / "ckpt").tokenizer is None


def test_tokenizer_that_does_not_fit_the_embedding_is_refused(tmp_path):
    _, tok = load_stories260k()  # 512 tokens; the tiny model embeds 96
    fm = FlextronModel.from_hf(tiny_model("llama"))
    with pytest.raises(ValueError, match="tokenizer has 512 tokens.* 96 rows"):
        fm.save_pretrained(tmp_path / "a", tokenizer=tok)
    fm.tokenizer = tok
    with pytest.raises(ValueError, match="tokenizer"):
        fm.save_pretrained(tmp_path / "b")
    assert os.listdir(tmp_path) == []


def test_meta_construction_is_confined_to_the_loading_thread():
    """Another thread building modules while a checkpoint loads gets real parameters; the patch is undone after."""
    register = torch.nn.Module.register_parameter
    other_may_build, other_built = threading.Event(), threading.Event()
    built = {}

    def other():
        other_may_build.wait(10)
        built["other"] = torch.nn.Linear(2, 2)
        other_built.set()

    t = threading.Thread(target=other)
    t.start()
    with fio._parameters_on_meta():
        built["loading"] = torch.nn.Linear(2, 2)
        other_may_build.set()
        assert other_built.wait(10)
    t.join()
    assert built["loading"].weight.is_meta and not built["other"].weight.is_meta
    assert torch.nn.Module.register_parameter is register
    assert not torch.nn.Linear(2, 2).weight.is_meta
