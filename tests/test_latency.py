"""Latency tables: profiling, prediction, persistence, checks; the guarantee projection and its errors.

Timings of a tiny model under the interpreter mean nothing; these tests check structure and arithmetic. Table
accuracy is measured by scripts/router_experiment.py (CPU) and benchmarks/bench_latency_table.py (GPU).
"""

from __future__ import annotations

import copy

import pytest
import torch

from flextron import ElasticSpace, FlextronModel, Subnet
from flextron.budget import project
from flextron.latency import LatencyTable, check_table, measure, profile, random_subnets, space_signature, validate
from tests.model_utils import tiny_model

SPACE = ElasticSpace(mlp=(0.25, 0.5, 1.0), heads=(2, 4, 6))


@pytest.fixture(scope="module")
def fm() -> FlextronModel:
    return FlextronModel.from_hf(tiny_model("llama"), SPACE)


@pytest.fixture(scope="module")
def table(fm) -> LatencyTable:
    return profile(fm, batch_size=1, seq_len=8, phase="prefill", warmup=0, repeats=1)


def synthetic(fm: FlextronModel, mlp_ms=(1.0, 2.0, 4.0), attn_ms=(1.0, 2.0, 3.0), fixed=2.0) -> LatencyTable:
    """A table with known entries (every layer alike) for exact arithmetic."""
    meta = {"phase": "prefill", "batch_size": 1, "seq_len": 8, "dtype": "float32", "device_type": "cpu",
            "device_name": "cpu:test", "model": space_signature(fm)}
    n = fm.num_layers
    return LatencyTable(meta=meta, mlp=[list(mlp_ms)] * n, attn=[list(attn_ms)] * n, fixed_ms=fixed)


def test_profile_shapes_and_predict(fm, table):
    assert table.meta["device_type"] == "cpu" and table.meta["dtype"] == "float32"
    assert table.meta["batch_size"] == 1 and table.meta["seq_len"] == 8 and table.meta["phase"] == "prefill"
    assert {"torch", "triton", "transformers"} <= set(table.meta["versions"])
    for i in range(fm.num_layers):
        assert len(table.mlp[i]) == len(fm.mlp_choices(i)) and len(table.attn[i]) == len(fm.head_choices(i))
        assert all(v > 0 for v in table.mlp[i] + table.attn[i])
    assert table.fixed_ms > 0
    assert table.predict(fm.full_subnet()) == pytest.approx(table.full_ms())
    s = random_subnets(fm, 1, seed=3)[0]
    want = table.fixed_ms + sum(table.mlp[i][fm.mlp_choices(i).index(s.mlp[i])]
                                + table.attn[i][fm.head_choices(i).index(s.heads[i])] for i in range(fm.num_layers))
    assert table.predict(s) == pytest.approx(want)
    # one-hot shares (every token at one width) predict the same as the subnet
    mlp = [[float(c == w) for c in fm.mlp_choices(i)] for i, w in enumerate(s.mlp)]
    heads = [[float(c == h) for c in fm.head_choices(i)] for i, h in enumerate(s.heads)]
    assert table.predict_mixture(mlp, heads) == pytest.approx(table.predict(s))
    assert fm.subnet is None  # profiling leaves the model as it was


def test_save_load_roundtrip(table, tmp_path):
    table.save(tmp_path / "t.json")
    back = LatencyTable.load(tmp_path / "t.json")
    assert back.to_dict() == table.to_dict()


def test_decode_profile_and_validate(fm):
    t = profile(fm, batch_size=2, seq_len=5, phase="decode", warmup=0, repeats=1)
    assert t.meta["phase"] == "decode"
    v = validate(fm, t, 2, warmup=0, repeats=1)
    assert len(v["rows"]) == 3 and all(r["measured_ms"] > 0 for r in v["rows"])
    assert measure(fm, None, batch_size=1, seq_len=4, phase="prefill", warmup=0, repeats=1) > 0


def test_table_from_another_model_or_device_is_refused(fm, table):
    other = FlextronModel.from_hf(tiny_model("llama"), ElasticSpace(mlp=(0.5, 1.0)))
    with pytest.raises(ValueError, match="table was profiled for another model"):
        check_table(table, other)
    moved = copy.deepcopy(table)
    moved.meta["device_type"], moved.meta["device_name"] = "cuda", "NVIDIA H200"
    with pytest.raises(ValueError, match="table was profiled on another device.*NVIDIA H200"):
        check_table(moved, fm)


def test_projection_meets_target_and_drops_least_important_first(fm):
    t = synthetic(fm)
    full = t.full_ms()  # 2 + 2 * (4 + 3) = 16
    for target in (0.375, 0.5, 0.7, 0.9, 1.0):
        s = project(fm, fm.full_subnet(), t, target)
        assert t.predict(s) <= target * full + 1e-9
        fm.check_subnet(s)
    # Layer 1's MLP tail is the least important: it goes first (one step saves 2 ms of 16: target 14/16).
    fm.importance = {"mlp": [torch.ones(72), torch.cat([torch.ones(40), torch.full((32,), 1e-3)])],
                     "heads": [torch.ones(6), torch.ones(6)]}
    try:
        s = project(fm, fm.full_subnet(), t, 14 / 16)
        assert s == Subnet(mlp=[72, 40], heads=[6, 6])
    finally:
        fm.importance = None


def test_guarantee_raises_naming_smallest_reachable_latency(fm):
    t = synthetic(fm)  # smallest: 2 + 2 * (1 + 1) = 6 of 16 ms
    with pytest.raises(ValueError, match=r"smallest reachable latency is 0\.375 of the full model"):
        project(fm, fm.full_subnet(), t, 0.3)


def test_target_outside_unit_interval_is_refused(fm):
    t = synthetic(fm)
    for bad in (0, -0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="target must be a latency fraction in"):
            project(fm, fm.full_subnet(), t, bad)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_timing_replays_the_captured_work():
    from flextron.measure import time_interleaved

    out = torch.zeros(4, device="cuda")
    times = time_interleaved([lambda: out.add_(1.0)], warmup=2, repeats=5, device="cuda", graphs=True)
    torch.cuda.synchronize()
    # one eager warm-up run before the capture (capturing runs nothing), then 2 + 5 replays
    assert out.tolist() == [8.0] * 4 and len(times[0]) == 5 and all(t > 0 for t in times[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_table_in_cuda_graphs_on_the_kernels():
    """The decode step (Triton decode attention against the HF cache, sliced MLPs) captures in a CUDA graph, block
    by block and whole; the table records the timing and validation measures the same way."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    fmg = FlextronModel.from_hf(LlamaForCausalLM(cfg).eval(), ElasticSpace(mlp=(0.5, 1.0), heads=(2, 4))).cuda()
    t = profile(fmg, batch_size=3, seq_len=20, phase="decode", warmup=1, repeats=3, graphs=True)
    assert t.meta["timing"] == "cuda_graph" and t.fixed_ms > 0
    assert all(v > 0 for row in t.mlp + t.attn for v in row)
    v = validate(fmg, t, 3, warmup=1, repeats=3)
    assert len(v["rows"]) == 4 and all(r["measured_ms"] > 0 for r in v["rows"])


def test_decode_rewind_restores_the_contiguous_prefill_cache(fm):
    """Each timed decode step starts from the prefilled cache tensors themselves (contiguous, seq_len long), not
    from cropped views: concatenating onto a strided view is a slow copy that a real decode loop never makes."""
    from flextron.measure import _runner

    with torch.inference_mode():
        step, rewind = _runner(fm, None, 2, 7, "decode", 0)
        first = rewind()
        for _ in range(2):
            step()
            again = rewind()
            assert all(a is b for a, b in zip(again, first))
    assert len(first) == 2 * fm.num_layers
    assert all(t.shape[2] == 7 and t.is_contiguous() for t in first)


def test_cache_kwarg_is_the_installed_forwards_name(fm):
    """Decode timing passes the cache under the name the installed transformers' forward takes (older releases:
    ``past_key_values``; an unknown ``cache=`` would reach the layers while the model counts positions from a cache
    of its own); given so, a decode step continues the prompt: its logits equal the whole sequence's."""
    import inspect

    from transformers import DynamicCache

    from flextron.model import cache_kwarg

    class Older(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
            return input_ids

    assert cache_kwarg(Older()) == "past_key_values"
    name = "cache" if "cache" in inspect.signature(type(fm.model).forward).parameters else "past_key_values"
    assert cache_kwarg(fm) == cache_kwarg(fm.model) == name
    ids = torch.randint(0, fm.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=fm.config)
    with torch.no_grad():
        fm(input_ids=ids[:, :5], use_cache=True, **{name: cache})
        step = fm(input_ids=ids[:, 5:], use_cache=True, **{name: cache}).logits[:, -1]
        whole = fm(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-5)
