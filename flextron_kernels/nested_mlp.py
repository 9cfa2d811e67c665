"""``nested_mlp``: every token runs the MLP at its own width over one set of prefix-nested weights.

Token ``t`` with width ``w`` computes ``a = act(x Wg[:w]^T) * (x Wu[:w]^T + bu[:w])`` (or, ungated,
``a = act(x Wu[:w]^T + bu[:w])``) and ``y = a Wd[:, :w]^T + bd`` (``reference.nested_mlp_ref``).

Routing (no host sync, so a decode step can be captured in a CUDA graph): tokens are sorted by width,
*descending*, on the device; the kernels then cut the sorted order into contiguous row tiles of
``BLOCK_M`` and give each tile the largest width among its rows (the first row's). Tiles are not padded
to width groups as in vLLM's ``moe_align_block_size``: a tile that straddles two groups runs at the larger
width with per-row masks. For every threshold ``v``, the number of such tiles with width ``>= v`` is
``cdiv(#tokens with width >= v, BLOCK_M)``, never more than the padded layout's
``sum_g cdiv(count_g, BLOCK_M)``, so the total MMA work is never larger, the grid is static
(``cdiv(T, BLOCK_M)`` row tiles) and the metadata is only the sort. Small batches (decode) skip the sort:
one tile holds every token and the weight prefix up to the largest width streams once.

Kernels (all fp32 accumulation, weights read through their strides, never copied or padded):

- ``_up_kernel``      gather rows by the sort order, ``[T, K] @ B[K, :w_tile]`` with the N range ending at
  the tile's width. Forward: ``B = Wu^T`` (and ``Wg^T``), epilogue bias + activation -> ``a`` (and the
  pre-activations for backward). Backward: ``B = Wd``, ``dA = dy Wd[:, :w]``, epilogue recomputes the
  activation and writes ``dh``, ``dg`` and ``a``.
- ``_down_kernel``    ``A[T, :w_tile] @ B[:w_tile, N]`` with the K loop ending at the tile's width and rows
  masked to their own width, + bias, scattered back to token order. Forward ``y = a Wd^T``; backward
  ``dx = dh Wu + dg Wg``.
- ``_route_kernel``   the routing of sorted batches up to 1024 tokens in one launch where the plan asks for it
  (``fused_route``): ranks the tokens, gathers ``x`` into sorted order for the TMA form, zeroes the down product's
  split-K counts; and (up to 384 tokens, in that launch or in one of its own) plans which up tiles run past the
  last whole wave of the chip. The up kernel's second launch runs those cut along N into narrower tiles, so the
  partial wave ends sooner (a full-width 256-token batch is 1.3 waves of up tiles on an H200).
- ``_wgrad_kernel``   ``C[j, n] = sum_t A[t, j] S[t, n]`` over the tokens using neuron ``j``. Sorted by width
  descending, those are a prefix of the order, so the token loop of a ``BLOCK_J`` block ends at the count
  of tokens wider than its first neuron. Neurons no token uses come out as exact zeros.

On Hopper (and under the interpreter) the sorted path's up and down products move every tile by TMA: the
source rows are gathered once into sorted order (by the routing launch, or ``index_select`` above 1024 tokens:
~1% of the MLP's time at prefill sizes), so a
row tile is a plain box, and each weight is a descriptor over its full tensor whose boxes past ``I`` read zeros.
The descriptors come from the host; a plan may ask for them to be built in the kernel instead (``dev_desc``:
``tl.make_tensor_descriptor``, scratch from torch's allocator), which measured slower on the GPU.
The unsorted decode tile keeps pointer loads (one tile streams the weight prefix with long K tiles).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._runtime import (
    INTERPRET,
    autocast_dtype,
    cast_to,
    cdiv,
    check_same,
    check_tensor,
    dot_precision,
    ensure_scratch_allocator,
    upcast_flag,
    use_triton,
)
from .reference import ACTIVATIONS, nested_mlp_ref
from .routing import nested_mlp_routing, rank_count, wider_counts
from .sliced_linear import TensorDescriptor, _aligned, _tma_sms

_ACT_ID = {name: i for i, name in enumerate(ACTIVATIONS)}  # silu 0, gelu 1, gelu_tanh 2, relu 3


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _act_and_grad(z, ACT: tl.constexpr):
    """The activation and its derivative at fp32 ``z``."""
    if ACT == 0:
        s = tl.sigmoid(z)
        f = z * s
        df = s * (1.0 + z * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        f = z * cdf
        df = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 2:
        # tanh through the sigmoid: tl has no portable tanh (libdevice is not there under the interpreter).
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        th = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        f = 0.5 * z * (1.0 + th)
        df = 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:
        f = tl.maximum(z, 0.0)
        df = (z > 0.0).to(tl.float32)
    return f, df


@triton.jit
def _tile_rows(pid_m, sw_ptr, order_ptr, T, I, SORTED: tl.constexpr, BLOCK_M: tl.constexpr):
    """A row tile: positions in the (sorted) order, each row's width, the tile's width, token ids."""
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = t < T
    # Clamped: an out-of-range width can only get here under CUDA-graph capture (no value check there),
    # and must not send a load past the weight.
    w_row = tl.minimum(tl.maximum(tl.load(sw_ptr + t, mask=valid, other=0), 0), I).to(tl.int32)
    w_row = tl.where(valid, w_row, 0)
    w_tile = tl.max(w_row, axis=0)
    if SORTED:
        rows = tl.load(order_ptr + t, mask=valid, other=0).to(tl.int64)
    else:
        rows = t.to(tl.int64)
    return t.to(tl.int64), w_row, w_tile, rows


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    """Programmatic dependent launch (Hopper; ``launch_pdl``): the grid may start while the previous kernel still
    runs, so wait for its results here, before any memory access; then let the next launch start its programs
    (they wait likewise) once all of this grid's are running. The launch gap in between is hidden."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _route_kernel(w_ptr, x_ptr, xs_ptr, sw_ptr, order_ptr, plan_ptr, zero_ptr, n_zero, T, H, I, stride_xt, stride_xh,
                  stride_xs, H_CHUNK, NSM, MAX_UNITS, RANK: tl.constexpr, GATHER: tl.constexpr, PLAN: tl.constexpr,
                  PARTS: tl.constexpr, N_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_Z: tl.constexpr, PDL: tl.constexpr = False):
    """A sorted batch's routing in one launch (up to ``_ROUTE_MAX_T`` tokens; at 256 tokens the three launches it
    replaces took 9.3 us of GPU time on an H200, and a graph pays a gap between any two launches):

    - RANK: program ``(i, j)`` ranks the tokens of block ``i`` by counting over all T (routing.rank_count; every
      ``j`` counts the same, cheaply); the ``j = 0`` programs scatter ``order`` and the sorted widths;
    - GATHER: program ``(i, j)`` copies columns ``[j H_CHUNK, (j + 1) H_CHUNK)`` of its tokens' rows of ``x`` to their
      ranks in ``xs`` (the TMA form's source in sorted order);
    - program (0, 0): with PLAN, the up product's tail split; and it zeroes ``n_zero`` int32 counts at ``zero_ptr``
      (the down product's split-K arrivals: no memset launch).

    The tail plan: active tiles (N block ``c`` of row tile ``r`` below the row tile's width, its first row's) are
    ranked column by column, as the swizzled grid runs them (all row tiles of an N block share its weights through
    L2). Rows are sorted by width descending, so the active row tiles of column ``c`` are the first
    ``cdiv(#{t: w_t > c BLOCK_N}, BLOCK_M)``: a count over the widths in any order, so the plan needs no sorted
    output. The head launch runs the columns below ``n_end`` whole: the most whole columns that fit in the whole
    waves of NSM programs. The tiles past them (they would cost one more whole wave) run in the tail launch, each
    cut along N into PARTS narrower tiles, where that costs fewer waves, ceil(tail PARTS / NSM) / PARTS against
    ceil(tail / NSM), and the tail launch has programs for them (MAX_UNITS); otherwise every tile runs in the head.
    Writes ``plan_ptr[0] = n_end``, ``plan_ptr[1]`` = the tail launch's programs with work, and ``plan_ptr[2 + c]`` =
    the tail's tiles in columns up to ``c``."""
    _pdl_enter(PDL)
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    if RANK:
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_in = t < T
        wt = tl.load(w_ptr + t, mask=t_in, other=0)
        rank = rank_count(w_ptr, t, wt, 0, T, BLOCK_T, BLOCK_U)
        if pid_h == 0:
            tl.store(order_ptr + rank, t.to(order_ptr.dtype.element_ty), mask=t_in)
            tl.store(sw_ptr + rank, wt, mask=t_in)
        if GATHER:  # H_CHUNK is a multiple of BLOCK_H
            src = x_ptr + t.to(tl.int64)[:, None] * stride_xt
            dst = xs_ptr + rank.to(tl.int64)[:, None] * stride_xs
            for h0 in range(pid_h * H_CHUNK, tl.minimum(pid_h * H_CHUNK + H_CHUNK, H), BLOCK_H):
                hh = h0 + tl.arange(0, BLOCK_H)
                m = t_in[:, None] & (hh < H)[None, :]
                tl.store(dst + hh[None, :], tl.load(src + hh[None, :].to(tl.int64) * stride_xh, mask=m), mask=m)
    if (pid_t == 0) & (pid_h == 0):
        if PLAN:
            cc = tl.arange(0, N_POW2)
            wider = tl.zeros((N_POW2,), dtype=tl.int32)  # tokens wider than c BLOCK_N
            for u0 in range(0, T, BLOCK_P):
                u = u0 + tl.arange(0, BLOCK_P)
                # Clamped as the kernels clamp (_tile_rows); tokens past T count as width 0.
                wu = tl.minimum(tl.maximum(tl.load(w_ptr + u, mask=u < T, other=0), 0), I).to(tl.int32)
                wider += tl.sum((wu[:, None] > cc[None, :] * BLOCK_N).to(tl.int32), 0)
            col_cnt = tl.cdiv(wider, BLOCK_M)  # active row tiles per N block
            upto = tl.cumsum(col_cnt, 0)
            total = tl.sum(col_cnt, 0)
            whole = (total // NSM) * NSM
            n_end = tl.sum((upto <= whole).to(tl.int32), 0)
            tail = total - tl.sum(tl.where(cc < n_end, col_cnt, 0), 0)
            split = (tl.cdiv(tail * PARTS, NSM) < PARTS * tl.cdiv(tail, NSM)) & (tail * PARTS <= MAX_UNITS)
            n_end = tl.where(split, n_end, N_POW2)
            tail_cnt = tl.where(cc >= n_end, col_cnt, 0)
            tl.store(plan_ptr, n_end)
            tl.store(plan_ptr + 1, tl.where(split, tail * PARTS, 0))
            tl.store(plan_ptr + 2 + cc, tl.cumsum(tail_cnt, 0))
        for z in range(0, n_zero, BLOCK_Z):
            zz = z + tl.arange(0, BLOCK_Z)
            tl.store(zero_ptr + zz, tl.zeros((BLOCK_Z,), dtype=tl.int32), mask=zz < n_zero)


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # GROUP_M row tiles walk the N blocks together, so a band of weight tiles stays hot in L2.
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    return first_m + ((pid % group_size) % group_m), (pid % group_size) // group_m


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _b_desc(ptr, K, N, stride_k, stride_n, B_NK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """A device-side descriptor over the whole of B ([K, N]), stored [N, K] (B = W^T) when ``B_NK``."""
    if B_NK:
        d = tl.make_tensor_descriptor(ptr, [N, K], [stride_n, 1], [BLOCK_N, BLOCK_K])
    else:
        d = tl.make_tensor_descriptor(ptr, [K, N], [stride_k, 1], [BLOCK_K, BLOCK_N])
    return d


@triton.jit
def _load_b(desc, ok, on, B_NK: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] tile of B through its TMA descriptor: the weight is stored [N, K] (B = W^T, read
    as a box and transposed in shared memory) or [K, N]."""
    if B_NK:
        b = desc.load([on, ok]).T
    else:
        b = desc.load([ok, on])
    return b


@triton.jit
def _up_kernel(
    src_ptr, order_ptr, sw_ptr, b1_ptr, b2_ptr, bias_ptr,
    h_ptr, g_ptr, a_ptr, dh_ptr, dg_ptr, a_desc, b1_desc, b2_desc, ao_desc, h_desc, g_desc, dh_desc, dg_desc,
    plan_ptr,
    T, K, I, LDA, LDH,
    stride_sm, stride_sk, stride_b1k, stride_b1n, stride_b2k, stride_b2n,
    SORTED: tl.constexpr, BACKWARD: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr, DEV_DESC: tl.constexpr, B_NK: tl.constexpr, EPI_TMA: tl.constexpr, TAIL: tl.constexpr,
    TAIL_LAUNCH: tl.constexpr, N_POW2: tl.constexpr, EPI_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """TAIL = 1: one launch over the swizzled tile grid. TAIL = PARTS > 1 (sorted batches, planned by
    _route_kernel into ``plan_ptr``): the head launch (TAIL_LAUNCH False) runs the tile grid's N blocks below
    the plan's ``n_end`` as usual; the tail launch runs the rest, each N block of the head's width cut into PARTS
    tiles of BLOCK_N (its own, narrower) columns, one per program: no partial sums, every part of an active block
    stored (zeros past each row's width), as readers expect whole head-width blocks."""
    _pdl_enter(PDL)
    KI = tl.cdiv(K, BLOCK_K)
    if DEV_DESC:
        a_desc = tl.make_tensor_descriptor(src_ptr, [T, K], [stride_sm, 1], [BLOCK_M, BLOCK_K])
        b1_desc = _b_desc(b1_ptr, K, I, stride_b1k, stride_b1n, B_NK, BLOCK_K, BLOCK_N)
        b2_desc = b1_desc
        if GATED and not BACKWARD:
            b2_desc = _b_desc(b2_ptr, K, I, stride_b2k, stride_b2n, B_NK, BLOCK_K, BLOCK_N)
    if TAIL_LAUNCH:
        u = tl.program_id(0)
        if u < tl.load(plan_ptr + 1):
            cc = tl.arange(0, N_POW2)
            tail_upto = tl.load(plan_ptr + 2 + cc)
            q = u // TAIL  # the tail tile, ranked column by column
            col = tl.sum((tail_upto <= q).to(tl.int32), 0)
            below = tl.sum(tl.where(cc == col - 1, tail_upto, 0), 0)  # the tail's tiles in earlier columns
            pid_n = col * TAIL + u % TAIL
            _up_tile(src_ptr, order_ptr, sw_ptr, b1_ptr, b2_ptr, bias_ptr, h_ptr, g_ptr, a_ptr, dh_ptr, dg_ptr,
                     a_desc, b1_desc, b2_desc, ao_desc, h_desc, g_desc, dh_desc, dg_desc,
                     q - below, pid_n, col * (TAIL * BLOCK_N), True, KI,
                     T, K, I, LDA, LDH, stride_sm, stride_sk, stride_b1k, stride_b1n, stride_b2k, stride_b2n,
                     SORTED, BACKWARD, GATED, HAS_BIAS, STORE_PRE, ACT, UPCAST, PRECISION, TMA, B_NK, EPI_TMA,
                     EPI_SPLIT, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(I, BLOCK_N), GROUP_M)
        runs = True
        if TAIL > 1:
            runs = pid_n < tl.load(plan_ptr)
        _up_tile(src_ptr, order_ptr, sw_ptr, b1_ptr, b2_ptr, bias_ptr, h_ptr, g_ptr, a_ptr, dh_ptr, dg_ptr,
                 a_desc, b1_desc, b2_desc, ao_desc, h_desc, g_desc, dh_desc, dg_desc,
                 pid_m, pid_n, pid_n * BLOCK_N, runs, KI,
                 T, K, I, LDA, LDH, stride_sm, stride_sk, stride_b1k, stride_b1n, stride_b2k, stride_b2n,
                 SORTED, BACKWARD, GATED, HAS_BIAS, STORE_PRE, ACT, UPCAST, PRECISION, TMA, B_NK, EPI_TMA,
                 EPI_SPLIT, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _up_tile(src_ptr, order_ptr, sw_ptr, b1_ptr, b2_ptr, bias_ptr, h_ptr, g_ptr, a_ptr, dh_ptr, dg_ptr,
             a_desc, b1_desc, b2_desc, ao_desc, h_desc, g_desc, dh_desc, dg_desc,
             pid_m, pid_n, block_on, runs, k_hi,
             T, K, I, LDA, LDH, stride_sm, stride_sk, stride_b1k, stride_b1n, stride_b2k, stride_b2n,
             SORTED: tl.constexpr, BACKWARD: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
             STORE_PRE: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
             TMA: tl.constexpr, B_NK: tl.constexpr, EPI_TMA: tl.constexpr, EPI_SPLIT: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One up tile (row tile ``pid_m``, N block ``pid_n`` of BLOCK_N columns) and its epilogue. ``block_on``: the
    first column of the buffer block it belongs to (the head's N block: a tail part's block may be active while the
    part itself lies past the tile's width; it then stores its zeros without running the K loop)."""
    DUAL: tl.constexpr = GATED and not BACKWARD  # two products (gate and up); backward has one (dA)
    t, w_row, w_tile, rows = _tile_rows(pid_m, sw_ptr, order_ptr, T, I, SORTED, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Weight masks stop at I, not at the tile's width: a bound the compiler knows is a multiple of 16
    # keeps 16-byte vector loads and hence the cp.async pipeline (a width from memory would not). The
    # extra weight columns of the last N block only feed output columns that are stored as zeros.
    n_in = rn < I
    # An N block past the tile's width runs no K iteration and stores nothing (every row's width is
    # <= the tile's), so it costs one load of the tile's widths.
    active = (block_on < w_tile) & runs
    k_hi = tl.where(active & (pid_n * BLOCK_N < w_tile), k_hi, 0)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        # The source is already in sorted order ([T, K], rows past T read as zeros) and the weights are
        # boxes over their full tensors (past I: zeros): every tile moves by the TMA engine. (Descriptors built
        # on the device where the plan asks for it: see _forward.)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        for ki in range(0, k_hi):
            ok = ki * BLOCK_K
            s = a_desc.load([om, ok])
            acc1 = _mma(s, _load_b(b1_desc, ok, on, B_NK), acc1, UPCAST, PRECISION)
            if DUAL:
                acc2 = _mma(s, _load_b(b2_desc, ok, on, B_NK), acc2, UPCAST, PRECISION)
    else:
        s_ptrs = src_ptr + rows[:, None] * stride_sm + rk[None, :] * stride_sk
        b1_ptrs = b1_ptr + rk[:, None] * stride_b1k + rn[None, :] * stride_b1n
        b2_ptrs = b2_ptr + rk[:, None] * stride_b2k + rn[None, :] * stride_b2n
        row_in = w_row > 0
        for ki in range(0, k_hi):
            k_left = K - ki * BLOCK_K
            s = tl.load(s_ptrs, mask=row_in[:, None] & (rk[None, :] < k_left), other=0.0)
            b1 = tl.load(b1_ptrs, mask=(rk[:, None] < k_left) & n_in[None, :], other=0.0)
            acc1 = _mma(s, b1, acc1, UPCAST, PRECISION)
            if DUAL:  # GATED alone shapes the backward's epilogue
                b2 = tl.load(b2_ptrs, mask=(rk[:, None] < k_left) & n_in[None, :], other=0.0)
                acc2 = _mma(s, b2, acc2, UPCAST, PRECISION)
                b2_ptrs += BLOCK_K * stride_b2k
            s_ptrs += BLOCK_K * stride_sk
            b1_ptrs += BLOCK_K * stride_b1k

    # Sorted-layout [T, LDA] buffers. Each N block that a tile runs is stored whole, zeros past each
    # row's width, so readers can mask by whole blocks (again for vector loads) and still add nothing.
    # EPI_TMA: the buffer tiles move by TMA as boxes (rows past T and columns past LDA clipped by the engine),
    # so only an inactive block is skipped, as a whole.
    # The backward's pre-activation buffers h, g (the forward's) may be narrower (LDH) than its outputs (LDA),
    # when the backward runs wider N blocks than the forward did.
    if active:
        keep = rn[None, :] < w_row[:, None]
        mask = (t[:, None] < T) & (rn[None, :] < LDA)
        off = t[:, None] * LDA + rn[None, :]
        mask_h = (t[:, None] < T) & (rn[None, :] < LDH)
        off_h = t[:, None] * LDH + rn[None, :]
        out_ty = a_ptr.dtype.element_ty
        ot = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        if not BACKWARD:
            h = acc1
            if HAS_BIAS:
                h += tl.load(bias_ptr + rn, mask=n_in, other=0.0).to(tl.float32)[None, :]
            if GATED:
                f, _ = _act_and_grad(acc2, ACT)
                a = f * h
            else:
                a, _ = _act_and_grad(h, ACT)
            _put(ao_desc, a_ptr + off, tl.where(keep, a, 0.0).to(out_ty), mask, ot, on, EPI_TMA)
            if STORE_PRE:
                _put(h_desc, h_ptr + off_h, h.to(out_ty), mask_h, ot, on, EPI_TMA)
                if GATED:
                    _put(g_desc, g_ptr + off_h, acc2.to(out_ty), mask_h, ot, on, EPI_TMA)
        elif EPI_SPLIT == 2:
            # The backward's epilogue in two N halves (boxes of half the width; TMA only): half the values live
            # at once (the whole tile reached 255 registers and spilled), as Triton's persistent-matmul tutorial
            # subtiles its epilogue.
            d0, d1 = tl.split(tl.permute(tl.reshape(acc1, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            _da_epilogue_half(d0, h_desc, g_desc, dh_desc, dg_desc, ao_desc, ot, on, w_row, GATED, ACT, out_ty,
                              BLOCK_N // 2)
            _da_epilogue_half(d1, h_desc, g_desc, dh_desc, dg_desc, ao_desc, ot, on + BLOCK_N // 2, w_row, GATED,
                              ACT, out_ty, BLOCK_N // 2)
        else:
            # Past a row's width the buffers hold the forward's values there (TMA) or read as zeros (pointer):
            # either way the results there are selected away.
            da = acc1
            h = _get(h_desc, h_ptr + off_h, mask_h & keep, ot, on, EPI_TMA).to(tl.float32)
            if GATED:
                g = _get(g_desc, g_ptr + off_h, mask_h & keep, ot, on, EPI_TMA).to(tl.float32)
                f, df = _act_and_grad(g, ACT)
                _put(dg_desc, dg_ptr + off, tl.where(keep, da * h * df, 0.0).to(out_ty), mask, ot, on, EPI_TMA)
                _put(dh_desc, dh_ptr + off, tl.where(keep, da * f, 0.0).to(out_ty), mask, ot, on, EPI_TMA)
                _put(ao_desc, a_ptr + off, tl.where(keep, f * h, 0.0).to(out_ty), mask, ot, on, EPI_TMA)
            else:
                f, df = _act_and_grad(h, ACT)
                _put(dh_desc, dh_ptr + off, tl.where(keep, da * df, 0.0).to(out_ty), mask, ot, on, EPI_TMA)
                _put(ao_desc, a_ptr + off, tl.where(keep, f, 0.0).to(out_ty), mask, ot, on, EPI_TMA)


@triton.jit
def _da_epilogue_half(da, h_desc, g_desc, dh_desc, dg_desc, ao_desc, ot, on, w_row, GATED: tl.constexpr,
                      ACT: tl.constexpr, out_ty: tl.constexpr, HALF_N: tl.constexpr):
    """The backward up kernel's epilogue on the box of columns [on, on + HALF_N) (TMA buffers)."""
    keep = (on + tl.arange(0, HALF_N))[None, :] < w_row[:, None]
    h = h_desc.load([ot, on]).to(tl.float32)
    if GATED:
        g = g_desc.load([ot, on]).to(tl.float32)
        f, df = _act_and_grad(g, ACT)
        dg_desc.store([ot, on], tl.where(keep, da * h * df, 0.0).to(out_ty))
        dh_desc.store([ot, on], tl.where(keep, da * f, 0.0).to(out_ty))
        ao_desc.store([ot, on], tl.where(keep, f * h, 0.0).to(out_ty))
    else:
        f, df = _act_and_grad(h, ACT)
        dh_desc.store([ot, on], tl.where(keep, da * df, 0.0).to(out_ty))
        ao_desc.store([ot, on], tl.where(keep, f, 0.0).to(out_ty))


@triton.jit
def _put(desc, ptrs, val, mask, ot, on, EPI_TMA: tl.constexpr):
    if EPI_TMA:
        desc.store([ot, on], val)
    else:
        tl.store(ptrs, val, mask=mask)


@triton.jit
def _get(desc, ptrs, mask, ot, on, EPI_TMA: tl.constexpr):
    if EPI_TMA:
        return desc.load([ot, on])
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _down_kernel(
    a1_ptr, a2_ptr, order_ptr, sw_ptr, b1_ptr, b2_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, a1_desc, a2_desc,
    b1_desc, b2_desc,
    T, N, I, LDA, KC,
    stride_b1k, stride_b1n, stride_b2k, stride_b2n, stride_om, stride_on,
    SORTED: tl.constexpr, DUAL: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, PAD: tl.constexpr, TMA: tl.constexpr, DEV_DESC: tl.constexpr, B_NK: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PDL: tl.constexpr = False,
):
    _pdl_enter(PDL)
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    t, w_row, w_tile, rows = _tile_rows(pid_m, sw_ptr, order_ptr, T, I, SORTED, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_in = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The K loop ends at the tile's width rounded up to the up kernel's N block (PAD): the buffer holds
    # zeros there past each row's width, and a multiple of PAD as the mask bound keeps vector loads.
    k_end = tl.cdiv(w_tile, PAD) * PAD
    k_lo = 0
    n_chunks = 1
    has_work = True
    if SPLIT:
        # Split-K: this program sums K chunk program_id(1) ([k_lo, k_lo + KC), KC a multiple of BLOCK_K). A
        # chunk at or past the tile's width runs no iteration and takes no part in the sum.
        n_chunks = tl.cdiv(k_end, KC)
        k_lo = tl.program_id(1) * KC
        has_work = k_lo < k_end
        k_end = tl.minimum(k_end, k_lo + KC)
    if TMA:
        # BLOCK_K divides PAD (checked at launch), so no box reaches past k_end into unwritten columns.
        if DEV_DESC:
            a1_desc = tl.make_tensor_descriptor(a1_ptr, [T, LDA], [LDA, 1], [BLOCK_M, BLOCK_K])
            b1_desc = _b_desc(b1_ptr, I, N, stride_b1k, stride_b1n, B_NK, BLOCK_K, BLOCK_N)
            a2_desc = a1_desc
            b2_desc = b1_desc
            if DUAL:
                a2_desc = tl.make_tensor_descriptor(a2_ptr, [T, LDA], [LDA, 1], [BLOCK_M, BLOCK_K])
                b2_desc = _b_desc(b2_ptr, I, N, stride_b2k, stride_b2n, B_NK, BLOCK_K, BLOCK_N)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        for ki in range(k_lo // BLOCK_K, tl.cdiv(k_end, BLOCK_K)):
            ok = ki * BLOCK_K
            acc = _mma(a1_desc.load([om, ok]), _load_b(b1_desc, ok, on, B_NK), acc, UPCAST, PRECISION)
            if DUAL:
                acc = _mma(a2_desc.load([om, ok]), _load_b(b2_desc, ok, on, B_NK), acc, UPCAST, PRECISION)
    else:
        a1_ptrs = a1_ptr + t[:, None] * LDA + (k_lo + rk)[None, :]
        a2_ptrs = a2_ptr + t[:, None] * LDA + (k_lo + rk)[None, :]
        b1_ptrs = b1_ptr + (k_lo + rk)[:, None] * stride_b1k + rn[None, :] * stride_b1n
        b2_ptrs = b2_ptr + (k_lo + rk)[:, None] * stride_b2k + rn[None, :] * stride_b2n
        row_in = t < T
        for ki in range(k_lo // BLOCK_K, tl.cdiv(k_end, BLOCK_K)):
            k = ki * BLOCK_K + rk
            a_mask = row_in[:, None] & (k[None, :] < k_end)
            b_mask = (k[:, None] < k_end) & (k[:, None] < I) & n_in[None, :]
            acc = _mma(tl.load(a1_ptrs, mask=a_mask, other=0.0), tl.load(b1_ptrs, mask=b_mask, other=0.0), acc,
                       UPCAST, PRECISION)
            if DUAL:
                acc = _mma(tl.load(a2_ptrs, mask=a_mask, other=0.0), tl.load(b2_ptrs, mask=b_mask, other=0.0),
                           acc, UPCAST, PRECISION)
                a2_ptrs += BLOCK_K
                b2_ptrs += BLOCK_K * stride_b2k
            a1_ptrs += BLOCK_K
            b1_ptrs += BLOCK_K * stride_b1k
    out_mask = (t[:, None] < T) & n_in[None, :]
    last = True
    if SPLIT:
        # Each chunk stores its fp32 partial in its own workspace slice, then counts itself in (acq_rel: the
        # store is visible to whoever counts in after). The tile's last chunk to arrive sums every slice in
        # chunk order (the same order whichever arrives last: deterministic) and writes the output.
        w_off = t[:, None] * N + rn[None, :]
        tl.store(ws_ptr + tl.program_id(1).to(tl.int64) * T * N + w_off, acc, mask=out_mask & has_work)
        arrived = tl.atomic_add(cnt_ptr + tl.program_id(0), 1, mask=has_work, sem="acq_rel", scope="gpu")
        last = has_work & (arrived == n_chunks - 1)
        if last:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            p_ws = ws_ptr + w_off
            for _ in range(0, n_chunks):
                acc += tl.load(p_ws, mask=out_mask, other=0.0, cache_modifier=".cg")  # .cg: past L1, from L2
                p_ws += T * N
    if last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_in, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + rows[:, None] * stride_om + rn[None, :] * stride_on
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _wgrad_step(a1, a2, s, acc1, acc2, dbacc, DUAL: tl.constexpr, HAS_DB: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    if UPCAST:
        a1 = a1.to(tl.float32)
        a2 = a2.to(tl.float32)
        s = s.to(tl.float32)
    acc1 = tl.dot(a1, s, acc1, input_precision=PRECISION)
    if HAS_DB:
        dbacc += tl.sum(a1.to(tl.float32), axis=1)
    if DUAL:
        acc2 = tl.dot(a2, s, acc2, input_precision=PRECISION)
    return acc1, acc2, dbacc


@triton.jit
def _wgrad_kernel(
    a1_ptr, a2_ptr, order_ptr, sw_ptr, cnt_ptr, src_ptr, c1_ptr, c2_ptr, db_ptr, a1_desc, a2_desc, s_desc,
    c1_desc, c2_desc,
    T, N, I, LDA,
    stride_sm, stride_sn, stride_c1j, stride_c1n, stride_c2j, stride_c2n,
    SORTED: tl.constexpr, DUAL: tl.constexpr, HAS_DB: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_M: tl.constexpr,
    EPI_TMA: tl.constexpr = False, C1_T: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """EPI_TMA: the gradient tiles leave by TMA stores (boxes clipped at the tensor's edges) over ``c1_desc`` /
    ``c2_desc``; C1_T: ``c1_desc`` is over C1's transpose (dWd, stored [N, I]), so the tile is stored transposed."""
    _pdl_enter(PDL)
    pid_j, pid_n = _swizzle(tl.program_id(0), tl.cdiv(I, BLOCK_J), tl.cdiv(N, BLOCK_N), GROUP_M)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = tl.arange(0, BLOCK_T)
    n_in = rn < N
    if SORTED:
        # Tokens wider than this block's first neuron: a prefix of the descending order.
        cnt = tl.load(cnt_ptr + pid_j * BLOCK_J).to(tl.int32)
    else:
        # One unsorted row tile (BLOCK_T >= T): every token if the widest reaches this block, else none.
        w = tl.load(sw_ptr + rt, mask=rt < T, other=0)
        cnt = tl.where(pid_j * BLOCK_J < tl.max(tl.minimum(w, I), axis=0), T, 0)
    acc1 = tl.zeros((BLOCK_J, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_J, BLOCK_N), dtype=tl.float32)
    dbacc = tl.zeros((BLOCK_J,), dtype=tl.float32)
    n_full = 0
    if TMA:
        # Whole token blocks as boxes of the sorted-layout buffers (transposed in shared memory) and of the
        # source, already gathered to sorted order: nothing to mask, so the tiles go from TMA straight to the MMA.
        n_full = cnt // BLOCK_T
        for ti in range(0, n_full):
            a1 = a1_desc.load([ti * BLOCK_T, pid_j * BLOCK_J]).T
            a2 = a1
            if DUAL:
                a2 = a2_desc.load([ti * BLOCK_T, pid_j * BLOCK_J]).T
            acc1, acc2, dbacc = _wgrad_step(a1, a2, s_desc.load([ti * BLOCK_T, pid_n * BLOCK_N]), acc1, acc2,
                                            dbacc, DUAL, HAS_DB, UPCAST, PRECISION)
    # The rest (with TMA: the last, partial token block) by masked pointer loads.
    for ti in range(n_full, tl.cdiv(cnt, BLOCK_T)):
        t = ti * BLOCK_T + rt
        t_in = t < cnt
        if SORTED and not TMA:
            rows = tl.load(order_ptr + t, mask=t_in, other=0).to(tl.int64)
        else:
            rows = t.to(tl.int64)
        # Every token here is wider than this block's first neuron, so the up kernel stored the whole
        # block for it (BLOCK_J divides its N block): zeros past the token's width, nothing unwritten.
        a_mask = t_in[None, :] & (rj[:, None] < LDA)
        a_off = t.to(tl.int64)[None, :] * LDA + rj[:, None]
        a1 = tl.load(a1_ptr + a_off, mask=a_mask, other=0.0)
        a2 = a1
        if DUAL:
            a2 = tl.load(a2_ptr + a_off, mask=a_mask, other=0.0)
        s = tl.load(src_ptr + rows[:, None] * stride_sm + rn[None, :] * stride_sn,
                    mask=t_in[:, None] & n_in[None, :], other=0.0)
        acc1, acc2, dbacc = _wgrad_step(a1, a2, s, acc1, acc2, dbacc, DUAL, HAS_DB, UPCAST, PRECISION)
    # Every element of the full-shape gradient is written here: zeros where no token reached.
    if EPI_TMA:
        if C1_T:
            c1_desc.store([pid_n * BLOCK_N, pid_j * BLOCK_J], tl.trans(acc1.to(c1_ptr.dtype.element_ty)))
        else:
            c1_desc.store([pid_j * BLOCK_J, pid_n * BLOCK_N], acc1.to(c1_ptr.dtype.element_ty))
        if DUAL:
            c2_desc.store([pid_j * BLOCK_J, pid_n * BLOCK_N], acc2.to(c2_ptr.dtype.element_ty))
    else:
        c_mask = (rj[:, None] < I) & n_in[None, :]
        rj64 = rj.to(tl.int64)
        tl.store(c1_ptr + rj64[:, None] * stride_c1j + rn[None, :] * stride_c1n,
                 acc1.to(c1_ptr.dtype.element_ty), mask=c_mask)
        if DUAL:
            tl.store(c2_ptr + rj64[:, None] * stride_c2j + rn[None, :] * stride_c2n,
                     acc2.to(c2_ptr.dtype.element_ty), mask=c_mask)
    if HAS_DB:
        tl.store(db_ptr + rj, dbacc.to(db_ptr.dtype.element_ty), mask=(rj < I) & (pid_n == 0))


# ---------------------------------------------------------------------------------------------- launch plan

# Up to this many tokens the batch is one row tile and is not sorted: at decode the weight stream is the
# whole cost, and one tile streams the prefix up to the largest width exactly once.
_UNSORTED_MAX_T = 16 if INTERPRET else 64
# The sorted path's up and down products move their tiles by TMA where _tma_ok allows; the benchmark turns this
# off to time the pointer form side by side.
_TMA = TensorDescriptor is not None


@functools.lru_cache(maxsize=4096)
def _plan(T: int, dtype: torch.dtype) -> dict:
    """Block shapes per kernel. Fixed heuristics, not autotuning: every new (T, I, H) would otherwise
    re-tune, and a decode loop sees a new T bucket often. Cached (host time is the cost of a decode step);
    callers copy before they change anything."""
    small = T <= _UNSORTED_MAX_T
    if INTERPRET:
        # The interpreter's cost grows with the number of programs: big blocks.
        bm = 16 if small else 32
        up = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, GROUP_M=4)
        return dict(sorted=not small, tma=not small, tma_bwd=not small, dev_desc=False, fused_route=True,
                    route=dict(BLOCK_T=32, BLOCK_U=32, BLOCK_H=64, num_warps=4), up=up, up_bwd={}, down=dict(up),
                    down_bwd={}, wgrad=dict(BLOCK_J=64, BLOCK_N=64, BLOCK_T=bm, GROUP_M=4))
    # fp32 tiles take twice the shared memory per stage: halve the K step instead of the stages.
    kdiv = 2 if dtype == torch.float32 else 1
    if small:
        bm = max(16, 1 << (T - 1).bit_length())
        # Decode: the weight stream is everything. Narrow N tiles give enough programs for 132 SMs
        # (the down projection has only H outputs), long K tiles amortise the loop.
        up = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=128 // kdiv, GROUP_M=1, num_warps=4, num_stages=3)
        down = dict(BLOCK_M=bm, BLOCK_N=32, BLOCK_K=256 // kdiv, GROUP_M=1, num_warps=4, num_stages=3)
        wgrad = dict(BLOCK_J=64, BLOCK_N=64, BLOCK_T=bm, GROUP_M=8, num_warps=4, num_stages=2)
    elif T <= 1024:
        # Few row tiles: too few programs for 132 SMs. From graph-timed sweeps at 256/512/1024 tokens of the
        # Llama-2-7B MLP (bench_nested_mlp.py --explore, benchmarks/NOTES.md):
        # - up to 384 tokens, 64x256 up tiles (8 warps) and the down product in two K chunks: 256 tokens
        #   0.126 ms (64x128 up tiles, one chunk: 0.152; cuBLAS dense 0.120);
        # - above, 128-row up tiles over 64-row down tiles: 512 tokens 0.183 (0.204; dense 0.202), 1024 tokens
        #   0.354 (0.375; dense 0.391). Splitting K there only added the partials' traffic.
        few = T <= 384
        up = dict(BLOCK_M=64 if few else 128, BLOCK_N=256 // kdiv if few else 128, BLOCK_K=64 // kdiv, GROUP_M=8,
                  num_warps=8, num_stages=3 if few or kdiv == 2 else 4)  # fp32: halved tiles, fewer stages
        # The last partial wave of up tiles cut along N into narrower tiles, in a second launch (TAIL parts per
        # N block; _route_kernel plans it on the device): at 256 tokens a full-width Llama-2-7B batch is 172
        # tiles of 64x256 on 132 SMs, and ncu showed the SMs busy only 61% of the kernel's time (the 40 tiles past
        # the first wave took ~75% of a wave), ~89% tensor-pipe busy while active.
        # Before it (benchmarks/NOTES.md): stream-K in one launch, slower even where nothing split (its tiles waited
        # on TMA loads far longer, in a row-major order, with a loop whose addresses left the uniform registers);
        # the tail split along K in a second launch (branch wip/tail-ksplit): its fixup (fp32 partials summed by
        # the last chunk) took a third of the tail's time, and planning in every program cost 2-5 us a launch.
        # Graph-timed at 256 tokens (forward; H200): quarters in 4 warps and 4 stages (two programs per SM), up to
        # two waves of them: Llama-2-7B all-full 0.165 -> 0.150-0.151 ms, Llama-3-8B uniform 0.179 -> 0.166; where
        # nothing splits, 2-3 us more (the plan's launch replaces the counts' memset; the empty tail launch stays).
        # Halves in 8 warps, 3 stages: -3 us on Llama-2-7B all-full; eighths: 0.153; K steps of 128 or 5 stages
        # (one program per SM): 0.161-0.162 there, 0.162 on Llama-3-8B uniform. Three waves of quarters let
        # Llama-3-8B all-full (92 tiles past the first wave) split: 0.189 against 0.181 whole.
        if few:
            up.update(TAIL=4, TAIL_ROUNDS=2, TAIL_CFG={"num_warps": 4, "num_stages": 4})
        down = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64 // kdiv, GROUP_M=8, num_warps=4, num_stages=4,
                    SPLIT_K=2 if few else 1)
        if T <= 256:
            # Ninth session (graph-timed sweeps at 128 / 256 / 384 tokens, three MLP shapes: Llama-2-7B, Llama-3-8B and
            # the ~1B of bench_compile.py; uniform and all-full; benchmarks/NOTES.md): the K loops here wait on their
            # loads, and what a program has in flight is (stages x stage bytes). cuBLAS runs 64x64 tiles in 7-13
            # stages at these sizes. Up to 256 tokens:
            # - the down product in 8 stages (192 KB: one program per SM) with as many K chunks as fill one wave:
            #   one at 256 tokens of a 4096-wide model (128 tiles), two for the 1B (64 tiles). Alone, 0.96-0.99x
            #   the two-chunk, 4-stage form's forward time on 7B/8B at 128 and 256 tokens; eight stages with more
            #   chunks than fill a wave (two waves) were 1.01-1.04x;
            # - 64x128 up tiles in 4 warps and 5 stages (200 KB) with no tail split. Both together (what this plan
            #   runs): 0.77-0.96x the old plan's forward time in the 10 cases measured (1B at 128 tokens, four chunks,
            #   was not), 1.00x on Llama-3-8B all-full at 256 (448 up tiles leave a last wave 39% full); the 1B at
            #   256 tokens went from 1.31x to 1.00x dense's time (uniform), 1.30x to 1.14x (all-full). Forward +
            #   backward 0.93-0.99x. At 384 tokens 7B/8B did not gain (1.00-1.02x; the 1B 0.92-0.94x): the plan above
            #   stays there.
            up = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64 // kdiv, GROUP_M=8, num_warps=4, num_stages=5)
            down.update(num_stages=8, SPLIT_K="fill")
            if T > 128 and kdiv == 1:
                # Tenth session (H100, graph-timed sweep at 128 / 256 tokens, three MLP shapes; benchmarks/NOTES.md):
                # 128x64 up tiles in 6 stages (192 KB): as many tiles as 64x128 at full width, 32 KB of loads a K step
                # against 40 (16 KB of x and 16 of weights; 8 and 32), so less L2 traffic for the same products. At
                # 256 tokens 0.960x / 0.968x / 0.975x the 64x128 forward's time all-full (Llama-2-7B, Llama-3-8B,
                # ~1B), 0.98-0.99x uniform on 8B / 1B, 1.04x uniform on 7B (taller tiles run more rows at a group's
                # larger width); at 128 tokens 0.99-1.01x (not taken there). dA keeps 64-row tiles (below).
                up = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=6)
        # Up to 384 tokens, token steps of 32 in the weight gradients: no register spills (ptxas: dWu+dWg 255
        # registers and 268 bytes spilled with steps of 64) and forward+backward (graph, 256 tokens) 0.6-2.4% faster
        # in all four cases tried; at 8192 tokens the same change was 20% slower in the weight-gradient kernel.
        # There also 64-neuron blocks in 4 warps (twice the programs: the K loop of 8 token steps is short) with the
        # tiles stored by TMA: forward+backward (graph, 256 tokens; H200, f292716) 0.913-0.934x the 128x128 / 8-warp
        # pointer-store config in all four cases (Llama-2-7B, Llama-3-8B; uniform, all-full), 0.930-0.944x without
        # the TMA stores; at 1024 tokens it was 0.99-1.04x, so 128x128 stays there.
        if few:
            wgrad = dict(BLOCK_J=64, BLOCK_N=128, BLOCK_T=32 // kdiv, GROUP_M=8, num_warps=4, num_stages=3,
                         EPI_TMA=True)
        else:
            wgrad = dict(BLOCK_J=128, BLOCK_N=128, BLOCK_T=64 // kdiv, GROUP_M=8, num_warps=8, num_stages=3)
    else:
        # Prefill: wgmma-sized tiles; GROUP_M row tiles share each band of weight tiles through L2.
        up = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 // kdiv, GROUP_M=8, num_warps=8, num_stages=3)
        down = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64 // kdiv, GROUP_M=8, num_warps=8, num_stages=3)
        wgrad = dict(BLOCK_J=128, BLOCK_N=128, BLOCK_T=64 // kdiv, GROUP_M=8, num_warps=8, num_stages=3)
    # The backward's up kernel (dA): changes to the forward's up config (see _up_bwd_cfg). At prefill sizes its
    # epilogue (two buffer loads, three stores) is half its time; a fourth stage took it from 1.31 to 1.03 ms
    # (Llama-2-7B MLP, 8192 tokens, uniform mix; 128x256 blocks were slower: 1.90). At 256 tokens, 4 stages
    # were 1.5-3% faster forward+backward (graph) in all four cases tried; from 385 to 1024 the forward has them.
    # Its epilogue in two N halves: 255 registers and 372-452 bytes of spills otherwise (ptxas for sm_90 at 256 and
    # 8192 tokens, benchmarks/kernel_regs.py), 182-194 registers and none in halves.
    up_bwd = {} if small else {"num_stages": 4, "EPI_SPLIT": 2}
    # Up to 256 tokens, the backward's dx (down product) in one K chunk, and dA (up product) in 64x128 tiles (twice
    # the forward's 64x256 programs): forward+backward (graph, 256 tokens, H200, 90ebac9) 0.972-0.982x with dx
    # unsplit (ptxas: the split-K fixup had 255 registers and 224 B spilled, unsplit 90 registers), 0.986-0.992x
    # with the narrower dA, in all four cases (Llama-2-7B, Llama-3-8B; uniform, all-full); both together (8e54afe)
    # 0.967-0.978x. At 384 tokens both together were 1.004x / 1.045x (Llama-2-7B uniform / all-full), 0.996x /
    # 1.036x (Llama-3-8B): not there. 64-column dx tiles were 1.03-1.10x, the down product in 8 warps 1.45-1.53x.
    down_bwd = {}
    if not small and T <= 256:
        # dx in 4 stages: its two A and two B tiles a stage would not fit the forward's 8.
        down_bwd = {"SPLIT_K": 1, "num_stages": 4}
        up_bwd.update(BLOCK_M=64, BLOCK_N=128 // kdiv, num_warps=4)  # at most 64-row tiles (_up_bwd_cfg)
    # The kernels share row tiles (a tile's buffer blocks are written by the up kernel of the same tile) and
    # a weight-gradient neuron block must lie inside one up-kernel N block.
    assert up["BLOCK_M"] % down["BLOCK_M"] == 0 and up["BLOCK_N"] % wgrad["BLOCK_J"] == 0
    # TMA tiles wherever the batch is sorted: 1.15-1.34x the pointer tiles' GPU speed at 256 tokens, 1.30x at
    # 1024, 1.17-1.37x at 2048-16384 (H200, benchmarks/NOTES.md). In the backward too: forward+backward from graph
    # replays, 256 tokens 0.58 -> 0.48 ms (Llama-2-7B uniform), 1024 tokens 1.31 -> 1.07 (an earlier call against
    # it at 256 tokens came from eager timings, which are bound by host time there).
    # Descriptors from the host. Building them in the kernel (dev_desc, tl.make_tensor_descriptor) cost GPU time
    # in every program: graph replay at 256 tokens 0.134 ms against 0.126, and 5-10% at 8192-16384 tokens; the
    # host time it saves was within the run-to-run noise of --host (+-40 us per call; benchmarks/NOTES.md).
    # The routing in one launch (fused_route, _route_kernel; sorted batches up to _ROUTE_MAX_T tokens) in place of
    # three (rank + scatter, gather of x, tail plan): graph forward (H200, f292716) 0.952-0.959x the three launches'
    # time at 256 tokens, 0.959-0.980x at 1024 (Llama-2-7B, Llama-3-8B; uniform, all-full); torch.profiler at 256
    # tokens: 6.2 us against 5.0 + 2.5 + 3.8. Programmatic dependent launch (pdl: every TMA-form kernel launched
    # early, waiting on griddepcontrol before its first load) was 0.98-1.05x at 256 tokens and 0.99-1.06x with
    # the fused routing: off.
    # The routing launch's blocks: BLOCK_T tokens ranked per program, counting BLOCK_U tokens a step; BLOCK_H columns
    # a gather step. Every program counts over all T tokens: in one step here (the count kernel's steps of 128 are
    # latency-bound: graph replays of 8.7 us at 256 tokens, 20.8 at 1024, one program per 64 tokens). ptxas for
    # sm_90, 16 tokens a program in 8 warps: 77-128 registers at 100-1024 tokens, no spills (64 tokens, steps of 128,
    # 4 warps: 255).
    route = dict(BLOCK_T=16, BLOCK_U=min(1024, max(16, _pow2(T))), BLOCK_H=128, num_warps=8)
    return dict(sorted=not small, tma=not small, tma_bwd=not small, dev_desc=False, fused_route=True, pdl=False,
                route=route, up=up, up_bwd=up_bwd, down=down, down_bwd=down_bwd, wgrad=wgrad)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Programs in one wave of the up product's tail split: the SM count (4 under the interpreter, a stand-in)."""
    if INTERPRET or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _up_bwd_cfg(plan: dict) -> dict:
    """The backward's up kernel config: the forward's with the plan's ``up_bwd`` changes. Its N blocks may be wider
    (a multiple of the forward's: its epilogue masks each row to its width, so the forward's unwritten blocks past a
    tile's width are never used) or narrower (a divisor: a block below a tile's width lies in a forward block below
    it, which the forward wrote whole). Its row tiles may be shorter (``up_bwd``'s BLOCK_M caps the forward's; both
    powers of two): a shorter tile's width is at most its forward tile's, so the blocks it reads were written. The
    weight gradients read its buffers
    in blocks of BLOCK_J, which must lie inside its N blocks, and dx (the down config with ``down_bwd``) in row tiles
    that must lie inside its own (dx runs each tile's K loop to the tile's width over whole blocks)."""
    cfg = dict(plan["up"], **plan["up_bwd"])
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], plan["up"]["BLOCK_M"])
    bn, fwd = cfg["BLOCK_N"], plan["up"]["BLOCK_N"]
    assert plan["up"]["BLOCK_M"] % cfg["BLOCK_M"] == 0 and (bn % fwd == 0 or fwd % bn == 0)
    assert bn % plan["wgrad"]["BLOCK_J"] == 0
    assert cfg["BLOCK_M"] % dict(plan["down"], **plan["down_bwd"])["BLOCK_M"] == 0
    return cfg


def _grid(rows: int, cols: int, cfg: dict, bm: str = "BLOCK_M"):
    return (cdiv(rows, cfg[bm]) * cdiv(cols, cfg["BLOCK_N"]),)


def _tma_ok(plan: dict, *tensors) -> str | bool:
    """Whether the TMA forms of the up and down kernels serve this call (plans that ask for it: prefill-sized
    batches; 2-byte dtypes, Hopper or the interpreter, row-major operands with 16-byte aligned rows), and where
    their descriptors are built: ``"device"`` (in the kernel) where the plan asks for it, else ``"host"``. False:
    the pointer form. (Not switched under CUDA-graph capture: a warm-up call must have compiled what the capture
    runs.)"""
    if not (_TMA and plan["tma"]):
        return False
    ts = [t for t in tensors if t is not None]
    if not _tma_sms(ts[0].device):
        return False
    if not all(t.element_size() == 2 and t.stride(-1) == 1 and _aligned(t, t.stride(0)) for t in ts):
        return False
    return "device" if plan["dev_desc"] else "host"


def _pdl(plan: dict, tma) -> dict:
    """Launch options and constexpr for programmatic dependent launch (_pdl_enter), where the plan asks for it: the
    TMA forms only (Hopper), never under the interpreter."""
    return {"PDL": True, "launch_pdl": True} if plan.get("pdl") and tma and not INTERPRET else {}


def _desc(t: torch.Tensor, block: list[int], memo: dict | None = None):
    """A host TMA descriptor over all of ``t``. ``memo``: one call's descriptors by tensor and box, so that launches
    of one call share them (host time: each costs microseconds of Python)."""
    if memo is None:
        return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], block)
    key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(0), tuple(block))
    d = memo.get(key)
    if d is None:
        d = memo[key] = TensorDescriptor(t, list(t.shape), [t.stride(0), 1], block)
    return d


def _weight_desc(w: torch.Tensor, nk: bool, cfg: dict, memo: dict | None = None):
    """B = w^T (w stored [N, K]) when ``nk``, else B = w (stored [K, N]); the box covers the full weight."""
    return _desc(w, [cfg["BLOCK_N"], cfg["BLOCK_K"]] if nk else [cfg["BLOCK_K"], cfg["BLOCK_N"]], memo)


def _launch_up(src, order, sw, w1, w2, nk, bias, h, g, a, dh, dg, inter, act_id, backward, store_pre, cfg, sorted_,
               tma, gated, plan=None, memo=None):
    """``B = w^T`` (``w`` stored ``[I, K]``) when ``nk`` (forward), else ``B = w`` (``[K, I]``, backward).
    With ``tma``, ``src`` must already be in sorted order. ``plan``: the tail split's plan (_route), where the
    config asks for the split (``TAIL``). ``memo``: descriptors shared with the call's other launches (_desc)."""
    T, K = src.shape
    assert cfg["BLOCK_N"] * cdiv(inter, cfg["BLOCK_N"]) <= a.shape[1]
    b1 = w1.t() if nk else w1
    b2 = (w2.t() if nk else w2) if w2 is not None else b1
    dummy = a
    memo = {} if memo is None else memo
    if tma == "device":
        ensure_scratch_allocator()
    cfg = dict(cfg)
    # The buffers' tiles by TMA too (only with host descriptors: one per buffer), unless the plan says not to.
    epi = bool(cfg.pop("EPI_TMA", True) and tma == "host")
    # The backward's epilogue in two N halves (EPI_SPLIT, TMA buffers only): half-width boxes.
    epi_split = 2 if cfg.pop("EPI_SPLIT", 1) == 2 and epi and backward else 1

    def descs(c):
        if tma == "host":
            d = (_desc(src, [c["BLOCK_M"], c["BLOCK_K"]], memo), _weight_desc(w1, nk, c, memo),
                 _weight_desc(w2 if w2 is not None else w1, nk, c, memo))
        else:
            d = (src, b1, b2)
        box = [c["BLOCK_M"], c["BLOCK_N"] // epi_split]
        return d + tuple(_desc(b, box, memo) if epi and b is not None else a for b in (a, h, g, dh, dg))

    # Tail split (sorted batches, ``plan`` from _route): the head launch over the tile grid, then a launch
    # of a program per narrow tail tile (at most TAIL_ROUNDS waves), with its own weight and buffer boxes.
    parts = _tail_parts(cfg.pop("TAIL", 1)) if sorted_ and plan is not None else 1
    rounds = cfg.pop("TAIL_ROUNDS", 1)
    nsm = cfg.pop("TAIL_SMS", 0) or _sm_count(src.device)
    cfg.pop("TAIL", None)
    args = (src, order if order is not None else sw, sw, b1, b2, bias if bias is not None else dummy,
            h if h is not None else dummy, g if g is not None else dummy, a,
            dh if dh is not None else dummy, dg if dg is not None else dummy)
    tail_args = (plan if plan is not None else sw, T, K, inter, a.stride(0),
                 h.stride(0) if h is not None else a.stride(0),
                 src.stride(0), src.stride(1), b1.stride(0), b1.stride(1), b2.stride(0), b2.stride(1))
    kw = dict(SORTED=sorted_, BACKWARD=backward, GATED=gated, HAS_BIAS=bias is not None,
              STORE_PRE=store_pre, ACT=act_id, UPCAST=upcast_flag(src.dtype), PRECISION=dot_precision(src.dtype),
              TMA=bool(tma), DEV_DESC=tma == "device", B_NK=nk, EPI_TMA=epi, TAIL=parts, EPI_SPLIT=epi_split,
              N_POW2=_tail_n_pow2(inter, cfg["BLOCK_N"]) if parts > 1 else 1)
    hcfg = {k: v for k, v in cfg.items() if k != "TAIL_CFG"}
    _up_kernel[_grid(T, inter, hcfg)](*args, *descs(hcfg), *tail_args, TAIL_LAUNCH=False, **kw, **hcfg)
    if parts > 1:
        tcfg = dict(cfg, BLOCK_N=cfg["BLOCK_N"] // parts)
        tcfg.update(tcfg.pop("TAIL_CFG", {}))
        _up_kernel[(rounds * nsm,)](*args, *descs(tcfg), *tail_args, TAIL_LAUNCH=True, **kw,
                                                     **tcfg)


# Up to this many tokens a sorted batch's routing is one launch (_route_kernel): each program counts over every
# token (routing's count kernel splits that count over programs from _RANK_CHUNK tokens on the GPU).
_ROUTE_MAX_T = 1024


def _route(x2: torch.Tensor, widths: torch.Tensor, inter: int, plan: dict, tma, pdl: dict | None = None):
    """``(sorted widths, order, src, tail plan, counts)``: the routing of one call. ``src`` is what the up product
    reads: ``x`` in sorted order for the TMA form, else ``x2`` itself. ``tail plan``: where the up config asks for
    the tail split (``TAIL`` > 1), its plan (_route_kernel), else None. ``counts``: the down launch's split-K
    arrival counts, zeroed, where this launch zeroes them (else None: the down launch zeroes its own).

    Sorted batches up to _ROUTE_MAX_T tokens, where the plan asks for it (``fused_route``): one launch does it all
    (rank, gather, plan, counts). Otherwise: the routing's sort (nested_mlp_routing), ``index_select`` for the
    gather, and a one-program launch for the plan."""
    T, H = x2.shape
    if not plan["sorted"]:
        sw, order = nested_mlp_routing(widths, False)
        return sw, order, x2, None, None
    up = plan["up"]
    pad = up["BLOCK_N"]
    parts = _tail_parts(up.get("TAIL", 1))
    fused = plan.get("fused_route", False) and T <= _ROUTE_MAX_T
    n_pow2 = _tail_n_pow2(inter, pad) if parts > 1 else 1
    n_cnt = _down_counts(T, H, inter, plan["down"], pad, tma, x2.device) if fused or parts > 1 else 0
    if not (fused or parts > 1):
        sw, order = nested_mlp_routing(widths)
        return sw, order, x2.index_select(0, order) if tma else x2, None, None
    buf = torch.empty(2 + n_pow2 + n_cnt, dtype=torch.int32, device=x2.device)
    nsm = up.get("TAIL_SMS", 0) or _sm_count(x2.device)
    rc = dict(plan["route"])
    bt, bu, bh = rc.pop("BLOCK_T"), rc.pop("BLOCK_U"), rc.pop("BLOCK_H")
    per_sm = rc.pop("PER_SM", 2)
    if fused:
        w = widths.reshape(-1).contiguous()
        sw = torch.empty_like(w)
        order = torch.empty(T, dtype=torch.int64, device=w.device)
        src = torch.empty((T, H), dtype=x2.dtype, device=x2.device) if tma else x2
        # Column chunks: about PER_SM programs per SM in all (each counts over T tokens again, a few us at most).
        n_h = max(1, min(cdiv(H, bh), cdiv(per_sm * nsm, cdiv(T, bt)))) if tma else 1
        chunk = cdiv(cdiv(H, n_h), bh) * bh
        grid = (cdiv(T, bt), cdiv(H, chunk))
    else:
        sw, order = nested_mlp_routing(widths)
        src = x2.index_select(0, order) if tma else x2
        w, chunk, grid = sw, 0, (1, 1)  # the plan only
    _route_kernel[grid](w, x2, src, sw, order, buf, buf[2 + n_pow2:], n_cnt, T, H, inter, x2.stride(0), x2.stride(1),
                        src.stride(0), chunk, nsm, up.get("TAIL_ROUNDS", 1) * nsm,
                        RANK=fused, GATHER=fused and bool(tma), PLAN=parts > 1, PARTS=parts, N_POW2=n_pow2,
                        BLOCK_M=up["BLOCK_M"], BLOCK_N=pad, BLOCK_T=bt, BLOCK_U=bu, BLOCK_H=bh,
                        BLOCK_P=min(bu, 128), BLOCK_Z=256,
                        **rc, **(pdl or {}))
    return sw, order, src, buf[:2 + n_pow2] if parts > 1 else None, buf[2 + n_pow2:] if n_cnt else None


def _tail_parts(parts: int) -> int:
    if parts not in (0, 1, 2, 4, 8):
        raise ValueError(f"TAIL (the up product's tail split: parts per N block) must be 0, 1, 2, 4 or 8, got {parts}")
    return max(parts, 1)


def _tail_n_pow2(inter: int, block_n: int) -> int:
    """The tail plan's column vector length: a power of two above the up product's N block count."""
    return max(16, _pow2(cdiv(inter, block_n) + 1))


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _down_block_k(cfg: dict, pad: int, tma) -> int:
    """The down product's K step: in the TMA form no longer than the pad (whole steps read only the zeros the up
    kernel wrote past a tile's width; the pointer form masks at the pad instead)."""
    return min(cfg["BLOCK_K"], pad) if tma else cfg["BLOCK_K"]


def _down_splits(T: int, N: int, cfg: dict, device: torch.device) -> int:
    """The down product's K chunks asked for: the config's ``SPLIT_K``, where ``"fill"`` means as many as keep one
    program per SM in one wave (the SM count over the output tiles, 1 to 4)."""
    splits = cfg.get("SPLIT_K", 1)
    if splits == "fill":
        return max(1, min(4, _sm_count(device) // _grid(T, N, cfg)[0]))
    if not (isinstance(splits, int) and splits >= 1):
        raise ValueError(f'SPLIT_K (the down product\'s K chunks) must be a positive int or "fill", got {splits!r}')
    return splits


def _down_counts(T: int, N: int, inter: int, cfg: dict, pad: int, tma, device: torch.device) -> int:
    """How many split-K arrival counts the down launch needs (0: not split); as _launch_down works them out."""
    splits = _down_splits(T, N, cfg, device)
    bk = _down_block_k(cfg, pad, tma)
    kc = cdiv(cdiv(cdiv(inter, pad) * pad, splits), bk) * bk
    return _grid(T, N, cfg)[0] if cdiv(cdiv(inter, pad) * pad, kc) > 1 else 0


def _launch_down(a1, a2, order, sw, w1, w2, nk, bias, out, inter, cfg, sorted_, pad, tma, counts=None, memo=None):
    """``out = a1 B1 (+ a2 B2)`` with ``B = w^T`` (``w`` stored ``[N, I]``) when ``nk`` (forward), else
    ``B = w`` (``[I, N]``, backward), scattered to token order. ``counts``: zeroed split-K arrival counts
    (_down_counts of them), where the caller has them (the tail plan's launch zeroes them)."""
    T, N = out.shape
    if a2 is not None:  # two A and two B tiles per stage: stay in shared memory
        cfg = dict(cfg, BLOCK_N=min(cfg["BLOCK_N"], 128), BLOCK_K=cfg["BLOCK_K"] // (2 if cfg["BLOCK_K"] > 64 else 1))
    cfg = dict(cfg, BLOCK_K=_down_block_k(cfg, pad, tma))
    splits = _down_splits(T, N, cfg, out.device)
    cfg.pop("SPLIT_K", None)
    b1 = w1.t() if nk else w1
    b2 = (w2.t() if nk else w2) if w2 is not None else b1
    # K chunks of whole BLOCK_Ks over the padded width; fewer chunks where the width is short.
    kc = cdiv(cdiv(cdiv(inter, pad) * pad, splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    splits = cdiv(cdiv(inter, pad) * pad, kc)
    if splits > 1:  # fp32 partial per chunk, and an arrival count per output tile
        ws = torch.empty((splits, T, N), dtype=torch.float32, device=out.device)
        cnt = counts if counts is not None else torch.zeros(_grid(T, N, cfg)[0], dtype=torch.int32,
                                                            device=out.device)
    else:
        ws = cnt = out
    if tma:
        assert pad % cfg["BLOCK_K"] == 0
    if tma == "device":
        ensure_scratch_allocator()
    if tma == "host":
        box = [cfg["BLOCK_M"], cfg["BLOCK_K"]]
        memo = {} if memo is None else memo
        d1 = _desc(a1, box, memo)
        descs = (d1, _desc(a2, box, memo) if a2 is not None else d1, _weight_desc(w1, nk, cfg, memo),
                 _weight_desc(w2 if w2 is not None else w1, nk, cfg, memo))
    else:
        descs = (a1, a1, b1, b2)
    _down_kernel[_grid(T, N, cfg) + (splits,)](
        a1, a2 if a2 is not None else a1, order if order is not None else sw, sw,
        b1, b2, bias if bias is not None else out, out, ws, cnt, *descs,
        T, N, inter, a1.stride(0), kc,
        b1.stride(0), b1.stride(1), b2.stride(0), b2.stride(1),
        out.stride(0), out.stride(1),
        SORTED=sorted_, DUAL=a2 is not None, HAS_BIAS=bias is not None, UPCAST=upcast_flag(out.dtype),
        PRECISION=dot_precision(out.dtype), PAD=pad, TMA=bool(tma), DEV_DESC=tma == "device", B_NK=nk,
        SPLIT=splits > 1, **cfg,
    )


def _launch_wgrad(a1, a2, order, sw, cnt, src, c1, c2, db, inter, cfg, sorted_, tma=False, memo=None):
    """``C[j, n] = sum_t A[t, j] S[t, n]`` over the tokens using neuron ``j``. With ``tma``, ``src`` must already be
    in sorted order."""
    T, N = src.shape
    c2_ = c2 if c2 is not None else c1
    cfg = dict(cfg)
    # The gradient tiles by TMA stores (host descriptors only), where the plan asks for it (EPI_TMA).
    epi = bool(cfg.pop("EPI_TMA", False) and tma == "host")
    c1_t = c1.stride(1) != 1  # C1 given as a transposed view (dWd): the descriptor is over the stored tensor
    if tma:
        box = [cfg["BLOCK_T"], cfg["BLOCK_J"]]
        memo = {} if memo is None else memo
        d1 = _desc(a1, box, memo)
        descs = (d1, _desc(a2, box, memo) if a2 is not None else d1, _desc(src, [cfg["BLOCK_T"], cfg["BLOCK_N"]], memo))
    else:
        descs = (a1, a1, src)
    if epi:
        jn, nj = [cfg["BLOCK_J"], cfg["BLOCK_N"]], [cfg["BLOCK_N"], cfg["BLOCK_J"]]
        c1s = c1.t() if c1_t else c1  # the tensor as stored
        assert c1s.stride(1) == 1 and not (c1_t and c2 is not None)
        d_c1 = _desc(c1s, nj if c1_t else jn)
        descs += (d_c1, _desc(c2, jn) if c2 is not None else d_c1)
    else:
        descs += (c1, c2_)
    _wgrad_kernel[_grid(inter, N, cfg, "BLOCK_J")](
        a1, a2 if a2 is not None else a1, order if order is not None else sw, sw,
        cnt if cnt is not None else sw, src, c1, c2_, db if db is not None else c1, *descs,
        T, N, inter, a1.stride(0),
        src.stride(0), src.stride(1), c1.stride(0), c1.stride(1), c2_.stride(0), c2_.stride(1),
        SORTED=sorted_, DUAL=c2 is not None, HAS_DB=db is not None, UPCAST=upcast_flag(src.dtype),
        PRECISION=dot_precision(src.dtype), TMA=bool(tma), EPI_TMA=epi, C1_T=epi and c1_t, **cfg,
    )


# ---------------------------------------------------------------------------------------------- autograd


# The forward's buffers (a; h and g for the backward) have I rounded up to this many columns: a multiple of every
# plan's up N block, so their shape depends on I alone (torch.compile's fake tensors get it without the plan).
_BUF_COLS = 256


def _forward(x, up_weight, down_weight, gate_weight, up_bias, down_bias, widths, act_id, training):
    """Route, up kernel, down kernel. ``training`` also keeps the pre-activations for backward."""
    H = x.shape[-1]
    inter = up_weight.shape[0]
    x2 = x.reshape(-1, H)
    T = x2.shape[0]
    plan = _plan(T, x.dtype)
    tma = _tma_ok(plan, x2, up_weight, down_weight, gate_weight)
    # The TMA form reads x in sorted order: gathered by the routing (T x H, ~1% of the MLP's time at prefill sizes).
    pdl = _pdl(plan, tma)
    sw, order, src, tail_plan, counts = _route(x2, widths, inter, plan, tma, pdl)
    # Sorted-layout intermediates [T, I rounded up to _BUF_COLS, a multiple of the up kernel's N block]; a row tile's
    # blocks up to its width are written (zeros past each row's own width), the rest is never read.
    pad = plan["up"]["BLOCK_N"]
    if _BUF_COLS % pad:
        raise ValueError(f"the up product's BLOCK_N must divide {_BUF_COLS}, got {pad}")
    a = torch.empty((T, cdiv(inter, _BUF_COLS) * _BUF_COLS), dtype=x.dtype, device=x.device)
    h = torch.empty_like(a) if training else None
    g = torch.empty_like(a) if training and gate_weight is not None else None
    memo = {}  # host TMA descriptors shared by the launches
    _launch_up(src, order, sw, up_weight, gate_weight, True, up_bias, h, g, a, None, None, inter, act_id, False,
               training, dict(plan["up"], **pdl), plan["sorted"], tma, gate_weight is not None, tail_plan, memo)
    y = torch.empty((T, H), dtype=x.dtype, device=x.device)
    _launch_down(a, None, order, sw, down_weight, None, True, down_bias, y, inter, dict(plan["down"], **pdl),
                 plan["sorted"], pad, tma, counts, memo)
    return y.view(x.shape), (x2, sw, order, h, g, dict(plan, tma=bool(tma)))


class _NestedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, up_weight, down_weight, gate_weight, up_bias, down_bias, widths, act_id):
        y, (x2, sw, order, h, g, plan) = _forward(
            x, up_weight, down_weight, gate_weight, up_bias, down_bias, widths, act_id, True)
        ctx.save_for_backward(x2, up_weight, down_weight, gate_weight, up_bias, sw, order, h, g)
        ctx.act_id, ctx.plan, ctx.x_shape = act_id, plan, x.shape
        ctx.has_down_bias = down_bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, up_w, down_w, gate_w, up_b, sw, order, h, g = ctx.saved_tensors
        grads = _backward(dy, x2, up_w, down_w, gate_w, up_b, sw, order, h, g, ctx.act_id, ctx.plan, ctx.x_shape,
                          ctx.has_down_bias, ctx.needs_input_grad[:6])
        return (*grads, None, None)


def _backward(dy, x2, up_w, down_w, gate_w, up_b, sw, order, h, g, act_id, plan, x_shape, has_down_bias, need):
    """Gradients ``(dx, dup, ddown, dgate, dub, ddb)`` (None where not needed or absent) of one call, from what its
    forward kept (``_forward``'s extras). ``need``: whether x, up_weight, down_weight, gate_weight, up_bias, down_bias
    need gradients."""
    srt = plan["sorted"]
    T, H = x2.shape
    inter = up_w.shape[0]
    dy2 = dy.reshape(-1, H)
    # The backward's buffers are as wide as its own up kernel's N blocks need (a multiple of the forward's).
    up_cfg = _up_bwd_cfg(plan)
    bn = up_cfg["BLOCK_N"]
    dh = torch.empty((T, cdiv(inter, bn) * bn), dtype=h.dtype, device=h.device)
    dg = torch.empty_like(dh) if gate_w is not None else None
    a = torch.empty_like(dh)
    tma = plan["tma_bwd"] and _tma_ok(plan, dy2)  # "host", "device" or False
    pdl = _pdl(plan, tma)
    # dA = dy Wd[:, :w], then the activation's derivative in the epilogue (a is recomputed there).
    src = dy2.index_select(0, order) if tma else dy2
    memo = {}  # host TMA descriptors shared by the launches
    _launch_up(src, order, sw, down_w, None, False, None, h, g, a, dh, dg, inter, act_id, True, False,
               dict(up_cfg, **pdl), srt, tma, gate_w is not None, memo=memo)
    dx = dup = ddown = dgate = dub = ddb = None
    if need[0]:
        dx = torch.empty((T, H), dtype=x2.dtype, device=x2.device)
        # dh and dg hold zeros up to the tile's width rounded up to the smaller of the two N blocks.
        dx_cfg = dict(plan["down"], **plan["down_bwd"], **pdl)  # dx: the down config with the plan's changes
        _launch_down(dh, dg, order, sw, up_w, gate_w, False, None, dx, inter, dx_cfg, srt,
                     min(bn, plan["up"]["BLOCK_N"]), tma, memo=memo)
        dx = dx.view(x_shape)
    cnt = wider_counts(sw, inter) if srt else None
    if need[2]:
        ddown = torch.empty(down_w.shape, dtype=down_w.dtype, device=down_w.device)
        # Written as dWd^T[j, n] through strides, so the token loop runs along the neuron axis.
        # The TMA form reads dy in sorted order: the gather made for dA above.
        _launch_wgrad(a, None, order, sw, cnt, src, ddown.t(), None, None, inter, dict(plan["wgrad"], **pdl), srt,
                      tma, memo)
    if need[1] or need[3] or need[4]:
        dup = torch.empty(up_w.shape, dtype=up_w.dtype, device=up_w.device)
        dgate = torch.empty(gate_w.shape, dtype=gate_w.dtype, device=gate_w.device) if gate_w is not None else None
        dub = torch.empty(inter, dtype=up_w.dtype, device=up_w.device) if up_b is not None else None
        xs = x2.index_select(0, order) if tma else x2
        _launch_wgrad(dh, dg, order, sw, cnt, xs, dup, dgate, dub, inter, dict(plan["wgrad"], **pdl), srt, tma,
                      memo)
    if has_down_bias and need[5]:
        ddb = dy2.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, dup, ddown, dgate, dub, ddb


# ---------------------------------------------------------------------------------------------- public op


def _check(x, up_weight, down_weight, widths, gate_weight, up_bias, down_bias, activation, same_dtype=True) -> int:
    if activation not in _ACT_ID:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_tensor("x", x, min_ndim=1)
    check_tensor("up_weight", up_weight, ndim=2)
    check_same("up_weight", up_weight, "x", x, same_dtype)
    inter, H = up_weight.shape
    if x.shape[-1] != H:
        raise ValueError(f"x.shape[-1] must equal up_weight.shape[1] = {H}, got {x.shape[-1]}")
    check_tensor("down_weight", down_weight, ndim=2)
    check_same("down_weight", down_weight, "x", x, same_dtype)
    if tuple(down_weight.shape) != (H, inter):
        raise ValueError(f"down_weight must have shape {(H, inter)} (up_weight's transposed), "
                         f"got {tuple(down_weight.shape)}")
    if gate_weight is not None:
        check_tensor("gate_weight", gate_weight, ndim=2)
        check_same("gate_weight", gate_weight, "x", x, same_dtype)
        if gate_weight.shape != up_weight.shape:
            raise ValueError(f"gate_weight must have up_weight's shape {(inter, H)}, got {tuple(gate_weight.shape)}")
    for name, b, n in (("up_bias", up_bias, inter), ("down_bias", down_bias, H)):
        if b is not None:
            check_tensor(name, b, ndim=1)
            check_same(name, b, "x", x, same_dtype)
            if b.shape[0] != n:
                raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")
    if not isinstance(widths, torch.Tensor):
        raise TypeError(f"widths must be an integer torch.Tensor, got {type(widths).__name__}")
    if widths.is_floating_point() or widths.is_complex() or widths.dtype == torch.bool:
        raise TypeError(f"widths must have an integer dtype, got {widths.dtype}")
    if tuple(widths.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"widths must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(widths.shape)}")
    if widths.device != x.device:
        raise ValueError(f"widths must be on x's device {x.device}, got {widths.device}")
    return inter


def nested_mlp(
    x: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    widths: torch.Tensor,
    *,
    gate_weight: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    activation: str = "silu",
    check_widths: bool = True,
) -> torch.Tensor:
    """Per-token-width MLP over one set of prefix-nested weights (no weight copies).

    Args:
        x: ``[..., H]``.
        up_weight, gate_weight: ``[I, H]``; down_weight: ``[H, I]``; up_bias ``[I]``, down_bias ``[H]``.
        widths: integer tensor of shape ``x.shape[:-1]``: the neurons each token uses, ``1 <= w <= I``.
        activation: ``"silu"``, ``"gelu"``, ``"gelu_tanh"`` (GPT-2) or ``"relu"``.
        check_widths: check the range of ``widths`` (one host synchronisation). It is skipped on its own
            while a CUDA graph is being captured or ``torch.compile`` traces the call; pass False to skip it in
            eager decode loops. Unchecked
            out-of-range widths are clamped to ``[0, I]`` in the kernels (never read past a weight).

    Returns ``[..., H]``: ``a = act(x Wg[:w]^T) * (x Wu[:w]^T + bu[:w])`` with a gate, else
    ``a = act(x Wu[:w]^T + bu[:w])``; ``y = a Wd[:, :w]^T + bd`` (``reference.nested_mlp_ref``).
    Differentiable in ``x`` and every weight and bias; their gradients have full shapes, exactly zero
    outside the neurons any token used. Tokens are sorted by width on the device, with no host sync.
    """
    amp = autocast_dtype(x)
    inter = _check(x, up_weight, down_weight, widths, gate_weight, up_bias, down_bias, activation, amp is None)
    used = inter
    compiling = torch.compiler.is_compiling()
    if (check_widths and widths.numel() > 0 and not compiling
            and not (widths.is_cuda and torch.cuda.is_current_stream_capturing())):
        lo, hi = (int(v) for v in torch.aminmax(widths))
        if lo < 1 or hi > inter:
            raise ValueError(f"widths must be in [1, {inter}] (up_weight.shape[0]), got values in [{lo}, {hi}]")
        used = hi
    if amp is not None:  # as F.linear under autocast; only the neurons this call can read are cast
        x, up_weight, down_weight, gate_weight, up_bias = cast_to(
            amp, x, up_weight[:used], down_weight[:, :used], None if gate_weight is None else gate_weight[:used],
            None if up_bias is None else up_bias[:used])
        (down_bias,) = cast_to(amp, down_bias)
    if not use_triton(x) or x.numel() == 0:
        return nested_mlp_ref(x, up_weight, down_weight, widths, gate_weight=gate_weight, up_bias=up_bias,
                              down_bias=down_bias, activation=activation)
    tensors = (x, up_weight, down_weight, gate_weight, up_bias, down_bias)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if compiling:  # one opaque custom op in the traced graph (_ops), with its backward registered
        return torch.ops.flextron.nested_mlp_fwd(x, up_weight, down_weight, widths, gate_weight, up_bias, down_bias,
                                                 _ACT_ID[activation], training)[0]
    if training:
        return _NestedMLP.apply(*tensors, widths, _ACT_ID[activation])
    # Inference: no autograd node, no saved pre-activations (a decode step pays the least host time).
    return _forward(*tensors, widths, _ACT_ID[activation], False)[0]
