"""Markdown tables from result files: ``python benchmarks/report.py benchmarks/results/sliced_linear_*.json``."""

from __future__ import annotations

import json
import sys


def sliced_linear_table(d: dict) -> str:
    info, s = d["info"], d["summary"]
    lines = [
        f"GPU {info['gpu']}, torch {info['torch']}, triton {info['triton']}, commit {info['commit']}, {info['date']}. "
        f"Measured ceilings: copy {d['ceilings']['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {d['ceilings']['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s.",
        "",
        "| weight | width | T | mode | flextron ms | cuBLAS view ms | cuBLAS copy ms (baseline) | speed vs baseline "
        "| floor ms | graph: flextron / copy ms |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in d["rows"]:
        ms = r["ms"]
        g = r.get("graph_ms")
        graph = f"{g['flextron']:.4f} / {g['copy']:.4f}" if g else ""
        lines.append(
            f"| {r['weight']} | {r['width']:.2f} | {r['T']} | {r['mode']} | {ms['flextron']:.4f} | "
            f"{ms.get('view', float('nan')):.4f} | {ms['copy']:.4f} | {r['speed_vs_copy']:.2f}x | "
            f"{r.get('floor_ms', float('nan')):.4f} | {graph} |"
        )
    lines += ["", "Summary: " + ", ".join(f"{k} = {v:.3g}" for k, v in s.items() if isinstance(v, (int, float)))]
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        d = json.load(open(path))
        if path.split("/")[-1].startswith("sliced_linear"):
            print(sliced_linear_table(d))
