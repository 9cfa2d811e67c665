"""sliced_linear against a float64 reference: odd shapes, prefixes, dtypes, strides, gradients, bad input."""

import pytest
import torch

from flextron_kernels import sliced_linear
from flextron_kernels.reference import sliced_linear_ref
from tests.utils import DEVICE, DTYPES, ON_GPU, assert_close, poisoned_allocations, randn

# (leading dims of x, full N, full K, active n, active k): widths off every tile multiple on purpose.
SHAPES = [
    ((1,), 80, 96, 77, 33),
    ((7,), 200, 130, 129, 127),
    ((127,), 64, 64, 1, 64),
    ((1000,), 100, 72, 67, 65),
    ((2, 3, 5), 48, 40, 48, 40),
]


def _reference(x, w, b, n):
    return sliced_linear_ref(x.double(), w.double(), None if b is None else b.double(), n)


@pytest.mark.parametrize("lead,N,K,n,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_backward(lead, N, K, n, k, dtype, with_bias):
    w = randn(N, K, dtype=dtype, scale=K**-0.5, requires_grad=True)
    b = randn(N, dtype=dtype, requires_grad=True) if with_bias else None
    x = randn(*lead, k, dtype=dtype, requires_grad=True)
    with poisoned_allocations():
        y = sliced_linear(x, w, b, out_features=n)
        dy = randn(*y.shape, dtype=dtype)
        y.backward(dy)
    assert y.shape == (*lead, n) and y.dtype == dtype

    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if with_bias else None
    yr = sliced_linear_ref(xr, wr, br, n)
    yr.backward(dy.double())
    assert_close(y, yr, dtype, "y")
    assert_close(x.grad, xr.grad, dtype, "dx")
    assert_close(w.grad, wr.grad, dtype, "dweight")
    # Outside the prefix the weight gradient is exactly zero, not merely small.
    assert torch.count_nonzero(w.grad[n:]) == 0 and torch.count_nonzero(w.grad[:, k:]) == 0
    if with_bias:
        assert_close(b.grad, br.grad, dtype, "dbias")
        assert torch.count_nonzero(b.grad[n:]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(dtype):
    """A non-contiguous x (a column slice of a wider tensor, transposed batch) and a weight that is itself a view."""
    big = randn(40, 3, 150, dtype=dtype)
    x = big.transpose(0, 1)[..., 7:7 + 90]  # [3, 40, 90], strides (150, 450, 1) and an offset
    assert not x.is_contiguous()
    wbig = randn(130, 200, dtype=dtype, scale=0.1)
    w = wbig[5:, 10:]  # storage offset, row stride 200
    b = randn(125, dtype=dtype)
    y = sliced_linear(x, w, b, out_features=111)
    assert_close(y, _reference(x, w, b, 111), dtype)


def test_weight_transposed_view():
    """A weight given as the transpose of a [K, N] tensor (column-major) is read through its strides."""
    wt = randn(70, 90, scale=0.1)
    w = wt.t()  # [90, 70], strides (1, 90)
    x = randn(9, 50)
    assert_close(sliced_linear(x, w, None, 61), _reference(x, w, None, 61), torch.float32)


def test_full_width_matches_linear():
    w, b, x = randn(64, 48), randn(64), randn(5, 48)
    assert_close(sliced_linear(x, w, b), torch.nn.functional.linear(x.double(), w.double(), b.double()), torch.float32)


def test_empty_batch():
    w, x = randn(16, 8), randn(0, 8)
    assert sliced_linear(x, w).shape == (0, 16)


@pytest.mark.skipif(not ON_GPU, reason="peak-memory accounting needs CUDA")
def test_no_weight_copy_on_gpu():
    w = randn(4096, 4096, dtype=torch.bfloat16)
    x = randn(16, 2048, dtype=torch.bfloat16)
    sliced_linear(x, w, None, 1024)  # warm up autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sliced_linear(x, w, None, 1024)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    slice_bytes = 1024 * 2048 * 2
    assert extra < slice_bytes // 4, f"forward allocated {extra} bytes: a copy of the weight slice?"


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_width_too_large():
    with pytest.raises(ValueError, match="out_features"):
        sliced_linear(randn(2, 8), randn(16, 8), out_features=17)


def test_bad_width_zero():
    with pytest.raises(ValueError, match="out_features"):
        sliced_linear(randn(2, 8), randn(16, 8), out_features=0)


def test_bad_width_type():
    with pytest.raises(TypeError, match="out_features"):
        sliced_linear(randn(2, 8), randn(16, 8), out_features=4.0)


def test_bad_input_width():
    with pytest.raises(ValueError, match=r"x\.shape\[-1\]"):
        sliced_linear(randn(2, 9), randn(16, 8))


def test_bad_weight_ndim():
    with pytest.raises(ValueError, match="weight must be 2-D"):
        sliced_linear(randn(2, 8), randn(16, 8, 1))


def test_bad_dtype_mismatch():
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        sliced_linear(randn(2, 8), randn(16, 8, dtype=torch.float16))


def test_bad_integer_dtype():
    with pytest.raises(TypeError, match="x must be float32"):
        sliced_linear(torch.ones(2, 8, dtype=torch.int32, device=DEVICE), randn(16, 8))


@pytest.mark.skipif(not ON_GPU, reason="needs two devices (CPU and CUDA)")
def test_bad_device_mismatch():
    with pytest.raises(ValueError, match="weight must be on x's device"):
        sliced_linear(randn(2, 8), randn(16, 8, device="cpu"))


def test_bad_device_mismatch_meta():
    with pytest.raises(ValueError, match="weight must be on x's device"):
        sliced_linear(randn(2, 8), torch.empty(16, 8, device="meta"))


def test_bad_bias_shape():
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        sliced_linear(randn(2, 8), randn(16, 8), randn(12))


def test_bad_bias_dtype():
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        sliced_linear(randn(2, 8), randn(16, 8), randn(16, dtype=torch.float16))


def test_bad_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sliced_linear([[1.0]], randn(16, 8))
