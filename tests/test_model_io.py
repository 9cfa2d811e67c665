"""Checkpoints: bit-exact round trips (full, ranked, slim heterogeneous) and atomic writes."""

from __future__ import annotations

import os

import pytest
import torch

from flextron import FlextronModel, Subnet
from flextron import io as fio

from .model_utils import rel, tiny_model, tokens


def _same_model(a: FlextronModel, b: FlextronModel) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for kind in ("mlp", "heads"):
        assert all(torch.equal(x, y) for x, y in zip(a.permutation[kind], b.permutation[kind]))
        if a.importance is not None:
            assert all(torch.equal(x, y) for x, y in zip(a.importance[kind], b.importance[kind]))
    assert a.subnet == b.subnet and a.space == b.space


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "qwen2"])
def test_round_trip_bit_exact(family, tmp_path):
    fm = FlextronModel.from_hf(tiny_model(family))
    fm.rank([tokens()])
    fm.set_subnet(fm.uniform_subnet(mlp=0.5, heads=0.5))
    fm.save_pretrained(tmp_path / "ckpt")
    back = FlextronModel.from_pretrained(tmp_path / "ckpt")
    _same_model(fm, back)
    x = tokens(seed=5)
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, fm(input_ids=x).logits)


def test_slim_heterogeneous_round_trip(tmp_path):
    fm = FlextronModel.from_hf(tiny_model("mistral"))
    fm.rank([tokens()])
    subnet = Subnet(mlp=[fm.mlp_choices(0)[2], fm.mlp_choices(1)[-1]], heads=[6, 3])
    fm.set_subnet(subnet)
    slim = fm.extract(subnet)
    slim.save_pretrained(tmp_path / "slim")
    back = FlextronModel.from_pretrained(tmp_path / "slim")
    _same_model(slim, back)
    assert [m.full_width for m in back.mlp_blocks] == list(subnet.mlp)
    assert [a.num_heads for a in back.attention_blocks] == list(subnet.heads)
    x = tokens(seed=6)
    with torch.no_grad():
        assert rel(back(input_ids=x).logits, fm(input_ids=x).logits) < 1e-5


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    fm = FlextronModel.from_hf(tiny_model("llama"))
    path = tmp_path / "ckpt"
    fm.save_pretrained(path)
    before = sorted(os.listdir(path))
    fm.rank([tokens()])

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("interrupted mid-save")

    monkeypatch.setattr(fio, "save_file", boom)  # dies after the weights, before the state and metadata
    with pytest.raises(KeyboardInterrupt):
        fm.save_pretrained(path, overwrite=True)
    assert sorted(os.listdir(path)) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left behind
    assert FlextronModel.from_pretrained(path).importance is None  # still the old, unranked checkpoint


def test_load_rejects_non_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="path"):
        FlextronModel.from_pretrained(tmp_path)


def test_uniform_subnet_with_heads_not_dividing_hidden_exports_slim(tmp_path):
    """6 heads of 8 on hidden 48 kept as 5: no transformers config expresses it, so the export is a slim flextron
    model that saves, loads and computes the subnet."""
    fm = FlextronModel.from_hf(tiny_model("llama"))
    subnet = Subnet(mlp=[72, 72], heads=[5, 5])
    fm.set_subnet(subnet)
    out = fm.extract(subnet)
    assert isinstance(out, FlextronModel)
    out.save_pretrained(tmp_path / "slim")
    back = FlextronModel.from_pretrained(tmp_path / "slim")
    x = tokens(seed=7)
    with torch.no_grad():
        assert rel(back(input_ids=x).logits, fm(input_ids=x).logits) < 1e-5
