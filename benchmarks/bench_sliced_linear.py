"""sliced_linear against cuBLAS on the same slices (what a user would otherwise call), and the roofline floor.

Providers (one run, same inputs):
  flextron  sliced_linear(x, W, None, n): the prefix read in place
  view      F.linear(x, W[:n, :k]): cuBLAS on the strided view of the slice (the baseline)
  copy      F.linear(x, Wc) with Wc = W[:n, :k].contiguous() made beforehand (the copy is not timed)
  floor     max(bytes / measured copy bandwidth, FLOPs / measured bf16 matmul rate)

Every case is timed eager (do_bench of the Python call, with autograd enabled as in a model's forward: the inputs
need no gradient) and from CUDA-graph replays; forward, and forward+backward at 256 and 4096 tokens. Target: flextron
>= 0.97x the view in every case, eager and graph.

The elastic dimension is the MLP's: for an up projection the output rows are sliced (n = width * N), for a
down projection the input columns (k = width * K), as a Flextron sub-network uses them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _common import (
    geomean,
    interleaved_ms,
    measure_ceilings,
    parse_args,
    peak_extra_bytes,
    run_info,
    write_result,
)

from flextron_kernels import sliced_linear

# (name, N (out), K (in), which side is elastic)
WEIGHTS = [
    ("llama2-7b.up", 11008, 4096, "out"),
    ("llama2-7b.down", 4096, 11008, "in"),
    ("llama3-8b.up", 14336, 4096, "out"),
    ("llama3-8b.down", 4096, 14336, "in"),
]
TOKENS = [1, 16, 256, 1024, 4096]
WIDTHS = [0.25, 0.5, 0.75, 1.0]
BWD_TOKENS = [256, 4096]
DT = torch.bfloat16


def rounds(fns: dict, grads: dict | None = None) -> tuple[dict, dict]:
    """Eager and graph ms per provider, each the median of six interleaved rounds (``_common.interleaved_ms``): no
    provider gains from being timed while the clocks settle. A graph accumulates gradients in place: same work."""
    t = interleaved_ms(fns, grads=grads)
    return {p: v["eager"] for p, v in t.items()}, {p: v["graph"] for p, v in t.items()}


def fwd_case(wname, W, Wc, n, k, T, frac, ceil) -> dict:
    x = torch.randn(T, k, device="cuda", dtype=DT)
    flops = 2 * T * n * k
    nbytes = 2 * (T * k + n * k + T * n)
    floor_ms = max(nbytes / ceil["copy_bytes_per_s"], flops / ceil["bf16_flops_per_s"]) * 1e3
    fns = {
        "flextron": lambda: sliced_linear(x, W, None, n),
        "view": lambda: F.linear(x, W[:n, :k]),
        "copy": lambda: F.linear(x, Wc),
    }
    for f in fns.values():
        f()  # autotune and compile outside the timed region
    t, graph = rounds(fns)
    out_bytes = T * n * 2
    # Extra device memory beyond the output itself: 0 means no hidden copy of the weight slice.
    mem = {p: peak_extra_bytes(f) - out_bytes for p, f in fns.items() if p != "copy"}
    mem["copy_incl_copy"] = peak_extra_bytes(lambda: F.linear(x, W[:n, :k].contiguous())) - out_bytes
    row = {
        "weight": wname, "N": W.shape[0], "K": W.shape[1], "n": n, "k": k, "T": T, "width": frac, "mode": "fwd",
        "ms": t, "floor_ms": floor_ms,
        "tflops": {p: flops / (v * 1e-3) / 1e12 for p, v in t.items()},
        "gbps": {p: nbytes / (v * 1e-3) / 1e9 for p, v in t.items()},
        "speed_vs_cublas": t["view"] / t["flextron"],
        "speed_vs_copy": t["copy"] / t["flextron"],
        "vs_floor": t["flextron"] / floor_ms,
        "peak_extra_bytes": mem,
        "graph_ms": graph,
        "graph_vs_floor": graph["flextron"] / floor_ms,
        "graph_speed_vs_cublas": graph["view"] / graph["flextron"],
        "graph_speed_vs_copy": graph["copy"] / graph["flextron"],
    }
    print(f"{wname:15s} w={frac:.2f} T={T:5d} fwd  flextron {t['flextron']:.4f}  view {t['view']:.4f}  "
          f"copy {t['copy']:.4f}  floor {floor_ms:.4f} ms  x{row['speed_vs_cublas']:.2f} vs cuBLAS"
          f"  | graph: flextron {graph['flextron']:.4f} view {graph['view']:.4f} x{row['graph_speed_vs_cublas']:.2f}")
    return row


def fwd_bwd_case(wname, W, Wc, n, k, T, frac) -> dict:
    xg = torch.randn(T, k, device="cuda", dtype=DT, requires_grad=True)
    Wg = W.clone().requires_grad_()
    Wcg = Wc.clone().requires_grad_()
    dy = torch.randn(T, n, device="cuda", dtype=DT)
    fns = {
        "flextron": (lambda: sliced_linear(xg, Wg, None, n).backward(dy), [xg, Wg]),
        "view": (lambda: F.linear(xg, Wg[:n, :k]).backward(dy), [xg, Wg]),
        "copy": (lambda: F.linear(xg, Wcg).backward(dy), [xg, Wcg]),
    }
    for f, _ in fns.values():
        f()  # compile the backward products first
    tb, graph = rounds({p: f for p, (f, _) in fns.items()}, {p: g for p, (_, g) in fns.items()})
    flops = 3 * 2 * T * n * k
    row = {
        "weight": wname, "N": W.shape[0], "K": W.shape[1], "n": n, "k": k, "T": T, "width": frac, "mode": "fwd+bwd",
        "ms": tb, "tflops": {p: flops / (v * 1e-3) / 1e12 for p, v in tb.items()},
        "speed_vs_cublas": tb["view"] / tb["flextron"], "speed_vs_copy": tb["copy"] / tb["flextron"],
        "graph_ms": graph, "graph_speed_vs_cublas": graph["view"] / graph["flextron"],
        "graph_speed_vs_copy": graph["copy"] / graph["flextron"],
    }
    print(f"{wname:15s} w={frac:.2f} T={T:5d} f+b  flextron {tb['flextron']:.4f}  view {tb['view']:.4f}  "
          f"copy {tb['copy']:.4f} ms  x{row['speed_vs_cublas']:.2f} vs cuBLAS  "
          f"| graph x{row['graph_speed_vs_cublas']:.2f}")
    return row


def main() -> None:
    args = parse_args(__doc__)
    info = run_info()
    ceil = measure_ceilings()
    print(info, {k: f"{v:.3e}" for k, v in ceil.items()})
    rows = []
    tokens = [1, 4096] if args.quick else TOKENS
    for wname, N, K, side in WEIGHTS:
        W = torch.randn(N, K, device="cuda", dtype=DT) * K**-0.5
        for frac in WIDTHS:
            n = int(N * frac) if side == "out" else N
            k = int(K * frac) if side == "in" else K
            Wc = W[:n, :k].contiguous()
            for T in tokens:
                rows.append(fwd_case(wname, W, Wc, n, k, T, frac, ceil))
                if T in BWD_TOKENS:
                    rows.append(fwd_bwd_case(wname, W, Wc, n, k, T, frac))
        torch.cuda.empty_cache()

    fwd = [r for r in rows if r["mode"] == "fwd"]
    summary = {
        "min_speed_vs_cublas_eager": min(r["speed_vs_cublas"] for r in rows),
        "min_speed_vs_cublas_graph": min(r["graph_speed_vs_cublas"] for r in rows),
        "geomean_speed_vs_cublas_eager": geomean(r["speed_vs_cublas"] for r in rows),
        "geomean_speed_vs_cublas_graph": geomean(r["graph_speed_vs_cublas"] for r in rows),
        "decode_graph_geomean_ratio_to_floor": geomean(r["graph_vs_floor"] for r in fwd if r["T"] <= 16),
        "max_peak_extra_bytes_flextron": max(r["peak_extra_bytes"]["flextron"] for r in fwd),
    }
    summary["target_min_speed_vs_cublas"] = [0.97, min(summary["min_speed_vs_cublas_eager"],
                                                       summary["min_speed_vs_cublas_graph"]) >= 0.97]
    print("summary:", {k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()})
    write_result(args.out, "sliced_linear", {"info": info, "ceilings": ceil, "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
