"""Registers, spills and shared memory of nested_mlp's up kernel for sm_90, compiled on the CPU (no GPU needed).

Triton's wheel ships ptxas: the kernel is compiled for Hopper exactly as a launch would (the launch arguments are
captured from ``_launch_up`` with CPU stand-in tensors), and ``ptxas -v`` reports its resources. Use it to compare
plan variants before spending device time, e.g. the stream-K tail against the plan:

    python benchmarks/kernel_regs.py --T 256 --set STREAM_K=4 --set SK_SMS=132

2026-11-29 (benchmarks/NOTES.md): at 256 tokens the plan's forward up kernel uses 172 registers; with the stream-K
tail it uses 254 (no spills), which is the lead for why that form was slower on the H200 even where nothing split.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, not the interpreter

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type

NM = importlib.import_module("flextron_kernels.nested_mlp")  # the package exports the function by that name


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def up_kernel_resources(T: int, H: int, inter: int, changes: dict, backward: bool = False) -> dict:
    """Compile the up kernel as the plan (with ``changes`` to its up config) would launch it for a sorted bf16
    batch of T tokens with host TMA descriptors; return ptxas's report."""
    captured = {}

    class Capture:
        def __getitem__(self, grid):
            return lambda *args, **kw: captured.update(args=args, kw=kw)

    real = NM._up_kernel
    NM._up_kernel = Capture()
    try:
        dt = torch.bfloat16
        src = torch.empty(T, H, dtype=dt)
        w = torch.empty((H, inter) if backward else (inter, H), dtype=dt)
        plan = NM._plan(T, dt)
        cfg = dict(NM._up_bwd_cfg(plan) if backward else plan["up"], **changes)
        lda = triton.cdiv(inter, cfg["BLOCK_N"]) * cfg["BLOCK_N"]
        bufs = [torch.empty(T, lda, dtype=dt) for _ in range(5)]
        sw, order = torch.empty(T, dtype=torch.int64), torch.empty(T, dtype=torch.int64)
        a, h, g, dh, dg = bufs
        if backward:
            NM._launch_up(src, order, sw, w, None, False, None, h, g, a, dh, dg, inter, 0, True, False, cfg, True,
                          "host", True)
        else:
            NM._launch_up(src, order, sw, w, w, True, None, None, None, a, None, None, inter, 0, False, False, cfg,
                          True, "host", True)
    finally:
        NM._up_kernel = real
    kw = dict(captured["kw"])
    options = {"num_warps": kw.pop("num_warps", 4), "num_stages": kw.pop("num_stages", 3)}
    sig = {n: mangle_type(v) for n, v in zip(real.arg_names, captured["args"])}
    sig.update({n: "constexpr" for n in kw})
    kernel = triton.compile(ASTSource(real, sig, kw), target=GPUTarget("cuda", 90, 32), options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(d, "k.cubin")],
                                capture_output=True, text=True, check=True).stderr
    lines = [ln.strip() for ln in report.splitlines() if "registers" in ln or "spill" in ln]
    return {"shared_bytes": kernel.metadata.shared, "ptxas": lines}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--H", type=int, default=4096)
    ap.add_argument("--I", type=int, default=11008)
    ap.add_argument("--backward", action="store_true", help="the backward's form (dA)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a change to the up config")
    args = ap.parse_args()
    changes = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    out = up_kernel_resources(args.T, args.H, args.I, changes, args.backward)
    print(f"T={args.T} up {'backward' if args.backward else 'forward'} {changes or 'plan'}: "
          f"shared {out['shared_bytes']} B; " + "; ".join(out["ptxas"]))


if __name__ == "__main__":
    main()
