"""One nested_mlp inference forward per call, for Nsight Compute (the device has ``/usr/local/cuda/bin/ncu``).

Runs ``--calls`` forwards of a bench case (model, width mix, T) under an EXPLORE plan variant; profile the last with
e.g. ``ncu --kernel-name regex:up_kernel --launch-skip 2 --launch-count 1 --section SpeedOfLight
--section WarpStateStats python benchmarks/lab/ncu_nested.py --variant c1 --mix full``.
"""

from __future__ import annotations

import argparse

import torch
from explore_nested_mlp import EXPLORE, MODELS, _widths, nm_plan, plan_change

from flextron_kernels import nested_mlp


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama2-7b", choices=sorted(MODELS))
    ap.add_argument("--mix", default="full")
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--variant", default="base", help="an EXPLORE key of explore_nested_mlp.py")
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    H, inter = MODELS[args.model]
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(*s, device="cuda", dtype=torch.bfloat16) * 0.02 for s in ((inter, H), (inter, H), (H, inter))]
    x = torch.randn(args.T, H, device="cuda", dtype=torch.bfloat16)
    w = _widths(args.mix, args.T, inter, gen)
    with torch.no_grad(), nm_plan.override(plan_change(EXPLORE[args.variant])):
        for _ in range(args.calls):
            nested_mlp(x, ws[1], ws[2], w, gate_weight=ws[0], check_widths=False)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
