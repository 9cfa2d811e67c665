"""The ``flextron`` command. ``flextron demo`` is the README's main job."""

from __future__ import annotations

import argparse
import sys


def _demo_linear(args: argparse.Namespace) -> int:
    """An elastic linear layer at several widths, checked against plain torch on the weight slice."""
    import torch

    from .layers import ElasticLinear

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = ElasticLinear(256, 384, device=device)
    x = torch.randn(8, 256, device=device)
    print(f"ElasticLinear(256 -> 384) on {device}; tokens={x.shape[0]}")
    print(f"{'in':>5} {'out':>5} {'params used':>12} {'max |err| vs F.linear':>22}")
    worst = 0.0
    for frac in (0.25, 0.5, 0.75, 1.0):
        k, n = int(256 * frac), int(384 * frac)
        layer.set_width(k, n)
        with torch.no_grad():
            y = layer(x[:, :k])
            ref = torch.nn.functional.linear(x[:, :k], layer.weight[:n, :k].contiguous(), layer.bias[:n])
        err = (y - ref).abs().max().item()
        worst = max(worst, err)
        print(f"{k:>5} {n:>5} {n * k + n:>12} {err:>22.2e}")
    ok = worst < 1e-4
    print("check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flextron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the demo on the embedded default")
    p.set_defaults(func=_demo_linear)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
