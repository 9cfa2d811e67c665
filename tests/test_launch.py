"""DirectLaunch: the compiled kernel reused only where Triton would have specialised it the same way."""

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs

from flextron_kernels._launch import DirectLaunch
from flextron_kernels._runtime import INTERPRET, cpu_do_bench
from tests.utils import DEVICE, ON_GPU


@triton.jit
def _scaled_copy(x_ptr, y_ptr, n, stride, alpha, BLOCK: tl.constexpr, SQUARE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs * stride, mask=offs < n, other=0.0)
    if SQUARE:
        x = x * x
    tl.store(y_ptr + offs, x * alpha, mask=offs < n)


@triton.autotune(configs=[triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 64})], key=["n"],
                 do_bench=cpu_do_bench if INTERPRET else None)
@triton.jit
def _tuned_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def _run(launch, x, n, stride, alpha=2.0, square=False):
    y = torch.full((n,), float("nan"), device=DEVICE)
    launch((triton.cdiv(n, 64),), (x, y), (n, stride, alpha), (64, square))
    return y


def test_reuses_only_matching_specialisations():
    """Aligned then misaligned bases, strides 16 and 1 and 3 (1 and multiples of 16 are what Triton specialises on),
    a changed constexpr and a changed float: each result against torch; on a GPU, a compiled kernel per distinct
    specialisation (a miss) and none for a repeat, whether found by its exact arguments or by its specialisation."""
    launch = DirectLaunch(_scaled_copy)
    base = torch.randn(4096, device=DEVICE)
    cases = [  # (x view, n, stride, alpha, square, new compiled kernel expected)
        (base, 200, 16, 2.0, False, True),
        (base, 200, 16, 2.0, False, False),  # a repeat: the cached kernel
        (base[1:], 200, 16, 2.0, False, True),  # base 4 bytes off 16-byte alignment
        (base, 200, 1, 2.0, False, True),
        (base, 200, 3, 2.0, False, True),
        (base, 199, 3, 2.0, False, False),  # 200 and 199 both neither 1 nor a multiple of 16
        (base, 200, 3, -0.5, False, False),  # floats are not specialised
        (base, 200, 3, 2.0, True, True),  # another constexpr
        (base[1:], 200, 16, 2.0, False, False),
        (base, 200, 16, 2.0, False, False),  # a third time: the lookup by exact arguments
        (base[4:], 200, 16, 2.0, False, False),  # 16 bytes on: aligned again
    ]
    misses = 0
    for x, n, stride, alpha, square, new in cases:
        y = _run(launch, x, n, stride, alpha, square)
        want = x[: n * stride : stride]
        want = (want * want if square else want) * alpha
        assert torch.equal(y, want), (x.data_ptr() % 16, n, stride, alpha, square)
        misses += new
        if ON_GPU and not INTERPRET:
            assert launch.misses == misses, (x.data_ptr() % 16, n, stride, alpha, square)


def test_autotuned_kernel_keeps_each_key_config():
    """An autotuned kernel: the config comes from the autotuner per tuning key (``n`` here, by value)."""
    launch = DirectLaunch(_tuned_copy)
    x = torch.randn(1000, device=DEVICE)
    for n in (1000, 999, 1000, 999):
        y = torch.full((n,), float("nan"), device=DEVICE)
        launch((triton.cdiv(n, 32),), (x, y), (n,), ())
        assert torch.equal(y, x[:n])
    if ON_GPU and not INTERPRET:
        assert launch.misses == 2


@pytest.mark.skipif(not ON_GPU or INTERPRET, reason="launch hooks are the GPU launcher's")
def test_launch_hook_sees_every_launch():
    """A profiler's launch hook (proton sets one) still sees each launch: those go through kernel[grid]."""
    launch = DirectLaunch(_scaled_copy)
    x = torch.randn(256, device=DEVICE)
    _run(launch, x, 256, 1)  # compiled and cached
    seen = []

    def hook(metadata):
        seen.append(metadata)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        y = _run(launch, x, 256, 1)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 1 and torch.equal(y, x * 2.0)
    _run(launch, x, 256, 1)
    assert len(seen) == 1 and launch.misses == 1


def test_rejects_what_it_cannot_serve():
    @triton.jit
    def constexpr_first(BLOCK: tl.constexpr, x_ptr):
        pass

    with pytest.raises(TypeError, match="constexpr parameters last"):
        DirectLaunch(constexpr_first)
    with pytest.raises(TypeError, match="runtime arguments expected"):
        DirectLaunch(_scaled_copy)((1,), (torch.zeros(1, device=DEVICE),), (), (64, False))
    if ON_GPU and not INTERPRET:
        with pytest.raises(TypeError, match="ints, bools and floats"):
            x = torch.zeros(1, device=DEVICE)
            DirectLaunch(_scaled_copy)((1,), (x, x), (1, "1", 1.0), (64, False))
