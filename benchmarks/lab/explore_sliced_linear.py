"""Kernel-variant sweep for sliced_linear on a GPU: which GEMM form closes the gap to cuBLAS (one device call).

Not a benchmark of the library (bench_sliced_linear.py is): it times candidate kernels against cuBLAS on the
contiguous copy of each slice, so the next kernel change is chosen from measurements. Variants:

  ptr[cfg]      the library's pointer-based kernel with a given block config
  tma[cfg]      TMA descriptors over the weight prefix (shape [n, k], the full row stride), one tile per program
  ptma[cfg]     the same, persistent (one program per SM), optionally warp-specialised
  swap[cfg]     decode: y^T = W x^T, so the weight rows fill the MMA's M side (M = tokens is tiny)

Prints a table (TFLOP/s for prefill, GB/s of weight stream for decode) and writes JSON to --out.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/: _common

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from _common import bench_graph_ms, bench_ms, result_path, run_info
from triton.tools.tensor_descriptor import TensorDescriptor

from flextron_kernels.sliced_linear import _strided_matmul_kernel
from flextron_kernels.sliced_linear import _tile_of as _tile

DT = torch.bfloat16
NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132


@triton.jit
def _tma_kernel(a_desc, b_desc, c_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile(tl.program_id(0), num_m, num_n, GROUP_M)
    om = pid_m * BLOCK_M
    on = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES):
        a = a_desc.load([om, ki * BLOCK_K])
        b = b_desc.load([on, ki * BLOCK_K])
        acc = tl.dot(a, b.T, acc)
    c_desc.store([om, on], acc.to(c_desc.dtype))


@triton.jit
def _ptma_kernel(a_desc, b_desc, c_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WS: tl.constexpr,
                 FLATTEN: tl.constexpr):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_m * num_n
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WS):
        pid_m, pid_n = _tile(tile_id, num_m, num_n, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([om, ki * BLOCK_K])
            b = b_desc.load([on, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        c_desc.store([om, on], acc.to(c_desc.dtype))


@triton.jit
def _swap_kernel(x_ptr, w_ptr, y_ptr, M, N, K, sxm, sxk, swn, swk, sym, syn, BLOCK_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, SPLIT_K: tl.constexpr):
    """acc[BN, BM] = W[BN, BK] @ x^T[BK, BM]: weight rows on the MMA's M side. SPLIT_K > 1: fp32 atomics."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rn_ld = (rn % N).to(tl.int64)
    rm_ld = (rm % M).to(tl.int64)
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_per
    w_ptrs = w_ptr + rn_ld[:, None] * swn + (k_lo + rk)[None, :] * swk
    x_ptrs = x_ptr + rm_ld[None, :] * sxm + (k_lo + rk)[:, None] * sxk
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_hi = min(K, k_lo + k_per)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        kl = k_hi - k0
        w = tl.load(w_ptrs, mask=rk[None, :] < kl, other=0.0)
        xt = tl.load(x_ptrs, mask=rk[:, None] < kl, other=0.0)
        acc = tl.dot(w, xt, acc)
        w_ptrs += BLOCK_K * swk
        x_ptrs += BLOCK_K * sxk
    y_ptrs = y_ptr + rm[None, :].to(tl.int64) * sym + rn[:, None].to(tl.int64) * syn
    mask = (rn[:, None] < N) & (rm[None, :] < M)
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")


def run_ptr(x, W, n, k, cfg):
    M = x.shape[0]
    y = torch.empty((M, n), device=x.device, dtype=x.dtype)
    grid = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    _strided_matmul_kernel[(grid,)](x, W, y, y, M, n, k, x.stride(0), x.stride(1), W.stride(1), W.stride(0), n, 1,
                                    HAS_BIAS=False, UPCAST=False, PRECISION="ieee",
                                    EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg)
    return y


def _descs(x, W, y, n, k, bm, bn, bk):
    a = TensorDescriptor(x, [x.shape[0], k], [x.stride(0), 1], [bm, bk])
    b = TensorDescriptor(W, [n, k], [W.stride(0), 1], [bn, bk])
    c = TensorDescriptor(y, [x.shape[0], n], [y.stride(0), 1], [bm, bn])
    return a, b, c


def run_tma(x, W, n, k, cfg):
    M = x.shape[0]
    y = torch.empty((M, n), device=x.device, dtype=x.dtype)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    a, b, c = _descs(x, W, y, n, k, bm, bn, bk)
    grid = triton.cdiv(M, bm) * triton.cdiv(n, bn)
    _tma_kernel[(grid,)](a, b, c, M, n, k, **cfg)
    return y


def run_ptma(x, W, n, k, cfg):
    M = x.shape[0]
    y = torch.empty((M, n), device=x.device, dtype=x.dtype)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    a, b, c = _descs(x, W, y, n, k, bm, bn, bk)
    tiles = triton.cdiv(M, bm) * triton.cdiv(n, bn)
    _ptma_kernel[(min(NUM_SMS, tiles),)](a, b, c, M, n, k, NUM_SMS=NUM_SMS, **cfg)
    return y


def run_swap(x, W, n, k, cfg):
    M = x.shape[0]
    split = cfg["SPLIT_K"]
    y = (torch.zeros if split > 1 else torch.empty)((M, n), device=x.device,
                                                     dtype=torch.float32 if split > 1 else x.dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
    _swap_kernel[grid](x, W, y, M, n, k, x.stride(0), x.stride(1), W.stride(0), W.stride(1), y.stride(0), 1, **cfg)
    return y.to(x.dtype) if split > 1 else y


def P(bm, bn, bk, g, w, s):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w, num_stages=s)


def T(bm, bn, bk, w, s):
    """One tile per program, TMA loads."""
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, STAGES=s, num_warps=w)


def PT(bm, bn, bk, w, s, ws):
    """Persistent TMA (one program per SM), optionally warp-specialised."""
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, WS=ws, FLATTEN=not ws, num_warps=w, num_stages=s)


PREFILL = {
    "ptr128x256x64w8s3": (run_ptr, P(128, 256, 64, 8, 8, 3)),
    "ptr128x256x64w8s4": (run_ptr, P(128, 256, 64, 8, 8, 4)),
    "ptr128x128x64w8s4": (run_ptr, P(128, 128, 64, 8, 8, 4)),
    "ptr128x128x64w4s4": (run_ptr, P(128, 128, 64, 8, 4, 4)),
    "ptr256x128x64w8s3": (run_ptr, P(256, 128, 64, 8, 8, 3)),
    "tma128x256x64w8s3": (run_tma, T(128, 256, 64, 8, 3)),
    "tma128x256x64w8s4": (run_tma, T(128, 256, 64, 8, 4)),
    "tma128x128x64w8s4": (run_tma, T(128, 128, 64, 8, 4)),
    "tma128x128x64w4s4": (run_tma, T(128, 128, 64, 4, 4)),
    "ptma128x256x64w8s3": (run_ptma, PT(128, 256, 64, 8, 3, False)),
    "ptma128x128x64w8s4": (run_ptma, PT(128, 128, 64, 8, 4, False)),
    "ptma128x256x64ws": (run_ptma, PT(128, 256, 64, 8, 3, True)),
    "ptma128x128x64ws": (run_ptma, PT(128, 128, 64, 4, 4, True)),
}


def S(bn, bm, bk, s, w, split=1):
    return dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, STAGES=s, num_warps=w, SPLIT_K=split)


DECODE = {
    "ptr16x16x128w4s5": (run_ptr, P(16, 16, 128, 1, 4, 5)),
    "ptr16x32x128w4s5": (run_ptr, P(16, 32, 128, 1, 4, 5)),
    "ptr16x64x128w4s4": (run_ptr, P(16, 64, 128, 1, 4, 4)),
    "ptr16x32x256w4s4": (run_ptr, P(16, 32, 256, 1, 4, 4)),
    "swap64x16x128s4w4": (run_swap, S(64, 16, 128, 4, 4)),
    "swap64x16x256s3w4": (run_swap, S(64, 16, 256, 3, 4)),
    "swap128x16x128s4w4": (run_swap, S(128, 16, 128, 4, 4)),
    "swap32x16x256s4w4": (run_swap, S(32, 16, 256, 4, 4)),
    "swap64x16x128s4w4k2": (run_swap, S(64, 16, 128, 4, 4, 2)),
    "swap64x16x128s4w4k4": (run_swap, S(64, 16, 128, 4, 4, 4)),
}

WEIGHTS = [("llama2-7b.up", 11008, 4096, "out"), ("llama2-7b.down", 4096, 11008, "in"),
           ("llama2-7b.qo", 4096, 4096, "in")]


def main() -> None:
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "benchmarks/results"
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else "prefill,decode"
    torch.manual_seed(0)
    rows = []
    for wname, N, K, side in WEIGHTS:
        W = torch.randn(N, K, device="cuda", dtype=DT) * 0.02
        for frac in (0.25, 0.5, 1.0):
            n, k = (int(N * frac) // 8 * 8, K) if side == "out" else (N, int(K * frac) // 8 * 8)
            Wc = W[:n, :k].contiguous()
            for phase, T_list, variants in (("prefill", (4096, 512), PREFILL), ("decode", (1, 16), DECODE)):
                if phase not in only:
                    continue
                for T in T_list:
                    x = torch.randn(T, k, device="cuda", dtype=DT)
                    ref = F.linear(x.double(), Wc.double()) if T <= 512 else None
                    timer = bench_ms if phase == "prefill" else bench_graph_ms
                    row = {"weight": wname, "frac": frac, "n": n, "k": k, "T": T, "phase": phase,
                           "cublas_copy": timer(lambda x=x, Wc=Wc: F.linear(x, Wc))}
                    for name, (fn, cfg) in variants.items():
                        try:
                            y = fn(x, W, n, k, cfg)
                            if ref is not None:
                                err = ((y.double() - ref).norm() / ref.norm()).item()
                                if not err < 2e-2:
                                    row[name] = f"wrong {err:.2e}"
                                    continue
                            row[name] = timer(lambda fn=fn, x=x, W=W, cfg=cfg, n=n, k=k: fn(x, W, n, k, cfg))
                        except Exception as e:  # a variant that does not compile is a finding, not a stop
                            row[name] = f"error {type(e).__name__}: {str(e)[:120]}"
                            traceback.print_exc(limit=1)
                    rows.append(row)
                    flops = 2 * T * n * k
                    wbytes = 2 * n * k

                    def fmt(v, flops=flops, wbytes=wbytes, phase=phase):
                        if not isinstance(v, float):
                            return v[:14]
                        return f"{flops / v / 1e9:.0f}TF" if phase == "prefill" else f"{wbytes / v / 1e6:.0f}GB/s"
                    best = min((v, kname) for kname, v in row.items()
                               if isinstance(v, float) and kname != "cublas_copy")
                    print(f"{wname:15} {frac:4} T={T:5} cublas {fmt(row['cublas_copy'])} best {best[1]} "
                          f"{fmt(best[0])} ({row['cublas_copy'] / best[0]:.2f}x) | "
                          + " ".join(f"{kk}={fmt(v)}" for kk, v in row.items() if kk not in (
                              "weight", "frac", "n", "k", "T", "phase", "cublas_copy")), flush=True)
    path = result_path(out, "explore_sliced_linear")
    with open(path, "w") as f:
        json.dump({"info": run_info(), "rows": rows}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__" and "--backward" not in sys.argv:
    main()


def explore_backward() -> None:
    """fwd+bwd of sliced_linear at 4096 tokens with each backward product on the TMA kernel or not: which of
    dX (A = dy) and dW (A = dy transposed through its descriptor) loses time at narrow widths."""
    import importlib

    from flextron_kernels import sliced_linear

    sl = importlib.import_module("flextron_kernels.sliced_linear")
    plan = sl._tma_plan
    modes = {
        "tma_all": plan,
        "no_trans_a": lambda a, b, out, M, N, K, sam, sak, *r: None if sam == 1 and sak != 1 else plan(
            a, b, out, M, N, K, sam, sak, *r),
        "fwd_only": lambda a, b, out, M, N, K, sam, sak, sbk, sbn, *r: plan(a, b, out, M, N, K, sam, sak, sbk, sbn,
                                                                            *r) if sbk == 1 else None,
    }
    for wname, N, K, side in WEIGHTS[:2]:
        W = (torch.randn(N, K, device="cuda", dtype=DT) * 0.02).requires_grad_()
        for frac in (0.25, 1.0):
            n, k = (int(N * frac), K) if side == "out" else (N, int(K * frac))
            x = torch.randn(4096, k, device="cuda", dtype=DT, requires_grad=True)
            dy = torch.randn(4096, n, device="cuda", dtype=DT)
            Wc = W[:n, :k].detach().contiguous().requires_grad_()
            res = {"cublas_copy": bench_ms(lambda x=x, Wc=Wc, dy=dy: F.linear(x, Wc).backward(dy),
                                           grad_to_none=[x, Wc])}
            for name, fn in modes.items():
                sl._tma_plan = fn
                res[name] = bench_ms(lambda x=x, W=W, n=n, dy=dy: sliced_linear(x, W, None, n).backward(dy),
                                     grad_to_none=[x, W])
            sl._tma_plan = plan
            print(f"bwd {wname:15} {frac:4} " + " ".join(f"{kk}={v * 1e3:.0f}us" for kk, v in res.items()), flush=True)


if __name__ == "__main__" and "--backward" in sys.argv:
    explore_backward()
