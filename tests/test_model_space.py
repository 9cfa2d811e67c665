"""The space is checked when it is made, and the nearest-choice rule of ``uniform_subnet`` shows in the repr."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from flextron import ElasticSpace, FlextronModel, Subnet

from .model_utils import VOCAB, tiny_model


@pytest.mark.parametrize("kw, error, match", [
    (dict(mlp=[1.5]), ValueError, r"space\.mlp\[0\] as a fraction must be in \(0, 1\], got 1.5"),
    (dict(mlp=[0.5, 0.0]), ValueError, r"space\.mlp\[1\] as a fraction"),
    (dict(heads=[float("nan")]), ValueError, r"space\.heads\[0\] as a fraction"),
    (dict(heads=[0]), ValueError, r"space\.heads\[0\] as a count must be >= 1"),
    (dict(mlp=["half"]), TypeError, r"space\.mlp\[0\] must be a fraction .* or a count"),
    (dict(mlp=[True]), TypeError, r"space\.mlp\[0\]"),
    (dict(mlp=0.5), TypeError, r"space\.mlp must be a sequence"),
    (dict(mlp="0.5"), TypeError, r"space\.mlp must be a sequence"),
    (dict(heads=[]), ValueError, r"space\.heads must not be empty"),
])
def test_space_checked_on_construction(kw, error, match):
    with pytest.raises(error, match=match):
        ElasticSpace(**kw)


def test_space_that_does_not_fit_the_model_fails_at_conversion():
    # counts above a layer's size, or off the KV-group grid, can only be checked against a model: at from_hf
    with pytest.raises(ValueError, match=r"space\.mlp\[0\] as a count must be in \[1, 72\], got 100"):
        FlextronModel.from_hf(tiny_model("llama"), ElasticSpace(mlp=[100]))
    with pytest.raises(ValueError, match=r"space\.heads\[0\] = 3 must be a multiple of 2"):
        FlextronModel.from_hf(tiny_model("llama_gqa"), ElasticSpace(heads=[3]))


def test_from_hf_given_a_path_names_from_pretrained(tmp_path):
    with pytest.raises(TypeError, match=r"AutoModelForCausalLM\.from_pretrained\('some/path'\)"):
        FlextronModel.from_hf("some/path")
    with pytest.raises(TypeError, match=r"AutoModelForCausalLM\.from_pretrained"):
        FlextronModel.from_hf(tmp_path)


def test_nearest_choice_is_visible_in_the_repr():
    # 9 query heads in 3 KV groups: head choices 3, 6, 9; half of 9 is 4.5, as near 6 as 3: ties go to the larger
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=72, intermediate_size=96, vocab_size=VOCAB,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=8)
    fm = FlextronModel.from_hf(LlamaForCausalLM(cfg).eval())
    subnet = fm.uniform_subnet(mlp=0.5, heads=0.5)
    assert subnet.heads == (6, 6) and subnet.mlp == (48, 48)
    assert repr(subnet) == "Subnet(mlp=[48/96 (50%)] * 2, heads=[6/9 (67%)] * 2)"
    fm.set_subnet(subnet)
    assert repr(fm.subnet) == repr(subnet)
    hetero = Subnet(mlp=[48, 96], heads=[3, 9])
    fm.set_subnet(hetero)
    assert repr(fm.subnet) == "Subnet(mlp=[48/96 (50%), 96/96 (100%)], heads=[3/9 (33%), 9/9 (100%)])"
    assert repr(hetero) == "Subnet(mlp=[48, 96], heads=[3, 9])"  # without a model: counts only
    assert hetero == fm.subnet  # the full sizes never take part in equality


def test_choices_tell_a_count_from_a_fraction():
    """The choices are remembered per space; ``1`` (one head or neuron) and ``1.0`` (all of them) are equal as
    numbers and must still resolve apart, in either order."""
    assert ElasticSpace(heads=(1,)).head_choices(8, 1) == [1, 8]
    assert ElasticSpace(heads=(1.0,)).head_choices(8, 1) == [8]
    assert ElasticSpace(heads=(1,)).head_choices(8, 1) == [1, 8]
    assert ElasticSpace(mlp=(0.5, 64), mlp_granularity=32).mlp_choices(256) == [64, 128, 256]
    choices = ElasticSpace(mlp=(0.5,), mlp_granularity=32).mlp_choices(256)
    choices.append(7)  # a caller's list is its own
    assert ElasticSpace(mlp=(0.5,), mlp_granularity=32).mlp_choices(256) == [128, 256]
