"""Variants of elastic_attention's TMA forward against the kernel as shipped and against SDPA (cuDNN on Hopper).

Each variant is the shipped TMA forward launched past its autotuner, once per tile config of a list (best kept):

- ``loop``: as shipped (the control: the autotuner's choice against each config timed alone);
- ``ws``: the unmasked key loop warp-specialised (the kernel's ``WS``, ``tl.range(..., warp_specialize=True)``;
  where the installed Triton cannot compile it for this GPU the row says so).

The softmax scale folded into one multiply-add per score (``qk * scale - m``), now in the shipped step, was measured
here first (results file at commit 14593d1: 4-6% of the forward's time on an H200).

Uniform heads (16 and 32 of 32) and the mixed budgets 8/16/24/32, at B1 S8192, B8 S2048 and B32 S512, bf16, head
dim 128, causal; outputs checked against SDPA. Eager do_bench medians (L2 flushed).

``--backward``: the backward's two kernels instead (``dkv``: a program per key block and KV head; ``dq``: a
program per query block and head), each launched past its autotuner per tile config and timed alone against the
autotuner's pick (``shipped``), outputs checked against the shipped kernels'; the row's ``backward`` entries are
the shipped backward whole (preprocess, dkv, dq) and the same with the best tile of each.
Usage: python benchmarks/lab/explore_attention.py [--out DIR] [--quick] [--variants loop,ws] [--tiles "64,128,4,3;..."]
       python benchmarks/lab/explore_attention.py --backward [--quick] [--tiles ...] [--out DIR]
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
from flextron_kernels._runtime import cdiv, dot_precision, upcast_flag
from flextron_kernels.elastic_attention import (
    _attn_bwd_dkv_kernel,
    _attn_bwd_dq_kernel,
    _attn_fwd_tma_kernel,
    _bwd_preprocess_kernel,
    _s_bucket,
)
from flextron_kernels.elastic_attention import backward as shipped_backward
from flextron_kernels.elastic_attention import forward as shipped_forward

LOG2E = 1.4426950408889634
TILES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 128, 8, 2), (128, 64, 8, 4)]
# The backward kernels' autotuned tiles (dkv, dq) and smaller ones that leave room for more programs per SM.
BWD_TILES = [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3),
             (32, 64, 4, 3), (32, 32, 4, 3)]


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


def bwd_kernel(kind, q, k, v, do, lse, delta, heads, scale, tile):
    """One backward kernel (``"dkv"`` or ``"dq"``) of the shipped backward, launched past its autotuner with
    ``tile``; returns its outputs."""
    bm, bn, w, st = tile
    B, HQ, Sq, D = q.shape
    HKV, Sk = k.shape[1], k.shape[2]
    args = dict(HEAD_DIM=D, CAUSAL=True, UPCAST=upcast_flag(q.dtype), PRECISION=dot_precision(q.dtype),
                BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    if kind == "dkv":
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        _attn_bwd_dkv_kernel.fn[(cdiv(Sk, bn), B * HKV)](
            q, k, v, do, dk, dv, lse, delta, heads, *strides, HQ, HKV, HQ // HKV, Sq, Sk, Sk - Sq, _s_bucket(Sq),
            scale * LOG2E, scale, **args)
        return dk, dv
    dq = torch.empty_like(q)
    _attn_bwd_dq_kernel.fn[(cdiv(Sq, bm), B * HQ)](
        q, k, v, do, dq, lse, delta, heads, *strides, HQ, HQ // HKV, Sq, Sk, Sk - Sq, _s_bucket(Sq),
        scale * LOG2E, scale, **args)
    return (dq,)


def bwd_case(q, k, v, heads, tiles, timer=bench_ms):
    """The backward of one case: the shipped backward whole, and each kernel per tile against the shipped
    kernel's outputs (``timer``: ms of a call; the tests pass a stub on a CPU)."""
    B, HQ, Sq, D = q.shape
    scale = 1.0 / math.sqrt(D)
    o, lse = shipped_forward(q, k, v, heads, True, scale)
    do = torch.randn_like(o)
    delta = torch.empty_like(lse)
    _bwd_preprocess_kernel[(cdiv(Sq, 64), B * HQ)](o, do, delta, heads, *o.stride(), *do.stride(), HQ, Sq,
                                                  HEAD_DIM=D, BLOCK_M=64)
    want_dq, want_dk, want_dv = shipped_backward(do, q, k, v, o, lse, heads, True, scale)
    want = {"dkv": (want_dk, want_dv), "dq": (want_dq,)}
    ms = {"backward_shipped": timer(lambda: shipped_backward(do, q, k, v, o, lse, heads, True, scale))}
    ms["preprocess"] = timer(lambda: _bwd_preprocess_kernel[(cdiv(Sq, 64), B * HQ)](
        o, do, delta, heads, *o.stride(), *do.stride(), HQ, Sq, HEAD_DIM=D, BLOCK_M=64))
    best, err = {}, {}
    for kind in ("dkv", "dq"):
        for tile in tiles:
            try:
                out = bwd_kernel(kind, q, k, v, do, lse, delta, heads, scale, tile)
                e = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, want[kind]))
                t = timer(lambda kind=kind, tile=tile: bwd_kernel(kind, q, k, v, do, lse, delta, heads, scale, tile))
            except Exception as ex:  # a tile the installed Triton cannot build for this GPU
                err[f"{kind}{tile}"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:160]}"
                continue
            if e > 0.05:
                err[f"{kind}{tile}"] = f"max difference from the shipped kernel {e:.3g}"
                continue
            if kind not in best or t < best[kind][0]:
                best[kind] = (t, list(tile))
        if kind in best:
            ms[f"{kind}_best"] = best[kind][0]
    if len(best) == 2:
        ms["backward_best_tiles"] = ms["preprocess"] + ms["dkv_best"] + ms["dq_best"]
    return {"ms": ms, "tile": {k: v[1] for k, v in best.items()}, "err": err}


def reference(q, k, v, heads):
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    keep = torch.arange(q.shape[1], device=q.device)[None, :] < heads[:, None]
    return o * keep[:, :, None, None]


def inputs(b, s, hkv, head_list):
    hq, d = 32, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v, torch.tensor(head_list, dtype=torch.int32, device="cuda")


def case_backward(b, s, hkv, head_list, tiles):
    row = {"B": b, "S": s, "hkv": hkv, "heads": head_list if len(set(head_list)) > 1 else head_list[0],
           **bwd_case(*inputs(b, s, hkv, head_list), tiles)}
    ms = row["ms"]
    if "backward_best_tiles" in ms:
        row["speed_vs_shipped"] = round(ms["backward_shipped"] / ms["backward_best_tiles"], 3)
    print(json.dumps(row), flush=True)
    return row


def case(b, s, hkv, head_list, variants, tiles):
    q, k, v, heads = inputs(b, s, hkv, head_list)
    uniform = len(set(head_list)) == 1
    h0 = head_list[0]
    rep = q.shape[1] // hkv
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
    ap.add_argument("--backward", action="store_true", help="sweep the backward's dkv and dq kernels instead")
    default_tiles = ";".join(",".join(map(str, t)) for t in TILES)
    default_bwd = ";".join(",".join(map(str, t)) for t in BWD_TILES)
    ap.add_argument("--tiles", default=None,
                    help=f"tile configs, 'BLOCK_M,BLOCK_N,num_warps,num_stages;...' (default: {default_tiles}; "
                         f"with --backward {default_bwd})")
    args = ap.parse_args(argv)
    known = {"loop": False, "ws": True}
    names = [v for v in args.variants.split(",") if v]
    if not names or any(v not in known for v in names):
        ap.error(f"--variants must name some of {sorted(known)}, got {args.variants!r}")
    variants = [(v, known[v]) for v in names]
    try:
        default = BWD_TILES if args.backward else TILES
        tiles = default if args.tiles is None else [parse_tile(t) for t in args.tiles.split(";") if t.strip()]
    except argparse.ArgumentTypeError as e:
        ap.error(f"--tiles: {e}")
    if not tiles:
        ap.error("--tiles names no tile")
    shapes = [(8, 2048), (32, 512)] if args.quick else [(1, 8192), (8, 2048), (32, 512)]
    rows = []
    if args.backward:
        for hkv in (32,) if args.quick else (32, 8):
            for b, s in shapes:
                rows.append(case_backward(b, s, hkv, [32] * b, tiles))
                if b >= 4:
                    rows.append(case_backward(b, s, hkv, [8, 16, 24, 32] * (b // 4), tiles))
        for r in rows:
            print(f"B{r['B']:>2} S{r['S']:>5} hkv{r['hkv']:>2} heads {str(r['heads'])[:14]:>14}: tiles {r['tile']} "
                  f"backward {r.get('speed_vs_shipped')}x the shipped")
        _write(args.out, "explore_attention_bwd", rows)
        return
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
    _write(args.out, "explore_attention", rows)


def _write(out, name, rows):
    if out:
        path = Path(out) / f"{name}_{torch.cuda.get_device_name().replace(' ', '_')}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**run_info(), "rows": rows}, indent=1))
        tmp.replace(path)
        print("wrote", path)


if __name__ == "__main__":
    main()
