"""Variants of elastic_attention's TMA forward against the kernel as shipped and against SDPA (cuDNN on Hopper).

Each variant is the shipped TMA forward launched past its autotuner, once per tile config of a list (best kept):

- ``loop``: as shipped (the control: the autotuner's choice against each config timed alone);
- ``ws``: the unmasked key loop warp-specialised (the kernel's ``WS``, ``tl.range(..., warp_specialize=True)``;
  where the installed Triton cannot compile it for this GPU the row says so).

The softmax scale folded into one multiply-add per score (``qk * scale - m``), now in the shipped step, was measured
here first (results file at commit 14593d1: 4-6% of the forward's time on an H200).

Uniform heads (16 and 32 of 32) and the mixed budgets 8/16/24/32, at B1 S8192, B8 S2048 and B32 S512, bf16, head
dim 128, causal; outputs checked against SDPA. Eager do_bench medians (L2 flushed).
Usage: python benchmarks/lab/explore_attention.py [--out DIR] [--quick] [--variants loop,ws] [--tiles "64,128,4,3;..."]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import bench_ms, run_info

from flextron_kernels import attention_backend, elastic_attention
from flextron_kernels._hopper import TensorDescriptor
from flextron_kernels.elastic_attention import _attn_fwd_tma_kernel

LOG2E = 1.4426950408889634
TILES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 128, 8, 2), (128, 64, 8, 4)]


def parse_tile(text: str) -> tuple[int, int, int, int]:
    """``"BLOCK_M,BLOCK_N,num_warps,num_stages"`` -> a tile config (powers of two for the blocks and warps)."""
    try:
        tile = tuple(int(p) for p in text.split(","))
    except ValueError:
        tile = ()
    if len(tile) != 4 or any(v < 1 for v in tile) or any(v & (v - 1) for v in tile[:3]):
        raise argparse.ArgumentTypeError(f"a tile is BLOCK_M,BLOCK_N,num_warps,num_stages (powers of two but the "
                                         f"stages), got {text!r}")
    return tile


def variant(q, k, v, heads, tile, ws):
    bm, bn, w, st = tile
    B, HQ, Sq, D = q.shape
    Sk = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((B, HQ, Sq), dtype=torch.float32, device=q.device)

    def desc(t, blk):
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, blk, D])

    # The shipped kernel itself, past its autotuner: this tile config, and the key loop warp-specialised or not.
    _attn_fwd_tma_kernel.fn[(triton.cdiv(Sq, bm), B * HQ)](
        desc(q, bm), desc(k, bn), desc(v, bn), desc(o, bm), lse, heads, HQ, HQ // k.shape[1], Sq, Sk, Sk - Sq,
        Sq, LOG2E / math.sqrt(D), HEAD_DIM=D, CAUSAL=True, UPCAST=False, PRECISION="ieee", BLOCK_M=bm, BLOCK_N=bn,
        WS=ws, num_warps=w, num_stages=st)
    return o


def reference(q, k, v, heads):
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    keep = torch.arange(q.shape[1], device=q.device)[None, :] < heads[:, None]
    return o * keep[:, :, None, None]


def case(b, s, hkv, head_list, variants, tiles):
    hq, d = 32, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    heads = torch.tensor(head_list, dtype=torch.int32, device="cuda")
    uniform = len(set(head_list)) == 1
    h0 = head_list[0]
    rep = hq // hkv
    qv, kv, vv = (q[:, :h0], k[:, : h0 // rep], v[:, : h0 // rep]) if uniform else (q, k, v)
    base = {"sdpa": lambda: F.scaled_dot_product_attention(qv, kv, vv, is_causal=True, enable_gqa=rep > 1)}
    with attention_backend("triton_tma"):
        base["shipped"] = lambda: elastic_attention(q, k, v, heads, validate=False)
        base["shipped"]()
    ref = reference(q, k, v, heads).float()
    row = {"B": b, "S": s, "hkv": hkv, "heads": head_list if not uniform else h0, "ms": {}, "err": {}}
    for name, fn in base.items():
        row["ms"][name] = bench_ms(fn)
    for vname, ws in variants:
        best = None
        for tile in tiles:
            try:
                out = variant(q, k, v, heads, tile, ws)
                err = (out.float() - ref).abs().max().item()
                ms = bench_ms(lambda tile=tile, ws=ws: variant(q, k, v, heads, tile, ws))
            except Exception as e:  # a variant the installed Triton cannot build for this GPU
                row["err"][f"{vname}{tile}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                continue
            if err > 0.05:
                row["err"][f"{vname}{tile}"] = f"max error {err:.3g}"
                continue
            if best is None or ms < best[0]:
                best = (ms, tile)
        if best is not None:
            row["ms"][vname] = best[0]
            row.setdefault("tile", {})[vname] = list(best[1])
    sd = row["ms"]["sdpa"]
    row["speed_vs_sdpa"] = {k: round(sd / v, 3) for k, v in row["ms"].items()}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write explore_attention_<GPU>.json into DIR")
    ap.add_argument("--quick", action="store_true", help="B8 S2048 and B32 S512 at 32 KV heads only")
    ap.add_argument("--variants", default="loop,ws", help="comma-separated, of: loop, ws")
    default_tiles = ";".join(",".join(map(str, t)) for t in TILES)
    ap.add_argument("--tiles", default=None,
                    help=f"tile configs, 'BLOCK_M,BLOCK_N,num_warps,num_stages;...' (default: {default_tiles})")
    args = ap.parse_args(argv)
    known = {"loop": False, "ws": True}
    names = [v for v in args.variants.split(",") if v]
    if not names or any(v not in known for v in names):
        ap.error(f"--variants must name some of {sorted(known)}, got {args.variants!r}")
    variants = [(v, known[v]) for v in names]
    try:
        tiles = TILES if args.tiles is None else [parse_tile(t) for t in args.tiles.split(";") if t.strip()]
    except argparse.ArgumentTypeError as e:
        ap.error(f"--tiles: {e}")
    if not tiles:
        ap.error("--tiles names no tile")
    shapes = [(8, 2048), (32, 512)] if args.quick else [(1, 8192), (8, 2048), (32, 512)]
    rows = []
    for hkv in (32,) if args.quick else (32, 8):
        for b, s in shapes:
            for h in (16, 32):
                rows.append(case(b, s, hkv, [h] * b, variants, tiles))
            if b >= 4:
                rows.append(case(b, s, hkv, [8, 16, 24, 32] * (b // 4), variants, tiles))
    for r in rows:
        sp = r["speed_vs_sdpa"]
        print(f"B{r['B']:>2} S{r['S']:>5} hkv{r['hkv']:>2} heads {str(r['heads'])[:14]:>14}: "
              + "  ".join(f"{k} {v:.2f}x" for k, v in sp.items()))
    if args.out:
        path = Path(args.out) / f"explore_attention_{torch.cuda.get_device_name().replace(' ', '_')}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**run_info(), "rows": rows}, indent=1))
        tmp.replace(path)
        print("wrote", path)


if __name__ == "__main__":
    main()
