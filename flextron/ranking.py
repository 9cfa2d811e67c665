"""Activation-based importance of neurons and heads, and the function-preserving permutation it implies.

Scores (forward only, full model, calibration batches):

- MLP neuron ``i``: mean over tokens of ``|a_i|``, ``a`` the intermediate activation (after the gate product for
  SwiGLU: ``act(x Wg^T) * (x Wu^T)``; ``act(x Wfc + b)`` for GPT-2). This is Flextron/Minitron's ``|X W1_i^T|``.
- Attention head ``h``: mean over tokens of ``||o_h||_2``, ``o_h`` the head's attention output (the o-projection's
  input block). Under GQA a KV group's score is the sum of its query heads' scores; groups are ranked, and the
  query heads inside a group are ordered by their own scores.

Then one permutation per layer sorts neurons and (groups of) heads by descending score, so every prefix is the
most important one. Permuting hidden neurons, or whole heads together with their KV heads, reorders terms of a sum
and so preserves the function; rows inside a head are never moved, so RoPE is unaffected.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from .model import FlextronModel, implements


def _run(fm: FlextronModel, batch) -> None:
    if isinstance(batch, torch.Tensor):
        fm(input_ids=batch)
    elif isinstance(batch, dict):
        fm(**batch)
    else:
        raise TypeError(f"batches must yield input_ids tensors or dicts of model inputs, got {type(batch).__name__}")


@torch.no_grad()
def importance(fm: FlextronModel, batches: Iterable, *, progress: bool = False) -> dict:
    """Per-layer scores ``{"mlp": [[I_l]], "heads": [[H_l]]}`` (float32, current order) on the full model.

    ``batches`` yields ``input_ids`` tensors ``[B, S]`` or dicts of model inputs. Every position counts
    (padding included: pass unpadded windows).
    """
    blocks = fm.mlp_blocks + fm.attention_blocks
    previous = fm.subnet
    was_training = fm.training
    fm.set_subnet(None)
    fm.eval()
    for b in blocks:
        b.stats = {}
    try:
        for batch in tqdm(batches, desc="ranking", disable=not progress, leave=False):
            _run(fm, batch)
        if not blocks[0].stats:
            raise ValueError("batches must contain at least one batch")
        means = [b.stats["sum"] / b.stats["count"] for b in blocks]
    finally:
        for b in blocks:
            b.stats = None
        fm.set_subnet(previous)
        fm.train(was_training)
    n = fm.num_layers
    return {"mlp": [m.cpu() for m in means[:n]], "heads": [h.cpu() for h in means[n:]]}


def order_from_scores(scores: dict, group_sizes: list[int]) -> dict:
    """Per-layer permutations sorting neurons, and KV groups of heads, by descending score (stable on ties)."""
    mlp = [torch.argsort(s, descending=True, stable=True) for s in scores["mlp"]]
    heads = []
    for s, g in zip(scores["heads"], group_sizes):
        groups = s.view(-1, g)
        group_order = torch.argsort(groups.sum(1), descending=True, stable=True)
        inner = torch.argsort(groups, dim=1, descending=True, stable=True)  # query heads inside each group
        heads.append((group_order[:, None] * g + inner[group_order]).reshape(-1))
    return {"mlp": mlp, "heads": heads}


def _check_perm(name: str, p, n: int) -> torch.Tensor:
    if not isinstance(p, torch.Tensor) or p.dtype not in (torch.int64, torch.int32) or p.dim() != 1:
        raise TypeError(f"{name} must be a 1-D integer tensor")
    if p.numel() != n or not torch.equal(torch.sort(p.cpu()).values, torch.arange(n)):
        raise ValueError(f"{name} must be a permutation of range({n})")
    return p.long().cpu()


@implements("permute")
@torch.no_grad()
def permute(fm: FlextronModel, mlp: list[torch.Tensor] | None = None, heads: list[torch.Tensor] | None = None) -> None:
    """Reorder each layer's neurons (``mlp[l]``) and query heads (``heads[l]``) in place: new ``j`` = old ``p[j]``.

    Head permutations must move each KV group's query heads together (they may reorder them inside the group).
    The full model computes the same function afterwards. ``fm.permutation`` and ``fm.importance`` follow.
    """
    n = fm.num_layers
    for name, perms in (("mlp", mlp), ("heads", heads)):
        if perms is not None and len(perms) != n:
            raise ValueError(f"{name} must have {n} permutations (one per layer), got {len(perms)}")
    if mlp is not None:
        for i, (m, p) in enumerate(zip(fm.mlp_blocks, mlp)):
            p = _check_perm(f"mlp[{i}]", p, m.full_width)
            m.permute_(p.to(m.up_weight().device))
            fm.permutation["mlp"][i] = fm.permutation["mlp"][i][p]
            if fm.importance is not None:
                fm.importance["mlp"][i] = fm.importance["mlp"][i][p]
    if heads is not None:
        for i, (a, p) in enumerate(zip(fm.attention_blocks, heads)):
            p = _check_perm(f"heads[{i}]", p, a.num_heads)
            g = a.group_size
            rows = p.view(-1, g) // g
            if not bool((rows == rows[:, :1]).all()):
                raise ValueError(f"heads[{i}] splits a KV group: the {g} query heads of each group must stay together")
            a.permute_(p.to(a.out_weight().device))
            fm.permutation["heads"][i] = fm.permutation["heads"][i][p]
            if fm.importance is not None:
                fm.importance["heads"][i] = fm.importance["heads"][i][p]


@implements("rank")
def rank(fm: FlextronModel, batches: Iterable, *, progress: bool = False) -> dict:
    """Score on ``batches``, then permute so every prefix is the most important; returns the permutations applied.

    The scores are kept on ``fm.importance`` (in the new order), the cumulative permutation on ``fm.permutation``.
    Calling it again re-ranks on the current weights and composes the permutations.
    """
    scores = importance(fm, batches, progress=progress)
    order = order_from_scores(scores, [a.group_size for a in fm.attention_blocks])
    fm.importance = None
    permute(fm, mlp=order["mlp"], heads=order["heads"])
    fm.importance = {k: [s[p] for s, p in zip(scores[k], order[k])] for k in ("mlp", "heads")}
    return order


def random_order(fm: FlextronModel, generator: torch.Generator | None = None) -> dict:
    """Random per-layer permutations (whole KV groups for heads): the baseline ranking is compared with."""
    mlp = [torch.randperm(m.full_width, generator=generator) for m in fm.mlp_blocks]
    heads = []
    for a in fm.attention_blocks:
        g = a.group_size
        groups = torch.randperm(a.num_kv_heads, generator=generator)
        heads.append((groups[:, None] * g + torch.arange(g)[None, :]).reshape(-1))
    return {"mlp": mlp, "heads": heads}
