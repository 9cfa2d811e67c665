"""``elastic_attention_decode``: one new query token per sequence against its KV cache (flash-decoding).

One launch serves a batch whose sequences differ in cache length and head budget:

1. split kernel, grid ``(splits, B * Hkv)``: a program takes one chunk of one sequence's cache for one KV head
   and all query heads of that group at once (a ``[BLOCK_H, D]`` query tile, so each K/V byte is read once per
   group, not once per query head). It writes a partial output normalised by its own softmax sum, and the
   chunk's log-sum-exp. Programs past the sequence's length, or whose group is past its head budget, return
   before loading anything.
2. reduce kernel, grid ``(B * Hq,)``: combines a head's partials with weights ``exp2(lse_s - max lse)``, or writes
   zeros for a head past the budget.

Where the cache is cut into one chunk (short caches over many sequences and KV heads), the split kernel writes the
output itself, zeros included, and the reduce kernel does not run: one launch per step (``DIRECT``).

Splitting along the sequence keeps every SM streaming even for a single long sequence: decode is bound by
the bandwidth of reading the cache, and ``B * Hkv`` programs alone would leave most of the GPU idle.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from contextlib import AbstractContextManager

import torch
import triton
import triton.language as tl

from ._launch import DirectLaunch
from ._runtime import (
    FLOAT_DTYPES,
    INTERPRET,
    autocast_dtype,
    cast_to,
    cdiv,
    check_same,
    check_tensor,
    cpu_do_bench,
    dot_precision,
    next_pow2,
    setting,
    upcast_flag,
    use_triton,
)
from .elastic_attention import LOG2E, check_head_dim, heads_tensor, values_checked
from .reference import elastic_attention_decode_ref

# Chunk lengths are multiples of the largest BLOCK_N, so every config tiles a chunk exactly.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=3),
]
_CHUNK_MULTIPLE = 128
_INTERPRET_BLOCK_N = 32
# Chunks combined per step of the reduction; tiny under the interpreter so the tests cover several steps.
_REDUCE_BLOCK = 2 if INTERPRET else 32


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": _INTERPRET_BLOCK_N}, num_warps=4)] if INTERPRET else _GPU_CONFIGS,
    key=["HEAD_DIM", "BLOCK_H", "CHUNK", "S_BUCKET", "DIRECT"],
    do_bench=cpu_do_bench if INTERPRET else None,
)
@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, po_ptr, plse_ptr, o_ptr, lens_ptr, heads_ptr,
    sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, sod,
    HQ, HKV, REP, S_MAX, NSPLIT, CHUNK, S_BUCKET, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    DIRECT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # DIRECT (one chunk, NSPLIT == 1): the output of the group's REP query heads is written here, normalised, and
    # zeros for heads past the budget or an empty cache; no partials, no reduce kernel.
    pid_s = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // HKV
    g = pid_bg % HKV
    n_heads = tl.minimum(tl.load(heads_ptr + b) - g * REP, REP)  # active query heads of this group
    length = tl.minimum(tl.load(lens_ptr + b), S_MAX)
    start = pid_s * CHUNK
    hrow = tl.arange(0, BLOCK_H)
    hq = g * REP + hrow
    hmask = hrow < n_heads
    d = tl.arange(0, HEAD_DIM)
    o_ptrs = o_ptr + b.to(tl.int64) * sob + hq[:, None].to(tl.int64) * soh + d[None, :] * sod
    omask = (hrow < REP)[:, None]
    if (n_heads <= 0) | (start >= length):
        if DIRECT:
            tl.store(o_ptrs, tl.zeros((BLOCK_H, HEAD_DIM), dtype=o_ptr.dtype.element_ty), mask=omask)
        return  # else the reduce kernel neither reads this chunk nor this group
    end = tl.minimum(start + CHUNK, length)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + hq[:, None].to(tl.int64) * sqh + d[None, :] * sqd,
                mask=hmask[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * skb + g.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + g.to(tl.int64) * svh
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, HEAD_DIM), dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        cmask = cols < end
        k = tl.load(k_base + cols[:, None].to(tl.int64) * skn + d[None, :] * skd, mask=cmask[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * svn + d[None, :] * svd, mask=cmask[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # BLOCK_H >= 16 rows (the group padded) so the product runs on tensor cores; decode is bound by the
        # K/V stream, so the padded rows cost nothing measurable.
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        qk = tl.where(cmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    if DIRECT:  # rows past the budget held zero queries (finite); they are written as zeros
        out = tl.where(hmask[:, None], acc / l_i[:, None], 0.0)
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=omask)
    else:  # partials are fresh contiguous fp32 [B, HQ, NSPLIT, (D)]
        part = (b.to(tl.int64) * HQ + hq) * NSPLIT + pid_s
        tl.store(po_ptr + part[:, None] * HEAD_DIM + d[None, :], acc / l_i[:, None], mask=hmask[:, None])
        tl.store(plse_ptr + part, m_i + tl.log2(l_i), mask=hmask)


@triton.jit
def _decode_reduce_kernel(
    po_ptr, plse_ptr, o_ptr, lens_ptr, heads_ptr, sob, soh, sod, HQ, S_MAX, NSPLIT, CHUNK,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // HQ
    h = pid % HQ
    d = tl.arange(0, HEAD_DIM)
    o_ptrs = o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh + d * sod
    length = tl.minimum(tl.load(lens_ptr + b), S_MAX)
    if (h >= tl.load(heads_ptr + b)) | (length <= 0):
        tl.store(o_ptrs, tl.zeros((HEAD_DIM,), dtype=o_ptr.dtype.element_ty))
        return
    n_chunks = tl.cdiv(length, CHUNK)  # only chunks the split kernel wrote
    # Online combination over blocks of chunks: a long context has hundreds of chunks, too many for one tile.
    m = tl.max(tl.full((BLOCK_S,), float("-inf"), dtype=tl.float32), 0)
    den = tl.sum(tl.zeros((BLOCK_S,), dtype=tl.float32), 0)
    acc = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    for s0 in range(0, n_chunks, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < n_chunks
        part = pid.to(tl.int64) * NSPLIT + s
        lse = tl.load(plse_ptr + part, mask=smask, other=float("-inf"))
        po = tl.load(po_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + tl.sum(po * w[:, None], 0)
        den = den * alpha + tl.sum(w, 0)
        m = m_new
    tl.store(o_ptrs, (acc / den).to(o_ptr.dtype.element_ty))


_SPLIT = DirectLaunch(_decode_split_kernel)
_REDUCE = DirectLaunch(_decode_reduce_kernel, num_warps=4)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a few chunks per sequence, so the tests exercise the reduction


@dataclasses.dataclass(frozen=True)
class ChunkPolicy:
    """How the split kernel cuts the cache (see :func:`chunking`)."""

    programs_per_sm: int = 8
    min_chunk: int = 1024


_policy = ChunkPolicy()


def chunk_policy(policy: ChunkPolicy) -> AbstractContextManager[None]:
    """Inside the block every decode call chunks the cache by ``policy`` (benchmark sweeps); the default otherwise."""
    if not isinstance(policy, ChunkPolicy):
        raise TypeError(f"policy must be a ChunkPolicy, got {type(policy).__name__}")
    return setting(globals(), "_policy", policy)


def chunking(batch: int, hkv: int, s_max: int, device: torch.device) -> tuple[int, int]:
    """Chunk length and count: about ``programs_per_sm`` programs per SM, but chunks of at least ``min_chunk`` keys
    wherever that still leaves about one program per SM (:class:`ChunkPolicy`).

    Many chunks rather than one wave of long ones: with two programs resident per SM, 344 long programs ran as
    1.3 waves (the last one 30 % full) and took 1.6x the memory floor; ~8 per SM bounds that tail loss. But a
    short chunk is mostly prologue (q load, pipeline fill, partial store): at batch 1 with 8 KV heads, 1024
    programs of 256 keys took 1.91x the floor at 32K and 256 programs of 1024 keys 1.51x (H200 sweep,
    ``bench_elastic_attention.py --decode-sweep``). The partials cost ``rep * D * 4`` bytes per chunk against
    ``chunk * D * 4`` bytes of K and V read.
    """
    return _chunking(batch, hkv, s_max, device, _policy)


@functools.lru_cache(maxsize=4096)
def _chunking(batch: int, hkv: int, s_max: int, device: torch.device, policy: ChunkPolicy) -> tuple[int, int]:
    """:func:`chunking` for one shape and policy, worked out once (host time on every decode call)."""
    multiple = _INTERPRET_BLOCK_N if INTERPRET else _CHUNK_MULTIPLE
    sms = _sm_count(device)
    groups = max(1, batch * hkv)
    splits = max(1, min(cdiv(policy.programs_per_sm * sms, groups), cdiv(s_max, multiple)))
    chunk = cdiv(cdiv(s_max, splits), multiple) * multiple
    if not INTERPRET:
        fill = cdiv(cdiv(s_max * groups, sms), multiple) * multiple  # ~one program per SM
        chunk = max(chunk, min(policy.min_chunk, fill))
    return chunk, cdiv(s_max, chunk)


def _check(q, k_cache, v_cache, cache_lens, num_heads, scale, validate):
    check_tensor("q", q, ndim=3)
    check_tensor("k_cache", k_cache, ndim=4)
    check_tensor("v_cache", v_cache, ndim=4)
    check_same("k_cache", k_cache, "q", q)
    check_same("v_cache", v_cache, "q", q)
    B, HQ, D = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"k_cache must be [B={B}, Hkv, S_max, D={D}] to match q, got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    HKV, S_MAX = k_cache.shape[1], k_cache.shape[2]
    if HKV == 0 or HQ % HKV:
        raise ValueError(f"q's head count Hq={HQ} must be a multiple of k_cache's Hkv={HKV} (grouped-query attention)")
    check_head_dim("q", D)
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not isinstance(cache_lens, torch.Tensor) or cache_lens.dtype.is_floating_point or cache_lens.dtype == torch.bool:
        got = getattr(cache_lens, "dtype", type(cache_lens).__name__)
        raise TypeError(f"cache_lens must be an integer tensor, got {got}")
    if cache_lens.shape != (B,):
        raise ValueError(f"cache_lens must have shape ({B},), got {tuple(cache_lens.shape)}")
    if cache_lens.device != q.device:
        raise ValueError(f"cache_lens must be on q's device {q.device}, got {cache_lens.device}")
    # Same policy as num_heads: one host sync to validate (the kernels clamp lengths to S_max and write zeros
    # for a length <= 0, so skipping it is safe).
    if B > 0 and values_checked(cache_lens, validate):
        lo, hi = torch.stack([cache_lens.min(), cache_lens.max()]).tolist()
        if lo < 1 or hi > S_MAX:
            raise ValueError(f"cache_lens values must be in [1, {S_MAX}] (k_cache's S_max), got {cache_lens.tolist()}")
    return heads_tensor(num_heads, B, HQ, HQ // HKV, q.device, validate)


_HEAD_DIMS = frozenset((16, 32, 64, 128, 256))  # check_head_dim's
_INDEX_DTYPES = (torch.int32, torch.int64)


def _lean_heads(q, k_cache, v_cache, cache_lens, num_heads, scale) -> torch.Tensor | None:
    """The common unvalidated call (a model's decode step: tensors of one float dtype on one device, ``cache_lens``
    and ``num_heads`` int32/int64 tensors ``[B]`` or ``num_heads`` None, no autocast) checked in a few attribute
    reads: the heads as :func:`heads_tensor` gives them, or None wherever anything is out of the ordinary (bad input
    included) for :func:`_check` to handle and name. It accepts only what ``_check`` accepts (``validate=False``)."""
    T = torch.Tensor
    if type(q) is not T or type(k_cache) is not T or type(v_cache) is not T or type(cache_lens) is not T:
        return None
    dt = q.dtype
    if dt not in FLOAT_DTYPES or k_cache.dtype is not dt or v_cache.dtype is not dt:
        return None
    qs, ks = q.shape, k_cache.shape
    if len(qs) != 3 or len(ks) != 4 or v_cache.shape != ks or cache_lens.dtype not in _INDEX_DTYPES:
        return None
    B, HQ, D = qs
    HKV = ks[1]
    if not B or ks[0] != B or ks[3] != D or not HKV or HQ % HKV or D not in _HEAD_DIMS or cache_lens.shape != (B,):
        return None
    dev = q.device
    if k_cache.device != dev or v_cache.device != dev or cache_lens.device != dev:
        return None
    if scale is not None and type(scale) is not float or torch.is_autocast_enabled(dev.type):
        return None
    if num_heads is None:
        return torch.full((B,), HQ, dtype=torch.int32, device=dev)
    if type(num_heads) is not T or num_heads.dtype not in _INDEX_DTYPES or num_heads.shape != (B,):
        return None
    if num_heads.device != dev:
        return None
    return num_heads if num_heads.dtype is torch.int32 else num_heads.to(torch.int32)  # .to alone costs ~3 us


def elastic_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    num_heads: int | torch.Tensor | None = None,
    *,
    scale: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """One query token per sequence against its cached prefix ``[0, cache_lens[b])``, with per-sequence head budgets.

    Args:
        q: ``[B, Hq, D]``, the new tokens' queries; any strides.
        k_cache, v_cache: ``[B, Hkv, S_max, D]`` (``Hq % Hkv == 0``), the new token's key/value already written at
            ``cache_lens[b] - 1``; any strides, so a ``[B, S_max, Hkv, D]`` cache transposed is read in place.
        cache_lens: integer tensor ``[B]`` with values in ``[1, S_max]``.
        num_heads: as in ``elastic_attention``: None, an int, or an integer tensor ``[B]``.
        scale: softmax scale, default ``1 / sqrt(D)``.
        validate: check ``cache_lens`` (and a ``num_heads`` tensor) with one host sync; skipped anyway during
            CUDA graph capture and torch.compile tracing. A decode loop that already trusts its lengths passes False
            to stay sync-free.

    Returns ``[B, Hq, D]`` in ``q``'s dtype; heads past a sequence's budget are zeros and read no cache.
    Inference only (no autograd).
    """
    if not (validate or INTERPRET) and type(q) is torch.Tensor and q.is_cuda and not torch.compiler.is_compiling():
        heads = _lean_heads(q, k_cache, v_cache, cache_lens, num_heads, scale)
        if heads is not None:  # a decode step's call, checked in a fraction of _check's host time
            scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
            return decode(q, k_cache, v_cache, cache_lens, heads, scale)
    q, k_cache, v_cache = cast_to(autocast_dtype(q), q, k_cache, v_cache)  # as SDPA under autocast
    heads = _check(q, k_cache, v_cache, cache_lens, num_heads, scale, validate)
    B, D = q.shape[0], q.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not use_triton(q) or B == 0:
        return elastic_attention_decode_ref(q, k_cache, v_cache, cache_lens, heads.long(), scale=scale)
    if torch.compiler.is_compiling():  # one opaque custom op in the traced graph (_ops); no gradient, as eager
        return torch.ops.flextron.elastic_attention_decode_fwd(q.detach(), k_cache.detach(), v_cache.detach(),
                                                               cache_lens, heads, scale)
    return decode(q, k_cache, v_cache, cache_lens, heads, scale)


def decode(q, k_cache, v_cache, cache_lens, heads, scale: float) -> torch.Tensor:
    """The launches of a decode step: split over the cache, then the merge of the splits (none for one chunk)."""
    B, HQ, D = q.shape
    HKV, S_MAX = k_cache.shape[1], k_cache.shape[2]
    rep = HQ // HKV
    chunk, nsplit = chunking(B, HKV, S_MAX, q.device)
    direct = nsplit == 1
    o = torch.empty((B, HQ, D), dtype=q.dtype, device=q.device)
    # One chunk: no partials (a placeholder pointer each; the kernel's DIRECT branch never touches them).
    po = o if direct else torch.empty((B, HQ, nsplit, D), dtype=torch.float32, device=q.device)
    plse = o if direct else torch.empty((B, HQ, nsplit), dtype=torch.float32, device=q.device)
    lens = cache_lens if cache_lens.dtype is torch.int32 else cache_lens.to(torch.int32)
    _SPLIT((nsplit, B * HKV), (q, k_cache, v_cache, po, plse, o, lens, heads), (
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *o.stride(), HQ, HKV, rep, S_MAX, nsplit, chunk,
        next_pow2(S_MAX), scale * LOG2E,
    ), (D, max(16, next_pow2(rep)), upcast_flag(q.dtype), dot_precision(q.dtype), direct))
    if direct:
        return o
    _REDUCE((B * HQ,), (po, plse, o, lens, heads), (*o.stride(), HQ, S_MAX, nsplit, chunk),
            (D, min(_REDUCE_BLOCK, max(2, next_pow2(nsplit)))))
    return o
