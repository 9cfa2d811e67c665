"""Host time the elastic blocks add per layer over HF's own modules, on any machine (no GPU needed).

A small Llama (compute negligible, so a forward's time is host time) runs one-token decode steps against a
DynamicCache: the plain HF model, then the same weights as a FlextronModel at full width and at 50%. The GPU's
dispatch is forced on the CPU (``sliced_linear.force_path("cublas")``: F.linear on the prefix views;
``attention_backend("sdpa")``), so the Python that runs is the Python a GPU runs. Prints microseconds per step and
per layer, best of ``--repeats``.

    TRITON_INTERPRET=1 python benchmarks/lab/host_overhead.py [--layers 8] [--steps 200] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import os
import pstats
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels' GPU dispatch is forced below; nothing launches

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import flextron  # noqa: F401  (registers FlextronModel's operations)
from flextron.model import FlextronModel, cache_kwarg
from flextron_kernels import attention_backend
from flextron_kernels.sliced_linear import force_path


def step_us(model, steps: int, repeats: int, profile: bool = False) -> float:
    ids = torch.randint(0, 100, (1, 8))
    best = float("inf")
    with torch.no_grad(), force_path("cublas"), attention_backend("sdpa"):
        for _ in range(repeats):
            cache = DynamicCache()
            kw = {cache_kwarg(model): cache}
            out = model(input_ids=ids, use_cache=True, **kw)
            nxt = out.logits[:, -1:].argmax(-1)
            prof = cProfile.Profile() if profile else None
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            for _ in range(steps):
                out = model(input_ids=nxt, use_cache=True, **kw)
            if prof:
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(30)
                return 0.0
            best = min(best, (time.perf_counter() - t0) / steps * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile the FlextronModel's steps at 50%%")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    hf = LlamaForCausalLM(cfg).eval()
    fm = FlextronModel.from_hf(copy.deepcopy(hf))
    base = step_us(hf, args.steps, args.repeats)
    print(f"HF: {base:.0f} us/step")
    for frac in (1.0, 0.5):
        fm.set_subnet(fm.uniform_subnet(frac, frac))
        t = step_us(fm, args.steps, args.repeats)
        print(f"FlextronModel {frac:.0%}: {t:.0f} us/step, {(t - base) / args.layers:+.1f} us/layer over HF")
    if args.profile:
        step_us(fm, args.steps, 1, profile=True)


if __name__ == "__main__":
    main()
