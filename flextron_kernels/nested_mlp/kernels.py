"""nested_mlp's Triton kernels (all fp32 accumulation; weights read through their strides, never copied or padded).

One file over ~500 lines on purpose: the four kernels share the tile-walk and epilogue helpers defined here.

Rows arrive sorted by width, descending (``routing``), cut into row tiles of ``BLOCK_M`` whose width is their first
row's; a tile that straddles two width groups runs at the larger width with per-row masks. Small batches (decode)
are one unsorted tile.

- ``up_kernel``     ``[T, K] @ B[K, :w_tile]``, the N range ending at the tile's width. Forward: ``B = Wu^T`` (and
  ``Wg^T``), epilogue bias + activation -> ``a`` (and the pre-activations for backward). Backward: ``B = Wd``,
  ``dA = dy Wd[:, :w]``, epilogue recomputes the activation and writes ``dh``, ``dg`` and ``a``.
- ``down_kernel``   ``A[T, :w_tile] @ B[:w_tile, N]``, the K loop ending at the tile's width, + bias, scattered back
  to token order. Forward ``y = a Wd^T``; backward ``dx = dh Wu + dg Wg``.
- ``route_kernel``  a sorted batch's routing in one launch: rank, gather ``x`` to sorted order (TMA form), zero the
  split-K counts, plan the up product's tail split.
- ``wgrad_kernel``  ``C[j, n] = sum_t A[t, j] S[t, n]`` over the tokens using neuron ``j``: a prefix of the sorted
  order, so a ``BLOCK_J`` block's token loop ends at the count of tokens wider than its first neuron.

TMA forms (``TMA``): the source is already in sorted order, so a row tile is a plain box; each weight is a host
descriptor over its full tensor whose boxes past ``I`` read zeros.
"""

import triton
import triton.language as tl

from ..routing import rank_count


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
def route_kernel(w_ptr, x_ptr, xs_ptr, sw_ptr, order_ptr, plan_ptr, zero_ptr, n_zero, T, H, I, stride_xt, stride_xh,
                 stride_xs, H_CHUNK, NSM, MAX_UNITS, RANK: tl.constexpr, GATHER: tl.constexpr, PLAN: tl.constexpr,
                 PARTS: tl.constexpr, N_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_Z: tl.constexpr):
    """A sorted batch's routing in one launch (up to ``ROUTE_MAX_T`` tokens; at 256 tokens the three launches it
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
def _load_b(desc, ok, on, B_NK: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] tile of B through its TMA descriptor: the weight is stored [N, K] (B = W^T, read
    as a box and transposed in shared memory) or [K, N]."""
    if B_NK:
        b = desc.load([on, ok]).T
    else:
        b = desc.load([ok, on])
    return b


@triton.jit
def up_kernel(
    src_ptr, order_ptr, sw_ptr, b1_ptr, b2_ptr, bias_ptr,
    h_ptr, g_ptr, a_ptr, dh_ptr, dg_ptr, a_desc, b1_desc, b2_desc, ao_desc, h_desc, g_desc, dh_desc, dg_desc,
    plan_ptr,
    T, K, I, LDA, LDH,
    stride_sm, stride_sk, stride_b1k, stride_b1n, stride_b2k, stride_b2n,
    SORTED: tl.constexpr, BACKWARD: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr, B_NK: tl.constexpr, EPI_TMA: tl.constexpr, TAIL: tl.constexpr,
    TAIL_LAUNCH: tl.constexpr, N_POW2: tl.constexpr, EPI_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """TAIL = 1: one launch over the swizzled tile grid. TAIL = PARTS > 1 (sorted batches, planned by
    route_kernel into ``plan_ptr``): the head launch (TAIL_LAUNCH False) runs the tile grid's N blocks below
    the plan's ``n_end`` as usual; the tail launch runs the rest, each N block of the head's width cut into PARTS
    tiles of BLOCK_N (its own, narrower) columns, one per program: no partial sums, every part of an active block
    stored (zeros past each row's width), as readers expect whole head-width blocks."""
    KI = tl.cdiv(K, BLOCK_K)
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
        # boxes over their full tensors (past I: zeros): every tile moves by the TMA engine.
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
def down_kernel(
    a1_ptr, a2_ptr, order_ptr, sw_ptr, b1_ptr, b2_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, a1_desc, a2_desc,
    b1_desc, b2_desc,
    T, N, I, LDA, KC,
    stride_b1k, stride_b1n, stride_b2k, stride_b2n, stride_om, stride_on,
    SORTED: tl.constexpr, DUAL: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, PAD: tl.constexpr, TMA: tl.constexpr, B_NK: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
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
def wgrad_kernel(
    a1_ptr, a2_ptr, order_ptr, sw_ptr, cnt_ptr, src_ptr, c1_ptr, c2_ptr, db_ptr, a1_desc, a2_desc, s_desc,
    c1_desc, c2_desc,
    T, N, I, LDA,
    stride_sm, stride_sn, stride_c1j, stride_c1n, stride_c2j, stride_c2n,
    SORTED: tl.constexpr, DUAL: tl.constexpr, HAS_DB: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_M: tl.constexpr,
    EPI_TMA: tl.constexpr = False, C1_T: tl.constexpr = False,
):
    """EPI_TMA: the gradient tiles leave by TMA stores (boxes clipped at the tensor's edges) over ``c1_desc`` /
    ``c2_desc``; C1_T: ``c1_desc`` is over C1's transpose (dWd, stored [N, I]), so the tile is stored transposed."""
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
