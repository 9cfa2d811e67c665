"""sliced_linear on an H200 against cuBLAS on the same slices, and the roofline floor.

Providers (one run, same inputs):
  flextron  sliced_linear(x, W, None, n): the prefix read in place
  view      F.linear(x, W[:n, :k]): cuBLAS on the strided view
  copy      F.linear(x, Wc) with Wc = W[:n, :k].contiguous() made beforehand (the baseline; the copy is not timed)
  floor     max(bytes / measured copy bandwidth, FLOPs / measured bf16 matmul rate)

The elastic dimension is the MLP's: for an up projection the output rows are sliced (n = width * N), for a
down projection the input columns (k = width * K), as a Flextron sub-network uses them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _common import bench_graph_ms, bench_ms, geomean, measure_ceilings, parse_args, run_info, write_result

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


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


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
    t = {p: bench_ms(f) for p, f in fns.items()}
    out_bytes = T * n * 2
    # Extra device memory beyond the output itself: 0 means no hidden copy of the weight slice.
    mem = {p: peak_extra_bytes(f) - out_bytes for p, f in fns.items() if p != "copy"}
    mem["copy_incl_copy"] = peak_extra_bytes(lambda: F.linear(x, W[:n, :k].contiguous())) - out_bytes
    # GPU time from CUDA-graph replays where an eager call is bound by host time (decode, and 256 tokens).
    graph = {p: bench_graph_ms(f) for p, f in fns.items()} if T <= 256 else None
    row = {
        "weight": wname, "N": W.shape[0], "K": W.shape[1], "n": n, "k": k, "T": T, "width": frac, "mode": "fwd",
        "ms": t, "floor_ms": floor_ms,
        "tflops": {p: flops / (v * 1e-3) / 1e12 for p, v in t.items()},
        "gbps": {p: nbytes / (v * 1e-3) / 1e9 for p, v in t.items()},
        "speed_vs_copy": t["copy"] / t["flextron"],
        "vs_floor": t["flextron"] / floor_ms,
        "peak_extra_bytes": mem,
        "graph_ms": graph,
        "graph_vs_floor": graph["flextron"] / floor_ms if graph else None,
        "graph_speed_vs_copy": graph["copy"] / graph["flextron"] if graph else None,
    }
    print(f"{wname:15s} w={frac:.2f} T={T:5d} fwd  flextron {t['flextron']:.4f}  view {t['view']:.4f}  "
          f"copy {t['copy']:.4f}  floor {floor_ms:.4f} ms  x{row['speed_vs_copy']:.2f} vs copy"
          + (f"  | graph: flextron {graph['flextron']:.4f} copy {graph['copy']:.4f}" if graph else ""))
    return row


def fwd_bwd_case(wname, W, Wc, n, k, T, frac) -> dict:
    xg = torch.randn(T, k, device="cuda", dtype=DT, requires_grad=True)
    Wg = W.clone().requires_grad_()
    Wcg = Wc.clone().requires_grad_()
    dy = torch.randn(T, n, device="cuda", dtype=DT)
    sliced_linear(xg, Wg, None, n).backward(dy)  # autotune the backward products first
    tb = {
        "flextron": bench_ms(lambda: sliced_linear(xg, Wg, None, n).backward(dy), grad_to_none=[xg, Wg]),
        "copy": bench_ms(lambda: F.linear(xg, Wcg).backward(dy), grad_to_none=[xg, Wcg]),
    }
    flops = 3 * 2 * T * n * k
    print(f"{wname:15s} w={frac:.2f} T={T:5d} f+b  flextron {tb['flextron']:.4f}  "
          f"copy {tb['copy']:.4f} ms  x{tb['copy'] / tb['flextron']:.2f} vs copy")
    return {
        "weight": wname, "N": W.shape[0], "K": W.shape[1], "n": n, "k": k, "T": T, "width": frac, "mode": "fwd+bwd",
        "ms": tb, "tflops": {p: flops / (v * 1e-3) / 1e12 for p, v in tb.items()},
        "speed_vs_copy": tb["copy"] / tb["flextron"],
    }


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
        "prefill_fwd_geomean_speed_vs_cublas_copy": geomean(r["speed_vs_copy"] for r in fwd if r["T"] >= 256),
        "decode_fwd_worst_ratio_to_floor": max((r["vs_floor"] for r in fwd if r["T"] <= 16), default=float("nan")),
        "decode_fwd_geomean_ratio_to_floor": geomean(r["vs_floor"] for r in fwd if r["T"] <= 16),
        "decode_graph_worst_ratio_to_floor": max((r["graph_vs_floor"] for r in fwd if r["T"] <= 16), default=0),
        "decode_graph_geomean_ratio_to_floor": geomean(r["graph_vs_floor"] for r in fwd if r["T"] <= 16),
        "decode_graph_geomean_speed_vs_cublas_copy": geomean(r["graph_speed_vs_copy"] for r in fwd if r["T"] <= 16),
        "t256_graph_geomean_speed_vs_cublas_copy": geomean(r["graph_speed_vs_copy"] for r in fwd if r["T"] == 256),
        "t256_graph_worst_speed_vs_cublas_copy": min((r["graph_speed_vs_copy"] for r in fwd if r["T"] == 256),
                                                     default=float("nan")),
        "fwd_bwd_geomean_speed_vs_cublas_copy": geomean(r["speed_vs_copy"] for r in rows if r["mode"] == "fwd+bwd"),
        "fwd_bwd_worst_speed_vs_cublas_copy": min(
            (r["speed_vs_copy"] for r in rows if r["mode"] == "fwd+bwd"), default=float("nan")),
        "max_peak_extra_bytes_flextron": max(r["peak_extra_bytes"]["flextron"] for r in fwd),
    }
    print("summary:", {k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()})
    write_result(args.out, "sliced_linear", {"info": info, "ceilings": ceil, "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
