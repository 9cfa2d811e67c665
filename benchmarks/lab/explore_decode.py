"""elastic_attention_decode's chunk policy on mixed per-sequence head budgets (budgets 8/16/24/32 of 32 query heads,
scattered over the batch as the benchmark's ``decode`` rows), against SDPA on all heads, eager and from graphs.

The default policy sizes the split from ``B * Hkv`` groups; with mixed budgets only the active groups stream the
cache (on average 5/8 of them here), so fewer programs than planned do the work. The sweep times each
``ChunkPolicy(programs_per_sm, min_chunk)`` per case; a row per (case, policy) with chunk, splits and speeds.

    python benchmarks/lab/explore_decode.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import interleaved_ms, run_info, write_result

from flextron_kernels import elastic_attention_decode

DEC = importlib.import_module("flextron_kernels.elastic_attention_decode")
HQ, D = 32, 128
POLICIES = [(8, 1024), (8, 512), (16, 512), (16, 256), (32, 256), (4, 1024)]


def case(hkv, b, ctx, policies):
    q = torch.randn(b, HQ, D, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(b, hkv, ctx, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    heads = torch.tensor([(8, 16, 24, 32)[i % 4] for i in range(b)], device="cuda", dtype=torch.int32)
    q4 = q[:, :, None]
    ref = F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=hkv != HQ)[:, :, 0]
    fns = {"sdpa_all": lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=hkv != HQ)}

    def make(pol):
        def fn():
            with DEC.chunk_policy(pol):
                return elastic_attention_decode(q, kc, vc, lens, heads, validate=False)
        return fn

    rows = []
    for pps, mc in policies:
        pol = DEC.ChunkPolicy(programs_per_sm=pps, min_chunk=mc)
        out = make(pol)()
        keep = torch.arange(HQ, device="cuda")[None, :, None] < heads[:, None, None]
        err = (out.float() - ref.float() * keep).abs().max().item()
        fns[f"p{pps}_{mc}"] = make(pol)
        chunk, splits = DEC._chunking(b, hkv, ctx, q.device, pol)
        rows.append(dict(hkv=hkv, B=b, ctx=ctx, programs_per_sm=pps, min_chunk=mc, chunk=chunk, splits=splits,
                         max_err=err))
    t = interleaved_ms(fns, 5, True)
    for r in rows:
        name = f"p{r['programs_per_sm']}_{r['min_chunk']}"
        r["ms"] = t[name]
        r["sdpa_all_ms"] = t["sdpa_all"]
        r["speed"] = {m: t["sdpa_all"][m] / t[name][m] for m in ("eager", "graph")}
        print(f"hkv={hkv:2} {b:3}x{ctx:5} pps={r['programs_per_sm']:2} min={r['min_chunk']:4} chunk={r['chunk']:5} "
              f"splits={r['splits']:3} speed eager {r['speed']['eager']:.2f} graph {r['speed']['graph']:.2f} "
              f"err {r['max_err']:.1e}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    shapes = [(8, 1024), (8, 2048), (8, 4096), (32, 512), (32, 1024), (32, 4096)]
    if args.quick:
        shapes = [(8, 4096), (32, 1024)]
    rows = []
    for hkv in (8, 32):
        for b, ctx in shapes:
            rows += case(hkv, b, ctx, POLICIES)
            torch.cuda.empty_cache()
    if args.out:
        print(write_result(args.out, "explore_decode", {**run_info(), "timing": "interleaved_ms medians of 5 rounds",
                                                         "rows": rows}))


if __name__ == "__main__":
    main()
