"""Elastic building blocks that keep the ``nn.Linear`` contract."""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from flextron_kernels import sliced_linear
from flextron_kernels.sliced_linear import blas_serves

# Per-request budgets on a prompt: each run of adjacent sequences that share a budget projects at its own width (the
# attention's heads, the MLP's neurons) when every run has at least RUN_MIN_TOKENS tokens and there are at most
# MAX_RUNS runs; FLEXTRON_BUDGET_RUNS=0 in the environment keeps every prompt in one batch.
RUNS_ENABLED = os.environ.get("FLEXTRON_BUDGET_RUNS", "1") != "0"
RUN_MIN_TOKENS = 1024
MAX_RUNS = 8


def serves_runs(runs: list[tuple[int, int, int]] | None, x: torch.Tensor) -> bool:
    """Whether ``x [B, S, ...]`` runs run by run: ``runs`` (``(first, end, value)``, covering the batch) is short
    enough and each run long enough that its products are large ones. There the batch at its widest member would
    spend the FLOPs the narrower sequences drop; one token per sequence (decode) reads the weights once per run
    instead, so it keeps the one batch."""
    if not RUNS_ENABLED or runs is None or x.dim() != 3 or len(runs) > MAX_RUNS or runs[-1][1] != x.shape[0]:
        return False
    return min(end - first for first, end, _ in runs) * x.shape[1] >= RUN_MIN_TOKENS


def run_by_run(x: torch.Tensor, runs: list[tuple[int, int, int]], width: int, fn) -> torch.Tensor:
    """The output ``[B, ..., width]`` of a batch served run by run (:func:`serves_runs`): ``fn(first, end, value,
    out)`` gives each run's. Where nothing records autograd (and no autocast or compilation), each run writes into
    its rows of one buffer (``out``, which :func:`prefix_linear` fills in place): no concatenation, one read and write
    of the output fewer; otherwise (``out=None``) the runs' outputs are concatenated."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return torch.cat([fn(first, end, value, None) for first, end, value in runs])
    y = x.new_empty(*x.shape[:-1], width)
    for first, end, value in runs:
        out = y[first:end]
        r = fn(first, end, value, out)
        if r.data_ptr() != out.data_ptr():  # a run's output made elsewhere (a dropout in training mode)
            out.copy_(r)
    return y


# Per-request budgets on a call of at most DECODE_MAX_TOKENS tokens (decode steps), FLEXTRON_BUDGET_DECODE:
# - kernels: the grouped kernels (``nested_mlp``, ``elastic_attention_decode``), which skip each sequence's neurons and
#   heads past its budget;
# - masked: what the batch's widest budget runs (cuBLAS prefix products, SDPA on the kept heads), each sequence's
#   neurons and heads past its own zeroed: the same weight traffic (at this size the grouped kernel also streams the
#   weights up to the widest width once), every kept head's KV cache read, the least host time;
# - eager (the default): the attention masked in eager calls whose cache holds fewer than MASKED_MAX_CACHE keys over
#   all sequences and KV heads, where the decode kernel's Triton launches cost more host time than the cache
#   reads they skip (on an H100 the kernel, with two launches per call, ran 0.42-1.01x SDPA on all heads, eager,
#   up to 2^18 such keys, and 1.41-1.58x from 2^20); the MLP through ``nested_mlp`` (its eager calls replay a
#   cached CUDA graph); the kernels under CUDA graph capture and torch.compile, where host time is not paid per call.
DECODE_POLICIES = ("eager", "kernels", "masked")
BUDGET_DECODE = os.environ.get("FLEXTRON_BUDGET_DECODE", "eager")
if BUDGET_DECODE not in DECODE_POLICIES:
    raise ValueError(f"FLEXTRON_BUDGET_DECODE must be one of {DECODE_POLICIES}, got {BUDGET_DECODE!r}")
DECODE_MAX_TOKENS = 64
MASKED_MAX_CACHE = 1 << 20


def masked_decode(x: torch.Tensor, attention: bool, cache_keys: int = 0) -> bool:
    """Whether per-request budgets on ``x [..., H]`` run masked in the attention (``attention``; ``cache_keys``: the
    keys it reads over all sequences and KV heads) or the MLP block: a call of at most :data:`DECODE_MAX_TOKENS`
    tokens under the :data:`BUDGET_DECODE` policy ``masked``, or under ``eager`` the attention of one with fewer
    than :data:`MASKED_MAX_CACHE` cache keys, outside graph capture and compilation."""
    if BUDGET_DECODE == "kernels" or x.numel() > DECODE_MAX_TOKENS * x.shape[-1]:
        return False
    if BUDGET_DECODE == "masked":
        return True
    return attention and cache_keys < MASKED_MAX_CACHE and not (
        torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()))


def per_sequence(owner, slot: str, b: torch.Tensor, key: tuple, make):
    """``make()``, kept in ``owner.<slot>`` for the per-sequence tensor ``b`` (and its in-place version) and ``key``,
    so a decode loop makes it once per call, not at every step; made afresh while compiling or capturing (no graph
    may hold a stale one) and for inference-mode tensors (they have no version counter)."""
    keep = not (torch.compiler.is_compiling() or b.is_inference()
                or (b.is_cuda and torch.cuda.is_current_stream_capturing()))
    if keep:
        key = (b._version, *key)
        memo = getattr(owner, slot)
        if memo is not None and memo[0] is b and memo[1] == key:
            return memo[2]
    out = make()
    if keep:
        setattr(owner, slot, (b, key, out))
    return out


# Prefix views made outside autograd, per weight: {id(weight): (weakref, data_ptr, {(n, k, bias ptr): views})}. An
# entry goes with its weight (the weakref's callback) and is remade when the weight's storage changes (``.to()``).
_VIEWS: dict[int, tuple[weakref.ref, int, dict]] = {}


def _prefix_views(weight: torch.Tensor, bias: torch.Tensor | None, n: int, k: int):
    # Views that carry gradients are made under autograd, each call; torch.compile traces plain slices (the cache's
    # weakrefs and ids would break its graph at every projection).
    # A weight that is itself a view made per call (GPT-2's transposed Conv1D weights) has nothing to cache.
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or weight._base is not None:
        return weight[:n, :k], None if bias is None else bias[:n]
    key = id(weight)
    entry = _VIEWS.get(key)
    ptr = weight.data_ptr()
    if entry is None or entry[0]() is not weight or entry[1] != ptr:
        entry = _VIEWS[key] = (weakref.ref(weight, lambda _, key=key: _VIEWS.pop(key, None)), ptr, {})
    views = entry[2].get((n, k, 0 if bias is None else bias.data_ptr()))
    if views is None:  # views of detached aliases: a view of the weight itself would keep the weight object alive
        views = entry[2][(n, k, 0 if bias is None else bias.data_ptr())] = (
            weight.detach()[:n, :k], None if bias is None else bias.detach()[:n])
    return views


def prefix_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight[:n, :k].T + bias[:n]`` (``k = x.shape[-1]``) for the elastic blocks, whose shapes are right by
    construction: ``F.linear`` on the prefix views where cuBLAS takes them in place (a GPU), with no checks and,
    outside autograd, the views made once per sub-network (the least host time per call, which is what an eager
    decode step costs); :func:`sliced_linear` otherwise. ``out`` (contiguous, ``[..., n]``, outside autograd and
    autocast; :func:`run_by_run`): the product is written there and ``out`` returned."""
    if blas_serves(x):
        k = x.shape[-1]
        if n != weight.shape[0] or k != weight.shape[1]:
            weight, bias = _prefix_views(weight, bias, n, k)
        if out is None:
            return F.linear(x, weight, bias)
        x2, o2 = x.reshape(-1, k), out.view(-1, n)
        if bias is None:
            torch.mm(x2, weight.t(), out=o2)
        else:
            torch.addmm(bias, x2, weight.t(), out=o2)
        return out
    y = sliced_linear(x, weight, bias, n)
    return y if out is None else out.copy_(y)


class ElasticLinear(nn.Linear):
    """A drop-in ``nn.Linear`` whose active input and output widths can be changed at run time.

    The state dict is exactly ``nn.Linear``'s. With ``in_width = k`` and ``out_width = n`` the layer computes
    ``x[..., :k] @ weight[:n, :k].T + bias[:n]`` through :func:`flextron_kernels.sliced_linear`, reading the
    weight prefix in place. ``x`` may already be ``k`` wide (the usual case inside a sub-network) or full width,
    in which case its first ``k`` features are used (a view, not a copy).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.in_width = in_features
        self.out_width = out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> ElasticLinear:
        """Wrap an existing ``nn.Linear``, sharing its parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.in_width, new.out_width = linear.in_features, linear.out_features
        return new

    def set_width(self, in_width: int | None = None, out_width: int | None = None) -> None:
        """Set the active widths; ``None`` restores the full width on that side."""
        self.in_width = self._checked("in_width", in_width, self.in_features)
        self.out_width = self._checked("out_width", out_width, self.out_features)

    @staticmethod
    def _checked(name: str, value, full: int) -> int:
        if value is None:
            return full
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int in [1, {full}] or None, got {type(value).__name__}")
        if not 1 <= value <= full:
            raise ValueError(f"{name} must be in [1, {full}], got {value}")
        return value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_width
        if x.shape[-1] != k:
            if x.shape[-1] != self.in_features:
                raise ValueError(
                    f"x.shape[-1] must be the active in_width {k} or in_features {self.in_features}, got {x.shape[-1]}"
                )
            x = x[..., :k]
        return sliced_linear(x, self.weight, self.bias, self.out_width)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in_width={self.in_width}, out_width={self.out_width}"
