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


def explore_table(d: dict) -> str:
    """``lab/explore_nested_mlp.py``: each variant's times over the plan's (``base``) in the same run, per model,
    token count and width mix, graph replays where the run has them (below 1025 tokens), eager above; < 1 is faster.
    The dense row gives the graph-timed cuBLAS MLP where the run has it."""
    keys = ("fwd_graph_ms", "fwd_bwd_graph_ms", "fwd_ms", "fwd_bwd_ms")
    groups: dict = {}
    for r in d["explore"]:
        groups.setdefault((r.get("model", ""), r["T"], r["mix"]), {})[r["variant"]] = r
    lines = [f"GPU {d['gpu']}, commit {d['commit']}, {d['date']}: variant time / base time (< 1: faster)", "",
             "| model | T | mix | variant | fwd | fwd+bwd | base fwd ms | base fwd+bwd ms | dense fwd ms |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for (model, T, mix), rows in groups.items():
        base, dense = rows.get("base"), rows.get("dense", {})
        if base is None:
            continue
        fwd = next(k for k in keys[::2] if k in base)
        bwd = next(k for k in keys[1::2] if k in base)
        for name, r in rows.items():
            if name in ("base", "dense"):
                continue
            if "error" in r:
                lines.append(f"| {model} | {T} | {mix} | {name} | error: {r['error'][:60]} | | | | |")
                continue
            lines.append(f"| {model} | {T} | {mix} | {name} | {r[fwd] / base[fwd]:.3f} | {r[bwd] / base[bwd]:.3f} | "
                         f"{base[fwd]:.4f} | {base[bwd]:.4f} | {dense.get('fwd_graph_ms', float('nan')):.4f} |")
    return "\n".join(lines)


def nested_mlp_table(d: dict) -> str:
    """``bench_nested_mlp.py`` (the full bench): per model, T, width mix and pass, flextron's speed over dense (eager,
    and graph replays where the run has them) and over the ideal (eager speed; graph time over the ideal's)."""
    def f(v, fmt="{:.3f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else ""
    lines = [f"GPU {d['gpu']}, commit {d['commit']}, {d['date']}: speed = baseline time / flextron time", "",
             "| model | T | mix | pass | vs dense (eager) | vs dense (graph) | vs ideal (eager) | graph time / ideal |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for c in d["cases"]:
        lines.append(f"| {c.get('model', '')} | {c['T']} | {c['mix']} | {c['pass']} | {f(c.get('speedup_vs_dense'))} | "
                     f"{f(c.get('speedup_graph_vs_dense_graph'))} | {f(c.get('speedup_vs_ideal'))} | "
                     f"{f(c.get('graph_time_vs_ideal'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if not sys.argv[1:] or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if sys.argv[1:] else 2)
    for path in sys.argv[1:]:
        with open(path) as f:
            d = json.load(f)
        if path.split("/")[-1].startswith("sliced_linear"):
            print(sliced_linear_table(d))
        elif "explore" in d:
            print(explore_table(d))
        elif d.get("bench") == "nested_mlp" and "cases" in d:
            print(nested_mlp_table(d))
