"""benchmarks/bench_compile.py's models: the dense baseline must stay dense (``FlextronModel.from_hf`` makes a model
elastic in place; the first version of the benchmark timed the elastic model twice, once as "hf")."""

import sys
from pathlib import Path

import torch

import flextron.attention as fattn
import flextron.mlp as fmlp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_compile import build


def test_bench_compile_baselines_are_what_they_say():
    cfg, hf, fm, full = build("cpu", smoke=True)
    assert not any(isinstance(m, (fmlp.ElasticMLP, fattn.ElasticAttention)) for m in hf.modules())
    assert fm.model is not hf and full.model is not hf and fm.model is not full.model
    assert fm.subnet is not None and full.subnet is None
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense, at_full, sub = hf(ids).logits, full(ids).logits, fm(ids).logits
    # The same weights: the full-width elastic model computes the dense model's function; the sub-network does not.
    assert torch.allclose(at_full, dense, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(sub, dense, rtol=1e-2, atol=1e-3)
