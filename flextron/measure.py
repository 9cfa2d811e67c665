"""Timing on the current device, and whole-model latency measurement (the ground truth a latency table is
checked against).

``time_interleaved`` times functions in interleaved rounds (CUDA events on a GPU, a monotonic clock on a CPU), or as
CUDA-graph replays (``graphs=True``); ``measure_many`` times whole-model prefills or decode steps of several subnets
that way. :mod:`flextron.latency` builds its tables and validation on these.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from .attention import no_padding
from .model import FlextronModel, cache_kwarg
from .space import Subnet

PHASES = ("prefill", "decode")


def time_ms(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10, device="cpu",
            before: Callable[[], object] | None = None, graphs: bool = False) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after ``warmup``; CUDA events on a GPU, a monotonic
    clock on a CPU. ``before`` (untimed) runs before each call (e.g. rewinding a KV cache)."""
    return statistics.median(time_interleaved([fn], warmup=warmup, repeats=repeats, device=device,
                                              before=[before], graphs=graphs)[0])


def _captured(fn: Callable[[], object], before: Callable[[], object] | None, pool) -> Callable[[], object]:
    """``fn`` captured once in a CUDA graph (after a warm-up run on a side stream); returns the replay.

    ``before`` runs before the warm-up and before the capture; what it returns (e.g. the cache tensors the step
    reads) is kept alive with the graph, which reads those addresses on every replay."""
    if before:
        before()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), no_padding():  # timed inputs never carry padding
        fn()
    torch.cuda.current_stream().wait_stream(side)
    keep = before() if before else None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool), no_padding():
        fn()

    def replay(graph=graph, keep=keep):
        graph.replay()
    return replay


def time_interleaved(fns: Sequence[Callable[[], object]], *, warmup: int = 3, repeats: int = 10, device="cpu",
                     before: Sequence[Callable[[], object] | None] | None = None,
                     graphs: bool = False) -> list[list[float]]:
    """Times of every ``fns[k]()`` (ms), ``repeats`` rounds each, interleaved: round ``r`` times every function
    once. On a machine whose load drifts (a shared CPU, clocks that change) each entry then sees the same mix of
    conditions, instead of one row of a table being timed in a quiet minute and the next in a busy one.

    ``graphs=True`` (CUDA only): each function is captured once in a CUDA graph and its replays are timed, so
    the figure is the device's time without Python's launch cost, as a served decode step (replayed from a
    graph) sees it. The graphs share one memory pool (their outputs are never read).
    Returns ``times[k]`` (``repeats`` values)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    before = list(before) if before is not None else [None] * len(fns)
    if graphs and cuda:
        pool = torch.cuda.graph_pool_handle()
        fns = [_captured(fn, b, pool) for fn, b in zip(fns, before)]
        before = [None] * len(fns)
    for fn, b in zip(fns, before):
        for _ in range(warmup):
            if b:
                b()
            fn()
    if cuda:
        torch.cuda.synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, (fn, b) in enumerate(zip(fns, before)):
            if b:
                b()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[k].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def _device_and_dtype(fm: FlextronModel):
    p = next(fm.model.parameters())
    return p.device, p.dtype


def _cache_slots(cache) -> list:
    """``(holder, key)`` of every tensor a transformers cache keeps (layer objects in transformers >= 4.56, lists
    before), so a measurement can put the tensors it saved back in place."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer, name) for layer in layers for name in ("keys", "values")
                if getattr(layer, name, None) is not None]
    return [(lst, i) for lst in (cache.key_cache, cache.value_cache) for i in range(len(lst))]


def _get(slot):
    holder, key = slot
    return holder[key] if isinstance(holder, list) else getattr(holder, key)


def _put(slot, value) -> None:
    holder, key = slot
    if isinstance(holder, list):
        holder[key] = value
    else:
        setattr(holder, key, value)


def _runner(fm: FlextronModel, subnet: Subnet | None, batch_size: int, seq_len: int, phase: str, seed: int):
    """``(fn, before)``: one timed whole-model run of ``subnet`` (activated inside ``fn``, so runners of several
    subnets can be interleaved) and the untimed step before it (rewinding the decode cache)."""
    device, _ = _device_and_dtype(fm)
    g = torch.Generator(device="cpu").manual_seed(seed)
    if phase == "prefill":
        ids = torch.randint(0, fm.config.vocab_size, (batch_size, seq_len), generator=g).to(device)

        def run():
            fm.set_subnet(subnet)
            fm(input_ids=ids, use_cache=False)
        return run, None
    from transformers import DynamicCache

    ids = torch.randint(0, fm.config.vocab_size, (batch_size, seq_len + 1), generator=g).to(device)
    cache = DynamicCache(config=fm.config)
    kw = {cache_kwarg(fm): cache}
    fm.set_subnet(subnet)  # the cache holds this subnet's KV heads
    fm(input_ids=ids[:, :seq_len], use_cache=True, **kw)

    # Rewinding puts the prefilled tensors back (no copy). ``crop`` would leave strided views, and concatenating
    # onto a strided view is a slow copy a real decode loop never makes (on an H200 it triples a 7B decode step).
    slots = _cache_slots(cache)
    saved = [_get(slot) for slot in slots]

    def rewind():
        for slot, t in zip(slots, saved):
            _put(slot, t)
        return saved  # what a captured step reads: kept alive with its graph

    def step():
        fm.set_subnet(subnet)
        fm(input_ids=ids[:, seq_len:], use_cache=True, **kw)
    return step, rewind


def _decode_group_cap(fm: FlextronModel, batch_size: int, seq_len: int, device, dtype) -> int:
    """How many full-model decode caches fit in half the free device memory (at least 1): a group's caches are
    alive together, and a Llama-2-7B cache of 32 x 2048 tokens alone is 34 GB."""
    if device.type != "cuda":
        return 1 << 30
    per = sum(2 * batch_size * (seq_len + 1) * a.num_kv_heads * a.head_dim for a in fm.attention_blocks)
    per *= torch.empty((), dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(0.5 * free // max(per, 1)))


def measure_many(fm: FlextronModel, subnets: Sequence[Subnet | None], *, batch_size: int, seq_len: int,
                 phase: str = "prefill", warmup: int = 3, repeats: int = 10, seed: int = 0,
                 group: int = 8, graphs: bool = False) -> list[dict]:
    """Measured whole-model latency of each subnet for the work a table describes (a prefill of ``batch_size x
    seq_len`` tokens, or one decode step of ``batch_size`` tokens after ``seq_len`` cached ones in the real HF
    cache, rewound before each run). Subnets are timed interleaved, ``group`` at a time (decode caches of a group
    are alive together). ``graphs=True`` (CUDA): each run is timed as a CUDA-graph replay (see :func:`profile`).
    Returns ``[{"median_ms", "min_ms"}]``."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    device, dtype = _device_and_dtype(fm)
    if phase == "decode":
        # A captured decode step also holds its own copy of the grown cache (the concatenation's output).
        group = min(group, _decode_group_cap(fm, batch_size, seq_len, device, dtype) // (2 if graphs else 1) or 1)
    previous, was_training = fm.subnet, fm.training
    fm.eval()
    out = []
    try:
        with torch.inference_mode():
            for k in range(0, len(subnets), group):
                runs = [_runner(fm, s, batch_size, seq_len, phase, seed) for s in subnets[k:k + group]]
                times = time_interleaved([r[0] for r in runs], before=[r[1] for r in runs], warmup=warmup,
                                         repeats=repeats, device=device, graphs=graphs)
                out += [{"median_ms": statistics.median(t), "min_ms": min(t)} for t in times]
                del runs
    finally:
        fm.set_subnet(previous)
        fm.train(was_training)
    return out


def measure(fm: FlextronModel, subnet: Subnet | None, *, batch_size: int, seq_len: int, phase: str = "prefill",
            warmup: int = 3, repeats: int = 10, seed: int = 0) -> float:
    """Measured whole-model latency (median ms) of one subnet; see :func:`measure_many`."""
    return measure_many(fm, [subnet], batch_size=batch_size, seq_len=seq_len, phase=phase, warmup=warmup,
                        repeats=repeats, seed=seed)[0]["median_ms"]
