"""FlextronModel on tiny random models of every family: full width, sub-networks, ranking, generate, export."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from flextron import FlextronModel, Subnet
from flextron.ranking import random_order

from .model_utils import FAMILIES, masked_reference, rel, tiny_model, tokens

TOL = 1e-5


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def _pair(family):
    """A tiny HF model of the family and a FlextronModel made from a copy of it."""
    orig = tiny_model(family)
    return orig, FlextronModel.from_hf(copy.deepcopy(orig))


def _at_half(fm):
    subnet = fm.uniform_subnet(mlp=0.5, heads=0.5)
    fm.set_subnet(subnet)
    return subnet


def _plain(orig, fm):
    """A plain HF model with fm's (possibly permuted) weights: state dicts map 1:1."""
    plain = copy.deepcopy(orig)
    plain.load_state_dict(fm.model.state_dict())
    return plain


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def test_full_width_and_state_dict(family):
    orig, fm = _pair(family)
    x = tokens()
    assert rel(_logits(fm, x), _logits(orig, x)) < TOL
    sd, ref = fm.model.state_dict(), orig.state_dict()
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_subnet_matches_masked_reference(family):
    orig, fm = _pair(family)
    x = tokens()
    g = fm.attention_blocks[0].group_size
    # heterogeneous: a different width and head count in each layer, widths off the tile grid
    subnet = Subnet(mlp=[fm.mlp_choices(0)[1], fm.mlp_choices(1)[-2]], heads=[g, fm.head_choices(1)[-2]])
    fm.set_subnet(subnet)
    assert rel(_logits(fm, x), _logits(masked_reference(orig, subnet), x)) < TOL
    fm.set_subnet(None)
    assert rel(_logits(fm, x), _logits(orig, x)) < TOL


def test_rank_preserves_function_and_orders_prefixes(family):
    orig, fm = _pair(family)
    x = tokens()
    before = _logits(fm, x)
    fm.rank([x, tokens(seed=2)])
    assert rel(_logits(fm, x), before) < TOL
    for i in range(fm.num_layers):
        s = fm.importance["mlp"][i]
        assert torch.all(s[:-1] >= s[1:])
        g = fm.attention_blocks[i].group_size
        group_scores = fm.importance["heads"][i].view(-1, g).sum(1)
        assert torch.all(group_scores[:-1] >= group_scores[1:])
        # the permutation records where each weight row came from
        mlp = fm.mlp_blocks[i]
        w0 = orig.state_dict()
        key = f"transformer.h.{i}.mlp.c_fc.weight" if family == "gpt2" else f"model.layers.{i}.mlp.up_proj.weight"
        got = mlp.up_weight()
        want = w0[key].t() if family == "gpt2" else w0[key]
        assert torch.equal(got, want[fm.permutation["mlp"][i]])
    # a random permutation on top is function-preserving too, and composes
    fm.permute(**random_order(fm, torch.Generator().manual_seed(0)))
    assert rel(_logits(fm, x), before) < TOL
    # and a sub-network of the permuted model is the masked reference of the permuted weights
    subnet = fm.uniform_subnet(mlp=0.5, heads=0.5)
    fm.set_subnet(subnet)
    assert rel(_logits(fm, x), _logits(masked_reference(_plain(orig, fm), subnet), x)) < TOL


def test_generate_with_kv_cache_at_subnet(family):
    orig, fm = _pair(family)
    subnet = _at_half(fm)
    x = tokens(batch=1, seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = fm.generate(x, **kw)
    uncached = fm.generate(x, use_cache=False, **kw)
    ref = masked_reference(orig, subnet).generate(x, **kw)
    assert torch.equal(cached, uncached) and torch.equal(cached, ref)
    # only the kept KV heads are cached
    with torch.no_grad():
        out = fm(input_ids=x, use_cache=True)
    a = fm.attention_blocks[0]
    assert out.past_key_values.layers[0].keys.shape[1] == subnet.heads[0] // a.group_size


def test_extract_uniform_is_plain_transformers_model(family, tmp_path):
    orig, fm = _pair(family)
    fm.rank([tokens()])
    x = tokens(seed=3)
    heads = 1.0 if family == "gpt2" else 0.5  # GPT-2 can express MLP-only shrinking (see flextron.export)
    subnet = fm.uniform_subnet(mlp=0.5, heads=heads)
    fm.set_subnet(subnet)
    want = _logits(fm, x)
    small = fm.extract(subnet)
    assert type(small) is type(orig)
    assert rel(_logits(small, x), want) < TOL
    small.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no flextron involved
    assert rel(_logits(loaded.eval(), x), want) < TOL
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in orig.parameters())


def test_extract_heterogeneous_is_slim_flextron_model(family):
    orig, fm = _pair(family)
    g = fm.attention_blocks[0].group_size
    subnet = Subnet(mlp=[fm.mlp_choices(0)[0], fm.mlp_choices(1)[-1]], heads=[fm.head_choices(0)[-1], g])
    fm.set_subnet(subnet)
    x = tokens()
    slim = fm.extract(subnet)
    assert isinstance(slim, FlextronModel) and slim.subnet is None
    assert rel(_logits(slim, x), _logits(fm, x)) < TOL
    assert slim.num_parameters() == fm.num_parameters(subnet)
    assert sum(p.numel() for p in slim.model.parameters()) < sum(p.numel() for p in orig.parameters())


def test_gpt2_fewer_heads_exports_slim():
    fm = FlextronModel.from_hf(tiny_model("gpt2"))
    subnet = fm.uniform_subnet(mlp=1.0, heads=0.5)
    assert isinstance(fm.extract(subnet), FlextronModel)


def test_per_token_widths_hook(family):
    fm = FlextronModel.from_hf(tiny_model(family))
    mlp = fm.mlp_blocks[0]
    x = torch.randn(2, 5, 48)
    w = fm.mlp_choices(0)
    widths = torch.tensor([[w[0]] * 5, [w[-1]] * 5])
    y = mlp(x, widths=widths)
    with torch.no_grad():
        mlp.width = w[0]
        y0 = mlp(x[:1])
        mlp.width = w[-1]
        y1 = mlp(x[1:])
    assert rel(y.detach(), torch.cat([y0, y1])) < TOL


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_padding_mask_at_subnet(family):
    orig, fm = _pair(family)
    subnet = _at_half(fm)
    x = tokens(batch=2, seq=10)
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding in the first sequence
    with torch.no_grad():
        got = fm(input_ids=x, attention_mask=mask).logits
        want = masked_reference(orig, subnet)(input_ids=x, attention_mask=mask).logits
    keep = mask.bool()
    assert rel(got[keep], want[keep]) < TOL
    fm.rank([{"input_ids": x, "attention_mask": mask}])  # dict batches work for ranking
