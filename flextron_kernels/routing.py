"""Width routing for ``nested_mlp``: group tokens by width on the device, with no host synchronisation.

The metadata is a descending, stable order of the widths. A row tile of the kernels is any contiguous run of
the sorted order and runs at its first (widest) row's width; see ``nested_mlp``'s module docstring for why
this needs no padding to width groups. Both functions are CUDA-graph capturable.

The order comes from one Triton launch that ranks every token by counting (``rank[t]`` = tokens wider than
``t`` plus equal-width tokens before it) and scatters it to its rank: ``torch.sort`` took 25 us for 256 tokens
on an H200 (a radix sort and two helper kernels), 15 % of the whole 256-token Llama-2-7B MLP.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRET, use_triton


@triton.jit
def _rank_kernel(w_ptr, sw_ptr, order_ptr, T, BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_in = t < T
    wt = tl.load(w_ptr + t, mask=t_in, other=0)
    rank = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for u0 in range(0, T, BLOCK_U):
        u = u0 + tl.arange(0, BLOCK_U)
        wu = tl.load(w_ptr + u, mask=u < T, other=0)
        u_in = (u < T)[None, :]
        before = (wu[None, :] > wt[:, None]) | ((wu[None, :] == wt[:, None]) & (u[None, :] < t[:, None]))
        rank += tl.sum((before & u_in).to(tl.int32), axis=1)
    tl.store(order_ptr + rank, t.to(order_ptr.dtype.element_ty), mask=t_in)
    tl.store(sw_ptr + rank, wt, mask=t_in)


def nested_mlp_routing(widths: torch.Tensor, sort: bool = True):
    """``(sorted_widths, order)``: widths sorted descending (stable) and the token ids in that order (int64),
    on the device.

    ``order`` is ``None`` when ``sort`` is False (the identity). A row tile of the kernels is a contiguous
    run of this order and runs at the largest width among its rows. No host synchronisation.
    """
    w = widths.reshape(-1)
    if not sort:
        return w, None
    T = w.numel()
    if not use_triton(w) or T == 0:
        return torch.sort(w, descending=True, stable=True)
    w = w.contiguous()
    sw = torch.empty_like(w)
    order = torch.empty(T, dtype=torch.int64, device=w.device)
    block_t, block_u = (32, 32) if INTERPRET else (64, 128)
    _rank_kernel[(triton.cdiv(T, block_t),)](w, sw, order, T, BLOCK_T=block_t, BLOCK_U=block_u, num_warps=4)
    return sw, order


def wider_counts(sorted_widths: torch.Tensor, inter: int) -> torch.Tensor:
    """``cnt[j]`` = number of tokens with width > j (a prefix of the descending order), for j < I."""
    neg = -sorted_widths.to(torch.int64)
    j = -torch.arange(inter, device=neg.device, dtype=torch.int64)
    return torch.searchsorted(neg, j)
