"""Bad input: each error path raises ValueError/TypeError naming the argument."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from flextron import ElasticSpace, FlextronModel, Subnet

from .model_utils import tiny_model


@pytest.fixture(scope="module")
def fm():
    return FlextronModel.from_hf(tiny_model("llama_gqa"))  # 6 query heads in 3 KV groups of 2


def test_wrong_number_of_layers(fm):
    with pytest.raises(ValueError, match=r"subnet\.mlp must have 2 entries"):
        fm.set_subnet(Subnet(mlp=[72], heads=[6, 6]))
    with pytest.raises(ValueError, match=r"subnet\.heads must have 2 entries"):
        fm.set_subnet(Subnet(mlp=[72, 72], heads=[6, 6, 6]))


def test_width_not_in_space(fm):
    with pytest.raises(ValueError, match=r"subnet\.mlp\[1\] = 37 is not an MLP width"):
        fm.set_subnet(Subnet(mlp=[72, 37], heads=[6, 6]))
    restricted = FlextronModel.from_hf(tiny_model("llama"), ElasticSpace(mlp=[0.5, 1.0], heads=[0.5, 1.0]))
    with pytest.raises(ValueError, match=r"subnet\.heads\[0\] = 2 is not a head count"):
        restricted.set_subnet(Subnet(mlp=[72, 72], heads=[2, 6]))


def test_heads_splitting_a_kv_group(fm):
    with pytest.raises(ValueError, match=r"subnet\.heads\[0\] = 3 splits a KV group"):
        fm.set_subnet(Subnet(mlp=[72, 72], heads=[3, 6]))


def test_head_permutation_splitting_a_kv_group(fm):
    perm = torch.tensor([1, 2, 0, 3, 4, 5])
    with pytest.raises(ValueError, match=r"heads\[0\] splits a KV group"):
        fm.permute(heads=[perm, torch.arange(6)])


def test_unsupported_model():
    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=50))
    expected = r"model must be one of .*GPT2LMHeadModel.*LlamaForCausalLM.*got BertForMaskedLM"
    with pytest.raises(TypeError, match=expected):
        FlextronModel.from_hf(bert)


def test_bad_subnet_and_space_types(fm):
    with pytest.raises(TypeError, match="subnet must be a Subnet"):
        fm.set_subnet([72, 72])
    with pytest.raises(TypeError, match=r"subnet\.mlp\[0\] must be an int"):
        Subnet(mlp=[0.5, 72], heads=[6, 6])
    with pytest.raises(ValueError, match=r"space\.mlp\[0\] as a fraction"):
        ElasticSpace(mlp=[1.5]).mlp_choices(72)
    with pytest.raises(ValueError, match="mlp must be a fraction"):
        fm.uniform_subnet(mlp=0.0)
