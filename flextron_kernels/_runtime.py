"""What every op shares: where kernels run, the interpreter's quirks, input checks.

Nothing here launches a kernel. Each op file imports the few helpers it needs.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager

import torch

# Read once at import: triton reads the same variable when its decorators run, so a later change
# would not take effect anyway (see shared/reference/env_cpu.md, gotcha 1).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cdiv(a: int, b: int) -> int:
    """Ceiling division for host code. ``triton.cdiv`` is a constexpr function: on the host each call costs
    ~3.6 us of argument unwrapping (measured on the CPU machine), and a nested_mlp call made eleven of them."""
    return -(-a // b)


@contextlib.contextmanager
def setting(namespace: dict, name: str, value) -> Iterator[None]:
    """Within the block ``namespace[name]`` (a module's ``globals()``) is ``value``; the previous value comes back
    after it (blocks nest). The switches of this package (paths, backends, policies) are these."""
    previous = namespace[name]
    namespace[name] = value
    try:
        yield
    finally:
        namespace[name] = previous


_CPU_REFERENCE = False


def cpu_reference() -> AbstractContextManager[None]:
    """Inside this block CPU tensors run the plain-torch reference of every op even under ``TRITON_INTERPRET=1``
    (CUDA tensors are unaffected): a whole real model then runs on the CPU in seconds instead of hours."""
    return setting(globals(), "_CPU_REFERENCE", True)


def use_triton(t: torch.Tensor) -> bool:
    """True where a Triton kernel can run on ``t``: a CUDA tensor, or a CPU tensor under the interpreter (outside
    :func:`cpu_reference`)."""
    if t.is_cuda:
        return True
    return INTERPRET and not _CPU_REFERENCE and t.device.type == "cpu"


def upcast_flag(dtype: torch.dtype) -> bool:
    """The interpreter does bf16 arithmetic on raw bits (silently wrong): kernels upcast loaded tiles then.

    On a GPU this is False, so bf16 tiles go to the tensor cores as they are.
    """
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own TF32 switch, so a user gets the precision ``F.linear`` would give."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cpu_do_bench(fn, quantiles=None, **_kw):
    """A stand-in for ``triton.testing.do_bench`` when no GPU exists (autotune asks a driver otherwise)."""
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


def autotune_configs(gpu_configs: Sequence, interpret_config) -> list:
    """Autotuning needs a GPU to time configs: under the interpreter, one config and no timing."""
    return [interpret_config] if INTERPRET else list(gpu_configs)


# ----------------------------------------------------------------------------------------------
# Input checks: each raises with a message that names the argument and what was expected.


def check_tensor(name: str, t, *, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` asks for on ``t``'s device, or None when autocast is off there.

    The ops follow ``F.linear``/SDPA under autocast: float inputs are cast to it (a weight only over the prefix
    a call reads), so a bf16-autocast training step with fp32 master weights runs the kernels in bf16.
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return None
    dev = t.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def cast_to(dtype: torch.dtype | None, *tensors):
    """``tensors`` cast to ``dtype`` (None entries and ``dtype=None`` pass through)."""
    return tuple(t if dtype is None or t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, dtype: bool = True) -> None:
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def check_width(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in [{low}, {high}], got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value
