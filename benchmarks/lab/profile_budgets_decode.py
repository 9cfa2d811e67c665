"""Where the host time of an eager decode step goes with per-request budgets, against the same batch at full width.

Greedy ``generate`` (dynamic cache) of a Llama-shaped model with random weights, 16 sequences at budgets
25/50/75/100% (four each) and at full width: ms per decode step for each (best of ``--repeats``), then a cProfile
of the budgets' steps, by own time. A GPU step whose host time exceeds its GPU time is paced by the host, so the
profile shows what to cut.

    python benchmarks/lab/profile_budgets_decode.py [--layers 8] [--new-tokens 32] [--top 30]
    python benchmarks/lab/profile_budgets_decode.py --device cpu --hidden 64 --layers 2   # a smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_end_to_end as e2e  # its model builder and budgets

import flextron


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_ms(fm, ids, new_tokens: int, repeats: int, device: torch.device, **kw) -> float:
    """ms per decode step: (generate of ``new_tokens`` - generate of 1) / (new_tokens - 1), best of ``repeats``."""
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
               attention_mask=torch.ones_like(ids), **kw)
    one = dict(gen, max_new_tokens=1, min_new_tokens=1)
    best = float("inf")
    with torch.no_grad():
        fm.generate(ids, **gen)  # warm-up: kernels compiled and tuned, graphs of repeated calls captured
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fm.generate(ids, **one)
            _sync(device)
            t1 = time.perf_counter()
            fm.generate(ids, **gen)
            _sync(device)
            t2 = time.perf_counter()
            best = min(best, ((t2 - t1) - (t1 - t0)) / (new_tokens - 1) * 1e3)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    h = args.hidden
    shape = dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=args.layers,
                 num_attention_heads=max(4, h // 64), num_key_value_heads=max(2, h // 256), vocab_size=32000)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fm = flextron.FlextronModel.from_hf(e2e.build_model(shape, device, dtype=dtype), e2e.make_space())
    ids = torch.randint(1, shape["vocab_size"], (len(e2e.BUDGETS), args.prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    budgets = list(e2e.BUDGETS)
    full = step_ms(fm, ids, args.new_tokens, args.repeats, device)
    mixed = step_ms(fm, ids, args.new_tokens, args.repeats, device, budgets=budgets)
    print(f"{args.layers} layers, hidden {h}, batch {len(budgets)}: full width {full:.3f} ms/step, budgets "
          f"{mixed:.3f} ms/step ({(mixed - full) / args.layers * 1e3:+.1f} us per layer)")
    prof = cProfile.Profile()
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
               attention_mask=torch.ones_like(ids), budgets=budgets)
    with torch.no_grad():
        prof.enable()
        fm.generate(ids, **gen)
        _sync(device)
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
