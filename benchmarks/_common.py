"""What every benchmark shares: run metadata, measured ceilings, timing, and result files."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
from pathlib import Path

import torch


def commit() -> str:
    if os.environ.get("FLEXTRON_COMMIT"):  # a copied working tree may carry a stale .git
        return os.environ["FLEXTRON_COMMIT"]
    try:
        out = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL)
        return out.strip()
    except Exception:
        return os.environ.get("FLEXTRON_COMMIT", "unknown")


def run_info() -> dict:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def bench_ms(fn, grad_to_none=None, rep: int = 60) -> float:
    """Median time in ms (``do_bench``: CUDA events, warm-up, L2 flushed between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=15, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def graph_replay(fn):
    """``fn`` captured once in a CUDA graph (after two warm-up runs on a side stream); returns the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def bench_graph_ms(fn, rep: int = 60) -> float:
    """Median ms of ``fn`` captured once in a CUDA graph and replayed: the device time without Python's launch
    cost, as a served decode step (captured in a graph) sees it. L2 is still flushed between replays."""
    return bench_ms(graph_replay(fn), rep=rep)


def interleaved_ms(fns: dict, rounds: int = 6, graph: bool = True, graph_fns: dict | None = None,
                   grads: dict | None = None, rep: int = 8) -> dict:
    """``{provider: {"eager": ms, "graph": ms or None}}``: each function is called once first (compile, autotune)
    and captured once (``graph_fns[p]`` where what to capture differs from the eager call); then ``rounds`` rounds,
    alternately in forward and reverse order, time every provider in turn (``do_bench`` median of the call, and of
    its replays), and each figure is the median over the rounds. Interleaving puts the GPU's clock and power drift
    on every provider alike: timed in one block each, the same SDPA call measured up to 7% apart.
    ``grads[p]``: tensors whose ``.grad`` is reset before each eager call."""
    import statistics

    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    replays = {name: graph_replay((graph_fns or fns)[name]) for name in fns} if graph else {}
    samples = {name: {"eager": [], "graph": []} for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            samples[name]["eager"].append(bench_ms(fns[name], grad_to_none=(grads or {}).get(name), rep=rep))
            if graph:
                samples[name]["graph"].append(bench_ms(replays[name], rep=rep))
    del replays
    return {name: {"eager": statistics.median(s["eager"]), "graph": statistics.median(s["graph"]) if graph else None}
            for name, s in samples.items()}


def peak_extra_bytes(fn) -> int:
    """Peak CUDA memory allocated while ``fn`` runs, beyond what was allocated before it (its outputs included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure_ceilings() -> dict:
    """The two roofline ceilings, measured here: device copy bandwidth and bf16 matmul rate on random data."""
    n = 1 << 30  # 2 GiB of bf16 read + 2 GiB written
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep=100)
    bw = 2 * n * 2 / (ms * 1e-3)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b, rep=100)
    rate = 2 * 8192**3 / (ms * 1e-3)
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": bw, "bf16_flops_per_s": rate}


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON result file")
    p.add_argument("--quick", action="store_true", help="a reduced sweep")
    return p.parse_args()


def result_path(out_dir: str | Path, name: str) -> Path:
    """``<out_dir>/<name>_<GPU>.json``: one current file per benchmark and GPU, which each run rewrites (the commit
    and date are inside; older results live in git history)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name}_{torch.cuda.get_device_name().replace(' ', '_')}.json"


def write_result(out_dir: str, name: str, payload: dict) -> Path:
    path = result_path(out_dir, name)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def geomean(xs) -> float:
    xs = [x for x in xs if x > 0]
    if not xs:
        return float("nan")
    prod = 1.0
    for x in xs:
        prod *= x
    return prod ** (1.0 / len(xs))
