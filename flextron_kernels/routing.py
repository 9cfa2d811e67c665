"""Width routing for ``nested_mlp``: group tokens by width on the device, with no host synchronisation.

The metadata is a descending, stable order of the widths. A row tile of the kernels is any contiguous run of
the sorted order and runs at its first (widest) row's width; see ``nested_mlp``'s module docstring for why
this needs no padding to width groups. Both functions are CUDA-graph capturable.

The order comes from one Triton launch that ranks every token by counting (``rank[t]`` = tokens wider than
``t`` plus equal-width tokens before it) and scatters it to its rank: ``torch.sort`` took 25 us for 256 tokens
on an H200 (a radix sort and two helper kernels), 15 % of the whole 256-token Llama-2-7B MLP. Above 1024 tokens
the count of each token block is split over programs (``_RANK_CHUNK``) and summed with integer atomics. The
count is quadratic in T: above ``RANK_MAX_T`` tokens the order comes from ``torch.sort`` (graph replays on an
H200, uniform mix of four widths: rank 8.7/20.8/22.9/25.0/65.6/227.6 us at 256/1024/2048/4096/8192/16384
tokens, torch.sort 34.2/35.7/36.8/40.5/72.4/79.0; benchmarks/lab/explore_routing.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRET, cdiv, use_triton


@triton.jit
def rank_count(w_ptr, t, wt, u_lo, u_hi, BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr):
    """For tokens ``t`` of widths ``wt``: how many tokens ``u`` in ``[u_lo, u_hi)`` come before each in the stable
    descending order (wider, or as wide and earlier)."""
    rank = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for u0 in range(u_lo, u_hi, BLOCK_U):
        u = u0 + tl.arange(0, BLOCK_U)
        wu = tl.load(w_ptr + u, mask=u < u_hi, other=0)
        u_in = (u < u_hi)[None, :]
        before = (wu[None, :] > wt[:, None]) | ((wu[None, :] == wt[:, None]) & (u[None, :] < t[:, None]))
        rank += tl.sum((before & u_in).to(tl.int32), axis=1)
    return rank


@triton.jit
def _rank_kernel(w_ptr, sw_ptr, order_ptr, rank_ptr, cnt_ptr, T, U_CHUNK,
                 SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr):
    """Rank of every token of a ``BLOCK_T`` block, counted over the tokens ``u`` of chunk ``program_id(1)``.
    With SPLIT the chunks' counts meet in ``rank_ptr`` (integer atomics: the sum is exact in any order), and the
    block's last chunk to arrive scatters its tokens to their ranks."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_in = t < T
    wt = tl.load(w_ptr + t, mask=t_in, other=0)
    u_lo = tl.program_id(1) * U_CHUNK
    rank = rank_count(w_ptr, t, wt, u_lo, tl.minimum(u_lo + U_CHUNK, T), BLOCK_T, BLOCK_U)
    last = True
    if SPLIT:
        tl.atomic_add(rank_ptr + t, rank, mask=t_in, sem="relaxed", scope="gpu")
        # acq_rel: every chunk's counts are visible to the chunk that counts in last.
        arrived = tl.atomic_add(cnt_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
        last = arrived == tl.num_programs(1) - 1
        if last:
            rank = tl.load(rank_ptr + t, mask=t_in, other=0, cache_modifier=".cg")
    if last:
        tl.store(order_ptr + rank, t.to(order_ptr.dtype.element_ty), mask=t_in)
        tl.store(sw_ptr + rank, wt, mask=t_in)


# One program counts over at most this many tokens; above, the count is split over programs (the whole row of
# a block in one program took 124-135 us at 8192 tokens on an H200: latency-bound, T/128 serial steps).
_RANK_CHUNK = 64 if INTERPRET else 1024
# Above this many tokens, torch.sort (a radix sort: linear in T) beats the count (see the module docstring).
RANK_MAX_T = 8192


def nested_mlp_routing(widths: torch.Tensor, sort: bool = True, *, sort_above: int = RANK_MAX_T):
    """``(sorted_widths, order)``: widths sorted descending (stable) and the token ids in that order (int64),
    on the device.

    ``order`` is ``None`` when ``sort`` is False (the identity). A row tile of the kernels is a contiguous
    run of this order and runs at the largest width among its rows. No host synchronisation. Above
    ``sort_above`` tokens the order comes from ``torch.sort`` rather than the rank count.
    """
    w = widths.reshape(-1)
    if not sort:
        return w, None
    T = w.numel()
    if not use_triton(w) or T == 0 or T > sort_above:
        sw, order = torch.sort(w, descending=True, stable=True)
        return sw, order
    w = w.contiguous()
    sw = torch.empty_like(w)
    order = torch.empty(T, dtype=torch.int64, device=w.device)
    block_t, block_u = (32, 32) if INTERPRET else (64, 128)
    chunks = cdiv(T, _RANK_CHUNK)
    if chunks > 1:  # rank counts, then one arrival count per token block (zeroed together: one memset)
        scratch = torch.zeros(T + cdiv(T, block_t), dtype=torch.int32, device=w.device)
        rank, cnt = scratch[:T], scratch[T:]
    else:
        rank = cnt = sw
    _rank_kernel[(cdiv(T, block_t), chunks)](w, sw, order, rank, cnt, T, _RANK_CHUNK, SPLIT=chunks > 1,
                                                    BLOCK_T=block_t, BLOCK_U=block_u, num_warps=4)
    return sw, order


def wider_counts(sorted_widths: torch.Tensor, inter: int) -> torch.Tensor:
    """``cnt[j]`` = number of tokens with width > j (a prefix of the descending order), for j < I."""
    neg = -sorted_widths.to(torch.int64)
    j = -torch.arange(inter, device=neg.device, dtype=torch.int64)
    return torch.searchsorted(neg, j)
