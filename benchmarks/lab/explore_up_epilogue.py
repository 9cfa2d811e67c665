"""Why the backward's up kernel (dA) was slow: a plain TMA matmul with and without the dA epilogue.

GPU only (Hopper). One question per part, each a 128x128x64 tile, 8 warps, TMA loads:
- ``major``: is an N-major B operand (the backward reads the down weight ``[H, I]`` as stored) slower than a
  K-major one? One product and two products sharing A, M=8192, K=4096, N=6912, against cuBLAS.
- ``epilogue``: the cost of the dA epilogue (two [T, N] buffer loads and three stores, all by TMA) after a
  one-product main loop, M=8192, K=4096, N=11008 (Llama-2-7B), 3 and 4 stages.

On an H200, B's major order made no difference (one product: 711 us N-major against 722 K-major, cuBLAS 649); the
epilogue took the kernel from 1099 to 1696 us with 3 stages and to 1446 with 4, which is why the plan gives the
backward's up kernel 4 stages. This script has run only under the interpreter in its present form.
Usage: ``python benchmarks/lab/explore_up_epilogue.py [major|epilogue|all]``.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _pid(M, N, BM: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    group = 8 * num_n
    first = (pid // group) * 8
    size = min(tl.cdiv(M, BM) - first, 8)
    return first + (pid % group) % size, (pid % group) // size


@triton.jit
def _mm(a_d, b_d, b2_d, c_d, M, N, K, NK: tl.constexpr, DUAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        BK: tl.constexpr):
    pm, pn = _pid(M, N, BM, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    acc2 = tl.zeros((BM, BN), tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        a = a_d.load([pm * BM, k * BK])
        b = b_d.load([pn * BN, k * BK]).T if NK else b_d.load([k * BK, pn * BN])
        acc = tl.dot(a, b, acc)
        if DUAL:
            b2 = b2_d.load([pn * BN, k * BK]).T if NK else b2_d.load([k * BK, pn * BN])
            acc2 = tl.dot(a, b2, acc2)
    if DUAL:
        acc = acc * acc2
    c_d.store([pm * BM, pn * BN], acc.to(tl.bfloat16))


@triton.jit
def _mm_epi(a_d, b_d, c_d, h_d, g_d, o2_d, o3_d, M, N, K, EPI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            BK: tl.constexpr):
    pm, pn = _pid(M, N, BM, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        acc = tl.dot(a_d.load([pm * BM, k * BK]), b_d.load([k * BK, pn * BN]), acc)
    if EPI:  # the dA epilogue of SwiGLU: dg, dh and the recomputed activation
        h = h_d.load([pm * BM, pn * BN]).to(tl.float32)
        g = g_d.load([pm * BM, pn * BN]).to(tl.float32)
        s = tl.sigmoid(g)
        f = g * s
        c_d.store([pm * BM, pn * BN], (acc * h * s * (1.0 + g * (1.0 - s))).to(tl.bfloat16))
        o2_d.store([pm * BM, pn * BN], (acc * f).to(tl.bfloat16))
        o3_d.store([pm * BM, pn * BN], (f * h).to(tl.bfloat16))
    else:
        c_d.store([pm * BM, pn * BN], acc.to(tl.bfloat16))


def _desc(t, block):
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], block)


def _time(fn, flop):
    ms = triton.testing.do_bench(fn, warmup=20, rep=100)
    return f"{ms * 1e3:.0f} us, {flop / ms / 1e9:.0f} TFLOP/s"


def major():
    M, K, N = 8192, 4096, 6912
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    grid = (triton.cdiv(M, 128) * triton.cdiv(N, 128),)
    for nk in (True, False):
        w = torch.randn(*((N, K) if nk else (K, N)), device="cuda", dtype=torch.bfloat16)
        bd = _desc(w, [128, 64] if nk else [64, 128])
        for dual in (False, True):
            for warps, stages in ((8, 3), (8, 4)):
                def run(bd=bd, nk=nk, dual=dual, warps=warps, stages=stages):
                    _mm[grid](_desc(a, [128, 64]), bd, bd, _desc(c, [128, 128]), M, N, K, NK=nk, DUAL=dual,
                              BM=128, BN=128, BK=64, num_warps=warps, num_stages=stages)
                print(f"B {'K' if nk else 'N'}-major, {'two products' if dual else 'one product'}, w{warps} "
                      f"s{stages}: {_time(run, 2 * M * N * K * (2 if dual else 1))}", flush=True)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    print(f"cuBLAS a @ b: {_time(lambda: a @ b, 2 * M * N * K)}")


def epilogue():
    M, K, N = 8192, 4096, 11008
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    bufs = [_desc(torch.randn(M, N, device="cuda", dtype=torch.bfloat16), [128, 128]) for _ in range(5)]
    grid = (triton.cdiv(M, 128) * triton.cdiv(N, 128),)
    for epi in (False, True):
        for stages in (3, 4):
            def run(epi=epi, stages=stages):
                _mm_epi[grid](_desc(a, [128, 64]), _desc(w, [64, 128]), *bufs, M, N, K, EPI=epi, BM=128, BN=128,
                              BK=64, num_warps=8, num_stages=stages)
            print(f"N={N}, {'dA epilogue' if epi else 'plain store'}, s{stages}: {_time(run, 2 * M * N * K)}",
                  flush=True)


if __name__ == "__main__":
    part = sys.argv[1] if len(sys.argv) > 1 else "all"
    if not torch.cuda.is_available():
        raise SystemExit("explore_up_epilogue needs a CUDA GPU")
    print(torch.cuda.get_device_name(), "triton", triton.__version__)
    if part in ("major", "all"):
        major()
    if part in ("epilogue", "all"):
        epilogue()
