"""The bookkeeping of nested_mlp's graph cache for eager calls (``flextron_kernels.nested_mlp.graphs``), on any device.

CUDA is stood in for: a "graph" records the launch function and the buffers it was captured on, and a replay calls it
again on them, so what each call returns shows which buffers and which weights it used. The real capture is tested on
a GPU in ``test_nested_mlp.py``."""

import contextlib
import gc

import pytest
import torch

from flextron_kernels.nested_mlp import graphs
from flextron_kernels.reference import nested_mlp_ref


class _FakeGraph:
    captures = 0

    def capture_begin(self, pool=None, capture_error_mode=None):
        _FakeGraph.captures += 1
        self.calls = []
        _Recorder.target = self

    def capture_end(self):
        _Recorder.target = None

    def replay(self):
        for fn, args in self.calls:
            fn(*args)


class _Recorder:
    target = None


class _Stream:
    cuda_stream = 7

    def __init__(self, *a, **k):
        pass

    def wait_stream(self, other):
        pass


def _launches(x, up, down, gate, up_b, down_b, widths, act_id, training, out=None):
    """What ``launch.forward`` computes (the reference), recorded instead of run while a fake capture is open."""
    def run():
        y = nested_mlp_ref(x, up, down, widths, gate_weight=gate, up_bias=up_b, down_bias=down_b)
        if out is not None:
            out.copy_(y)
        return y
    if _Recorder.target is not None:
        _Recorder.target.calls.append((run, ()))
        return None, None
    _launches.runs += 1
    return run(), None


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 1))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    graphs.clear()
    _FakeGraph.captures = 0
    _launches.runs = 0
    yield
    graphs.clear()


def _weights(seed, inter=24, hidden=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) / 4 for s in ((inter, hidden), (hidden, inter), (inter, hidden))]


def _call(x, ws, widths):
    up, down, gate = ws
    return graphs.call(_launches, x, up, down, gate, None, None, widths, 0)


def _ref(x, ws, widths):
    up, down, gate = ws
    return nested_mlp_ref(x, up, down, widths, gate_weight=gate)


def test_first_call_runs_second_captures_then_replays(fake_cuda):
    ws = _weights(0)
    outs = []
    for _ in range(4):
        x = torch.randn(5, 8)
        w = torch.randint(1, 25, (5,))
        y = _call(x, ws, w)
        torch.testing.assert_close(y, _ref(x, ws, w))  # the call's own x and widths, through the buffers
        outs.append((y, y.clone()))
    assert _launches.runs == 1 and _FakeGraph.captures == 1 and graphs.cached_graphs() == 1
    for y, then in outs:  # an output is the caller's own tensor: later replays do not write it
        assert torch.equal(y, then)


def test_in_place_update_read_new_tensor_is_another_graph(fake_cuda):
    ws = _weights(0)
    x, w = torch.randn(3, 8), torch.randint(1, 25, (3,))
    for _ in range(2):
        _call(x, ws, w)
    ws[0].mul_(2)  # same tensor: the cached graph reads it as it is now
    torch.testing.assert_close(_call(x, ws, w), _ref(x, ws, w))
    assert _FakeGraph.captures == 1
    ws2 = [t.clone() for t in ws]  # same values, other addresses: another key, first sighting runs the launches
    torch.testing.assert_close(_call(x, ws2, w), _ref(x, ws2, w))
    assert _FakeGraph.captures == 1 and graphs.cached_graphs() == 1
    _call(x, ws2, w)
    assert _FakeGraph.captures == 2 and graphs.cached_graphs() == 2


def test_layers_of_one_shape_share_buffers_which_go_with_their_graphs(fake_cuda, monkeypatch):
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    layers = [_weights(i) for i in range(3)]
    x, w = torch.randn(4, 8), torch.randint(1, 25, (4,))
    for ws in layers[:2]:
        for _ in range(2):
            _call(x, ws, w)
    assert graphs.cached_graphs() == 2 and len(graphs._buffers) == 1  # one set of buffers for the shape
    for _ in range(2):
        _call(x, layers[2], w)  # a third graph: the least recently used one is dropped
    assert graphs.cached_graphs() == 2
    for ws in layers:  # every layer still computes its own MLP (the dropped one runs the launches again)
        torch.testing.assert_close(_call(x, ws, w), _ref(x, ws, w))
    x2 = torch.randn(6, 8)
    for _ in range(2):
        _call(x2, layers[0], torch.randint(1, 25, (6,)))
    assert len(graphs._buffers) == 2
    graphs.clear()
    gc.collect()
    assert graphs.cached_graphs() == 0 and len(graphs._buffers) == 0  # no graph left: no buffer left


def test_one_off_sightings_do_not_evict_graphs(fake_cuda, monkeypatch):
    monkeypatch.setattr(graphs, "MAX_SEEN", 3)
    ws = _weights(0)
    x, w = torch.randn(2, 8), torch.randint(1, 25, (2,))
    for _ in range(2):
        _call(x, ws, w)
    for t in range(3, 10):  # prompt lengths seen once each
        _call(torch.randn(t, 8), ws, torch.randint(1, 25, (t,)))
    assert graphs.cached_graphs() == 1 and len(graphs._seen) == 3
    runs = _launches.runs
    _call(x, ws, w)
    assert _launches.runs == runs  # still replayed


def test_failed_capture_runs_the_launches_from_then_on(fake_cuda):
    def broken(*args):
        if _Recorder.target is not None:
            raise RuntimeError("not capturable")
        return _launches(*args)

    ws = _weights(0)
    x, w = torch.randn(3, 8), torch.randint(1, 25, (3,))
    up, down, gate = ws
    for _ in range(3):
        y = graphs.call(broken, x, up, down, gate, None, None, w, 0)
        torch.testing.assert_close(y, _ref(x, ws, w))
    assert graphs.cached_graphs() == 0 and _launches.runs == 3


def test_serves_no_cpu_tensor_and_switch_restores():
    before = graphs._ENABLED
    assert not graphs.serves(torch.randn(4, 8))  # a CPU tensor
    with graphs.graphs_enabled(not before):
        assert graphs._ENABLED is (not before)
    assert graphs._ENABLED is before
