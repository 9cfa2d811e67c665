"""Width routing for ``nested_mlp``: group tokens by width on the device, with no host synchronisation.

The metadata is a descending sort of the widths. A row tile of the kernels is any contiguous run of the
sorted order and runs at its first (widest) row's width; see ``nested_mlp``'s module docstring for why
this needs no padding to width groups. Both functions are CUDA-graph capturable.
"""

from __future__ import annotations

import torch


def nested_mlp_routing(widths: torch.Tensor, sort: bool = True):
    """``(sorted_widths, order)``: widths sorted descending and the token ids in that order, on the device.

    ``order`` is ``None`` when ``sort`` is False (the identity). A row tile of the kernels is a contiguous
    run of this order and runs at the largest width among its rows. No host synchronisation.
    """
    w = widths.reshape(-1)
    if not sort:
        return w, None
    return torch.sort(w, descending=True)


def wider_counts(sorted_widths: torch.Tensor, inter: int) -> torch.Tensor:
    """``cnt[j]`` = number of tokens with width > j (a prefix of the descending order), for j < I."""
    neg = -sorted_widths.to(torch.int64)
    j = -torch.arange(inter, device=neg.device, dtype=torch.int64)
    return torch.searchsorted(neg, j)
