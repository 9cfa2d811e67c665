"""Hopper helpers every op shares: TMA descriptors, SM counts, alignment checks. Nothing here launches a kernel."""

from __future__ import annotations

import functools

import torch

from ._runtime import INTERPRET

try:  # Hopper's TMA descriptors (triton >= 3.4); the interpreter emulates them
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None


@functools.cache
def tma_sms(device: torch.device) -> int:
    """The device's SM count where TMA kernels may run (Hopper or later, or the interpreter: 4), else 0.
    Asked lazily, not at import: importing must not initialise CUDA (forked workers could not use it)."""
    if TensorDescriptor is None:
        return 0
    if INTERPRET or device.type != "cuda":
        return 4 if INTERPRET else 0
    if torch.cuda.get_device_capability(device)[0] < 9:
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def sm_count(device: torch.device) -> int:
    """Programs in one wave: the SM count (4 under the interpreter or off CUDA, a stand-in)."""
    if INTERPRET or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def aligned(t: torch.Tensor, row_stride: int) -> bool:
    """Whether ``t``'s base and rows of ``row_stride`` elements are 16-byte aligned, as a TMA descriptor needs."""
    return t.data_ptr() % 16 == 0 and (row_stride * t.element_size()) % 16 == 0 and row_stride > 0


def _descriptor(t: torch.Tensor, block: list[int]):
    """``TensorDescriptor(t, shape, [row stride, 1], block)`` without the dataclass's checks (~10 us of Python each on
    a slow host, several per call): the callers pass tensors whose alignment they checked (``aligned``) or that they
    allocated themselves."""
    d = TensorDescriptor.__new__(TensorDescriptor)
    d.base, d.shape, d.strides, d.block_shape, d.padding = t, list(t.shape), [t.stride(0), 1], block, "zero"
    return d


def full_desc(t: torch.Tensor, block: list[int], memo: dict | None = None):
    """A host TMA descriptor over all of row-major ``t`` with boxes of ``block``. ``memo``: one call's descriptors by
    tensor and box, shared by its launches."""
    if memo is None:
        return _descriptor(t, block)
    key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(0), tuple(block))
    d = memo.get(key)
    if d is None:
        d = memo[key] = _descriptor(t, block)
    return d
