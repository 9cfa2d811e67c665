"""Host time of one decode step's launches on a GPU machine, piece by piece.

Tiny problems (the GPU finishes each launch before the host issues the next), so a loop's wall time per call is
the host's. Times, per call: an ATen launch for scale; SDPA's GQA decode step (the baseline); the public
``elastic_attention_decode``; ``decode`` (allocations and launches, no checks); the split kernel through
``kernel[grid]`` (the autotuner and Triton's JIT path) and through ``DirectLaunch``; the binder alone; and the
compiled kernel's own launcher (``CompiledKernel.run``) with the bound arguments. Then a cProfile of ``decode``,
and the prefill forward's host time on a tiny prompt.

    python benchmarks/lab/launch_overhead.py [--calls 2000] [--out DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton import knobs
from triton.runtime import driver

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import run_info, write_result

from flextron_kernels import attention_backend
from flextron_kernels.elastic_attention_decode import decode, elastic_attention_decode

# The package exports functions of these modules' names: the modules themselves, for their launch internals.
EA = importlib.import_module("flextron_kernels.elastic_attention")
DEC = importlib.import_module("flextron_kernels.elastic_attention_decode")


def per_call_us(fn, calls: int, repeats: int = 5) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def one_shape(B: int, HQ: int, HKV: int, S: int, calls: int) -> dict:
    dev = torch.device("cuda")
    dt = torch.bfloat16
    D = 128
    q = torch.randn(B, HQ, D, device=dev, dtype=dt)
    kc = torch.randn(B, HKV, S, D, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    lens = torch.full((B,), S, device=dev, dtype=torch.int32)
    heads = torch.tensor([HQ * (1 + i % 4) // 4 for i in range(B)], device=dev, dtype=torch.int32)
    scale = D ** -0.5
    x = torch.randn(16, device=dev)
    chunk, nsplit = DEC.chunking(B, HKV, S, dev)
    o = torch.empty_like(q)
    po = o if nsplit == 1 else torch.empty((B, HQ, nsplit, D), dtype=torch.float32, device=dev)
    plse = o if nsplit == 1 else torch.empty((B, HQ, nsplit), dtype=torch.float32, device=dev)
    pos = (q, kc, vc, po, plse, o, lens, heads, *q.stride(), *kc.stride(), *vc.stride(), *o.stride(),
           HQ, HKV, HQ // HKV, S, nsplit, chunk, DEC.next_pow2(S), scale * DEC.LOG2E)
    kw = dict(HEAD_DIM=D, BLOCK_H=max(16, DEC.next_pow2(HQ // HKV)), UPCAST=False, PRECISION="ieee",
              DIRECT=nsplit == 1)
    grid = (nsplit, B * HKV)
    kern = DEC._decode_split_kernel
    ck = kern[grid](*pos, **kw)
    kw_all = {**kw, **kern.best_config.kwargs}  # the autotuner's pick (BLOCK_N) completes the constexprs
    binder = kern.fn.device_caches[dev.index or 0][4]
    bound, _spec, _opts = binder(*pos, **kw_all)
    vals = tuple(bound.values())
    stream = driver.active.get_current_stream(dev.index or 0)
    fn, meta = ck.function, ck.packed_metadata
    run = ck.run
    enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook

    def direct():
        run(grid[0], grid[1], 1, stream, fn, meta, None, enter, exit_, *vals)

    def direct_args():  # what a cached launcher would do per call: rebuild the argument tuple
        run(grid[0], grid[1], 1, stream, fn, meta, None, enter, exit_,
            q, kc, vc, po, plse, o, lens, heads, *q.stride(), *kc.stride(), *vc.stride(), *o.stride(),
            HQ, HKV, HQ // HKV, S, nsplit, chunk, 256, scale * DEC.LOG2E, D, 16, False, "ieee", nsplit == 1,
            kw_all["BLOCK_N"])

    cache = {}

    def spec_key(a):  # what the binder specialises on: a pointer's 16-byte alignment; an int's 1, %16, int64
        if isinstance(a, torch.Tensor):
            return a.data_ptr() % 16 == 0
        if isinstance(a, int):
            return (a == 1, a % 16 == 0, a >= 1 << 31)
        return None

    def prototype():  # a cache keyed in Python on those properties, then the compiled launcher
        args = (q, kc, vc, po, plse, o, lens, heads, *q.stride(), *kc.stride(), *vc.stride(), *o.stride(),
                HQ, HKV, HQ // HKV, S, nsplit, chunk, 256, scale * DEC.LOG2E)
        key = tuple(map(spec_key, args))
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = ck
        hit.run(grid[0], grid[1], 1, stream, hit.function, hit.packed_metadata, None, enter, exit_,
                *args, D, 16, False, "ieee", nsplit == 1, kw_all["BLOCK_N"])

    kq = kc[:, :, :S]
    cases = {
        "aten_add": lambda: x.add(1.0),
        "torch.empty": lambda: torch.empty((B, HQ, D), dtype=dt, device=dev),
        "sdpa_gqa_step": lambda: F.scaled_dot_product_attention(q[:, :, None], kq, vc, enable_gqa=True),
        "elastic_attention_decode": lambda: elastic_attention_decode(q, kc, vc, lens, heads, validate=False),
        "decode": lambda: decode(q, kc, vc, lens, heads, scale),
        "split_kernel[grid]": lambda: kern[grid](*pos, **kw),
        "DirectLaunch (shipped)": lambda: DEC._SPLIT(grid, pos[:8], pos[8:], tuple(kw.values())),
        "binder": lambda: binder(*pos, **kw_all),
        "get_current_stream": lambda: driver.active.get_current_stream(dev.index or 0),
        "compiled.run (bound args)": direct,
        "compiled.run (args rebuilt)": direct_args,
        "prototype cache + run": prototype,
    }
    name = f"B{B}_HQ{HQ}_HKV{HKV}_S{S}_nsplit{nsplit}"
    row = {k: per_call_us(f, calls) for k, f in cases.items()}
    print(f"== {name}")
    for k, v in row.items():
        print(f"  {k:30s} {v:8.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        decode(q, kc, vc, lens, heads, scale)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return row


def prefill_host(calls: int) -> dict:
    """The forward's host time on a tiny prompt: TMA kernel (descriptors, autotuner), pointer kernel, SDPA."""
    dev = torch.device("cuda")
    q = torch.randn(2, 32, 16, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(2, 8, 16, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    heads = torch.tensor([16, 32], device=dev, dtype=torch.int32)
    row = {}
    for name in ("triton_tma", "triton"):
        with attention_backend(name):
            row[f"forward ({name})"] = per_call_us(lambda: EA.forward(q, k, v, heads, True, 128 ** -0.5), calls)
    row["4 TensorDescriptors"] = per_call_us(lambda: [EA._desc(t) for t in (q, k, v, q)], calls)
    row["sdpa causal gqa"] = per_call_us(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), calls)
    print("== prefill B2 S16")
    for key, val in row.items():
        print(f"  {key:30s} {val:8.1f} us")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = {}
    for B, HQ, HKV, S in ((8, 32, 8, 256), (32, 32, 32, 256)):
        rows[f"B{B}_HQ{HQ}_HKV{HKV}_S{S}"] = one_shape(B, HQ, HKV, S, args.calls)
    rows["prefill_B2_S16"] = prefill_host(args.calls)
    if args.out:
        write_result(args.out, "launch_overhead", dict(
            benchmark="launch_overhead", **run_info(), rows=rows,
            timing=f"host microseconds per call: wall time of {args.calls} calls on tiny problems (the GPU keeps "
            "up), best of 5; bf16, head dim 128"))


if __name__ == "__main__":
    main()
