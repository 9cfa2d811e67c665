"""Train/eval mode through conversion, ranking, export and loading, with dropout as the families ship it."""

from __future__ import annotations

import copy

import pytest
import torch

from flextron import FlextronModel

from .model_utils import FAMILIES, rel, tiny_model, tokens

TOL = 1e-5


def _modes(module: torch.nn.Module) -> set[bool]:
    return {m.training for m in module.modules()}


@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_keeps_eval_mode(family):
    orig = tiny_model(family)  # eval mode, as from_pretrained returns it
    fm = FlextronModel.from_hf(copy.deepcopy(orig))
    assert fm.training is False and _modes(fm) == {False}
    x = tokens()
    with torch.no_grad():
        a, b, want = fm(input_ids=x).logits, fm(input_ids=x).logits, orig(input_ids=x).logits
    assert torch.equal(a, b)  # no dropout: the same logits on every call
    assert rel(a, want) < TOL
    fm.rank([x])  # ranking runs in the model's mode and leaves it as it was
    assert _modes(fm) == {False}
    with torch.no_grad():
        assert rel(fm(input_ids=x).logits, want) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_keeps_train_mode(family):
    orig = tiny_model(family).train()
    fm = FlextronModel.from_hf(copy.deepcopy(orig))
    assert fm.training is True and _modes(fm) == {True}
    x = tokens()
    if family == "gpt2":  # GPT-2 ships with dropout 0.1: in train mode it applies, as in the HF model
        with torch.no_grad():
            assert not torch.equal(fm(input_ids=x).logits, fm(input_ids=x).logits)
            assert not torch.equal(orig(input_ids=x).logits, orig(input_ids=x).logits)
    fm.eval()
    with torch.no_grad():
        assert rel(fm(input_ids=x).logits, orig.eval()(input_ids=x).logits) < TOL


def test_mixed_modes_are_kept_per_block():
    orig = tiny_model("gpt2")
    orig.transformer.h[1].train()  # a user's choice: one block trains, the rest does not
    fm = FlextronModel.from_hf(orig)
    assert fm.layers[0].attn.training is False and fm.layers[0].mlp.training is False
    assert fm.layers[1].attn.training is True and fm.layers[1].mlp.training is True
    assert fm.layers[1].attn.attn_dropout.training is True


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("uniform", [True, False])
def test_extract_returns_eval_mode(family, uniform):
    fm = FlextronModel.from_hf(tiny_model(family)).train()
    g = fm.attention_blocks[0].group_size
    if uniform:
        subnet = fm.uniform_subnet(mlp=0.5, heads=1.0 if family == "gpt2" else 0.5)
    else:
        subnet = type(fm.full_subnet())(mlp=[fm.mlp_choices(0)[0], fm.mlp_choices(1)[-1]],
                                        heads=[fm.head_choices(0)[-1], g])
    small = fm.extract(subnet)
    assert _modes(small) == {False}
    assert fm.training is True and _modes(fm) == {True}  # the source keeps its own mode
    x = tokens()
    fm.eval().set_subnet(subnet)
    with torch.no_grad():
        assert rel(small(input_ids=x).logits, fm(input_ids=x).logits) < TOL
