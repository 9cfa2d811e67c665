"""Registers, spills and shared memory of nested_mlp's kernels for sm_90, compiled on the CPU (no GPU needed).

Triton's wheel ships ptxas: each kernel of one forward+backward is compiled for Hopper exactly as its launch would
be (the launch arguments are captured from the op with CPU stand-in tensors; nothing runs), and ``ptxas -v``
reports its resources. Use it to compare plan variants before spending device time, e.g. the up product's tail split:

    python benchmarks/lab/kernel_regs.py --T 256 --inference --set up.TAIL=4

Registers alone prove little (a kernel at 254 registers may still be the faster); spills are the firmer signal.
"""

from __future__ import annotations

import argparse
import contextlib
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

from flextron_kernels.nested_mlp import launch as NL
from flextron_kernels.nested_mlp import plan as NP

NOP = importlib.import_module("flextron_kernels.nested_mlp.op")


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def _compile(fn, args, kw) -> dict:
    kw = dict(kw)
    options = {"num_warps": kw.pop("num_warps", 4), "num_stages": kw.pop("num_stages", 3)}
    sig = {n: mangle_type(v) for n, v in zip(fn.arg_names, args)}
    sig.update({n: "constexpr" for n in kw})
    kernel = triton.compile(ASTSource(fn, sig, kw), target=GPUTarget("cuda", 90, 32), options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(d, "k.cubin")],
                                capture_output=True, text=True, check=True).stderr
    lines = [ln.replace("ptxas info    : ", "").strip() for ln in report.splitlines()
             if "registers" in ln or "spill" in ln]
    return {"shared_bytes": kernel.metadata.shared, "ptxas": lines}


def step_resources(T: int, H: int, inter: int, changes: dict, train: bool = True) -> list[tuple[str, dict]]:
    """Compile every kernel launch of one nested_mlp forward+backward (``train``; else an inference forward) as
    the plan with ``changes`` (``{"up": {...}, ...}``) would launch it: SwiGLU, bf16, a sorted batch of T tokens,
    host TMA descriptors where the plan takes them; nothing runs. Returns (launch, ptxas report) per launch."""
    launches = []
    real = {name: getattr(NL, name) for name in ("up_kernel", "down_kernel", "wgrad_kernel", "route_kernel")}

    class Capture:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((self.name, args, kw))
                if self.name == "route_kernel" and kw.get("RANK"):
                    # Nothing runs: give the backward a valid order and sorted widths, as the routing would.
                    names = real[self.name].arg_names
                    w, sw, order = (args[names.index(n)] for n in ("w_ptr", "sw_ptr", "order_ptr"))
                    order.copy_(torch.arange(order.numel()))
                    sw.copy_(w)
            return launch

    saved = [(m, n, getattr(m, n)) for m, n in ((NL, "tma_sms"), (NL, "nested_mlp_routing"), (NOP, "use_triton"),
                                                  (NL, "wider_counts"))]
    dt = torch.bfloat16

    def routing(widths, sort=True):  # CPU stand-ins above the routing launch's token limit (index_select, torch.sort)
        return widths.to(torch.int32), torch.arange(widths.numel())
    stack = contextlib.ExitStack()

    def change(p):
        return p.replace(**{k: dict(getattr(p, k), **v) if isinstance(v, dict) else v for k, v in changes.items()})
    try:
        stack.enter_context(NP.override(change))
        for name in real:
            setattr(NL, name, Capture(name))
        NL.tma_sms = lambda device: 132  # as on the H200
        NL.nested_mlp_routing = routing
        NOP.use_triton = lambda t: True  # CPU tensors: the op would otherwise take its torch reference
        NL.wider_counts = lambda sw, inter_: torch.zeros(inter_ + 1, dtype=torch.int32)
        x = torch.zeros(T, H, dtype=dt, requires_grad=train)
        ws = [torch.zeros(*s, dtype=dt, requires_grad=train) for s in ((inter, H), (inter, H), (H, inter))]
        y = NOP.nested_mlp(x, ws[1], ws[2], torch.full((T,), inter), gate_weight=ws[0], check_widths=False)
        if train:
            y.backward(torch.zeros_like(y))
    finally:
        stack.close()
        for name, fn in real.items():
            setattr(NL, name, fn)
        for m, name, fn in saved:
            setattr(m, name, fn)
    return [(_tag(name, kw), _compile(real[name], args, kw)) for name, args, kw in launches]


def _tag(name: str, kw: dict) -> str:
    """The launch's name in the report: up, up tail (the tail split's second launch), down; (dA) and (dx) in the
    backward; dWd, dWu+dWg for the weight gradients."""
    if name == "route_kernel":
        return "route" if kw["RANK"] else "tail plan"
    if name == "wgrad_kernel":
        return "dWu+dWg" if kw["HAS_DB"] or kw["DUAL"] else "dWd"
    if name == "up_kernel":
        return "up" + (" tail" if kw["TAIL_LAUNCH"] else "") + (" (dA)" if kw["BACKWARD"] else "")
    return "down (dx)" if kw["DUAL"] else "down"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--H", type=int, default=4096)
    ap.add_argument("--I", type=int, default=11008)
    ap.add_argument("--inference", action="store_true", help="an inference forward (no stored pre-activations)")
    ap.add_argument("--set", action="append", default=[], metavar="KERNEL.KEY=VALUE",
                    help="a change to the plan, e.g. up.TAIL=8 or up_bwd.EPI_SPLIT=2; a plan-wide KEY=VALUE too, "
                         "e.g. fused_route=True")
    args = ap.parse_args()
    changes = {}
    for item in args.set:
        key, value = item.split("=", 1)
        if "." in key:
            kernel, name = key.split(".", 1)
            changes.setdefault(kernel, {})[name] = _value(value)
        else:
            changes[key] = _value(value)
    print(f"T={args.T} H={args.H} I={args.I} {'inference' if args.inference else 'training'} {changes or 'plan'}")
    for tag, res in step_resources(args.T, args.H, args.I, changes, not args.inference):
        print(f"  {tag:14s} shared {res['shared_bytes']:6d} B; " + "; ".join(res["ptxas"]))


if __name__ == "__main__":
    main()
