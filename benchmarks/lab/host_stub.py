"""The host Python of one nested_mlp forward call with every Triton launch stubbed out (no GPU needed).

What it measures: our wrapper's own cost (checks, plan, allocations, TMA descriptors, launch arguments) under the
GPU plans, per call, with the routing's single launch (``fused_route``) and without. What it does not: Triton's
launcher (argument specialisation, the driver call), which needs a GPU and dominates a call's host time there
(``explore_nested_mlp.py --host``). Small H and I keep the CPU's own copies (index_select) negligible.

    python benchmarks/lab/host_stub.py
"""

from __future__ import annotations

import importlib
import os
import time

os.environ.pop("TRITON_INTERPRET", None)  # the GPU plans, not the interpreter's

import torch

from flextron_kernels.nested_mlp import launch as NL
from flextron_kernels.nested_mlp import plan as NP

NOP = importlib.import_module("flextron_kernels.nested_mlp.op")
R = importlib.import_module("flextron_kernels.routing")


class _Stub:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def _routing(widths, sort=True):
    """The count kernel's host side (allocations and a stubbed launch), with a valid order for the gather."""
    w = widths.reshape(-1)
    if not sort:
        return w, None
    w = w.contiguous()
    sw, order = torch.empty_like(w), torch.zeros(w.numel(), dtype=torch.int64)
    R._rank_kernel[(1, 1)](w, sw, order)
    return sw, order


def main(H: int = 64, inter: int = 512, calls: int = 500, repeats: int = 5):
    for name in ("up_kernel", "down_kernel", "wgrad_kernel", "route_kernel"):
        setattr(NL, name, _Stub())
    R._rank_kernel = _Stub()
    NL.tma_sms = lambda device: 132  # as on the H200: the TMA forms and their descriptors
    NL.sm_count = lambda device: 132
    NOP.use_triton = lambda t: True
    NL.nested_mlp_routing = _routing
    dt = torch.bfloat16
    ws = [torch.randn(*s, dtype=dt) for s in ((inter, H), (inter, H), (H, inter))]
    for fused in (False, True):
        with NP.override(lambda p, fused=fused: p.replace(fused_route=fused)):
            _time(ws, H, inter, calls, repeats, fused)


def _time(ws, H, inter, calls, repeats, fused):
    dt = torch.bfloat16
    for T in (1, 16, 256, 1024):
        x = torch.randn(T, H, dtype=dt)
        w = torch.randint(1, inter + 1, (T,))

        def call(x=x, w=w):
            return NOP.nested_mlp(x, ws[1], ws[2], w, gate_weight=ws[0], check_widths=False)
        for _ in range(200):
            call()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        print(f"fused_route={fused} T={T}: {best:.1f} us per call (best of {repeats} x {calls})", flush=True)


if __name__ == "__main__":
    main()
