"""``elastic_attention``: flash attention over a per-sequence prefix of query heads (GQA), forward and backward.

On a GPU a uniform budget runs PyTorch's SDPA (the backend torch picks) on the head-prefix views, the fastest
attention a user has; the Triton kernel below serves per-sequence budgets in one launch, queries after cached keys
(causal alignment at the end, which SDPA's ``is_causal`` lacks) and the interpreter. ``attention_backend`` chooses.

Sequence ``b`` keeps query heads ``[0, num_heads[b])``; the others come out as zeros. The grid covers every
``(query block, batch, head)`` like the Triton fused-attention tutorial, and a program whose head is past its
sequence's budget stores zeros and returns before loading anything: an inactive head costs one tile store,
and a batch that mixes budgets runs in one launch with no gather of the active heads.

- forward: online softmax in base 2 (``exp2`` with ``log2(e)`` folded into the scale); the log-sum-exp of each
  row is saved for the backward.
- backward (FlashAttention-2): ``delta = rowsum(dO * O)``; one kernel per key block accumulates ``dK, dV`` over
  all query heads of its KV group (the GQA reduction, no atomics); one kernel per query block computes ``dQ``.

Causal masking aligns queries to the end of the keys (``Sk >= Sq``), as ``elastic_attention_ref`` does. Each
loop is split into blocks that need no mask (the bulk) and blocks on the diagonal or the ragged edge.
Everything is read through strides, so head-prefix views ``q[:, :h]`` and ``[B, S, H, D]`` transposes pass as is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._hopper import TensorDescriptor, tma_sms
from ._runtime import (
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
from .reference import elastic_attention_ref

LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Hopper-sized tiles for 16-bit D >= 64; anything else (fp32, small
# head dims, the tests) is pruned to the single small config: fp32 tiles double the shared memory per stage.
_FWD_TILES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4)]
_DQ_TILES = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3)]
_DKV_TILES = [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3)]
_SMALL_TILE = (64, 32, 4, 2)
# The interpreter's cost grows with the number of programs: big blocks, one config (BLOCK_M != BLOCK_N on
# purpose, so the tests exercise the diagonal bookkeeping with unequal tiles).
_INTERPRET_TILE = (64, 32, 4, 1)


def _configs(tiles):
    if INTERPRET:
        tiles = [_INTERPRET_TILE]
    else:
        tiles = list(tiles) + [_SMALL_TILE]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def _prune(configs, named_args, **kwargs):
    """Only 16-bit D >= 64 problems are worth timing several tiles; the rest get the last (small) config."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 0))
    dtype = named_args["q_ptr"].dtype
    if len(configs) == 1 or (head_dim >= 64 and dtype in (torch.float16, torch.bfloat16)):
        return configs[:-1] if len(configs) > 1 else configs
    return configs[-1:]


def _autotune(tiles, key):
    kw = {} if INTERPRET else {"prune_configs_by": {"early_config_prune": _prune}}
    return triton.autotune(configs=_configs(tiles), key=key, do_bench=cpu_do_bench if INTERPRET else None, **kw)


@triton.jit
def _tile(HQ, BLOCK_M: tl.constexpr):
    """A forward program's ``(pid_bh, b, h, start_m, rows)``. Last query blocks first: under causal masking they
    are the longest, so the tail of the grid is short."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    start_m = pid_m * BLOCK_M
    return pid_bh, pid_bh // HQ, pid_bh % HQ, start_m, start_m + tl.arange(0, BLOCK_M)


@triton.jit
def _softmax_step(acc, l_i, m_i, qk, v, cols, rows, Sk, OFF, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One key block of the online softmax over the unscaled scores ``qk``: mask (ragged edge, causal diagonal)
    where ``MASK``, rescale, add ``p @ v``. Off the mask the scale is folded into one multiply-add per score
    (``qk * scale - m``, the row max taken before scaling: ``qk_scale > 0``): 4-6% of the forward's time on an
    H200 at 2048 and 512 tokens (``benchmarks/lab/explore_attention.py``)."""
    if MASK:
        qk = qk * qk_scale
        keep = cols[None, :] < Sk
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + OFF)
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _finish(acc, l_i, m_i, lse_ptr, pid_bh, rows, Sq):
    """Normalise the accumulator and store each row's log-sum-exp (base 2) for the backward."""
    tl.store(lse_ptr + pid_bh.to(tl.int64) * Sq + rows, m_i + tl.log2(l_i), mask=rows < Sq)
    return acc / l_i[:, None]


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, rows, lo, hi, Sk, OFF, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        cmask = cols[:, None] < Sk
        k = tl.load(k_base + cols[:, None].to(tl.int64) * skn + d[None, :] * skd, mask=cmask, other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * svn + d[None, :] * svd, mask=cmask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v, cols, rows, Sk, OFF, qk_scale, MASK, CAUSAL, PRECISION)
    return acc, l_i, m_i


@triton.jit
def _key_range(start_m, Sk, OFF, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys of query block ``start_m``: ``[0, full)`` need no mask, ``[full, hi)`` are diagonal or ragged."""
    if CAUSAL:
        hi = tl.minimum(Sk, start_m + BLOCK_M + OFF)
        full = tl.minimum((start_m + OFF + 1) // BLOCK_N, Sk // BLOCK_N) * BLOCK_N
    else:
        hi = Sk
        full = (Sk // BLOCK_N) * BLOCK_N
    return full, hi


@_autotune(_FWD_TILES, key=["HEAD_DIM", "CAUSAL", "S_BUCKET"])
@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, heads_ptr,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    HQ, REP, Sq, Sk, OFF, S_BUCKET, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, start_m, rows = _tile(HQ, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    rmask = rows[:, None] < Sq
    # int64: batch and row offsets times strides pass 2^31 on long prompts with many heads.
    o_ptrs = o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows[:, None].to(tl.int64) * som + d[None, :] * sod
    if h >= tl.load(heads_ptr + b):
        tl.store(o_ptrs, tl.zeros((BLOCK_M, HEAD_DIM), dtype=o_ptr.dtype.element_ty), mask=rmask)
        return
    g = h // REP
    bo, ho, ro = b.to(tl.int64), h.to(tl.int64), rows[:, None].to(tl.int64)
    q = tl.load(q_ptr + bo * sqb + ho * sqh + ro * sqm + d[None, :] * sqd, mask=rmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * skb + g.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + g.to(tl.int64) * svh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    full, hi = _key_range(start_m, Sk, OFF, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, rows, 0, full, Sk, OFF,
                               qk_scale, False, CAUSAL, UPCAST, PRECISION, HEAD_DIM, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, rows, full, hi, Sk, OFF,
                               qk_scale, True, CAUSAL, UPCAST, PRECISION, HEAD_DIM, BLOCK_N)
    acc = _finish(acc, l_i, m_i, lse_ptr, pid_bh, rows, Sq)
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=rmask)


# The forward through Hopper's TMA: 4-D descriptors ([B, H, S, D] with the tensors' own strides, boxes
# [1, 1, BLOCK, D]) load the tiles asynchronously, zero-filled past the edges, in place of pointer loads with masks.
# On a GPU it is the default forward wherever the operands allow it (16-bit, aligned strides, Hopper): measured on an
# H100 at 1.1-1.25x the pointer kernel's speed in every case of bench_elastic_attention. ``attention_backend("triton")``
# keeps the pointer kernel; under the interpreter ``"auto"`` runs the pointer kernel and ``"triton_tma"`` this one.
# The 64-row, 4-warp tiles at 3 stages (64 and 112 KB of shared memory) leave room for two or three programs per SM,
# so one program's prologue and epilogue overlap another's key loop: on an H100 they ran the causal forward
# 1.05-1.26x faster than the autotuner's pick among the others at 2048 and 512 tokens
# (benchmarks/lab/explore_attention.py --tiles).
_TMA_TILES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 128, 8, 2), (128, 64, 8, 5), (64, 64, 4, 4),
              (64, 64, 4, 3), (64, 32, 4, 3)]
_TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _tma_pre_hook(nargs):
    bm, bn, d = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"]
    nargs["desc_q"].block_shape = [1, 1, bm, d]
    nargs["desc_k"].block_shape = [1, 1, bn, d]
    nargs["desc_v"].block_shape = [1, 1, bn, d]
    nargs["desc_o"].block_shape = [1, 1, bm, d]


def _tma_configs():
    tiles = [_INTERPRET_TILE] if INTERPRET else _TMA_TILES
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st, pre_hook=_tma_pre_hook)
            for m, n, w, st in tiles]


@triton.jit
def _fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, b, g, rows, lo, hi, Sk, OFF, qk_scale,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr):
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = desc_k.load([b, g, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = desc_v.load([b, g, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v, start_n + tl.arange(0, BLOCK_N), rows, Sk, OFF, qk_scale,
                                      MASK, CAUSAL, PRECISION)
    return acc, l_i, m_i


@triton.autotune(configs=_tma_configs(), key=["HEAD_DIM", "CAUSAL", "S_BUCKET"],
                 do_bench=cpu_do_bench if INTERPRET else None)
@triton.jit
def _attn_fwd_tma_kernel(
    desc_q, desc_k, desc_v, desc_o, lse_ptr, heads_ptr,
    HQ, REP, Sq, Sk, OFF, S_BUCKET, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr = False,
):
    # The pointer kernel's program order, masking and early exit (see _attn_fwd_kernel); only the loads and the
    # output store differ. ``WS``: the unmasked key loop warp-specialised (benchmarks/lab/explore_attention.py: no
    # gain on an H200 with Triton 3.6, so off).
    pid_bh, b, h, start_m, rows = _tile(HQ, BLOCK_M)
    if h >= tl.load(heads_ptr + b):
        desc_o.store([b, h, start_m, 0], tl.zeros((1, 1, BLOCK_M, HEAD_DIM), dtype=desc_o.dtype))
        return
    g = h // REP
    q = desc_q.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    full, hi = _key_range(start_m, Sk, OFF, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, b, g, rows, 0, full, Sk, OFF, qk_scale,
                                   False, CAUSAL, UPCAST, PRECISION, HEAD_DIM, BLOCK_N, WS)
    acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, b, g, rows, full, hi, Sk, OFF, qk_scale,
                                   True, CAUSAL, UPCAST, PRECISION, HEAD_DIM, BLOCK_N, False)
    acc = _finish(acc, l_i, m_i, lse_ptr, pid_bh, rows, Sq)
    desc_o.store([b, h, start_m, 0], acc.to(desc_o.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))


@triton.jit
def _bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr, heads_ptr, sob, soh, som, sod, sdb, sdh, sdm, sdd, HQ, Sq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    if h >= tl.load(heads_ptr + b):
        return  # the dQ and dK/dV kernels skip this head without reading delta
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    rmask = rows[:, None] < Sq
    bo, ho, ro = b.to(tl.int64), h.to(tl.int64), rows[:, None].to(tl.int64)
    o = tl.load(o_ptr + bo * sob + ho * soh + ro * som + d[None, :] * sod, mask=rmask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + bo * sdb + ho * sdh + ro * sdm + d[None, :] * sdd, mask=rmask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * Sq + rows, tl.sum(o * do, 1), mask=rows < Sq)


@_autotune(_DQ_TILES, key=["HEAD_DIM", "CAUSAL", "S_BUCKET"])
@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, heads_ptr,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    HQ, REP, Sq, Sk, OFF, S_BUCKET, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    rmask = rows[:, None] < Sq
    # dq is a fresh contiguous [B, HQ, Sq, D] tensor.
    dq_ptrs = dq_ptr + (pid_bh.to(tl.int64) * Sq + rows[:, None]) * HEAD_DIM + d[None, :]
    if h >= tl.load(heads_ptr + b):
        tl.store(dq_ptrs, tl.zeros((BLOCK_M, HEAD_DIM), dtype=dq_ptr.dtype.element_ty), mask=rmask)
        return
    g = h // REP
    bo, ho, ro = b.to(tl.int64), h.to(tl.int64), rows[:, None].to(tl.int64)
    q = tl.load(q_ptr + bo * sqb + ho * sqh + ro * sqm + d[None, :] * sqd, mask=rmask, other=0.0)
    do = tl.load(do_ptr + bo * sdb + ho * sdh + ro * sdm + d[None, :] * sdd, mask=rmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * Sq + rows, mask=rows < Sq, other=0.0)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * Sq + rows, mask=rows < Sq, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * skb + g.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + g.to(tl.int64) * svh
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    full, hi = _key_range(start_m, Sk, OFF, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        cmask = cols[:, None] < Sk
        k = tl.load(k_base + cols[:, None].to(tl.int64) * skn + d[None, :] * skd, mask=cmask, other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * svn + d[None, :] * svd, mask=cmask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(qk - lse[:, None])
        if start_n >= full:  # diagonal or ragged block: a runtime branch, taken by at most two blocks
            keep = cols[None, :] < Sk
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + OFF)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    tl.store(dq_ptrs, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _dkv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqm, sqd, sdm, sdd, cols, lo, hi, Sq, OFF, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        rmask = rows[:, None] < Sq
        q = tl.load(q_base + rows[:, None].to(tl.int64) * sqm + d[None, :] * sqd, mask=rmask, other=0.0)
        do = tl.load(do_base + rows[:, None].to(tl.int64) * sdm + d[None, :] * sdd, mask=rmask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_base + rows, mask=rows < Sq, other=0.0)
        delta = tl.load(delta_base + rows, mask=rows < Sq, other=0.0)
        # Transposed scores [BLOCK_N, BLOCK_M]: dK and dV rows are keys. Keys past Sk load as zeros; their rows
        # of dK/dV are never stored, so only the query side needs a mask.
        pT = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASK:
            keep = rows[None, :] < Sq
            if CAUSAL:
                keep = keep & (cols[:, None] <= rows[None, :] + OFF)
            pT = tl.where(keep, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@_autotune(_DKV_TILES, key=["HEAD_DIM", "CAUSAL", "S_BUCKET"])
@triton.jit
def _attn_bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, heads_ptr,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    HQ, HKV, REP, Sq, Sk, OFF, S_BUCKET, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    pid_bg = tl.program_id(1)
    b = pid_bg // HKV
    g = pid_bg % HKV
    cols = start_n + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    cmask = cols[:, None] < Sk
    # dk, dv are fresh contiguous [B, HKV, Sk, D] tensors.
    dkv_off = (pid_bg.to(tl.int64) * Sk + cols[:, None]) * HEAD_DIM + d[None, :]
    h_lo = g * REP
    # Only heads below the budget contribute (the budget need not be a whole number of groups here).
    h_hi = tl.minimum(h_lo + REP, tl.load(heads_ptr + b))
    if h_lo >= h_hi:
        zeros = tl.zeros((BLOCK_N, HEAD_DIM), dtype=dk_ptr.dtype.element_ty)
        tl.store(dk_ptr + dkv_off, zeros, mask=cmask)
        tl.store(dv_ptr + dkv_off, zeros, mask=cmask)
        return
    bo, go, co = b.to(tl.int64), g.to(tl.int64), cols[:, None].to(tl.int64)
    k = tl.load(k_ptr + bo * skb + go * skh + co * skn + d[None, :] * skd, mask=cmask, other=0.0)
    v = tl.load(v_ptr + bo * svb + go * svh + co * svn + d[None, :] * svd, mask=cmask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # Query blocks: [lo, mid) straddle the diagonal (masked), [mid, tail) are fully visible and in bounds,
    # [tail, Sq) is the ragged last block.
    if CAUSAL:
        lo = (tl.maximum(start_n - OFF, 0) // BLOCK_M) * BLOCK_M
        mid = tl.minimum(lo + tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - OFF - lo, 0), BLOCK_M) * BLOCK_M, Sq)
    else:
        lo = 0
        mid = 0
    tail = tl.maximum(mid, (Sq // BLOCK_M) * BLOCK_M)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    for h in range(h_lo, h_hi):  # the GQA reduction: every query head of the group, in registers
        bh = b.to(tl.int64) * HQ + h
        h64 = bh - b.to(tl.int64) * HQ  # the loop index as int64 (a plain int under the interpreter)
        q_base = q_ptr + b.to(tl.int64) * sqb + h64 * sqh
        do_base = do_ptr + b.to(tl.int64) * sdb + h64 * sdh
        lse_base = lse_ptr + bh * Sq
        delta_base = delta_ptr + bh * Sq
        bases = (q_base, do_base, lse_base, delta_base)
        dk, dv = _dkv_inner(dk, dv, k, v, *bases, sqm, sqd, sdm, sdd, cols, lo, mid, Sq,
                            OFF, qk_scale, True, CAUSAL, UPCAST, PRECISION, HEAD_DIM, BLOCK_M)
        dk, dv = _dkv_inner(dk, dv, k, v, *bases, sqm, sqd, sdm, sdd, cols, mid, tail, Sq,
                            OFF, qk_scale, False, CAUSAL, UPCAST, PRECISION, HEAD_DIM, BLOCK_M)
        dk, dv = _dkv_inner(dk, dv, k, v, *bases, sqm, sqd, sdm, sdd, cols, tail, Sq, Sq,
                            OFF, qk_scale, True, CAUSAL, UPCAST, PRECISION, HEAD_DIM, BLOCK_M)
    tl.store(dk_ptr + dkv_off, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=cmask)
    tl.store(dv_ptr + dkv_off, dv.to(dv_ptr.dtype.element_ty), mask=cmask)


# ---------------------------------------------------------------------------------------------- launchers


def _s_bucket(s: int) -> int:
    # Re-tune per power of two of the length, not per prompt.
    return next_pow2(max(s, 16))


def _tma_serves(q, k, v) -> bool:
    """Whether the TMA forward can read these operands: 16-bit, a Hopper GPU (or the interpreter), unit stride on D,
    every other stride and every base 16-byte aligned (head-prefix views and ``[B, S, H, D]`` transposes are)."""
    if q.dtype not in _TORCH_TO_TL or TensorDescriptor is None or not tma_sms(q.device):
        return False
    for t in (q, k, v):
        if t.stride(3) != 1 or t.data_ptr() % 16 or any((st * t.element_size()) % 16 for st in t.stride()[:3]):
            return False
    return True


def _desc(t: torch.Tensor):
    """A 4-D host descriptor over ``t`` (its shape and strides); the autotune pre-hook sets the box per config."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, t.shape[3]])


def forward(q, k, v, heads, causal, scale):
    B, HQ, Sq, D = q.shape
    HKV, Sk = k.shape[1], k.shape[2]
    o = torch.empty((B, HQ, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, HQ, Sq), dtype=torch.float32, device=q.device)
    if (_backend == "triton_tma" or (_backend == "auto" and not INTERPRET)) and _tma_serves(q, k, v):
        _attn_fwd_tma_kernel[lambda meta: (cdiv(Sq, meta["BLOCK_M"]), B * HQ)](
            _desc(q), _desc(k), _desc(v), _desc(o), lse, heads,
            HQ, HQ // HKV, Sq, Sk, Sk - Sq, _s_bucket(Sq), scale * LOG2E,
            HEAD_DIM=D, CAUSAL=causal, UPCAST=upcast_flag(q.dtype), PRECISION=dot_precision(q.dtype),
        )
        return o, lse

    def grid(meta):
        return (cdiv(Sq, meta["BLOCK_M"]), B * HQ)

    _attn_fwd_kernel[grid](
        q, k, v, o, lse, heads, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        HQ, HQ // HKV, Sq, Sk, Sk - Sq, _s_bucket(Sq), scale * LOG2E,
        HEAD_DIM=D, CAUSAL=causal, UPCAST=upcast_flag(q.dtype), PRECISION=dot_precision(q.dtype),
    )
    return o, lse


def backward(do, q, k, v, o, lse, heads, causal, scale):
    B, HQ, Sq, D = q.shape
    HKV, Sk = k.shape[1], k.shape[2]
    delta = torch.empty_like(lse)
    pre_block = 64  # two [64, D] fp32 tiles stay in registers up to D = 256
    _bwd_preprocess_kernel[(cdiv(Sq, pre_block), B * HQ)](
        o, do, delta, heads, *o.stride(), *do.stride(), HQ, Sq, HEAD_DIM=D, BLOCK_M=pre_block,
    )
    dq = torch.empty((B, HQ, Sq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, HKV, Sk, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, HKV, Sk, D), dtype=v.dtype, device=v.device)
    common = dict(HEAD_DIM=D, CAUSAL=causal, UPCAST=upcast_flag(q.dtype), PRECISION=dot_precision(q.dtype))
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    _attn_bwd_dkv_kernel[lambda meta: (cdiv(Sk, meta["BLOCK_N"]), B * HKV)](
        q, k, v, do, dk, dv, lse, delta, heads, *strides,
        HQ, HKV, HQ // HKV, Sq, Sk, Sk - Sq, _s_bucket(Sq), scale * LOG2E, scale, **common,
    )
    _attn_bwd_dq_kernel[lambda meta: (cdiv(Sq, meta["BLOCK_M"]), B * HQ)](
        q, k, v, do, dq, lse, delta, heads, *strides,
        HQ, HQ // HKV, Sq, Sk, Sk - Sq, _s_bucket(Sq), scale * LOG2E, scale, **common,
    )
    return dq, dk, dv


class _ElasticAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, heads, causal, scale):
        o, lse = forward(q, k, v, heads, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, heads)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, heads = ctx.saved_tensors
        dq, dk, dv = backward(do, q, k, v, o, lse, heads, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


# --------------------------------------------------------------------------------------------- dispatch

BACKENDS = ("auto", "sdpa", "triton", "triton_tma")
_backend = "auto"


def attention_backend(name: str) -> AbstractContextManager[None]:
    """Inside the block, ``elastic_attention`` takes ``name`` in place of its rule (tests, benchmarks):

    - ``"auto"`` (the default): uniform budgets (``num_heads`` None or an int) on a GPU go to
      ``F.scaled_dot_product_attention`` on the head-prefix views, the backend torch picks (cuDNN on Hopper),
      wherever SDPA's causal alignment is ours (``Sq == Sk``, or one query); per-sequence budgets given as a list of
      ints run the Triton kernel for a prompt outside autograd (the list made a device tensor once), else SDPA once
      per budget group; a budget tensor, a chunk of queries after cached keys, and the interpreter run the Triton
      kernel, its forward through TMA descriptors on a GPU where the operands allow it
      (16-bit, 16-byte aligned strides, Hopper), else through pointer loads.
    - ``"sdpa"``: SDPA wherever it can serve (also on the CPU; a list of budgets once per group); the Triton kernel
      only where it cannot.
    - ``"triton"``: the Triton kernel always (a list of budgets becomes a tensor), its forward through pointer loads.
    - ``"triton_tma"``: the Triton kernel always, its forward through TMA descriptors where the operands allow it
      (also under the interpreter); the backward is the same for both forwards.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return setting(globals(), "_backend", name)


def sdpa_serves(q: torch.Tensor, k: torch.Tensor, causal: bool) -> bool:
    """SDPA's ``is_causal`` aligns queries to the first keys, ours to the last: the same where ``Sq == Sk``; one
    query sees every key either way."""
    if _backend in ("triton", "triton_tma") or (_backend == "auto" and not (q.is_cuda and not INTERPRET)):
        return False
    sq, sk = q.shape[2], k.shape[2]
    return not causal or sq == sk or sq == 1


def _sdpa_prefix(q, k, v, h: int, causal: bool, scale: float) -> torch.Tensor:
    """SDPA on the first ``h`` query heads (views, no copy); ``[B, h, Sq, D]`` as SDPA returns it."""
    hq, hkv = q.shape[1], k.shape[1]
    rep = hq // hkv
    if h != hq:
        q, k, v = q[:, :h], k[:, : h // rep], v[:, : h // rep]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] > 1, scale=scale,
                                          enable_gqa=rep > 1)


def _padded(o: torch.Tensor, hq: int) -> torch.Tensor:
    """``[B, h, Sq, D]`` -> ``[B, Hq, Sq, D]`` with zero heads appended, stored ``[B, Sq, Hq, D]`` (the layout the
    output projection reads as ``[B, Sq, Hq * D]`` without a copy)."""
    h = o.shape[1]
    if h == hq:
        return o
    return F.pad(o.transpose(1, 2), (0, 0, 0, hq - h)).transpose(1, 2)


@functools.lru_cache(maxsize=256)
def _index(seqs: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A group's sequence indices on the device, made once (a copy from the host is illegal in a CUDA graph)."""
    return torch.tensor(seqs, device=device)


def _kernel_takes_list(budgets: list[int], q, k, v) -> bool:
    """Whether ``"auto"`` runs mixed host-list budgets through the Triton kernel rather than SDPA per group: a prompt
    (more than one query) outside autograd. On an H100 the kernel ran mixed budgets 8/16/24/32 at 1.38x cuDNN on all
    heads at 8 x 2048 and 1.07-1.10x at 32 x 512, SDPA per group on adjacent sequences 0.94-0.95x and 0.47-0.58x
    (eager; ``bench_elastic_attention.py``). Its backward against cuDNN's per group, and single queries, are not
    measured that way: those keep SDPA."""
    return (_backend == "auto" and len(set(budgets)) > 1 and q.shape[2] > 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


@functools.lru_cache(maxsize=256)
def _budget_tensor(budgets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A host list of budgets on the device, made once (a copy from the host is illegal in a CUDA graph)."""
    return torch.tensor(budgets, dtype=torch.int32, device=device)


def _grouped(q, k, v, budgets: list[int], causal: bool, scale: float) -> torch.Tensor:
    """Per-sequence budgets known on the host: SDPA once per budget group. A group whose sequences are adjacent
    reads views; a scattered one gathers its sequences' kept heads. One output, zeros past each budget."""
    B, hq, sq, d = q.shape
    rep = hq // k.shape[1]
    groups: dict[int, list[int]] = {}
    for b, h in enumerate(budgets):
        groups.setdefault(h, []).append(b)
    if len(groups) == 1:
        return _padded(_sdpa_prefix(q, k, v, budgets[0], causal, scale), hq)
    out = q.new_empty((B, sq, hq, d))
    for h, seqs in groups.items():
        lo, hi = seqs[0], seqs[-1] + 1
        if hi - lo == len(seqs):
            o = _sdpa_prefix(q[lo:hi], k[lo:hi], v[lo:hi], h, causal, scale)
            out[lo:hi, :, :h] = o.transpose(1, 2)
            if h < hq:
                out[lo:hi, :, h:] = 0
        else:
            idx = _index(tuple(seqs), q.device)
            o = _sdpa_prefix(q[idx, :h], k[idx, : h // rep], v[idx, : h // rep], h, causal, scale)
            part = _padded(o, hq).transpose(1, 2)
            out.index_copy_(0, idx, part)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------- input checks


def check_head_dim(name: str, d: int) -> None:
    # tl.arange needs a power of two and tl.dot needs >= 16; 256 is the largest tile that fits shared memory.
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"{name} head dim must be a power of two in [16, 256], got {d}")


def values_checked(t: torch.Tensor, validate: bool) -> bool:
    """Whether to check a tensor's values, which costs one host sync: not when asked not to, nor while a CUDA
    graph is being captured (a sync is illegal there) or torch.compile traces the call."""
    # is_compiling first: torch.compile cannot trace is_current_stream_capturing (a graph break on CUDA).
    if not validate or torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def heads_tensor(num_heads, batch: int, hq: int, rep: int, device: torch.device, validate: bool = True) -> torch.Tensor:
    """Validate ``num_heads`` (None, int or integer tensor ``[batch]``) and return it as int32 on ``device``.

    A tensor's values are checked only where ``values_checked`` says so. Unchecked values are still safe: the
    kernels keep heads ``h < num_heads[b]`` (and of each KV group only those), so a count past Hq means all
    heads and one <= 0 means none.
    """
    expect = f"a multiple of {rep} (Hq // Hkv) in [{rep}, {hq}]"
    if num_heads is None:
        return torch.full((batch,), hq, dtype=torch.int32, device=device)
    if isinstance(num_heads, torch.Tensor):
        if num_heads.dtype.is_floating_point or num_heads.dtype.is_complex or num_heads.dtype == torch.bool:
            raise TypeError(f"num_heads must be an integer tensor, got {num_heads.dtype}")
        if num_heads.shape != (batch,):
            raise ValueError(f"num_heads must have shape ({batch},), got {tuple(num_heads.shape)}")
        if num_heads.device != device:
            raise ValueError(f"num_heads must be on q's device {device}, got {num_heads.device}")
        if batch > 0 and values_checked(num_heads, validate):
            lo, hi, bad = torch.stack([num_heads.min(), num_heads.max(), (num_heads % rep != 0).any().long()]).tolist()
            if lo < rep or hi > hq or bad:
                raise ValueError(f"num_heads values must each be {expect}, got {num_heads.tolist()}")
        return num_heads.to(torch.int32)
    if isinstance(num_heads, (list, tuple)):
        return torch.tensor(host_heads(num_heads, batch, hq, rep), dtype=torch.int32, device=device)
    return torch.full((batch,), _uniform_heads(num_heads, hq, rep), dtype=torch.int32, device=device)


def host_heads(num_heads: Sequence, batch: int, hq: int, rep: int) -> list[int]:
    """Check per-sequence head counts given on the host (a list or tuple of ints, one per sequence)."""
    if len(num_heads) != batch:
        raise ValueError(f"num_heads must hold one count per sequence ({batch}), got {len(num_heads)}")
    for i, h in enumerate(num_heads):
        if isinstance(h, bool) or not isinstance(h, int):
            raise TypeError(f"num_heads[{i}] must be an int, got {type(h).__name__}")
        if not rep <= h <= hq or h % rep:
            raise ValueError(f"num_heads[{i}] must be a multiple of {rep} (Hq // Hkv) in [{rep}, {hq}], got {h}")
    return list(num_heads)


def _check(q, k, v, causal, scale):
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    B, HQ, Sq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Hkv, S, D={D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    HKV, Sk = k.shape[1], k.shape[2]
    if HKV == 0 or HQ % HKV:
        raise ValueError(f"q's head count Hq={HQ} must be a multiple of k's Hkv={HKV} (grouped-query attention)")
    if causal and Sq > Sk:
        raise ValueError(f"causal attention needs k's length >= q's (queries align to the last keys), got {Sk} < {Sq}")
    check_head_dim("q", D)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not scale > 0:  # the kernels take each row's max before scaling
        raise ValueError(f"scale must be > 0, got {scale}")


def _uniform_heads(num_heads, hq: int, rep: int) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads must be None, an int, a list of ints or an integer tensor, got "
                        f"{type(num_heads).__name__}")
    if not rep <= num_heads <= hq or num_heads % rep:
        raise ValueError(f"num_heads must be a multiple of {rep} (Hq // Hkv) in [{rep}, {hq}], got {num_heads}")
    return num_heads


def elastic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int | Sequence[int] | torch.Tensor | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Softmax attention in which sequence ``b`` keeps only query heads ``[0, num_heads[b])``.

    Args:
        q: ``[B, Hq, Sq, D]``; any strides (a head-prefix view ``x[:, :h]`` is read in place).
        k, v: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0``; query head ``h`` attends with KV head ``h // (Hq // Hkv)``.
        num_heads: ``None`` (all heads), an int, a list of ints (one per sequence, known on the host) or an integer
            tensor ``[B]``; each a multiple of ``Hq // Hkv`` in ``[Hq // Hkv, Hq]``.

    Which implementation runs (:func:`attention_backend` overrides it): on a GPU, a uniform budget (None or an int)
    runs ``F.scaled_dot_product_attention`` with the backend torch picks, on the head-prefix views, wherever its
    causal alignment is this function's (``Sq == Sk`` or one query); a list of mixed budgets runs the Triton kernel
    for a prompt outside autograd, else SDPA once per budget group; a tensor of budgets (no host sync, CUDA-graph
    safe) and a chunk of queries after cached keys run the Triton kernel, one launch that skips each sequence's
    dropped heads.
        validate: check a ``num_heads`` tensor's values, at the cost of one host sync per call; skipped anyway
            while a CUDA graph is captured or torch.compile traces the call. Unchecked, heads ``h < num_heads[b]``
            are kept (clamped to [0, Hq]).
        causal: mask key ``j > i + (Sk - Sq)`` (needs ``Sk >= Sq``).
        scale: softmax scale, default ``1 / sqrt(D)``.

    ``D`` must be a power of two in ``[16, 256]``. Returns ``[B, Hq, Sq, D]`` in ``q``'s dtype with zeros in
    heads past each budget; those heads cost no attention work, forward or backward. Differentiable in q, k, v.
    """
    q, k, v = cast_to(autocast_dtype(q), q, k, v)  # as SDPA under autocast
    _check(q, k, v, causal, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    B, hq = q.shape[:2]
    rep = hq // k.shape[1]
    if not isinstance(num_heads, torch.Tensor) and q.numel() and k.shape[2] and sdpa_serves(q, k, causal):
        if num_heads is None:
            return _sdpa_prefix(q, k, v, hq, causal, scale)
        if not isinstance(num_heads, (list, tuple)):
            return _padded(_sdpa_prefix(q, k, v, _uniform_heads(num_heads, hq, rep), causal, scale), hq)
        budgets = host_heads(num_heads, B, hq, rep)
        if not _kernel_takes_list(budgets, q, k, v):
            return _grouped(q, k, v, budgets, causal, scale)
        num_heads, validate = _budget_tensor(tuple(budgets), q.device), False  # checked on the host just now
    heads = heads_tensor(num_heads, B, hq, rep, q.device, validate)
    if not use_triton(q) or q.numel() == 0 or k.shape[2] == 0:
        return elastic_attention_ref(q, k, v, heads.long(), causal=causal, scale=scale)
    if torch.compiler.is_compiling():  # one opaque custom op in the traced graph (_ops), its backward registered
        return torch.ops.flextron.elastic_attention_fwd(q, k, v, heads, bool(causal), scale)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _ElasticAttention.apply(q, k, v, heads, bool(causal), scale)
    return forward(q, k, v, heads, bool(causal), scale)[0]  # inference: no autograd node, nothing saved
