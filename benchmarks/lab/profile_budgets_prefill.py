"""Where the time of an eager prefill forward goes with per-request budgets, against the same batch at full width.

One forward of 16 prompts (``use_cache=False, logits_to_keep=1``, as ``bench_end_to_end.py``'s budgets prefill row)
of a Llama-shaped model with random weights, at budgets 25/50/75/100% (four each; each run of equal budgets at its
own width, and with that off: one batch), and at full width. For each:

- ``eager``: ms per call, synchronised (median of ``--repeats``);
- ``host``: ms until the Python call returns, the GPU's queue drained before it (median). Where ``host`` is near
  ``eager``, the call is paced by the host: its GPU work waits on launches;
- ``graph``: ms per replay of the call captured in a CUDA graph (the GPU's time with no host in the way);
- ``ops``: torch operators dispatched per call (a ``TorchDispatchMode`` count, views included) and ``launches``:
  CUDA kernels per call (``torch.profiler``), the host's work by count.

Then a cProfile of the budgets' call by own time. ``--variants``: the budgets' call again with the attention
(``attn-one-batch``) or the MLP (``mlp-one-batch``) in one batch while the other block keeps its runs.

    python benchmarks/lab/profile_budgets_prefill.py [--shape llama-1b] [--layers 16] [--top 30]
    python benchmarks/lab/profile_budgets_prefill.py --variants attn-one-batch,mlp-one-batch
    python benchmarks/lab/profile_budgets_prefill.py --device cpu --hidden 64 --layers 2 --seq 16   # a smoke run
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_end_to_end as e2e  # its model builder, shapes and budgets
from profile_budgets_decode import _sync, print_profile

import flextron
import flextron.layers


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def measure(call, device: torch.device, repeats: int, graph_call=None, graph_ctx=contextlib.nullcontext) -> dict:
    """``eager``, ``host`` and (on a GPU) ``graph`` ms of ``call``, its operator count and CUDA launches;
    ``graph_call``: what to capture where it differs from the eager call, inside ``graph_ctx()``."""
    call()
    _sync(device)
    eager, host = [], []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        _sync(device)
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        eager.append((t2 - t0) * 1e3)
    with _OpCount() as count:
        call()
    row = dict(eager=statistics.median(eager), host=statistics.median(host), graph=None,
               ops=sum(count.ops.values()), top_ops=count.ops.most_common(8), launches=None)
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            _sync(device)
        row["launches"] = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
        graph_call = graph_call or call
        with graph_ctx():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs' make_graphed_callables
                graph_call()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graph_call()
            graph.replay()
            _sync(device)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                graph.replay()
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            row["graph"] = statistics.median(times)
            del graph
    return row


@contextlib.contextmanager
def _runs(enabled: bool):
    saved = flextron.layers.RUNS_ENABLED
    flextron.layers.RUNS_ENABLED = enabled
    try:
        yield
    finally:
        flextron.layers.RUNS_ENABLED = saved


VARIANTS = {"attn-one-batch": ("flextron.attention", "ElasticAttention", "head_runs"),
            "mlp-one-batch": ("flextron.mlp", "ElasticMLP", "width_runs")}


@contextlib.contextmanager
def _one_batch(variant: str):
    """Inside the block the variant's block class serves per-request budgets in one batch (its runs hidden from it
    for each call), the other block as it is."""
    import importlib

    if variant not in VARIANTS:
        raise SystemExit(f"--variants: {variant!r} is not one of {', '.join(VARIANTS)}")
    module, name, slot = VARIANTS[variant]
    cls = getattr(importlib.import_module(module), name)
    forward = cls.forward

    def one_batch(self, *args, **kwargs):
        runs = getattr(self, slot)
        setattr(self, slot, None)
        try:
            return forward(self, *args, **kwargs)
        finally:
            setattr(self, slot, runs)

    cls.forward = one_batch
    try:
        yield
    finally:
        cls.forward = forward


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama-1b", choices=sorted(e2e.SHAPES))
    ap.add_argument("--hidden", type=int, default=None, help="a Llama of this hidden size in place of --shape")
    ap.add_argument("--layers", type=int, default=None, help="the shape's layer count by default")
    ap.add_argument("--seq", type=int, default=512, help="tokens per prompt")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--variants", default="", help="comma list of " + ", ".join(VARIANTS))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.hidden:
        h = args.hidden
        shape = dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=2, num_attention_heads=max(4, h // 64),
                     num_key_value_heads=max(2, h // 256), vocab_size=32000)
    else:
        shape = dict(e2e.SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fm = flextron.FlextronModel.from_hf(e2e.build_model(shape, device, dtype=dtype), e2e.make_space())
    budgets = list(e2e.BUDGETS)
    ids = torch.randint(1, shape["vocab_size"], (len(budgets), args.seq),
                        generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(use_cache=False, logits_to_keep=1)
    layers = shape["num_hidden_layers"]
    print(f"{args.shape if not args.hidden else 'hidden ' + str(args.hidden)}, {layers} layers, {len(budgets)} x "
          f"{args.seq} tokens, {device}")
    print(f"{'call':<22} {'eager ms':>9} {'host ms':>8} {'graph ms':>9} {'ops':>6} {'launches':>8}  top ops")
    rows = {}
    calls = [("full width", None, True), ("budgets, runs", budgets, True), ("budgets, one batch", budgets, False)]
    calls += [(f"budgets, {v}", budgets, v) for v in args.variants.split(",") if v]
    with torch.no_grad():
        for name, b, runs in calls:
            graph = {}
            if b is not None:  # captured with the budgets set on the modules, as bench_end_to_end's graph rows
                graph = dict(graph_call=lambda: fm.model(input_ids=ids, **kw),
                             graph_ctx=lambda: fm._budgets(None, budgets, len(budgets)))
            with _runs(runs) if isinstance(runs, bool) else _one_batch(runs):
                r = measure(lambda b=b: fm(input_ids=ids, budgets=b, **kw), device, args.repeats, **graph)
            rows[name] = r
            graph = f"{r['graph']:9.2f}" if r["graph"] is not None else f"{'-':>9}"
            launches = f"{r['launches']:8d}" if r["launches"] is not None else f"{'-':>8}"
            top = ", ".join(f"{op} {n}" for op, n in r["top_ops"][:5])
            print(f"{name:<22} {r['eager']:9.2f} {r['host']:8.2f} {graph} {r['ops']:6d} {launches}  {top}")
    full, mixed = rows["full width"], rows["budgets, runs"]
    print(f"budgets (runs) vs full: {full['eager'] / mixed['eager']:.2f}x eager"
          + (f", {full['graph'] / mixed['graph']:.2f}x graph" if mixed["graph"] else "")
          + f"; {(mixed['ops'] - full['ops']) / layers:+.0f} ops per layer")
    print_profile(lambda: fm(input_ids=ids, budgets=budgets, **kw), device, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
