"""sliced_linear against a float64 reference: odd shapes, prefixes, dtypes, strides, gradients, bad input."""

import contextlib
import importlib

import pytest
import torch

from flextron_kernels import sliced_linear
from flextron_kernels._hopper import tma_sms
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
@pytest.mark.parametrize("blas", [True, False] if ON_GPU else [False])  # a GPU: cuBLAS below the TMA sizes, or not
def test_forward_backward(lead, N, K, n, k, dtype, with_bias, blas):
    sl = importlib.import_module("flextron_kernels.sliced_linear")  # the package exports the function by that name
    with contextlib.nullcontext() if blas else sl.force_path("triton"):
        _forward_backward(lead, N, K, n, k, dtype, with_bias)


def _forward_backward(lead, N, K, n, k, dtype, with_bias):
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


# The TMA kernel's production block configs, forced onto small shapes (by size they would go to the pointer
# kernel on a GPU): persistent 128x256 tiles with fewer programs than tiles, and one 128x128 tile per program.
TMA_BLOCKS = {"persistent": (128, 256, 64, 8, 3, 2), "per_tile": (128, 128, 64, 4, 4, None)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead", [(300,), (2, 150)])
@pytest.mark.parametrize("blocks", ["persistent", "per_tile"])
def test_tma_path_forward_backward(dtype, lead, blocks):
    """Shapes whose strides suit TMA descriptors (16-byte rows, >= 128 rows): the forward and both backward
    products take the descriptor kernel (dW reads dy transposed through its descriptor); x is a column prefix
    of a wider tensor and the weight a prefix of a bigger one."""
    sl = importlib.import_module("flextron_kernels.sliced_linear")  # the package exports the function by that name
    if not tma_sms(torch.device(DEVICE)):
        pytest.skip("no TMA on this GPU")
    with sl.force_path("tma", TMA_BLOCKS[blocks]):  # these sizes would go to cuBLAS or the pointer kernel on a GPU
        _tma_forward_backward(sl, dtype, lead)


def _tma_forward_backward(sl, dtype, lead):

    N, K, n, k = 264, 200, 136, 120
    w = randn(N, K, dtype=dtype, scale=K**-0.5, requires_grad=True)
    b = randn(N, dtype=dtype, requires_grad=True)
    xbig = randn(*lead, 200, dtype=dtype)
    x = xbig[..., :k].detach().requires_grad_()  # a leaf; its view below keeps the wide row stride
    xv = xbig[..., :k]
    M = xv.numel() // k
    x2 = xv.reshape(M, k)
    out = torch.empty(M, n, dtype=dtype, device=DEVICE)
    assert sl._tma_plan(x2, w, out, M, n, k, *x2.stride(), w.stride(1), w.stride(0), n, 1) is not None
    with poisoned_allocations():
        y = sliced_linear(xv.detach().requires_grad_(), w, b, out_features=n)
        y_leaf = sliced_linear(x, w, b, out_features=n)
        dy = randn(*y.shape, dtype=dtype)
        y_leaf.backward(dy)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = sliced_linear_ref(xr, wr, br, n)
    yr.backward(dy.double())
    assert_close(y, yr, dtype, "y (strided x)")
    assert_close(y_leaf, yr, dtype, "y")
    assert_close(x.grad, xr.grad, dtype, "dx")
    assert_close(w.grad, wr.grad, dtype, "dweight")
    assert_close(b.grad, br.grad, dtype, "dbias")
    assert torch.count_nonzero(w.grad[n:]) == 0 and torch.count_nonzero(w.grad[:, k:]) == 0


def test_tma_plan_refuses_unaligned_and_small():
    from flextron_kernels.sliced_linear import _tma_plan

    x = randn(300, 121, dtype=torch.bfloat16)  # 242-byte rows: not 16-byte aligned
    w = randn(64, 121, dtype=torch.bfloat16)
    out = torch.empty(300, 64, dtype=torch.bfloat16, device=DEVICE)
    assert _tma_plan(x, w, out, 300, 64, 121, *x.stride(), w.stride(1), w.stride(0), 64, 1) is None
    x = randn(100, 128, dtype=torch.bfloat16)  # fewer rows than one 128-row tile: the pointer kernel
    w = randn(64, 128, dtype=torch.bfloat16)
    out = torch.empty(100, 64, dtype=torch.bfloat16, device=DEVICE)
    assert _tma_plan(x, w, out, 100, 64, 128, *x.stride(), w.stride(1), w.stride(0), 64, 1) is None
    x = randn(300, 128)  # fp32: the pointer kernel
    w = randn(64, 128)
    out = torch.empty(300, 64, device=DEVICE)
    assert _tma_plan(x, w, out, 300, 64, 128, *x.stride(), w.stride(1), w.stride(0), 64, 1) is None


def _count_launches(sl, monkeypatch) -> list:
    """The pointer kernel replaced by a spy that counts its launches (and still launches it)."""
    seen = []
    real = sl._strided_matmul_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **k):
                seen.append(grid)
                return real[grid](*a, **k)
            return launch
    monkeypatch.setattr(sl, "_strided_matmul_kernel", Spy())
    return seen


@pytest.mark.parametrize("lead,N,K,n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_blas_below_tma(lead, N, K, n, k, with_bias, monkeypatch):
    """A GPU takes F.linear on the prefix views (cuBLAS in place, autograd's full-shape weight gradient); forced here
    on any device, forward and every gradient against the reference, with no launch of the pointer kernel. A weight
    with no unit stride (cuBLAS would copy it) goes to the pointer kernel."""
    sl = importlib.import_module("flextron_kernels.sliced_linear")
    seen = _count_launches(sl, monkeypatch)
    with sl.force_path("cublas"):
        _blas_below_tma(seen, lead, N, K, n, k, with_bias)


def _blas_below_tma(seen, lead, N, K, n, k, with_bias):
    w = randn(N, K, scale=K**-0.5, requires_grad=True)
    b = randn(N, requires_grad=True) if with_bias else None
    x = randn(*lead, k, requires_grad=True)
    with poisoned_allocations():
        y = sliced_linear(x, w, b, out_features=n)
        dy = randn(*y.shape)
        y.backward(dy)
    assert seen == []
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if with_bias else None
    yr = sliced_linear_ref(xr, wr, br, n)
    yr.backward(dy.double())
    assert_close(y, yr, torch.float32, "y")
    assert_close(x.grad, xr.grad, torch.float32, "dx")
    assert_close(w.grad, wr.grad, torch.float32, "dweight")
    assert torch.count_nonzero(w.grad[n:]) == 0 and torch.count_nonzero(w.grad[:, k:]) == 0
    if with_bias:
        assert_close(b.grad, br.grad, torch.float32, "dbias")
    # Inference (no autograd): F.linear on the prefix view, any leading dims, still no pointer kernel.
    with torch.no_grad():
        assert_close(sliced_linear(x, w, b, n), _reference(x, w, b, n), torch.float32, "y (inference)")
    assert seen == []
    # An x with no unit stride: F.linear takes it too (torch makes the activation contiguous, as for any user).
    xs = randn(k, 4, 2)[:, :, 0].t()  # [4, k], strides (2, 8)
    assert_close(sliced_linear(xs, w.detach(), None, n), _reference(xs, w.detach(), None, n), torch.float32)
    assert seen == []
    # A weight cuBLAS cannot read in place (no unit stride): the pointer kernel serves, never a weight copy.
    ws = randn(N, K, 2, scale=K**-0.5)[:, :, 0]
    assert_close(sliced_linear(x.detach(), ws, None, n), _reference(x.detach(), ws, None, n), torch.float32)
    assert len(seen) == 1


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


def test_lean_gpu_call_serves_the_common_call_and_declines_the_rest():
    """The GPU's common call, checked in a few attribute reads (``_blas_call``, device-agnostic): ``F.linear`` on the
    prefix views where it serves, exactly; None for anything else, which the full path then checks and names (the
    bad-input tests below run through it on a GPU)."""
    sl = importlib.import_module("flextron_kernels.sliced_linear")
    w, b = randn(64, 48, requires_grad=True), randn(64, requires_grad=True)
    x = randn(3, 5, 40, requires_grad=True)
    F = torch.nn.functional
    for bias, n, k, weight in [(None, 50, 40, w), (b, 50, 40, w), (b, 64, 48, w), (None, 33, 40, w.detach().t().t()),
                               (None, 20, 40, randn(48, 64).t())]:
        xk = x[..., :k] if k == x.shape[-1] else randn(3, 5, k)
        y = sl._blas_call(xk, weight, bias, n if n != weight.shape[0] else None)
        expect = F.linear(xk, weight[:n, :k], None if bias is None else bias[:n])
        assert y is not None and torch.equal(y, expect)
        assert_close(y, _reference(xk, weight, bias, n), torch.float32)
    y = sl._blas_call(x, w, b, 50)
    y.sum().backward()  # autograd's own backward on the views: full-shape gradients, zero past the prefix
    assert torch.count_nonzero(w.grad[50:]) == 0 and torch.count_nonzero(w.grad[:, 40:]) == 0
    assert torch.count_nonzero(b.grad[50:]) == 0
    wd = w.detach()
    declined = [
        (x, wd, None, 65), (x, wd, None, 0), (x, wd, None, 4.0), (x, wd, None, True), (randn(2, 49), wd, None, None),
        (randn(2, 0), wd, None, None), (x, randn(64, 48, 1), None, None), (x, wd.half(), None, None),
        (x.detach().to(torch.int32), wd.to(torch.int32), None, None),
        (x, torch.empty(64, 48, device="meta"), None, None),
        (x, wd, randn(12), None), (x, wd, randn(64).half(), None), (x, wd, randn(64, 1), None),
        (x, [[1.0]], None, None),
        (x, randn(64, 96)[:, ::2], None, None),  # no unit stride: cuBLAS would copy it
    ]
    for args in declined:
        assert sl._blas_call(*args) is None, [getattr(a, "shape", a) for a in args]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("frozen", [(), ("x", "bias")])
def test_torch_compile_fullgraph(with_bias, frozen):
    """Under torch.compile (fullgraph: no graph break) the call is one custom op with its backward registered:
    output and the gradient of every input that needs one equal the eager op's exactly (the same kernels)."""
    torch._dynamo.reset()
    w = randn(200, 130, scale=130**-0.5, requires_grad=True)
    b = randn(200, requires_grad=True) if with_bias else None
    x = randn(3, 7, 127, requires_grad=True)
    for name in frozen:
        if name == "x" or b is not None:
            (x if name == "x" else b).requires_grad_(False)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    dy = randn(3, 7, 129)

    def step(x, w, b):
        return sliced_linear(x, w, b, out_features=129)
    y_eager = step(x, w, b)
    g_eager = torch.autograd.grad(y_eager, leaves, dy)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y = compiled(x, w, b)
    grads = torch.autograd.grad(y, leaves, dy)
    assert y.shape == (3, 7, 129) and torch.equal(y, y_eager)
    assert all(torch.equal(a, c) for a, c in zip(grads, g_eager))
    assert_close(y, _reference(x, w, b, 129), torch.float32)


def test_custom_ops_opcheck():
    """torch.library.opcheck of the forward and backward custom ops (schema, autograd registration, fake tensors,
    eager against AOT-dispatch tracing with dynamic shapes)."""
    w, b, x = randn(200, 130, requires_grad=True), randn(200, requires_grad=True), randn(9, 127, requires_grad=True)
    torch.library.opcheck(torch.ops.flextron.sliced_linear_fwd.default, (x, w, b, 129))
    torch.library.opcheck(torch.ops.flextron.sliced_linear_fwd.default, (x.detach(), w.detach(), None, 77))
    for need in ([True, True, True], [False, True, False]):
        torch.library.opcheck(torch.ops.flextron.sliced_linear_bwd.default,
                              (randn(9, 129), x.detach(), w.detach(), True, 129, need))


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
