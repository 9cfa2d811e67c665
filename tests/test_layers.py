"""ElasticLinear: the nn.Linear contract, width switching, and bad widths."""

import pytest
import torch
from torch import nn

from flextron import ElasticLinear
from flextron_kernels.reference import sliced_linear_ref
from tests.utils import DEVICE, assert_close, randn


def _linear(bias=True):
    torch.manual_seed(0)
    return nn.Linear(48, 40, bias=bias, device=DEVICE)


@pytest.mark.parametrize("bias", [True, False])
def test_same_state_dict_and_full_width_output(bias):
    lin = _linear(bias)
    el = ElasticLinear.from_linear(lin)
    assert isinstance(el, nn.Linear)
    assert el.state_dict().keys() == lin.state_dict().keys()
    assert el.weight is lin.weight  # shared, not copied
    x = randn(3, 5, 48)
    assert_close(el(x), lin(x).detach(), torch.float32)
    fresh = ElasticLinear(48, 40, bias=bias, device=DEVICE)
    fresh.load_state_dict(lin.state_dict())
    assert_close(fresh(x), lin(x).detach(), torch.float32)


def test_widths_and_gradients():
    el = ElasticLinear.from_linear(_linear())
    el.set_width(in_width=33, out_width=17)
    x = randn(6, 33, requires_grad=True)
    y = el(x)
    assert y.shape == (6, 17)
    ref = sliced_linear_ref(x.double(), el.weight.double(), el.bias.double(), 17)
    assert_close(y, ref, torch.float32)
    y.sum().backward()
    assert torch.count_nonzero(el.weight.grad[17:]) == 0 and torch.count_nonzero(el.weight.grad[:, 33:]) == 0
    # A full-width input is narrowed to the active in_width (a view).
    xf = randn(6, 48)
    ref = sliced_linear_ref(xf[:, :33].double(), el.weight.double(), el.bias.double(), 17)
    assert_close(el(xf), ref, torch.float32)
    el.set_width()
    assert el(xf).shape == (6, 40)


def test_bad_width_values():
    el = ElasticLinear(8, 4)
    with pytest.raises(ValueError, match="out_width"):
        el.set_width(out_width=5)
    with pytest.raises(ValueError, match="in_width"):
        el.set_width(in_width=0)
    with pytest.raises(TypeError, match="in_width"):
        el.set_width(in_width=2.5)
    with pytest.raises(TypeError, match="linear"):
        ElasticLinear.from_linear(nn.Conv1d(2, 2, 1))


def test_bad_input_width():
    el = ElasticLinear(8, 4, device=DEVICE)
    el.set_width(in_width=6)
    with pytest.raises(ValueError, match=r"x\.shape\[-1\]"):
        el(randn(2, 7))


def test_prefix_views_made_once_and_remade_for_new_storage():
    """Outside autograd the elastic blocks' prefix views are made once per (weight, width) and reused; a weight moved
    to new storage, a transposed weight made per call, and calls under autograd get fresh slices."""
    from flextron.layers import _VIEWS, _prefix_views

    lin = torch.nn.Linear(8, 6)
    with torch.no_grad():
        a = _prefix_views(lin.weight, lin.bias, 4, 5)
        b = _prefix_views(lin.weight, lin.bias, 4, 5)
        assert a[0] is b[0] and a[1] is b[1] and a[0].shape == (4, 5) and a[1].shape == (4,)
        assert _prefix_views(lin.weight, lin.bias, 3, 5)[0] is not a[0]  # another width
        lin.double()  # new storage, same Parameter objects
        c = _prefix_views(lin.weight, lin.bias, 4, 5)
        assert c[0] is not a[0] and c[0].dtype == torch.float64 and c[0].data_ptr() == lin.weight.data_ptr()
        t = lin.weight.t()
        assert _prefix_views(t, None, 3, 2)[0] is not _prefix_views(t, None, 3, 2)[0]
    g = _prefix_views(lin.weight, lin.bias, 4, 5)  # under autograd: views that carry gradients
    assert g[0] is not c[0] and g[0].requires_grad
    key = id(lin.weight)
    del lin, a, b, c, g, t
    import gc

    gc.collect()
    assert key not in _VIEWS, "an entry must go with its weight"


@pytest.mark.parametrize("bias", [True, False])
def test_prefix_linear_into_a_buffer(bias, monkeypatch):
    """``out=``: the product lands in the given rows of a buffer (cuBLAS's ``mm``/``addmm`` on the prefix views on a
    GPU, forced here on the CPU; the fallback's copy otherwise) and equals ``F.linear`` on the slices."""
    import flextron.layers as L

    torch.manual_seed(0)
    w, b = torch.randn(24, 16), torch.randn(24) if bias else None
    x = torch.randn(3, 5, 16)[:, :, :10]  # a prefix of the inputs, as a block's narrower activations are
    want = torch.nn.functional.linear(x, w[:20, :10], None if b is None else b[:20])
    for blas in (True, False):
        monkeypatch.setattr(L, "blas_serves", lambda t, blas=blas: blas)
        buf = torch.full((4, 5, 20), float("nan"))
        got = L.prefix_linear(x.contiguous(), w, b, 20, buf[1:4])
        assert got.data_ptr() == buf[1:4].data_ptr()
        torch.testing.assert_close(buf[1:4], want, rtol=1e-5, atol=1e-5)
        assert buf[0].isnan().all()  # nothing written outside its rows


def test_run_by_run_writes_each_run_once_or_concatenates():
    """Outside autograd the runs fill one buffer; with gradients on they are concatenated (and differentiable); an
    output made elsewhere (a training-mode dropout) is copied into its rows."""
    import flextron.layers as L

    x = torch.randn(5, 3, 4, requires_grad=True)
    runs = [(0, 2, 1), (2, 5, 2)]

    def fn(first, end, value, out):
        y = x[first:end, :, :2] * value
        return y if out is None else out.copy_(y) if value == 1 else y.clone()  # run 2: made elsewhere

    want = torch.cat([x[0:2, :, :2], x[2:5, :, :2] * 2])
    with torch.no_grad():
        got = L.run_by_run(x, runs, 2, fn)
    torch.testing.assert_close(got, want.detach())
    grad = L.run_by_run(x, runs, 2, fn)
    torch.testing.assert_close(grad, want)
    grad.sum().backward()
    assert x.grad[:2, :, :2].eq(1).all() and x.grad[2:, :, :2].eq(2).all() and x.grad[:, :, 2:].eq(0).all()
