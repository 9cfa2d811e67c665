"""nested_mlp's launchers: routing, the up, down and weight-gradient launches, and one call's forward and backward.

Entry points (``op`` and ``_ops`` call these): :func:`call_plan`, :func:`forward`, :func:`backward`.
"""

from __future__ import annotations

import torch

from .._hopper import aligned, full_desc, sm_count, tma_sms
from .._runtime import cdiv, dot_precision, upcast_flag
from ..routing import nested_mlp_routing, wider_counts
from .kernels import down_kernel, route_kernel, up_kernel, wgrad_kernel
from .plan import (
    BUF_COLS,
    ROUTE_MAX_T,
    Plan,
    down_block_k,
    down_counts,
    down_splits,
    grid,
    plan_for,
    tail_n_pow2,
    tail_parts,
    up_bwd_cfg,
)


def tma_ok(plan: Plan, *tensors) -> bool:
    """Whether the TMA forms of the up and down kernels serve this call: the plan asks for them, and the operands are
    2-byte, row-major with 16-byte aligned rows, on Hopper or the interpreter. (Not switched under CUDA-graph
    capture: a warm-up call must have compiled what the capture runs.)"""
    if not plan.tma:
        return False
    ts = [t for t in tensors if t is not None]
    if not tma_sms(ts[0].device):
        return False
    return all(t.element_size() == 2 and t.stride(-1) == 1 and aligned(t, t.stride(0)) for t in ts)


def call_plan(x2: torch.Tensor, up_weight, down_weight, gate_weight) -> Plan:
    """The plan of one call on ``x2 [T, H]``, with ``tma`` the forward's decision for these operands."""
    plan = plan_for(x2.shape[0], x2.dtype)
    tma = tma_ok(plan, x2, up_weight, down_weight, gate_weight)
    return plan if tma == plan.tma else plan.replace(tma=tma)  # no copy in the common case: host time


def _weight_desc(w: torch.Tensor, nk: bool, cfg: dict, memo: dict | None = None):
    """B = w^T (w stored [N, K]) when ``nk``, else B = w (stored [K, N]); the box covers the full weight."""
    return full_desc(w, [cfg["BLOCK_N"], cfg["BLOCK_K"]] if nk else [cfg["BLOCK_K"], cfg["BLOCK_N"]], memo)


def launch_up(src, order, sw, w1, w2, nk, bias, h, g, a, dh, dg, inter, act_id, backward, store_pre, cfg, sorted_,
              tma, gated, sms, tail_plan=None, memo=None):
    """``B = w^T`` (``w`` stored ``[I, K]``) when ``nk`` (forward), else ``B = w`` (``[K, I]``, backward).
    With ``tma``, ``src`` must already be in sorted order. ``tail_plan``: the tail split's plan (route), where the
    config asks for the split (``TAIL``), over waves of ``sms`` programs. ``memo``: descriptors shared with the
    call's other launches."""
    T, K = src.shape
    assert cfg["BLOCK_N"] * cdiv(inter, cfg["BLOCK_N"]) <= a.shape[1]
    b1 = w1.t() if nk else w1
    b2 = (w2.t() if nk else w2) if w2 is not None else b1
    dummy = a
    memo = {} if memo is None else memo
    cfg = dict(cfg)
    epi = bool(cfg.pop("EPI_TMA", True) and tma)  # the buffers' tiles by TMA too
    epi_split = 2 if cfg.pop("EPI_SPLIT", 1) == 2 and epi and backward else 1  # half-width boxes

    def descs(c):
        if tma:
            d = (full_desc(src, [c["BLOCK_M"], c["BLOCK_K"]], memo), _weight_desc(w1, nk, c, memo),
                 _weight_desc(w2 if w2 is not None else w1, nk, c, memo))
        else:
            d = (src, b1, b2)
        box = [c["BLOCK_M"], c["BLOCK_N"] // epi_split]
        return d + tuple(full_desc(b, box, memo) if epi and b is not None else a for b in (a, h, g, dh, dg))

    # Tail split: the head launch over the tile grid, then a program per narrow tail tile (at most TAIL_ROUNDS
    # waves), with its own weight and buffer boxes.
    parts = tail_parts(cfg.pop("TAIL", 1)) if sorted_ and tail_plan is not None else 1
    rounds = cfg.pop("TAIL_ROUNDS", 1)
    cfg.pop("TAIL", None)
    args = (src, order if order is not None else sw, sw, b1, b2, bias if bias is not None else dummy,
            h if h is not None else dummy, g if g is not None else dummy, a,
            dh if dh is not None else dummy, dg if dg is not None else dummy)
    tail_args = (tail_plan if tail_plan is not None else sw, T, K, inter, a.stride(0),
                 h.stride(0) if h is not None else a.stride(0),
                 src.stride(0), src.stride(1), b1.stride(0), b1.stride(1), b2.stride(0), b2.stride(1))
    kw = dict(SORTED=sorted_, BACKWARD=backward, GATED=gated, HAS_BIAS=bias is not None,
              STORE_PRE=store_pre, ACT=act_id, UPCAST=upcast_flag(src.dtype), PRECISION=dot_precision(src.dtype),
              TMA=bool(tma), B_NK=nk, EPI_TMA=epi, TAIL=parts, EPI_SPLIT=epi_split,
              N_POW2=tail_n_pow2(inter, cfg["BLOCK_N"]) if parts > 1 else 1)
    hcfg = {k: v for k, v in cfg.items() if k != "TAIL_CFG"}
    up_kernel[grid(T, inter, hcfg)](*args, *descs(hcfg), *tail_args, TAIL_LAUNCH=False, **kw, **hcfg)
    if parts > 1:
        tcfg = dict(cfg, BLOCK_N=cfg["BLOCK_N"] // parts)
        tcfg.update(tcfg.pop("TAIL_CFG", {}))
        up_kernel[(rounds * sms,)](*args, *descs(tcfg), *tail_args, TAIL_LAUNCH=True, **kw, **tcfg)


def route(x2: torch.Tensor, widths: torch.Tensor, inter: int, plan: Plan, tma: bool, sms: int):
    """``(sorted widths, order, src, tail plan, counts)``: the routing of one call. ``src`` is what the up product
    reads: ``x`` in sorted order for the TMA form, else ``x2`` itself. ``tail plan``: where the up config asks for
    the tail split (``TAIL`` > 1), its plan (route_kernel), else None. ``counts``: the down launch's split-K
    arrival counts, zeroed, where this launch zeroes them (else None: the down launch zeroes its own).

    Sorted batches up to ROUTE_MAX_T tokens, where the plan asks for it (``fused_route``): one launch does it all
    (rank, gather, plan, counts). Otherwise: the routing's sort (nested_mlp_routing), ``index_select`` for the
    gather, and a one-program launch for the plan."""
    T, H = x2.shape
    if not plan.sorted:
        sw, order = nested_mlp_routing(widths, False)
        return sw, order, x2, None, None
    up = plan.up
    pad = up["BLOCK_N"]
    parts = tail_parts(up.get("TAIL", 1))
    fused = plan.fused_route and T <= ROUTE_MAX_T
    n_pow2 = tail_n_pow2(inter, pad) if parts > 1 else 1
    n_cnt = down_counts(T, H, inter, plan.down, pad, tma, sms) if fused or parts > 1 else 0
    if not (fused or parts > 1):
        sw, order = nested_mlp_routing(widths)
        return sw, order, x2.index_select(0, order) if tma else x2, None, None
    buf = torch.empty(2 + n_pow2 + n_cnt, dtype=torch.int32, device=x2.device)
    rc = dict(plan.route)
    bt, bu, bh = rc.pop("BLOCK_T"), rc.pop("BLOCK_U"), rc.pop("BLOCK_H")
    per_sm = rc.pop("PER_SM", 2)
    if fused:
        w = widths.reshape(-1).contiguous()
        sw = torch.empty_like(w)
        order = torch.empty(T, dtype=torch.int64, device=w.device)
        src = torch.empty((T, H), dtype=x2.dtype, device=x2.device) if tma else x2
        # Column chunks: about PER_SM programs per SM in all (each counts over T tokens again, a few us at most).
        n_h = max(1, min(cdiv(H, bh), cdiv(per_sm * sms, cdiv(T, bt)))) if tma else 1
        chunk = cdiv(cdiv(H, n_h), bh) * bh
        grid_ = (cdiv(T, bt), cdiv(H, chunk))
    else:
        sw, order = nested_mlp_routing(widths)
        src = x2.index_select(0, order) if tma else x2
        w, chunk, grid_ = sw, 0, (1, 1)  # the plan only
    route_kernel[grid_](w, x2, src, sw, order, buf, buf[2 + n_pow2:], n_cnt, T, H, inter, x2.stride(0), x2.stride(1),
                        src.stride(0), chunk, sms, up.get("TAIL_ROUNDS", 1) * sms,
                        RANK=fused, GATHER=fused and bool(tma), PLAN=parts > 1, PARTS=parts, N_POW2=n_pow2,
                        BLOCK_M=up["BLOCK_M"], BLOCK_N=pad, BLOCK_T=bt, BLOCK_U=bu, BLOCK_H=bh,
                        BLOCK_P=min(bu, 128), BLOCK_Z=256, **rc)
    return sw, order, src, buf[:2 + n_pow2] if parts > 1 else None, buf[2 + n_pow2:] if n_cnt else None


def launch_down(a1, a2, order, sw, w1, w2, nk, bias, out, inter, cfg, sorted_, pad, tma, sms, counts=None,
                memo=None):
    """``out = a1 B1 (+ a2 B2)`` with ``B = w^T`` (``w`` stored ``[N, I]``) when ``nk`` (forward), else
    ``B = w`` (``[I, N]``, backward), scattered to token order. ``counts``: zeroed split-K arrival counts
    (down_counts of them), where the caller has them (the routing launch zeroes them)."""
    T, N = out.shape
    if a2 is not None:  # two A and two B tiles per stage: stay in shared memory
        cfg = dict(cfg, BLOCK_N=min(cfg["BLOCK_N"], 128), BLOCK_K=cfg["BLOCK_K"] // (2 if cfg["BLOCK_K"] > 64 else 1))
    cfg = dict(cfg, BLOCK_K=down_block_k(cfg, pad, tma))
    splits = down_splits(T, N, cfg, sms)
    cfg.pop("SPLIT_K", None)
    b1 = w1.t() if nk else w1
    b2 = (w2.t() if nk else w2) if w2 is not None else b1
    # K chunks of whole BLOCK_Ks over the padded width; fewer chunks where the width is short.
    kc = cdiv(cdiv(cdiv(inter, pad) * pad, splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    splits = cdiv(cdiv(inter, pad) * pad, kc)
    if splits > 1:  # fp32 partial per chunk, and an arrival count per output tile
        ws = torch.empty((splits, T, N), dtype=torch.float32, device=out.device)
        cnt = counts if counts is not None else torch.zeros(grid(T, N, cfg)[0], dtype=torch.int32,
                                                            device=out.device)
    else:
        ws = cnt = out
    if tma:
        assert pad % cfg["BLOCK_K"] == 0
        box = [cfg["BLOCK_M"], cfg["BLOCK_K"]]
        memo = {} if memo is None else memo
        d1 = full_desc(a1, box, memo)
        descs = (d1, full_desc(a2, box, memo) if a2 is not None else d1, _weight_desc(w1, nk, cfg, memo),
                 _weight_desc(w2 if w2 is not None else w1, nk, cfg, memo))
    else:
        descs = (a1, a1, b1, b2)
    down_kernel[grid(T, N, cfg) + (splits,)](
        a1, a2 if a2 is not None else a1, order if order is not None else sw, sw,
        b1, b2, bias if bias is not None else out, out, ws, cnt, *descs,
        T, N, inter, a1.stride(0), kc,
        b1.stride(0), b1.stride(1), b2.stride(0), b2.stride(1),
        out.stride(0), out.stride(1),
        SORTED=sorted_, DUAL=a2 is not None, HAS_BIAS=bias is not None, UPCAST=upcast_flag(out.dtype),
        PRECISION=dot_precision(out.dtype), PAD=pad, TMA=bool(tma), B_NK=nk, SPLIT=splits > 1, **cfg,
    )


def launch_wgrad(a1, a2, order, sw, cnt, src, c1, c2, db, inter, cfg, sorted_, tma=False, memo=None):
    """``C[j, n] = sum_t A[t, j] S[t, n]`` over the tokens using neuron ``j``. With ``tma``, ``src`` must already be
    in sorted order."""
    T, N = src.shape
    c2_ = c2 if c2 is not None else c1
    cfg = dict(cfg)
    epi = bool(cfg.pop("EPI_TMA", False) and tma)  # the gradient tiles by TMA stores
    c1_t = c1.stride(1) != 1  # C1 given as a transposed view (dWd): the descriptor is over the stored tensor
    if tma:
        box = [cfg["BLOCK_T"], cfg["BLOCK_J"]]
        memo = {} if memo is None else memo
        d1 = full_desc(a1, box, memo)
        descs = (d1, full_desc(a2, box, memo) if a2 is not None else d1,
                 full_desc(src, [cfg["BLOCK_T"], cfg["BLOCK_N"]], memo))
    else:
        descs = (a1, a1, src)
    if epi:
        jn, nj = [cfg["BLOCK_J"], cfg["BLOCK_N"]], [cfg["BLOCK_N"], cfg["BLOCK_J"]]
        c1s = c1.t() if c1_t else c1  # the tensor as stored
        assert c1s.stride(1) == 1 and not (c1_t and c2 is not None)
        d_c1 = full_desc(c1s, nj if c1_t else jn)
        descs += (d_c1, full_desc(c2, jn) if c2 is not None else d_c1)
    else:
        descs += (c1, c2_)
    wgrad_kernel[grid(inter, N, cfg, "BLOCK_J")](
        a1, a2 if a2 is not None else a1, order if order is not None else sw, sw,
        cnt if cnt is not None else sw, src, c1, c2_, db if db is not None else c1, *descs,
        T, N, inter, a1.stride(0),
        src.stride(0), src.stride(1), c1.stride(0), c1.stride(1), c2_.stride(0), c2_.stride(1),
        SORTED=sorted_, DUAL=c2 is not None, HAS_DB=db is not None, UPCAST=upcast_flag(src.dtype),
        PRECISION=dot_precision(src.dtype), TMA=bool(tma), EPI_TMA=epi, C1_T=epi and c1_t, **cfg,
    )


def forward(x, up_weight, down_weight, gate_weight, up_bias, down_bias, widths, act_id, training, out=None):
    """Route, up kernel, down kernel: ``(y, (x2, sorted widths, order, h, g, plan))``. ``training`` also keeps the
    pre-activations ``h``, ``g`` for :func:`backward` (else None). ``out``: a contiguous tensor of ``x``'s shape and
    dtype that ``y`` is written into (else a new one)."""
    H = x.shape[-1]
    inter = up_weight.shape[0]
    x2 = x.reshape(-1, H)
    T = x2.shape[0]
    plan = call_plan(x2, up_weight, down_weight, gate_weight)
    sms = plan.sms or sm_count(x.device)
    sw, order, src, tail_plan, counts = route(x2, widths, inter, plan, plan.tma, sms)
    # Sorted-layout intermediates [T, I rounded up to BUF_COLS]; a row tile's blocks up to its width are written
    # (zeros past each row's own width), the rest is never read.
    pad = plan.up["BLOCK_N"]
    if BUF_COLS % pad:
        raise ValueError(f"the up product's BLOCK_N must divide {BUF_COLS}, got {pad}")
    a = torch.empty((T, cdiv(inter, BUF_COLS) * BUF_COLS), dtype=x.dtype, device=x.device)
    h = torch.empty_like(a) if training else None
    g = torch.empty_like(a) if training and gate_weight is not None else None
    memo = {}  # host TMA descriptors shared by the launches
    launch_up(src, order, sw, up_weight, gate_weight, True, up_bias, h, g, a, None, None, inter, act_id, False,
              training, plan.up, plan.sorted, plan.tma, gate_weight is not None, sms, tail_plan, memo)
    y = torch.empty((T, H), dtype=x.dtype, device=x.device) if out is None else out.view(T, H)
    launch_down(a, None, order, sw, down_weight, None, True, down_bias, y, inter, plan.down, plan.sorted, pad,
                plan.tma, sms, counts, memo)
    return y.view(x.shape), (x2, sw, order, h, g, plan)


def backward(dy, x2, up_w, down_w, gate_w, up_b, sw, order, h, g, act_id, plan: Plan, x_shape, has_down_bias, need):
    """Gradients ``(dx, dup, ddown, dgate, dub, ddb)`` (None where not needed or absent) of one call, from what its
    :func:`forward` kept (``plan`` with the forward's ``tma``). ``need``: whether x, up_weight, down_weight,
    gate_weight, up_bias, down_bias need gradients."""
    srt = plan.sorted
    T, H = x2.shape
    inter = up_w.shape[0]
    dy2 = dy.reshape(-1, H)
    sms = plan.sms or sm_count(dy.device)
    # The backward's buffers are as wide as its own up kernel's N blocks need (a multiple of the forward's).
    up_cfg = up_bwd_cfg(plan)
    bn = up_cfg["BLOCK_N"]
    dh = torch.empty((T, cdiv(inter, bn) * bn), dtype=h.dtype, device=h.device)
    dg = torch.empty_like(dh) if gate_w is not None else None
    a = torch.empty_like(dh)
    tma = plan.tma_bwd and tma_ok(plan, dy2)
    # dA = dy Wd[:, :w], then the activation's derivative in the epilogue (a is recomputed there).
    src = dy2.index_select(0, order) if tma else dy2
    memo = {}  # host TMA descriptors shared by the launches
    launch_up(src, order, sw, down_w, None, False, None, h, g, a, dh, dg, inter, act_id, True, False,
              up_cfg, srt, tma, gate_w is not None, sms, memo=memo)
    dx = dup = ddown = dgate = dub = ddb = None
    if need[0]:
        dx = torch.empty((T, H), dtype=x2.dtype, device=x2.device)
        # dh and dg hold zeros up to the tile's width rounded up to the smaller of the two N blocks.
        dx_cfg = dict(plan.down, **plan.down_bwd)
        launch_down(dh, dg, order, sw, up_w, gate_w, False, None, dx, inter, dx_cfg, srt,
                    min(bn, plan.up["BLOCK_N"]), tma, sms, memo=memo)
        dx = dx.view(x_shape)
    cnt = wider_counts(sw, inter) if srt else None
    if need[2]:
        ddown = torch.empty(down_w.shape, dtype=down_w.dtype, device=down_w.device)
        # Written as dWd^T[j, n] through strides, so the token loop runs along the neuron axis; the TMA form reads
        # dy in sorted order (dA's gather).
        launch_wgrad(a, None, order, sw, cnt, src, ddown.t(), None, None, inter, plan.wgrad, srt, tma, memo)
    if need[1] or need[3] or need[4]:
        dup = torch.empty(up_w.shape, dtype=up_w.dtype, device=up_w.device)
        dgate = torch.empty(gate_w.shape, dtype=gate_w.dtype, device=gate_w.device) if gate_w is not None else None
        dub = torch.empty(inter, dtype=up_w.dtype, device=up_w.device) if up_b is not None else None
        xs = x2.index_select(0, order) if tma else x2
        launch_wgrad(dh, dg, order, sw, cnt, xs, dup, dgate, dub, inter, plan.wgrad, srt, tma, memo)
    if has_down_bias and need[5]:
        ddb = dy2.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, dup, ddown, dgate, dub, ddb
