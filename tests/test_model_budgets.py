"""Per-request budgets: every sequence of one batch runs its own sub-network, from prefill through decode.

The reference is each sequence generated alone with its sub-network made active (``set_subnet``), with the same
cache: the batched call must give the same greedy tokens.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flextron.attention
import flextron.layers
import flextron.mlp
from flextron import FlextronModel, Subnet
from flextron.budget import attach_router
from flextron.router import StaticRouter
from flextron_kernels import cpu_reference

from .model_utils import VOCAB, tiny_model, tokens
from .utils import DEVICE

NEW = 6


def _subnets(fm):
    g = [a.group_size for a in fm.attention_blocks]
    hetero = Subnet(mlp=[fm.mlp_choices(0)[0], fm.mlp_choices(1)[-1]], heads=[fm.head_choices(0)[-1], g[1]])
    return [fm.uniform_subnet(mlp=0.5, heads=0.5), fm.full_subnet(), hetero, fm.uniform_subnet(mlp=0.25, heads=0.25)]


def _generate(fm, x, cache, **kw):
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(x), **kw)
    if cache is not None:
        kw["cache_implementation"] = cache
    return fm.generate(x, **kw)


def _alone(fm, x, subnets, cache):
    rows = []
    for b, s in enumerate(subnets):
        fm.set_subnet(s)
        rows.append(_generate(fm, x[b:b + 1], cache))
    fm.set_subnet(None)
    return torch.cat(rows)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "qwen2", "mistral"])
def test_each_sequence_runs_its_own_subnet(family, cache):
    fm = FlextronModel.from_hf(tiny_model(family))
    subnets = _subnets(fm)
    x = tokens(batch=len(subnets), seq=7, seed=3)
    with cpu_reference():
        got = _generate(fm, x, cache, budgets=subnets)
        want = _alone(fm, x, subnets, cache)
    assert torch.equal(got, want)
    assert fm.subnet is None and all(m.sequence_widths is None for m in fm.mlp_blocks)  # nothing left behind
    assert all(a.head_budgets is None for a in fm.attention_blocks)


def test_forward_logits_and_the_active_subnet_come_back():
    fm = FlextronModel.from_hf(tiny_model("llama_gqa"))
    subnets = _subnets(fm)
    x = tokens(batch=len(subnets), seq=9)
    active = fm.uniform_subnet(mlp=0.75, heads=1.0)
    fm.set_subnet(active)
    with cpu_reference(), torch.no_grad():
        got = fm(input_ids=x, budgets=subnets).logits
        assert fm.subnet == active
        for b, s in enumerate(subnets):
            fm.set_subnet(s)
            want = fm(input_ids=x[b:b + 1]).logits
            assert ((got[b:b + 1] - want).norm() / want.norm()).item() < 1e-5
    # the cache of a layer holds the batch's largest KV head count
    fm.set_subnet(None)
    with cpu_reference(), torch.no_grad():
        out = fm(input_ids=x, budgets=subnets, use_cache=True)
    for i, layer in enumerate(out.past_key_values.layers):
        kv = max(s.heads[i] for s in subnets) // fm.attention_blocks[i].group_size
        assert layer.keys.shape[1] == kv


def test_fractions_go_through_the_static_router_else_uniform():
    fm = FlextronModel.from_hf(tiny_model("llama_gqa"))
    assert fm.resolve_budgets([0.5, 1.0]) == [fm.uniform_subnet(mlp=0.5, heads=0.5), fm.full_subnet()]
    # a 1-D float tensor or numpy array of fractions is its list of values
    assert fm.resolve_budgets(torch.tensor([0.5, 1.0])) == fm.resolve_budgets(np.array([0.5, 1.0])) == [
        fm.uniform_subnet(mlp=0.5, heads=0.5), fm.full_subnet()]
    n = fm.num_layers
    router = StaticRouter([fm.mlp_choices(i) for i in range(n)], [fm.head_choices(i) for i in range(n)])
    with torch.no_grad():  # a router that keeps the fewest neurons and every head, whatever the target
        for lin in (*router.mlp_heads, *router.attn_heads):
            lin.weight.zero_()
            lin.bias.zero_()
        for lin in router.mlp_heads:
            lin.bias[0] = 1.0
        for lin in router.attn_heads:
            lin.bias[-1] = 1.0
    attach_router(fm, router)
    want = Subnet(mlp=[fm.mlp_choices(i)[0] for i in range(n)], heads=[fm.head_choices(i)[-1] for i in range(n)])
    assert fm.resolve_budgets([0.3, fm.full_subnet()]) == [want, fm.full_subnet()]


def _counter(calls: dict, name: str, run):
    def counted(*a, **k):
        calls[name] += 1
        return run(*a, **k)
    return counted


def _count_paths(monkeypatch) -> dict:
    """Counts of the per-run attention (``runs``) and of the grouped MLP kernel's calls (``nested_mlp``)."""
    calls = {"runs": 0, "nested_mlp": 0}
    monkeypatch.setattr(flextron.attention.ElasticAttention, "_forward_runs",
                        _counter(calls, "runs", flextron.attention.ElasticAttention._forward_runs))
    monkeypatch.setattr(flextron.mlp, "nested_mlp", _counter(calls, "nested_mlp", flextron.mlp.nested_mlp))
    return calls


@pytest.mark.parametrize("decode", ["kernels", "masked", "eager"])
def test_kernel_path(decode, monkeypatch):
    """Head size 16: per-sequence heads through elastic_attention / its decode form and MLP widths through
    nested_mlp (Triton on the GPU where there is one, else the interpreter on the CPU); with the masked decode
    (FLEXTRON_BUDGET_DECODE=masked) calls of few tokens run the dense ops instead, and the prompt's attention
    still runs elastic_attention; under the default (eager) the eager decode steps' attention runs SDPA, masked,
    and the MLP nested_mlp."""
    monkeypatch.setattr(flextron.layers, "BUDGET_DECODE", decode)
    torch.manual_seed(0)
    orig = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=64, vocab_size=VOCAB,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval().to(DEVICE)
    fm = FlextronModel.from_hf(copy.deepcopy(orig))
    subnets = [fm.uniform_subnet(mlp=0.5, heads=0.5), fm.full_subnet()]
    x = tokens(batch=2, seq=6).to(DEVICE)
    calls = {"nested_mlp": 0, "elastic_attention": 0, "elastic_attention_decode": 0}
    with pytest.MonkeyPatch.context() as mp:  # count the kernels' calls: this test is about those paths
        for module, name in ((flextron.mlp, "nested_mlp"), (flextron.attention, "elastic_attention"),
                             (flextron.attention, "elastic_attention_decode")):
            mp.setattr(module, name, _counter(calls, name, getattr(module, name)))
        got = _generate(fm, x, "dynamic", budgets=subnets)
    want = {"kernels": (True, True, True), "masked": (True, False, False), "eager": (True, True, False)}[decode]
    assert tuple(bool(calls[k]) for k in ("elastic_attention", "nested_mlp", "elastic_attention_decode")) == want, calls
    assert torch.equal(got, _alone(fm, x, subnets, "dynamic"))


def _count_head_drops(monkeypatch, calls: dict) -> None:
    """Counts the attention calls given a head drop mask (the masked decode) in ``calls["head_drop"]``."""
    calls["head_drop"] = 0

    def counted(*a, **k):
        calls["head_drop"] += k.get("head_drop") is not None
        return core(*a, **k)

    core = flextron.attention.attention_core
    monkeypatch.setattr(flextron.attention, "attention_core", counted)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "qwen2"])
def test_masked_decode_gives_each_sequence_its_own_subnet(family, cache, monkeypatch):
    """FLEXTRON_BUDGET_DECODE=masked: a call of few tokens runs the dense ops at the batch's widest budget and
    zeroes each sequence's neurons and heads past its own; the greedy tokens are each sequence's alone, every
    decode step of every layer drops heads, and the grouped MLP kernel never runs."""
    monkeypatch.setattr(flextron.layers, "BUDGET_DECODE", "masked")
    calls = _count_paths(monkeypatch)
    _count_head_drops(monkeypatch, calls)
    fm = FlextronModel.from_hf(tiny_model(family))
    subnets = _subnets(fm)
    x = tokens(batch=len(subnets), seq=7, seed=3)
    with cpu_reference():
        got = _generate(fm, x, cache, budgets=subnets)
        assert calls["nested_mlp"] == 0
        assert calls["head_drop"] == fm.num_layers * (NEW - 1)  # each layer's budgets differ between sequences
        want = _alone(fm, x, subnets, cache)
    assert torch.equal(got, want)


def test_masked_decode_only_for_few_tokens(monkeypatch):
    """The masked decode serves calls of at most DECODE_MAX_TOKENS tokens; a longer prompt keeps the grouped MLP."""
    monkeypatch.setattr(flextron.layers, "BUDGET_DECODE", "masked")
    monkeypatch.setattr(flextron.layers, "DECODE_MAX_TOKENS", 8)
    calls = _count_paths(monkeypatch)
    fm = FlextronModel.from_hf(tiny_model("llama_gqa"))
    half, full = fm.uniform_subnet(mlp=0.5, heads=0.5), fm.full_subnet()
    with cpu_reference(), torch.no_grad():
        fm(input_ids=tokens(batch=2, seq=4, seed=1), budgets=[half, full])  # 8 tokens
        assert calls["nested_mlp"] == 0
        fm(input_ids=tokens(batch=2, seq=5, seed=1), budgets=[half, full])  # 10 tokens
        assert calls["nested_mlp"] == fm.num_layers


def test_decode_policies(monkeypatch):
    """kernels: never masked; masked: every call of few tokens; eager (the default): the attention of those outside
    compilation (and capture), never the MLP."""
    few, many = torch.zeros(4, 1, 8), torch.zeros(4, 17, 8)
    monkeypatch.setattr(flextron.layers, "DECODE_MAX_TOKENS", 64)
    seen = {}
    for policy in flextron.layers.DECODE_POLICIES:
        monkeypatch.setattr(flextron.layers, "BUDGET_DECODE", policy)
        for attention in (True, False):
            got = [flextron.layers.masked_decode(few, attention), flextron.layers.masked_decode(many, attention)]
            with monkeypatch.context() as m:
                m.setattr(torch.compiler, "is_compiling", lambda: True)
                got.append(flextron.layers.masked_decode(few, attention))
            seen[policy, attention] = got
    assert seen == {("kernels", True): [False] * 3, ("kernels", False): [False] * 3,
                    ("masked", True): [True, False, True], ("masked", False): [True, False, True],
                    ("eager", True): [True, False, False], ("eager", False): [False] * 3}
    # eager: a large cache (keys over sequences and KV heads) keeps the decode kernel, which skips its reads
    cap = flextron.layers.MASKED_MAX_CACHE
    monkeypatch.setattr(flextron.layers, "BUDGET_DECODE", "eager")
    assert flextron.layers.masked_decode(few, True, cap - 1) and not flextron.layers.masked_decode(few, True, cap)
    monkeypatch.setattr(flextron.layers, "BUDGET_DECODE", "masked")
    assert flextron.layers.masked_decode(few, True, cap)


def test_masked_decode_gradients_equal_the_grouped_kernel(monkeypatch):
    """Training on short sequences with per-request budgets: the masked dense MLP gives the grouped kernel's
    gradients for every parameter."""
    fm = FlextronModel.from_hf(tiny_model("llama_gqa"))
    half, full = fm.uniform_subnet(mlp=0.5, heads=0.5), fm.full_subnet()
    x = tokens(batch=3, seq=6, seed=11)
    calls = _count_paths(monkeypatch)
    grads = {}
    with cpu_reference():
        for decode in ("masked", "kernels"):
            monkeypatch.setattr(flextron.layers, "BUDGET_DECODE", decode)
            fm.zero_grad(set_to_none=True)
            fm(input_ids=x, budgets=[half, half, full]).logits.float().pow(2).mean().backward()
            grads[decode] = {n: p.grad.clone() for n, p in fm.named_parameters() if p.grad is not None}
            assert calls["nested_mlp"] == (0 if decode == "masked" else fm.num_layers)
    assert grads["masked"].keys() == grads["kernels"].keys() and grads["masked"]
    for n, g in grads["kernels"].items():
        assert ((grads["masked"][n] - g).norm() / g.norm().clamp_min(1e-12)).item() < 1e-5, n


def test_bad_decode_policy_is_named():
    env = {**os.environ, "FLEXTRON_BUDGET_DECODE": "fast"}
    r = subprocess.run([sys.executable, "-c", "import flextron.layers"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "FLEXTRON_BUDGET_DECODE must be one of" in r.stderr


@pytest.mark.parametrize("budgets, error, match", [
    ([1.5], ValueError, r"budgets\[0\] must be a latency fraction in \(0, 1\]"),
    (["half"], TypeError, r"budgets\[0\] must be a Subnet or a latency fraction"),
    (0.5, TypeError, "budgets must be a list"),
    (torch.tensor([1, 1]), TypeError, r"budgets as an array must be 1-D latency fractions \(floats\), got 1-D "
                                      "torch.int64"),
    (torch.tensor([[0.5]]), TypeError, "must be 1-D latency fractions"),
    (np.array([1]), TypeError, "must be 1-D latency fractions"),
    (torch.tensor([1.5]), ValueError, r"budgets\[0\] must be a latency fraction in \(0, 1\]"),
    ([], ValueError, "one entry per sequence"),
])
def test_bad_budgets(budgets, error, match):
    fm = FlextronModel.from_hf(tiny_model("llama_gqa"))
    with pytest.raises(error, match=match):
        fm(input_ids=tokens(batch=1), budgets=budgets)


def test_bad_budget_combinations():
    fm = FlextronModel.from_hf(tiny_model("llama_gqa"))
    x = tokens(batch=2)
    with pytest.raises(ValueError, match="either head_budgets or budgets"):
        fm(input_ids=x, budgets=[1.0, 1.0], head_budgets=torch.tensor([2, 2]))
    with pytest.raises(ValueError, match=r"budgets\[1\]: subnet\.heads\[0\] = 3 splits a KV group"):
        fm(input_ids=x, budgets=[1.0, Subnet(mlp=[72, 72], heads=[3, 6])])
    with pytest.raises(ValueError, match="budgets holds 3 entries but the batch has 2 sequences"):
        fm(input_ids=x, budgets=[0.25, 0.5, 1.0])


def test_budgets_made_once_per_call_and_follow_changes():
    """The per-layer budgets and per-token widths a generate call reads at every step are made once, and made
    again when the budget tensor changes in place or the active sub-network changes; inference-mode tensors (no
    version counter) work too."""
    fm = FlextronModel.from_hf(tiny_model("llama_gqa"))
    a, m = fm.attention_blocks[0], fm.mlp_blocks[0]
    g, full = a.group_size, a.num_heads
    b = torch.tensor([full, g])
    a.head_budgets = b
    first = a._budgets(2)
    assert first.tolist() == [full, g] and a._budgets(2) is first
    b[0] = 2 * g  # in place: a new version
    assert a._budgets(2).tolist() == [2 * g, g]
    fm.set_subnet(fm.uniform_subnet(mlp=1.0, heads=g / full))  # fewer active heads: every budget capped at them
    assert a._budgets(2).tolist() == [g, g]
    with torch.inference_mode():
        a.head_budgets = torch.tensor([full, full])
        assert a._budgets(2).tolist() == [g, g] and a._budgets(2) is not a._budgets(2)
    fm.set_subnet(None)

    w = torch.tensor([m.full_width, 3])
    shape = torch.Size([2, 5])
    first = m._sequence_token_widths(w, shape)
    assert first.tolist() == [[m.full_width] * 5, [3] * 5] and m._sequence_token_widths(w, shape) is first
    assert m._sequence_token_widths(w, torch.Size([2, 1])).tolist() == [[m.full_width], [3]]  # a decode step
    w[1] = 0  # in place; clamped to one neuron
    assert m._sequence_token_widths(w, shape)[1].tolist() == [1] * 5
    m.width = 10
    assert m._sequence_token_widths(w, shape)[0].tolist() == [10] * 5

    # the masked decode's drop masks: made once, again on a change
    x = torch.zeros(2, 1, 8)
    drop = m._sequence_drop(w, x)
    assert drop.shape == (2, 1, 10) and m._sequence_drop(w, x) is drop
    assert drop[0, 0].tolist() == [False] * 10 and drop[1, 0].tolist() == [False] + [True] * 9  # w[1] = 0: one neuron
    w[1] = 4
    assert m._sequence_drop(w, x)[1, 0].tolist() == [False] * 4 + [True] * 6
    heads = torch.tensor([full, g], dtype=torch.int32)
    hd = a._head_drop(heads)
    assert hd.shape == (2, a.heads, 1, 1) and a._head_drop(heads) is hd
    assert hd[:, :, 0, 0].tolist() == [[False] * full, [False] * g + [True] * (full - g)]


@pytest.mark.parametrize("cache", [None, "dynamic", "static"])
@pytest.mark.parametrize("family", ["llama_gqa", "qwen2", "gpt2"])
def test_long_prompts_project_each_run_at_its_own_heads(family, cache, monkeypatch):
    """Prompts long enough (here: any, the threshold lowered) run each run of adjacent sequences with one head
    budget through its own projections, attention and output projection; the tokens and logits are each
    sequence's alone, with and without a cache, and decode steps go on from the zero-padded cache."""
    monkeypatch.setattr(flextron.layers, "RUN_MIN_TOKENS", 1)
    calls = _count_paths(monkeypatch)
    fm = FlextronModel.from_hf(tiny_model(family))
    half, full = fm.uniform_subnet(mlp=0.5, heads=0.5), fm.full_subnet()
    subnets = [half, half, full, half]  # three runs: (0, 2), (2, 3), (3, 4)
    x = tokens(batch=len(subnets), seq=7, seed=5)
    with cpu_reference(), torch.no_grad():
        logits = fm(input_ids=x, budgets=subnets).logits
        assert calls["runs"] == fm.num_layers
        assert calls["nested_mlp"] == 0  # the MLPs ran each run at its own width too
        for b, s in enumerate(subnets):
            fm.set_subnet(s)
            want = fm(input_ids=x[b:b + 1]).logits
            assert ((logits[b:b + 1] - want).norm() / want.norm()).item() < 1e-5
        fm.set_subnet(None)
        if cache is not None:
            got = _generate(fm, x, cache, budgets=subnets)
            assert torch.equal(got, _alone(fm, x, subnets, cache))
    assert all(a.head_runs is None and a.head_budgets is None for a in fm.attention_blocks)


def test_prompts_with_short_runs_keep_one_batch(monkeypatch):
    """Below the tokens a run needs, or past MAX_RUNS runs, a prompt runs as one batch."""
    calls = _count_paths(monkeypatch)
    fm = FlextronModel.from_hf(tiny_model("llama_gqa"))
    half, full = fm.uniform_subnet(mlp=0.5, heads=0.5), fm.full_subnet()
    x = tokens(batch=2, seq=7, seed=5)
    with cpu_reference(), torch.no_grad():
        fm(input_ids=x, budgets=[half, full])  # 7 tokens a run, under RUN_MIN_TOKENS
        assert calls["nested_mlp"] == fm.num_layers  # the MLPs kept one batch (per-sequence widths) too
        monkeypatch.setattr(flextron.layers, "RUN_MIN_TOKENS", 1)
        monkeypatch.setattr(flextron.layers, "MAX_RUNS", 1)
        fm(input_ids=x, budgets=[half, full])  # two runs, over MAX_RUNS
        assert calls["runs"] == 0
        monkeypatch.setattr(flextron.layers, "MAX_RUNS", 2)
        monkeypatch.setattr(flextron.layers, "RUNS_ENABLED", False)  # FLEXTRON_BUDGET_RUNS=0
        fm(input_ids=x, budgets=[half, full])
        assert calls["runs"] == 0
        monkeypatch.setattr(flextron.layers, "RUNS_ENABLED", True)
        n = calls["nested_mlp"]
        fm(input_ids=x, budgets=[half, full])
        assert calls["runs"] == fm.num_layers
        assert calls["nested_mlp"] == n


def test_runs_of_adjacent_values():
    from flextron.model import _runs

    assert _runs([5, 5, 2, 5]) == [(0, 2, 5), (2, 3, 2), (3, 4, 5)]
    assert _runs([1]) == [(0, 1, 1)]


def test_long_padded_prompts_per_run_equal_one_batch(monkeypatch):
    """Left-padded prompts (a 4-D mask per sequence): the per-run path slices each run's mask and gives the
    one-batch path's logits at every real position."""
    fm = FlextronModel.from_hf(tiny_model("llama_gqa"))
    half, full = fm.uniform_subnet(mlp=0.5, heads=0.5), fm.full_subnet()
    subnets = [half, half, full]
    x = tokens(batch=3, seq=9, seed=7)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    mask[2, :5] = 0
    monkeypatch.setattr(flextron.layers, "RUN_MIN_TOKENS", 1)
    calls = _count_paths(monkeypatch)
    out = {}
    with cpu_reference(), torch.no_grad():
        for runs in (True, False):
            monkeypatch.setattr(flextron.layers, "RUNS_ENABLED", runs)
            out[runs] = fm(input_ids=x, attention_mask=mask, budgets=subnets).logits
    assert calls["runs"] == fm.num_layers  # the padded batch did take the per-run path
    real = mask.bool()
    a, b = out[True][real], out[False][real]
    assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_per_run_cache_under_autocast_keeps_the_projections_dtype(monkeypatch):
    """Under autocast the per-run path caches K/V in the dtype the one-batch path caches (that of the rotated keys),
    and gives its logits."""
    monkeypatch.setattr(flextron.layers, "RUN_MIN_TOKENS", 1)
    fm = FlextronModel.from_hf(tiny_model("llama_gqa"))
    half, full = fm.uniform_subnet(mlp=0.5, heads=0.5), fm.full_subnet()
    x = tokens(batch=2, seq=7, seed=9)
    got = {}
    with cpu_reference(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for runs in (True, False):
            monkeypatch.setattr(flextron.layers, "RUNS_ENABLED", runs)
            out = fm(input_ids=x, budgets=[half, full], use_cache=True)
            got[runs] = (out.logits.float(), [layer.keys.dtype for layer in out.past_key_values.layers])
    assert got[True][1] == got[False][1]
    assert ((got[True][0] - got[False][0]).norm() / got[False][0].norm()).item() < 2e-2


def test_per_run_gradients_equal_one_batch(monkeypatch):
    """Training through per-request budgets: the per-run path (projections and MLP products per run) gives the
    one-batch path's gradients for every parameter."""
    monkeypatch.setattr(flextron.layers, "RUN_MIN_TOKENS", 1)
    calls = _count_paths(monkeypatch)
    fm = FlextronModel.from_hf(tiny_model("llama_gqa"))
    half, full = fm.uniform_subnet(mlp=0.5, heads=0.5), fm.full_subnet()
    x = tokens(batch=3, seq=6, seed=11)
    grads = {}
    with cpu_reference():
        for runs in (True, False):
            monkeypatch.setattr(flextron.layers, "RUNS_ENABLED", runs)
            fm.zero_grad(set_to_none=True)
            fm(input_ids=x, budgets=[half, half, full]).logits.float().pow(2).mean().backward()
            grads[runs] = {n: p.grad.clone() for n, p in fm.named_parameters() if p.grad is not None}
            # per run: every layer's attention and MLP ran run by run; one batch: the grouped MLP, no runs
            assert calls == ({"runs": fm.num_layers, "nested_mlp": 0} if runs else
                             {"runs": fm.num_layers, "nested_mlp": fm.num_layers})
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for n, g in grads[False].items():
        assert ((grads[True][n] - g).norm() / g.norm().clamp_min(1e-12)).item() < 1e-5, n


@pytest.mark.parametrize("family, train", [("llama_gqa", False), ("gpt2", False), ("gpt2", True)])
def test_per_run_buffers_equal_concatenation(family, train, monkeypatch):
    """Outside autograd the runs write their attention and MLP outputs into one buffer each (cuBLAS into the rows,
    forced here on the CPU); the logits are those of the concatenated runs that autograd records, GPT-2's dropout
    in training mode included (the same random draws, run by run)."""
    monkeypatch.setattr(flextron.layers, "RUN_MIN_TOKENS", 1)
    monkeypatch.setattr(flextron.layers, "blas_serves", lambda t: True)
    calls = _count_paths(monkeypatch)
    fm = FlextronModel.from_hf(tiny_model(family))
    fm.train(train)
    half, full = fm.uniform_subnet(mlp=0.5, heads=0.5), fm.full_subnet()
    x = tokens(batch=3, seq=5, seed=13)
    out = {}
    with cpu_reference():
        for grad in (False, True):
            torch.manual_seed(7)
            with torch.set_grad_enabled(grad):
                out[grad] = fm(input_ids=x, budgets=[half, half, full]).logits.detach()
    assert calls["runs"] == 2 * fm.num_layers
    torch.testing.assert_close(out[False], out[True], rtol=1e-5, atol=1e-5)
