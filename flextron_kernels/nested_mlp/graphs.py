"""Eager inference calls of ``nested_mlp`` replayed from CUDA graphs: one graph launch instead of three Triton launches.

A Triton launch from Python costs tens of microseconds of host time, and a ``nested_mlp`` call makes three of them
(routing, up, down) plus its torch allocations; in an eager decode step the GPU waits on that. So an eager
inference call on CUDA whose exact arguments were seen before is served by a graph captured on the second sighting
(the first runs the launches as they are, which also compiles the kernels): the call copies ``x`` and ``widths``
into the graph's input buffers, replays it, and returns a copy of its output. Its host cost is a key lookup, two
copies, one replay and one copy, whatever the token count.

Why it is exact: the key holds every address, shape, stride and dtype the launches read (``x``'s and ``widths``'
shape, each weight and bias tensor, the activation, the device, the stream and torch's TF32 switch, which fp32 dots
follow). A replay reads whatever those addresses hold at that moment, and a call whose key matches passes tensors at
exactly those addresses; so a weight updated in place is read as updated, and a new weight at another address is
another key. Memory:

- input buffers (``x``, ``widths``) and the output buffer are shared by every graph of one shape on one stream
  (every layer of a model), since a replay reads and writes them only while it runs; they go with the last graph
  that uses them (at most :data:`MAX_GRAPHS` graphs are kept, least recently used dropped);
- the launches' intermediates live in one private memory pool per device and stream, shared by all graphs: a
  replay's intermediates are dead when it ends, and replays on one stream never overlap.

Not served here (the launches run as before): calls that record autograd, calls under ``torch.compile`` or inside a
user's own graph capture, CPU tensors, token counts above :data:`MAX_TOKENS`, calls inside :func:`plan.override`.
Off with ``FLEXTRON_NESTED_MLP_GRAPHS=0`` in the environment or :func:`graphs_enabled` ``(False)``; :func:`clear`
drops every graph and buffer (the weights' memory is never held: a graph only holds addresses).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from contextlib import AbstractContextManager

import torch

from .._runtime import setting
from . import plan

MAX_TOKENS = 2048  # larger calls are bound by GPU time (their host time overlaps it), and their buffers are large
MAX_GRAPHS = 1024  # least recently used graphs beyond this are dropped (a 32-layer model at 32 token counts)
MAX_SEEN = 4096  # keys seen once and not yet captured (one-off prompt lengths), least recently seen dropped

_ENABLED = os.environ.get("FLEXTRON_NESTED_MLP_GRAPHS", "1") != "0"
_lock = threading.Lock()
_graphs: OrderedDict = OrderedDict()  # key -> _Entry
_seen: OrderedDict = OrderedDict()  # key -> None: seen once; the next sighting captures
# (device, stream, x shape, x dtype, widths dtype) -> _Buffers, while a graph holds them (weak: they go with the
# last graph that uses them, so shapes seen long ago hold no memory)
_buffers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_pools: dict = {}  # (device, stream) -> graph memory pool handle
_failed: set = set()  # keys whose capture raised: run eagerly from then on


class _Buffers:
    __slots__ = ("x", "widths", "y", "__weakref__")

    def __init__(self, x, widths, y):
        self.x, self.widths, self.y = x, widths, y


class _Entry:
    __slots__ = ("graph", "bufs")

    def __init__(self, graph, bufs):
        self.graph, self.bufs = graph, bufs


def graphs_enabled(enabled: bool) -> AbstractContextManager[None]:
    """Within this block, eager inference calls use (``True``) or never use (``False``) cached graphs."""
    return setting(globals(), "_ENABLED", bool(enabled))


def clear() -> None:
    """Drop every cached graph, buffer and pool."""
    with _lock:
        _graphs.clear()
        _seen.clear()
        _buffers.clear()
        _pools.clear()
        _failed.clear()


def cached_graphs() -> int:
    """How many captured graphs the cache holds."""
    return len(_graphs)


def _sig(t):
    return None if t is None else (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def serves(x: torch.Tensor) -> bool:
    """Whether an eager inference call on ``x`` may be served from a graph (the caller excludes autograd). Never
    while a :func:`plan.override` is active (the key does not hold the plan)."""
    return (_ENABLED and x.is_cuda and 0 < x.numel() and x.numel() // x.shape[-1] <= MAX_TOKENS
            and not plan.overridden() and not torch.cuda.is_current_stream_capturing())


def call(forward, x, up_weight, down_weight, gate_weight, up_bias, down_bias, widths, act_id):
    """``forward(x, ..., widths, act_id, False, out)[0]`` (``launch.forward``), from a graph where one is cached
    for these exact arguments; on the first sighting of a key the launches run as they are, on the second the
    graph is captured."""
    stream = torch.cuda.current_stream(x.device)
    sid = (x.device.index, stream.cuda_stream)
    bkey = (sid, tuple(x.shape), x.dtype, widths.dtype)
    key = (bkey, torch.backends.cuda.matmul.allow_tf32, _sig(up_weight), _sig(down_weight), _sig(gate_weight),
           _sig(up_bias), _sig(down_bias), act_id)
    entry = _graphs.get(key)
    if entry is not None:
        _graphs.move_to_end(key)
    elif key in _failed:  # a capture that failed: run the launches from then on
        return forward(x, up_weight, down_weight, gate_weight, up_bias, down_bias, widths, act_id, False)[0]
    elif key not in _seen:  # first sighting: run the launches (they compile the kernels)
        with _lock:
            _seen[key] = None
            while len(_seen) > MAX_SEEN:
                _seen.popitem(last=False)
        return forward(x, up_weight, down_weight, gate_weight, up_bias, down_bias, widths, act_id, False)[0]
    else:  # second sighting: capture
        with _lock:
            _seen.pop(key, None)
        entry = _capture(key, bkey, sid, stream, forward, x, up_weight, down_weight, gate_weight, up_bias,
                         down_bias, widths, act_id)
        if entry is None:
            return forward(x, up_weight, down_weight, gate_weight, up_bias, down_bias, widths, act_id, False)[0]
    b = entry.bufs
    b.x.copy_(x)
    b.widths.copy_(widths)
    entry.graph.replay()
    return b.y.clone()


def _capture(key, bkey, sid, stream, forward, x, up_weight, down_weight, gate_weight, up_bias, down_bias, widths,
             act_id):
    with _lock:
        bufs = _buffers.get(bkey)
        if bufs is None:
            bufs = _Buffers(*(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, widths, x)))
            _buffers[bkey] = bufs
        pool = _pools.get(sid)
        if pool is None:
            pool = _pools[sid] = torch.cuda.graph_pool_handle()
    # torch.cuda.graph without its synchronize / gc.collect / empty_cache on entry (one capture per layer and
    # shape: those would cost milliseconds each); the capture runs on a side stream, as CUDA requires.
    side = torch.cuda.Stream(x.device)
    side.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                forward(bufs.x, up_weight, down_weight, gate_weight, up_bias, down_bias, bufs.widths, act_id,
                        False, bufs.y)
            finally:
                graph.capture_end()
    except Exception:  # a capture that cannot happen runs eagerly, as before
        stream.wait_stream(side)
        with _lock:
            _failed.add(key)
        return None
    stream.wait_stream(side)
    entry = _Entry(graph, bufs)
    with _lock:
        _graphs[key] = entry
        while len(_graphs) > MAX_GRAPHS:
            _graphs.popitem(last=False)
    return entry
