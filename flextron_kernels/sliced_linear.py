"""``sliced_linear``: ``y = x @ W[:n, :k].T + b[:n]`` reading the weight prefix in place.

One strided matmul serves the forward and both backward products, because a prefix of a row-major weight is
just a smaller matrix with the full row stride:

- forward      ``y[M, n]  = x[M, k]   @ W[:n, :k]^T``   (B read through W's strides, transposed)
- grad input   ``dx[M, k] = dy[M, n]  @ W[:n, :k]``
- grad weight  ``dW[:n, :k] = dy^T[n, M] @ x[M, k]``    (written into a view of the full-shape gradient)

No copy of ``W`` is ever made; ``x`` and ``dy`` are flattened to 2-D (a view when their strides allow).
On a GPU a call is ``F.linear`` on the prefix view (torch passes such views to cuBLAS in place; autograd writes the
full-shape weight gradient): the Triton GEMMs below made 0.85-0.98x of cuBLAS at 4096 tokens and 0.35x on a 25%
input slice (H200), and a Python autograd function costs more host time than torch's own. The Triton products
(``matmul_strided``: a persistent TMA-descriptor kernel for large products, a pointer-based one otherwise) run
under the interpreter, for a weight whose strides cuBLAS cannot take in place, and under ``force_path``.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager

import torch
import triton
import triton.language as tl

from ._hopper import TensorDescriptor, aligned, tma_sms
from ._runtime import (
    FLOAT_DTYPES,
    INTERPRET,
    autocast_dtype,
    cast_to,
    cdiv,
    check_same,
    check_tensor,
    check_width,
    dot_precision,
    setting,
    upcast_flag,
    use_triton,
)
from .reference import sliced_linear_ref

PATHS = ("cublas", "triton", "tma")
_forced: tuple[str, tuple | None] | None = None  # set only by force_path


def force_path(path: str, tma_blocks: tuple | None = None) -> AbstractContextManager[None]:
    """Inside the block every product of this module takes ``path`` in place of the size rule (tests, benchmarks):

    - ``"cublas"``: torch (cuBLAS on a GPU) on views of the operands where it takes them in place, else the pointer
      kernel; never the TMA kernel;
    - ``"triton"``: never cuBLAS; the TMA kernel where its size rule and descriptors serve, else the pointer kernel;
    - ``"tma"``: as ``"triton"``, with the TMA kernel on ``tma_blocks`` (``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
      num_stages, programs)``, programs None for one per tile) at every size where its descriptors serve.
    """
    if path not in PATHS or (path == "tma") != (tma_blocks is not None):
        raise ValueError(f"path must be one of {PATHS}, with tma_blocks exactly for 'tma'; got {path!r}, {tma_blocks}")
    return setting(globals(), "_forced", (path, tma_blocks))


@functools.lru_cache(maxsize=4096)
def _pick_blocks(M: int, N: int, K: int, elem_bytes: int) -> tuple[dict, int]:
    """Block shapes by problem size instead of autotuning, and the grid size.

    Autotuning compiled every config for every new (M, N, K, dtype) key: on an H200 that made the CUDA test
    run take 433 s, and a model would stall at every new prompt length. Size-based blocks compile once per
    dtype and layout. Cached: on the decode path the launch's host time is the cost that matters.
    """
    if INTERPRET:
        # The interpreter's cost grows with the number of programs: big blocks.
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)
    elif M <= 16:
        # Decode: a weight stream. Narrow N tiles give >= 2 programs per SM so enough loads are in flight;
        # small tiles keep 4+ programs resident per SM.
        # 16x32x256 tiles in 4 stages: the best pointer config at 16 tokens, 0.97-1.12x cuBLAS in a CUDA graph
        # (H200, benchmarks/lab/explore_sliced_linear.py).
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)
    else:
        # fp32 tiles take twice the shared memory per stage: halve BLOCK_K to stay under 228 KB.
        bk = 64 if elem_bytes <= 2 else 32
        if M <= 64:
            cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, num_warps=4, num_stages=4)
        elif cdiv(M, 128) * cdiv(N, 256) >= 132:
            # Enough tiles to fill 132 SMs with the large wgmma tile; GROUP_M keeps W tiles hot in L2.
            cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=3)
        else:
            cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=4)
    cfg["EVEN_K"] = K % cfg["BLOCK_K"] == 0
    return cfg, cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])


@triton.jit
def _strided_matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = A[M, K] @ B[K, N] (+ bias[N]), all through strides, fp32 accumulation.

    Strides equal to 1 are specialised by Triton's JIT, so contiguous operands get vector loads.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    group_id = pid // group_size
    first_m = group_id * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group_size) % group_m)
    pid_n = (pid % group_size) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows past the edge wrap onto valid rows instead of being masked: the main-loop loads need no M/N
    # masks (the tutorials' trick), and the wrapped rows are never stored. int64: a row index times a row
    # stride passes 2^31 for big weights and long prompts.
    rm_ld = (rm % M).to(tl.int64)
    rn_ld = (rn % N).to(tl.int64)
    a_ptrs = a_ptr + rm_ld[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn_ld[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    c_ptrs = c_ptr + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _tile_of(tile_id, num_m, num_n, GROUP_M: tl.constexpr):
    in_group = GROUP_M * num_n
    first_m = (tile_id // in_group) * GROUP_M
    gm = min(num_m - first_m, GROUP_M)
    return first_m + (tile_id % in_group) % gm, (tile_id % in_group) // gm


@triton.jit
def _tma_matmul_kernel(
    a_desc, b_desc, c_desc, bias_ptr, M, N, K,
    HAS_BIAS: tl.constexpr, TRANS_A: tl.constexpr, B_NK: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
):
    """C[M, N] = A @ B (+ bias) with every tile moved by the TMA engine (Hopper's bulk tensor copies).

    The descriptors carry each operand's own shape and row stride, so a weight prefix is a [n, k] box over the
    full weight (no copy) and out-of-range rows/columns read as zeros and are never stored. A is stored [M, K]
    (or [K, M] with TRANS_A), B [K, N] (or [N, K] with B_NK). With NUM_PROGRAMS below the tile count the
    kernel is persistent: each program walks tiles NUM_PROGRAMS apart, and the pipeliner overlaps the next
    tile's loads with this tile's epilogue.
    """
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            ok = ki * BLOCK_K
            a = a_desc.load([ok, om]).T if TRANS_A else a_desc.load([om, ok])
            b = b_desc.load([on, ok]).T if B_NK else b_desc.load([ok, on])
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            rn = on + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        c_desc.store([om, on], acc.to(c_desc.dtype))


def _strided_by(t: torch.Tensor, s_first: int, s_second: int) -> bool | None:
    """How a 2-D operand with strides ``(s_first, s_second)`` can be a TMA descriptor: False when the second dim is
    the unit-stride one (rows along the first), True when the first is (stored transposed), None when neither is
    or its rows are not 16-byte aligned. (A unit row stride is never aligned, so the order of the checks is moot.)"""
    if s_second == 1 and aligned(t, s_first):
        return False
    if s_first == 1 and aligned(t, s_second):
        return True
    return None


def _tma_blocks(M: int, N: int, sms: int):
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, programs)`` for the TMA kernel, or None; ``programs``
    None means one program per tile, else a persistent grid of that many programs."""
    if _forced is not None and _forced[0] == "tma":
        return _forced[1]
    if INTERPRET:  # small tiles and few programs: cheap on a CPU, and persistence is exercised
        return 64, 64, 32, 4, 1, sms
    if cdiv(M, 128) * cdiv(N, 256) >= 2 * sms:
        return 128, 256, 64, 8, 3, sms
    if cdiv(M, 128) * cdiv(N, 128) >= sms - 4:
        return 128, 128, 64, 4, 4, None
    return None


def _tma_plan(a, b, out, M, N, K, sam, sak, sbk, sbn, scm, scn):
    """Block config and descriptors for the TMA kernel, or None where the pointer kernel must serve.

    Chosen from an H200 sweep (benchmarks/lab/explore_sliced_linear.py): persistent 128x256 tiles when there are at
    least two waves of them (0.85-0.98x cuBLAS at 4096 tokens, where the pointer kernel made 0.66-0.77x), one
    128x128 tile per program at a wave or so, the pointer kernel below that (it wins with few tiles)."""
    sms = tma_sms(out.device)
    if _forced is not None and _forced[0] == "cublas":
        return None
    if not sms or a.element_size() != 2 or M < 128 or scn != 1 or not aligned(out, scm):
        return None
    trans_a = _strided_by(a, sam, sak)  # A stored [M, K] (False) or [K, M] (True)
    b_nk = _strided_by(b, sbk, sbn)  # B stored [K, N] (False) or [N, K] (True)
    if trans_a is None or b_nk is None:
        return None
    blocks = _tma_blocks(M, N, sms)
    if blocks is None:
        return None
    bm, bn, bk, warps, stages, programs = blocks
    tiles = cdiv(M, bm) * cdiv(N, bn)
    programs = tiles if programs is None else min(programs, tiles)
    a_desc = (TensorDescriptor(a, [K, M], [sak, 1], [bk, bm]) if trans_a
              else TensorDescriptor(a, [M, K], [sam, 1], [bm, bk]))
    b_desc = (TensorDescriptor(b, [N, K], [sbn, 1], [bn, bk]) if b_nk
              else TensorDescriptor(b, [K, N], [sbk, 1], [bk, bn]))
    c_desc = TensorDescriptor(out, [M, N], [scm, 1], [bm, bn])
    cfg = dict(TRANS_A=trans_a, B_NK=b_nk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, NUM_PROGRAMS=programs,
               num_warps=warps, num_stages=stages)
    return a_desc, b_desc, c_desc, cfg


def _use_blas(out: torch.Tensor, M: int, N: int) -> bool:
    """Whether a GPU call of ``out[M, N]`` goes to cuBLAS (where its operands allow): always on a GPU unless
    ``force_path`` says otherwise. A row-major weight's prefix goes to cuBLAS without a copy (ATen's
    prepare_matrix_for_cublas), and cuBLAS on those views is the baseline a user has: the Triton GEMMs made
    0.85-0.98x of it at 4096 tokens and 0.35x on a 25% input slice (H200), so they serve only operands cuBLAS
    would copy, and ``force_path`` in tests and benchmarks."""
    if _forced is not None:
        return _forced[0] == "cublas"
    return out.is_cuda and not INTERPRET


def blas_serves(x: torch.Tensor) -> bool:
    """Whether ``sliced_linear`` on ``x`` is ``F.linear`` on the prefix views (a GPU, and no ``force_path`` to
    the Triton kernels), for a weight stored row-major or transposed."""
    return _use_blas(x, 0, 0)


def _blas_strides(s_r: int, s_c: int, rows: int, cols: int) -> bool:
    """Whether a ``[rows, cols]`` matrix with these strides goes to cuBLAS in place: one unit stride and the other
    at least the extent it steps over."""
    return (s_c == 1 and s_r >= max(1, cols)) or (s_r == 1 and s_c >= max(1, rows))


def _blas_view(t: torch.Tensor, rows: int, cols: int, s_r: int, s_c: int) -> torch.Tensor | None:
    """``t`` as the strided ``[rows, cols]`` matrix where cuBLAS can read (or write) it in place, else None."""
    return t.as_strided((rows, cols), (s_r, s_c)) if _blas_strides(s_r, s_c, rows, cols) else None


def _blas_matmul(a, b, out, bias, M, N, K, sam, sak, sbk, sbn, scm, scn) -> bool:
    """``out = A @ B (+ bias)`` through torch (cuBLAS) on views of the operands; False where a view would not go
    to cuBLAS as it is (the caller then launches the pointer kernel)."""
    va, vb, vc = (_blas_view(a, M, K, sam, sak), _blas_view(b, K, N, sbk, sbn), _blas_view(out, M, N, scm, scn))
    if va is None or vb is None or vc is None:
        return False
    if bias is None:
        torch.mm(va, vb, out=vc)
    else:
        torch.addmm(bias[:N], va, vb, out=vc)
    return True


def matmul_strided(a, b, out, bias, M, N, K, sam, sak, sbk, sbn, scm, scn) -> None:
    """``out[M, N] = A[M, K] @ B[K, N] (+ bias[:N])`` with every operand given by base tensor and strides.

    Passing strides instead of view tensors keeps the host cost of a launch low (decode is launch-bound).
    Inputs are not checked here. On a GPU, cuBLAS on views where it takes them in place (force_path changes
    that); else the TMA kernel where its plan serves, else the pointer kernel.
    """
    if M == 0 or N == 0:
        return
    if K == 0:
        view = out.as_strided((M, N), (scm, scn))
        view.zero_() if bias is None else view.copy_(bias[:N].expand(M, N))
        return
    if _use_blas(out, M, N) and _blas_matmul(a, b, out, bias, M, N, K, sam, sak, sbk, sbn, scm, scn):
        return
    plan = _tma_plan(a, b, out, M, N, K, sam, sak, sbk, sbn, scm, scn)
    if plan is not None:
        a_desc, b_desc, c_desc, cfg = plan
        _tma_matmul_kernel[(cfg["NUM_PROGRAMS"],)](
            a_desc, b_desc, c_desc, bias if bias is not None else out, M, N, K,
            HAS_BIAS=bias is not None, UPCAST=upcast_flag(a.dtype), **cfg,
        )
        return
    cfg, grid = _pick_blocks(M, N, K, a.element_size())
    _strided_matmul_kernel[(grid,)](
        a, b, out, bias if bias is not None else out,
        M, N, K, sam, sak, sbk, sbn, scm, scn,
        HAS_BIAS=bias is not None, UPCAST=upcast_flag(a.dtype), PRECISION=dot_precision(a.dtype), **cfg,
    )


def strided_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """``out = a @ b (+ bias)`` for 2-D strided views; ``out`` may itself be a view into a larger tensor."""
    M, K = a.shape
    N = b.shape[1]
    matmul_strided(a, b, out, bias, M, N, K, *a.stride(), *b.stride(), *out.stride())


def flatten(x: torch.Tensor) -> torch.Tensor:
    # reshape is a view whenever the leading dims can be merged; only a truly scattered x is copied.
    return x.reshape(-1, x.shape[-1])


def forward(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    M, k = x2.shape
    y = torch.empty((M, n), dtype=x2.dtype, device=x2.device)
    # B[kk, j] = weight[j, kk]: the prefix weight[:n, :k] transposed, read through the weight's own strides.
    sw0, sw1 = weight.stride()
    matmul_strided(x2, weight, y, bias, M, n, k, x2.stride(0), x2.stride(1), sw1, sw0, n, 1)
    return y


class _SlicedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, n):
        x2 = flatten(x)
        y = forward(x2, weight, bias, n)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        ctx.n = n
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        return (*backward(dy, x2, weight, ctx.n, ctx.x_shape, ctx.has_bias, ctx.needs_input_grad[:3]), None)


def backward(dy, x2, weight, n: int, x_shape, has_bias: bool, need):
    """``(dx, dw, db)`` (None where not needed): ``need`` says whether x, weight and bias need gradients."""
    k = x2.shape[1]
    dy2 = flatten(dy)
    dx = dw = db = None
    if need[0]:
        dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
        matmul_strided(dy2, weight, dx, None, dx.shape[0], k, n, *dy2.stride(), *weight.stride(), k, 1)
        dx = dx.view(x_shape)
    if need[1]:
        # Only the complement is zero-filled: the kernel writes the prefix once.
        dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
        dw[n:].zero_()
        dw[:n, k:].zero_()
        sd0, sd1 = dy2.stride()
        matmul_strided(dy2, x2, dw, None, n, k, x2.shape[0], sd1, sd0, *x2.stride(), *dw.stride())
    if has_bias and need[2]:
        db = torch.zeros(weight.shape[0], dtype=dy.dtype, device=dy.device)
        db[:n] = dy2.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, dw, db


def _check(x, weight, bias, out_features, same_dtype: bool = True) -> int:
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_same("weight", weight, "x", x, same_dtype)
    N, K = weight.shape
    check_width("x.shape[-1]", x.shape[-1], 1, K)
    n = N if out_features is None else check_width("out_features", out_features, 1, N)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same("bias", bias, "x", x, same_dtype)
        if bias.shape[0] != N:
            raise ValueError(f"bias must have shape ({N},) to match weight's rows, got {tuple(bias.shape)}")
    return n


def _blas_call(x: torch.Tensor, weight, bias, out_features) -> torch.Tensor | None:
    """The common GPU call (``x`` a CUDA tensor, no ``force_path``) checked in a few attribute reads: ``F.linear`` on
    the prefix views, or None where anything is out of the ordinary (bad input included), for the full path to
    handle and name. Its host time beyond the view is 1.4-1.6 us against the full path's 3.9 (a CPU core, the product
    stubbed). Under autocast, with ``x`` and the weight of one dtype, ``F.linear`` casts the prefix views as the full
    path does."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or x.dim() < 1:
        return None
    dt = x.dtype
    if weight.dtype is not dt or dt not in FLOAT_DTYPES or weight.device != x.device:
        return None
    N, K = weight.shape
    k = x.shape[-1]
    n = N if out_features is None else out_features
    if type(n) is not int or not (0 < n <= N and 0 < k <= K):
        return None
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.shape[0] == N
                                 and bias.dtype is dt and bias.device == x.device):
        return None
    s_r, s_c = weight.stride()
    if not _blas_strides(s_r, s_c, n, k):
        return None
    if n == N and k == K:  # the whole weight as it is: no view, no alias node for autograd to walk
        return torch.nn.functional.linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight[:n, :k], None if bias is None else bias[:n])


def sliced_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out_features: int | None = None
) -> torch.Tensor:
    """``y = x @ weight[:n, :k].T + bias[:n]``, reading the weight prefix in place (no copy).

    Args:
        x: ``[..., k]`` with ``1 <= k <= K``; any strides.
        weight: the full ``[N, K]`` weight.
        bias: optional full ``[N]`` bias.
        out_features: ``n`` with ``1 <= n <= N``; ``None`` means ``N``.

    Returns ``[..., n]`` in ``x``'s dtype. Differentiable in ``x``, ``weight`` and ``bias``; the weight and
    bias gradients have their full shapes, zero outside the prefix.
    """
    if not INTERPRET and _forced is None and type(x) is torch.Tensor and x.is_cuda:
        y = _blas_call(x, weight, bias, out_features)
        if y is not None:
            return y
    amp = autocast_dtype(x)
    n = _check(x, weight, bias, out_features, same_dtype=amp is None)
    if amp is not None:  # as F.linear under autocast; only the prefix this call reads is cast
        k = x.shape[-1]
        x, weight, bias = cast_to(amp, x, weight[:n, :k], None if bias is None else bias[:n])
    if _use_blas(x, 0, 0) and _blas_strides(*weight.stride(), n, x.shape[-1]):
        # A GPU: F.linear on the prefix view, forward and backward. cuBLAS reads the view in place (a row-major
        # weight, or a transposed one such as GPT-2's Conv1D), autograd's own backward writes the full-shape
        # weight gradient, and torch.compile traces it as it is. The least host time a call can cost; the whole
        # weight goes as it is (no view: no alias node for autograd to walk).
        if n == weight.shape[0] and x.shape[-1] == weight.shape[1]:
            return torch.nn.functional.linear(x, weight, bias)
        return torch.nn.functional.linear(x, weight[:n, : x.shape[-1]], None if bias is None else bias[:n])
    if not use_triton(x):
        return sliced_linear_ref(x, weight, bias, n)
    if torch.compiler.is_compiling():  # one opaque custom op in the traced graph (_ops), its backward registered
        return torch.ops.flextron.sliced_linear_fwd(x, weight, bias, n)
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if needs_grad and torch.is_grad_enabled():
        return _SlicedLinear.apply(x, weight, bias, n)
    # Inference skips autograd's bookkeeping.
    return forward(flatten(x), weight, bias, n).view(*x.shape[:-1], n)
