"""Routing metadata above 2048 tokens: the counting rank kernel against ``torch.sort``.

``nested_mlp_routing`` ranks every token by counting (quadratic in T, split over programs above 1024 tokens);
``torch.sort(descending=True, stable=True)`` is a radix sort. Both from CUDA-graph replays (device time), widths
drawn from four choices as the nested_mlp benchmark's uniform mix. Checks that the two orders agree.
Usage: ``python benchmarks/lab/explore_routing.py [--out DIR]`` (GPU only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/: _common

import torch
from _common import bench_graph_ms, result_path, run_info

from flextron_kernels.routing import nested_mlp_routing


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--t", default="256,1024,2048,4096,8192,16384")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("explore_routing needs a CUDA GPU")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for T in (int(t) for t in args.t.split(",")):
        choices = torch.tensor([2752, 5504, 8256, 11008])
        w = choices[torch.randint(0, 4, (T,), generator=gen)].cuda()
        sw, order = nested_mlp_routing(w)
        ref_w, ref_order = torch.sort(w, descending=True, stable=True)
        assert torch.equal(sw, ref_w) and torch.equal(order, ref_order), T
        row = {"T": T,
               "rank_us": 1e3 * bench_graph_ms(lambda w=w: nested_mlp_routing(w)),
               "torch_sort_us": 1e3 * bench_graph_ms(lambda w=w: torch.sort(w, descending=True, stable=True))}
        rows.append(row)
        print(row, flush=True)
    info = run_info()
    path = result_path(args.out, "routing")
    with open(path, "w") as f:
        json.dump(dict(info, bench="routing", rows=rows), f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
