"""Shared test helpers: device choice, tolerances, relative error, poisoned allocations."""

from __future__ import annotations

import contextlib

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# ||out - ref|| / ||ref|| bounds against a float64 reference. fp32 dots run in IEEE mode (torch's
# default allow_tf32=False is honoured), so fp32 is tight on both CPU and GPU.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double().cpu()
    ref = ref.double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "output has NaN/Inf (unwritten or poisoned elements?)"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output", scale: float = 1.0):
    err = rel_err(out, ref)
    tol = TOL[dtype] * scale
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def randn(*shape, dtype=torch.float32, device=DEVICE, scale=1.0, requires_grad=False):
    t = (torch.randn(*shape, dtype=torch.float32, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


@contextlib.contextmanager
def poisoned_allocations():
    """Make every ``torch.empty``/``empty_like`` of a float dtype come back full of NaN.

    A kernel that leaves any output element unwritten then fails the finiteness check in ``rel_err``.
    """
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def p_empty(*a, **k):
        return poison(empty(*a, **k))

    def p_empty_like(*a, **k):
        return poison(empty_like(*a, **k))

    torch.empty, torch.empty_like = p_empty, p_empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
