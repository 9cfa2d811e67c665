"""nested_mlp: per-token MLP widths over one set of weights, against dense, torch alternatives and the ideal.

GPU only. Llama-2-7B (4096/11008) and Llama-3-8B (4096/14336) SwiGLU MLPs in bf16. Width mixes: ``uniform``
over {25, 50, 75, 100}% of I, ``skewed`` (70% of tokens at 25%, 10% at each other width), ``full``.

Providers (forward, and forward+backward):
- ``flextron``: ``flextron_kernels.nested_mlp`` (routing included; ``check_widths=False``, the eager decode setting).
- ``flextron_ptr`` (T > 64, where the op sorts tokens and uses TMA tiles): the same op with pointer-loaded tiles.
- ``flextron_kernels`` (forward+backward, T <= ``EAGER_TRAINING_MAX_TOKENS``, where an eager call that records
  autograd runs as torch ops): the same call forced onto the Triton kernels, the A/B of that rule.
- ``dense``: the full-width MLP with cuBLAS ``F.linear`` (what every token would cost without nesting).
- ``loop``: plain torch, per width group: gather the tokens, ``F.linear`` on weight views, scatter back
  (group index lists are computed outside the timing, which favours this baseline).
- ``grouped_mm``: ``torch._grouped_mm`` with every group's weights copied and zero-padded to the largest width
  (the MoE-style layout; the copies are made outside the timing, their bytes are recorded).
- ``ideal``: each group alone on contiguous copies of its slices with cuBLAS, all groups replayed in one CUDA
  graph: the sum of per-group GEMM times with no launch or routing overhead (backward written out by hand).
- ``flextron_graph`` / ``dense_graph`` (T <= 2048, forward; ``flextron_ptr_graph`` at 256): replayed from CUDA
  graphs, the decode setting (and the GPU time where an eager call is bound by host time: at 2048 tokens an eager
  forward's host time is close to its GPU time). ``flextron_graph`` / ``dense_graph`` of forward+backward
  (T <= 2048): one graph over the forward and ``torch.autograd.grad``.

Trimmed to stay under ~4 minutes on an H200: forward+backward runs T in {256, 2048, 8192} only (T = 16384
backward is the 8192 case doubled; T <= 16 backward is not a training shape); do_bench uses warmup=10 ms,
rep=40 ms; eager forward+backward at T <= 256 times flextron, dense and flextron_kernels in six interleaved rounds
(``_common.interleaved_ms``, median; do_bench warmup=15 ms, rep=8 ms per round).
Usage: ``python benchmarks/bench_nested_mlp.py --out DIR [--models llama2-7b] [--quick]``.
Block-config sweeps, host cost and per-kernel profiles: ``benchmarks/lab/explore_nested_mlp.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
import torch.nn.functional as F
import triton
from _common import commit, interleaved_ms, result_path
from triton.testing import do_bench

from flextron_kernels import nested_mlp
from flextron_kernels.nested_mlp import op as nm_op
from flextron_kernels.nested_mlp import plan as nm_plan

MODELS = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336)}
# Pass --models for the ~1B Llama shape of bench_compile.py: a 256-token batch has fewer up tiles than the GPU SMs.
EXTRA_MODELS = {"llama-1b": (2048, 5632)}
T_FWD = [1, 16, 256, 2048, 8192, 16384]
T_BWD = [256, 2048, 8192]
MIXES = {
    "uniform": ([0.25, 0.5, 0.75, 1.0], [0.25, 0.25, 0.25, 0.25]),
    "skewed": ([0.25, 0.5, 0.75, 1.0], [0.7, 0.1, 0.1, 0.1]),
    "full": ([1.0], [1.0]),
}


def _bench(fn, grad_to_none=None) -> float:
    return float(do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none, return_mode="median"))


def _widths(mix: str, T: int, inter: int, gen: torch.Generator) -> torch.Tensor:
    fracs, probs = MIXES[mix]
    pick = torch.multinomial(torch.tensor(probs), T, replacement=True, generator=gen)
    return (torch.tensor(fracs)[pick] * inter).round().long().cuda()


def _mlp(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def _mlp_fwd_bwd_manual(x, wg, wu, wd, dy):
    """Forward and backward of one group with plain matmuls (graph-capturable, no autograd)."""
    g, h = x @ wg.t(), x @ wu.t()
    s = torch.sigmoid(g)
    act = g * s
    a = act * h
    y = a @ wd.t()
    da = dy @ wd
    dwd = dy.t() @ a
    dh = da * act
    dg = da * h * (s * (1 + g * (1 - s)))
    dx = dh @ wu + dg @ wg
    return y, dx, dwd, dh.t() @ x, dg.t() @ x


def _graph(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm up (compiles, allocator) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def _pointer_tiles(plan):
    return plan.replace(tma=False)


def run_case(H, inter, T, mix, backward, gen, quick):
    dt = torch.bfloat16
    x = torch.randn(T, H, device="cuda", dtype=dt)
    wg = torch.randn(inter, H, device="cuda", dtype=dt) * H**-0.5
    wu = torch.randn(inter, H, device="cuda", dtype=dt) * H**-0.5
    wd = torch.randn(H, inter, device="cuda", dtype=dt) * inter**-0.5
    w = _widths(mix, T, inter, gen)
    wl = w.tolist()
    groups = sorted({v: None for v in wl}, reverse=True)
    idx = {v: torch.tensor([i for i, u in enumerate(wl) if u == v], device="cuda") for v in groups}
    sumw = sum(wl)
    flops = 2 * 3 * H * sumw * (3 if backward else 1)
    rec = {"T": T, "mix": mix, "pass": "fwd+bwd" if backward else "fwd", "groups": {v: len(idx[v]) for v in groups},
           "mean_width_frac": sumw / (T * inter), "useful_tflop": flops / 1e12, "ms": {}, "errors": {}}
    dy = torch.randn(T, H, device="cuda", dtype=dt)
    params = [x, wg, wu, wd]

    def flex():
        return nested_mlp(x, wu, wd, w, gate_weight=wg, check_widths=False)

    def flex_ptr():
        with nm_plan.override(_pointer_tiles):
            return flex()

    def dense():
        return _mlp(x, wg, wu, wd)

    def loop():
        y = torch.zeros_like(x)
        for v in groups:
            y = y.index_copy(0, idx[v], _mlp(x.index_select(0, idx[v]), wg[:v], wu[:v], wd[:, :v]))
        return y

    # grouped_mm: tokens permuted by group, weights copied per group and zero-padded to the largest width.
    wmax = groups[0]
    perm = torch.cat([idx[v] for v in groups])
    offs = torch.cumsum(torch.tensor([len(idx[v]) for v in groups], device="cuda"), 0).to(torch.int32)
    gp = torch.zeros(len(groups), wmax, H, device="cuda", dtype=dt)
    up = torch.zeros_like(gp)
    dp = torch.zeros(len(groups), H, wmax, device="cuda", dtype=dt)
    for i, v in enumerate(groups):
        gp[i, :v], up[i, :v], dp[i, :, :v] = wg[:v], wu[:v], wd[:, :v]
    rec["grouped_mm_copy_bytes"] = 3 * gp.numel() * gp.element_size()

    def grouped():
        xs = x.index_select(0, perm)
        g = torch._grouped_mm(xs, gp.transpose(1, 2), offs=offs)
        h = torch._grouped_mm(xs, up.transpose(1, 2), offs=offs)
        ys = torch._grouped_mm(F.silu(g) * h, dp.transpose(1, 2), offs=offs)
        return torch.zeros_like(x).index_copy(0, perm, ys)

    # ideal: contiguous copies per group, one CUDA graph over all groups.
    copies = [(x.index_select(0, idx[v]).contiguous(), wg[:v].contiguous(), wu[:v].contiguous(),
               wd[:, :v].contiguous(), dy.index_select(0, idx[v]).contiguous()) for v in groups]

    def ideal():
        for xg, g_, u_, d_, dyg in copies:
            if backward:
                _mlp_fwd_bwd_manual(xg, g_, u_, d_, dyg)
            else:
                _mlp(xg, g_, u_, d_)

    providers = {"flextron": flex, "dense": dense, "loop": loop, "grouped_mm": grouped}
    if quick:
        providers = {"flextron": flex, "dense": dense}
    if T > 64:
        providers["flextron_ptr"] = flex_ptr
    if backward and T <= nm_op.EAGER_TRAINING_MAX_TOKENS:

        def flex_kernels():
            with nm_op.training_path("kernels"):
                return flex()
        providers["flextron_kernels"] = flex_kernels
    interleaved = {}
    if backward and T <= nm_op.EAGER_TRAINING_MAX_TOKENS:
        # Eager calls of a few hundred tokens are bound by host time, which drifts over a run (dense alone read
        # 0.51-0.77 ms over three identical cases timed one after another): flextron, dense and the kernels' A/B
        # are timed in interleaved rounds, so drift falls on all of them alike.
        interleaved = {n: providers.pop(n) for n in ("flextron", "dense", "flextron_kernels")}
        for p in params:
            p.requires_grad_(True)
        try:
            t = interleaved_ms({n: (lambda fn=fn: fn().backward(dy)) for n, fn in interleaved.items()}, graph=False,
                               grads={n: params for n in interleaved})
            rec["ms"].update({n: v["eager"] for n, v in t.items()})
        except Exception as e:
            rec["errors"]["interleaved"] = f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
    for name, fn in providers.items():
        try:
            if backward:
                leaves = params + ([gp, up, dp] if name == "grouped_mm" else [])
                for p in leaves:
                    p.requires_grad_(True)
                rec["ms"][name] = _bench(lambda fn=fn: fn().backward(dy), grad_to_none=leaves)
                for p in leaves:
                    p.requires_grad_(False)
                    p.grad = None
            else:
                with torch.no_grad():
                    rec["ms"][name] = _bench(fn)
        except Exception as e:  # a provider that cannot run this case is recorded, not fatal
            rec["errors"][name] = f"{type(e).__name__}: {str(e)[:200]}"
            for p in params + [gp, up, dp]:
                p.requires_grad_(False)
                p.grad = None
    try:
        g = _graph(ideal)
        rec["ms"]["ideal"] = _bench(g.replay)
        del g
    except Exception as e:
        rec["errors"]["ideal"] = f"{type(e).__name__}: {str(e)[:200]}"
    if not backward and T <= 2048:
        graphed = [("flextron_graph", flex), ("dense_graph", dense)]
        if 64 < T <= 256:
            graphed.append(("flextron_ptr_graph", flex_ptr))
        for name, fn in graphed:
            try:
                with torch.no_grad():
                    g = _graph(fn)
                rec["ms"][name] = _bench(g.replay)
                del g
            except Exception as e:
                rec["errors"][name] = f"{type(e).__name__}: {str(e)[:200]}"
    if backward and T <= 2048:
        # Forward+backward from a graph replay too (autograd captured whole): the GPU time, where an eager step is
        # bound by host time; comparable with the ideal, which is graph-timed.
        for name, fn in (("flextron_graph", flex), ("dense_graph", dense)):
            try:
                for p in params:
                    p.requires_grad_(True)
                g = _graph(lambda fn=fn: torch.autograd.grad(fn(), params, dy))
                rec["ms"][name] = _bench(g.replay)
                del g
            except Exception as e:
                rec["errors"][name] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                for p in params:
                    p.requires_grad_(False)
                    p.grad = None
    if not backward:
        with torch.no_grad():  # the providers agree (bf16 rounding apart)
            ref = loop().float()
            rec["rel_err_flextron_vs_loop"] = ((flex().float() - ref).norm() / ref.norm()).item()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            flex()
        torch.cuda.synchronize()
        rec["flextron_fwd_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    ms = rec["ms"]
    if "flextron" in ms:
        rec["tflops_flextron"] = flops / (ms["flextron"] * 1e-3) / 1e12
        for base_name in ("dense", "ideal", "loop", "grouped_mm", "flextron_ptr", "flextron_kernels"):
            if base_name in ms:
                rec[f"speedup_vs_{base_name}"] = ms[base_name] / ms["flextron"]
    if "flextron_graph" in ms and "dense_graph" in ms:
        rec["speedup_graph_vs_dense_graph"] = ms["dense_graph"] / ms["flextron_graph"]
    if "flextron_graph" in ms and "ideal" in ms:
        rec["graph_time_vs_ideal"] = ms["flextron_graph"] / ms["ideal"]
    if "flextron_graph" in ms and "flextron_ptr_graph" in ms:
        rec["speedup_graph_vs_ptr_graph"] = ms["flextron_ptr_graph"] / ms["flextron_graph"]
    return rec


def new_result(out_dir: str) -> tuple[str, dict]:
    """The results file's path (``nested_mlp_<GPU>.json``, rewritten by each run) and its header, with no cases yet."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {
        "bench": "nested_mlp", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "commit": commit(), "date": stamp, "dtype": "bfloat16",
        "timing": "triton.testing.do_bench median, warmup=10ms rep=40ms", "cases": [],
    }
    return str(result_path(out_dir, "nested_mlp")), result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="flextron and dense only, fewer T")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_nested_mlp needs a CUDA GPU")
    path, result = new_result(args.out)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    t_fwd = [1, 256, 8192] if args.quick else T_FWD
    for model in args.models.split(","):
        H, inter = {**MODELS, **EXTRA_MODELS}[model]
        for backward, ts in ((False, t_fwd), (True, T_BWD)):
            for T in ts:
                for mix in MIXES:
                    rec = run_case(H, inter, T, mix, backward, gen, args.quick)
                    rec["model"] = model
                    result["cases"].append(rec)
                    result["elapsed_s"] = time.time() - t0
                    with open(path, "w") as f:  # after every case: a killed run keeps what it measured
                        json.dump(result, f, indent=1)
                    torch.cuda.empty_cache()
    print(f"wrote {path} ({time.time() - t0:.0f} s)")
    cols = ["flextron", "flextron_ptr", "flextron_kernels", "dense", "loop", "grouped_mm", "ideal", "flextron_graph",
            "flextron_ptr_graph", "dense_graph"]
    print(f"{'model':10} {'pass':8} {'T':>6} {'mix':8} " + " ".join(f"{c:>10}" for c in cols) + "  x_dense x_ideal")
    for r in result["cases"]:
        ms = r["ms"]
        cells = " ".join(f"{ms[c]:10.4f}" if c in ms else f"{'-':>10}" for c in cols)
        print(f"{r['model']:10} {r['pass']:8} {r['T']:6d} {r['mix']:8} {cells}  "
              f"{r.get('speedup_vs_dense', float('nan')):7.2f} {r.get('speedup_vs_ideal', float('nan')):7.2f}")
    errs = {(r["model"], r["pass"], r["T"], r["mix"]): r["errors"] for r in result["cases"] if r["errors"]}
    for k, v in list(errs.items())[:6]:
        print("error", k, v)


if __name__ == "__main__":
    main()
