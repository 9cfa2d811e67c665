"""nested_mlp's launch plan: the tile configs chosen per token count, dtype and device, and the rules they obey.

Fixed heuristics, not autotuning: every new (T, I, H) would otherwise re-tune, and a decode loop sees a new T often.
The figures behind each choice are graph-timed sweeps of the Llama-2-7B / Llama-3-8B / ~1B MLPs on an H200 or H100
(``benchmarks/results/nested_mlp_explore_*.json``; ``benchmarks/lab/explore_nested_mlp.py`` reruns them), and
ptxas reports for sm_90 (``benchmarks/lab/kernel_regs.py``).

Tests and benchmarks run other plans through :func:`override`, never by patching this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator

import torch

from .._runtime import INTERPRET, cdiv

# Up to this many tokens the batch is one unsorted row tile: at decode one tile streams the weight prefix once.
_UNSORTED_MAX_T = {False: 64, True: 16}  # by interpreting
UNSORTED_MAX_T: int = _UNSORTED_MAX_T[INTERPRET]
# Up to this many tokens a sorted batch's routing is one launch (route_kernel counts over every token per program).
ROUTE_MAX_T = 1024
# The forward's buffers have I rounded up to this: a multiple of every up N block, so torch.compile's fake tensors
# get their shape from I alone.
BUF_COLS = 256


@dataclasses.dataclass(frozen=True)
class Plan:
    """One call's launch plan. Each tile config is the launch's keyword arguments (``BLOCK_*``, ``GROUP_M``,
    ``num_warps``, ``num_stages``) plus the launcher's own keys:

    - ``up``: ``TAIL`` (parts per N block of the tail split, 1/2/4/8), ``TAIL_ROUNDS`` (waves of tail programs),
      ``TAIL_CFG`` (the tail launch's changes), ``EPI_TMA`` (buffer tiles by TMA; default on);
    - ``up_bwd`` / ``down_bwd``: changes to ``up`` / ``down`` for the backward's dA / dx; ``EPI_SPLIT`` (2: dA's
      epilogue in two N halves);
    - ``down``: ``SPLIT_K`` (K chunks, or ``"fill"``: as many as fill one wave, 1 to 4);
    - ``wgrad``: ``EPI_TMA`` (gradient tiles stored by TMA; default off);
    - ``route``: ``BLOCK_T``/``BLOCK_U``/``BLOCK_H`` (tokens ranked per program / counted per step / columns per
      gather step), ``PER_SM`` (gather programs per SM, default 2).
    """

    sorted: bool  # tokens sorted by width into row tiles (else one unsorted tile)
    tma: bool  # the up and down products by TMA where tma_ok allows (the forward's decision, once made)
    tma_bwd: bool  # the backward too
    fused_route: bool  # rank, gather, tail plan and counts in one launch up to ROUTE_MAX_T tokens
    route: dict
    up: dict
    up_bwd: dict
    down: dict
    down_bwd: dict
    wgrad: dict
    sms: int = 0  # programs per wave (tail split, SPLIT_K="fill"); 0: the device's SM count

    def replace(self, **changes) -> Plan:
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=4096)
def build(T: int, dtype: torch.dtype, interpret: bool = INTERPRET) -> Plan:
    """The plan for ``T`` tokens of ``dtype``: the interpreter's (big blocks, few programs) or the GPU's.
    Cached (host time is the cost of a decode step); the configs are shared, so copy before changing them."""
    small = T <= _UNSORTED_MAX_T[interpret]
    if interpret:
        bm = 16 if small else 32
        up = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, GROUP_M=4)
        return Plan(sorted=not small, tma=not small, tma_bwd=not small, fused_route=True,
                    route=dict(BLOCK_T=32, BLOCK_U=32, BLOCK_H=64, num_warps=4), up=up, up_bwd={}, down=dict(up),
                    down_bwd={}, wgrad=dict(BLOCK_J=64, BLOCK_N=64, BLOCK_T=bm, GROUP_M=4))
    # fp32 tiles take twice the shared memory per stage: halve the K step instead of the stages.
    kdiv = 2 if dtype == torch.float32 else 1
    if small:
        bm = max(16, 1 << (T - 1).bit_length())
        # Decode streams the weights: narrow N tiles give every SM programs, long K tiles amortise the loop.
        up = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=128 // kdiv, GROUP_M=1, num_warps=4, num_stages=3)
        down = dict(BLOCK_M=bm, BLOCK_N=32, BLOCK_K=256 // kdiv, GROUP_M=1, num_warps=4, num_stages=3)
        wgrad = dict(BLOCK_J=64, BLOCK_N=64, BLOCK_T=bm, GROUP_M=8, num_warps=4, num_stages=2)
    elif T <= 1024:
        # Few row tiles for the SMs. Up to 384 tokens 64x256 up tiles and two K chunks of the down product
        # (256 tokens: 0.126 ms against 0.152); above, 128-row up tiles over 64-row down tiles, unsplit.
        few = T <= 384
        up = dict(BLOCK_M=64 if few else 128, BLOCK_N=256 // kdiv if few else 128, BLOCK_K=64 // kdiv, GROUP_M=8,
                  num_warps=8, num_stages=3 if few or kdiv == 2 else 4)  # fp32: halved tiles, fewer stages
        if few:
            # The last partial wave of up tiles cut along N into quarters in a second launch: 0.165 -> 0.150 ms on
            # Llama-2-7B all-full at 256 tokens (the SMs were busy 61% of the time without it).
            up.update(TAIL=4, TAIL_ROUNDS=2, TAIL_CFG={"num_warps": 4, "num_stages": 4})
        down = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64 // kdiv, GROUP_M=8, num_warps=4, num_stages=4,
                    SPLIT_K=2 if few else 1)
        if T <= 256:
            # Latency-bound K loops want more bytes in flight: 64x128 up tiles in 5 stages, the down product in 8
            # stages with K chunks filling one wave (0.77-0.96x the forward time above; not at 384 tokens).
            up = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64 // kdiv, GROUP_M=8, num_warps=4, num_stages=5)
            down.update(num_stages=8, SPLIT_K="fill")
            if T > 128 and kdiv == 1:
                # 128x64 up tiles: less L2 traffic per K step for the same tiles, 0.96-0.98x all-full at 256 tokens
                # (results/nested_mlp_explore_NVIDIA_H100_80GB_HBM3.json); not at 128 tokens.
                up = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=6)
        if few:
            # Token steps of 32 (no register spills) and 64-neuron blocks in 4 warps stored by TMA: 0.91-0.93x the
            # forward+backward time of 128x128 in 8 warps at 256 tokens; 0.99-1.04x at 1024, so not there.
            wgrad = dict(BLOCK_J=64, BLOCK_N=128, BLOCK_T=32 // kdiv, GROUP_M=8, num_warps=4, num_stages=3,
                         EPI_TMA=True)
        else:
            wgrad = dict(BLOCK_J=128, BLOCK_N=128, BLOCK_T=64 // kdiv, GROUP_M=8, num_warps=8, num_stages=3)
    else:
        # Prefill: wgmma-sized tiles; GROUP_M row tiles share each band of weight tiles through L2.
        up = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 // kdiv, GROUP_M=8, num_warps=8, num_stages=3)
        down = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64 // kdiv, GROUP_M=8, num_warps=8, num_stages=3)
        wgrad = dict(BLOCK_J=128, BLOCK_N=128, BLOCK_T=64 // kdiv, GROUP_M=8, num_warps=8, num_stages=3)
    # dA's epilogue is half its time at prefill: a fourth stage (1.31 -> 1.03 ms at 8192 tokens), and two N halves
    # (ptxas: 255 registers and spills whole, ~190 and none in halves).
    up_bwd = {} if small else {"num_stages": 4, "EPI_SPLIT": 2}
    down_bwd = {}
    if not small and T <= 256:
        # dx unsplit in 4 stages (the split-K fixup spilled; two operands a stage would not fit 8) and dA in 64x128
        # tiles: 0.967-0.978x forward+backward at 256 tokens; 1.00-1.05x at 384, so not there.
        down_bwd = {"SPLIT_K": 1, "num_stages": 4}
        up_bwd.update(BLOCK_M=64, BLOCK_N=128 // kdiv, num_warps=4)
    # The kernels share row tiles (the up kernel writes a tile's buffer blocks), and a weight-gradient neuron block
    # lies inside one up N block.
    assert up["BLOCK_M"] % down["BLOCK_M"] == 0 and up["BLOCK_N"] % wgrad["BLOCK_J"] == 0
    # TMA tiles wherever the batch is sorted, backward too (1.15-1.37x the pointer tiles' speed); the routing in one
    # launch (0.95-0.98x the three launches' time at 256-1024 tokens).
    # Routing: 16 tokens a program in 8 warps counting all T in one step (no spills up to 1024 tokens).
    route = dict(BLOCK_T=16, BLOCK_U=min(1024, max(16, pow2(T))), BLOCK_H=128, num_warps=8)
    return Plan(sorted=not small, tma=not small, tma_bwd=not small, fused_route=True, route=route, up=up,
                up_bwd=up_bwd, down=down, down_bwd=down_bwd, wgrad=wgrad)


_overrides: list[Callable[[Plan], Plan]] = []


@contextlib.contextmanager
def override(change: Callable[[Plan], Plan]) -> Iterator[None]:
    """Inside the block every nested_mlp call (forward and backward) runs on ``change(plan)`` in place of the plan
    :func:`build` chooses, e.g. ``override(lambda p: p.replace(tma=False))`` for the pointer tiles. Blocks nest
    (the inner change applies to the outer one's result). For tests, benchmarks and plan sweeps."""
    _overrides.append(change)
    try:
        yield
    finally:
        _overrides.remove(change)


def overridden() -> bool:
    """Whether an :func:`override` block is active."""
    return bool(_overrides)


def plan_for(T: int, dtype: torch.dtype) -> Plan:
    """The plan a call of ``T`` tokens of ``dtype`` runs: :func:`build`'s, with any :func:`override` applied."""
    plan = build(T, dtype)
    for change in _overrides:
        plan = change(plan)
    return plan


def up_bwd_cfg(plan: Plan) -> dict:
    """The backward's up kernel config: the forward's with the plan's ``up_bwd`` changes. Its N blocks may be a
    multiple of the forward's (its epilogue masks each row to its width) or a divisor (a block below a tile's width
    lies in a forward block the forward wrote whole); its row tiles at most the forward's (both powers of two), so
    the blocks it reads were written. The weight gradients read its buffers in BLOCK_J blocks inside its N blocks,
    and dx (``down`` with ``down_bwd``) in row tiles inside its own."""
    cfg = dict(plan.up, **plan.up_bwd)
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], plan.up["BLOCK_M"])
    bn, fwd = cfg["BLOCK_N"], plan.up["BLOCK_N"]
    assert plan.up["BLOCK_M"] % cfg["BLOCK_M"] == 0 and (bn % fwd == 0 or fwd % bn == 0)
    assert bn % plan.wgrad["BLOCK_J"] == 0
    assert cfg["BLOCK_M"] % dict(plan.down, **plan.down_bwd)["BLOCK_M"] == 0
    return cfg


def grid(rows: int, cols: int, cfg: dict, bm: str = "BLOCK_M") -> tuple[int]:
    return (cdiv(rows, cfg[bm]) * cdiv(cols, cfg["BLOCK_N"]),)


def pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def tail_parts(parts: int) -> int:
    if parts not in (0, 1, 2, 4, 8):
        raise ValueError(f"TAIL (the up product's tail split: parts per N block) must be 0, 1, 2, 4 or 8, got {parts}")
    return max(parts, 1)


def tail_n_pow2(inter: int, block_n: int) -> int:
    """The tail plan's column vector length: a power of two above the up product's N block count."""
    return max(16, pow2(cdiv(inter, block_n) + 1))


def down_block_k(cfg: dict, pad: int, tma) -> int:
    """The down product's K step: in the TMA form no longer than the pad (whole steps read only the zeros the up
    kernel wrote past a tile's width; the pointer form masks at the pad instead)."""
    return min(cfg["BLOCK_K"], pad) if tma else cfg["BLOCK_K"]


def down_splits(T: int, N: int, cfg: dict, sms: int) -> int:
    """The down product's K chunks asked for: the config's ``SPLIT_K``, where ``"fill"`` means as many as keep one
    program per SM in one wave of ``sms`` (the SM count over the output tiles, 1 to 4)."""
    splits = cfg.get("SPLIT_K", 1)
    if splits == "fill":
        return max(1, min(4, sms // grid(T, N, cfg)[0]))
    if not (isinstance(splits, int) and splits >= 1):
        raise ValueError(f'SPLIT_K (the down product\'s K chunks) must be a positive int or "fill", got {splits!r}')
    return splits


def down_counts(T: int, N: int, inter: int, cfg: dict, pad: int, tma, sms: int) -> int:
    """How many split-K arrival counts the down launch needs (0: not split), as launch_down works them out."""
    splits = down_splits(T, N, cfg, sms)
    bk = down_block_k(cfg, pad, tma)
    kc = cdiv(cdiv(cdiv(inter, pad) * pad, splits), bk) * bk
    return grid(T, N, cfg)[0] if cdiv(cdiv(inter, pad) * pad, kc) > 1 else 0
