"""Deployment of latency budgets: ``set_budget`` (static, input-adaptive, guaranteed), and routers and latency table
saved with the model.

The routers and the table live on the model as ``fm.routing`` (a plain :class:`Routing`, not a submodule: the
model's state dict and parameter list stay the HF model's).

- ``set_budget(fm, target)``: the static router's argmax subnet for ``target`` becomes active (read through the
  table when one is attached, see :func:`static_subnet`).
- ``set_budget(fm, target, adaptive=True)``: the dynamic router picks each token's MLP width (forward pre-hooks
  pass the widths to ``ElasticMLP.forward``, which runs ``nested_mlp``) and each sequence's head count (decided on
  the prompt, kept for every later one-token step of the same batch, so the KV cache stays valid).
- ``guarantee=True``: the chosen subnet's *predicted* latency never exceeds ``target`` times the full model's. The
  router's choice is projected onto the table by giving up, one step at a time, the width whose next-smaller choice
  loses the least importance (``fm.importance``: the ranking scores, normalised per layer and axis) per millisecond
  saved, until the prediction fits. Adaptive + guarantee caps every layer at the projection of the full model, so
  no token or sequence can exceed it. No subnet fits: ``ValueError`` naming the smallest reachable latency.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .latency import LatencyTable, check_table
from .model import FlextronModel, implements
from .router import ANCHORS, DynamicRouter, StaticRouter, build_router, check_target, encode_target
from .space import Subnet

ROUTERS_META = "routers.json"
ROUTERS_WEIGHTS = "routers.safetensors"
TABLE_FILE = "latency_table.json"


@dataclass
class Routing:
    """What ``set_budget`` needs: routers, the latency table, and the hooks of the active adaptive budget."""

    static: StaticRouter | None = None
    dynamic: DynamicRouter | None = None
    table: LatencyTable | None = None
    budget: dict | None = None  # {"target", "adaptive", "guarantee", "subnet", "predicted_fraction"}
    hooks: list = field(default_factory=list)
    record: dict | None = None  # while set (see record_choices): adaptive choices counted per layer


def routing(fm: FlextronModel) -> Routing:
    r = getattr(fm, "routing", None)
    if r is None:
        r = Routing()
        fm.routing = r
    return r


def attach_table(fm: FlextronModel, table: LatencyTable) -> None:
    check_table(table, fm, check_device=False)
    routing(fm).table = table


def attach_router(fm: FlextronModel, router) -> None:
    """Attach a static or dynamic router (checked against the model's space)."""
    if not isinstance(router, (StaticRouter, DynamicRouter)):
        raise TypeError(f"router must be a StaticRouter or DynamicRouter, got {type(router).__name__}")
    router.check(fm)
    setattr(routing(fm), router.kind, router)


# -- guarantee projection ---------------------------------------------------------------------------
def _loss_per_step(fm: FlextronModel, axis: str, layer: int, hi: int, lo: int) -> float:
    """Importance given up by going from ``hi`` to ``lo`` units: the share of the layer's (axis') total score held
    by units ``lo..hi-1``; without ranking scores, the share of units."""
    full = fm.mlp_blocks[layer].full_width if axis == "mlp" else fm.attention_blocks[layer].num_heads
    if fm.importance is None:
        return (hi - lo) / full
    s = fm.importance[axis][layer].float().clamp(min=0)
    tot = float(s.sum()) or 1.0
    return float(s[lo:hi].sum()) / tot


def project(fm: FlextronModel, subnet: Subnet, table: LatencyTable, target: float) -> Subnet:
    """The subnet, reached from ``subnet`` by shrinking widths, whose predicted latency is at most ``target`` times
    the full model's, giving up the least important width per millisecond saved first.

    Raises ``ValueError`` naming the smallest reachable latency when even the smallest subnet does not fit."""
    target = check_target(target)
    full = table.full_ms()
    bound = target * full
    smallest = table.min_ms()
    if smallest > bound * (1 + 1e-9):
        raise ValueError(f"no subnet meets target {target:.3f} in guarantee mode: the smallest reachable latency is "
                         f"{smallest / full:.3f} of the full model ({smallest:.3f} ms of {full:.3f} ms, "
                         f"{table.describe()})")
    mlp, heads = list(subnet.mlp), list(subnet.heads)
    mc, hc = table.mlp_choices, table.head_choices
    cur = table.predict(subnet)
    while cur > bound * (1 + 1e-9):
        best = None
        for axis, widths, choices, lut in (("mlp", mlp, mc, table.mlp), ("heads", heads, hc, table.attn)):
            for i, w in enumerate(widths):
                j = choices[i].index(w)
                if j == 0:
                    continue
                saved = lut[i][j] - lut[i][j - 1]
                lost = _loss_per_step(fm, axis, i, w, choices[i][j - 1])
                # Steps that save nothing (timing noise) rank last; among savers, least importance per ms first.
                key = (saved <= 0, lost / saved if saved > 0 else lost)
                if best is None or key < best[0]:
                    best = (key, axis, i, j - 1, saved)
        if best is None:  # every layer at its smallest choice (cannot happen after the check above)
            break
        _, axis, i, j, saved = best
        if axis == "mlp":
            mlp[i] = mc[i][j]
        else:
            heads[i] = hc[i][j]
        cur -= saved
    out = Subnet(mlp=mlp, heads=heads)
    if table.predict(out) > bound * (1 + 1e-9):  # a table whose entries do not fall with width: shrink to the floor
        out = Subnet(mlp=[min(c, key=lambda w, i=i: table.mlp[i][mc[i].index(w)]) for i, c in enumerate(mc)],
                     heads=[min(c, key=lambda h, i=i: table.attn[i][hc[i].index(h)]) for i, c in enumerate(hc)])
    return out


def static_subnet(router: StaticRouter, target: float, table: LatencyTable | None = None) -> Subnet:
    """The static router's subnet for ``target``. With a table, the router is read at the input ``t'`` (on a grid
    of 161 points in [0.2, 1]) whose argmax subnet's predicted latency is nearest ``target`` (ties: the faster):
    the router supplies the shape (which layers keep what), the table pins the latency, so an argmax that lands
    off the router's trained expectation does not move the budget."""
    target = check_target(target)
    if table is None:
        return router.choose(target)
    best = None
    for t in torch.linspace(ANCHORS[0], 1.0, 161).tolist():
        s = router.choose(t)
        f = table.predict_fraction(s)
        key = (abs(f - target), f)
        if best is None or key < best[0]:
            best = (key, s)
    return best[1]


@implements("subnet_for_budget")
def subnet_for_budget(fm: FlextronModel, target: float) -> Subnet:
    """The subnet of one per-request budget: the static router's for ``target`` when one is attached (read through
    the table, as :func:`set_budget` does), else the uniform subnet keeping that fraction of neurons and heads."""
    r = routing(fm)
    if r.static is not None:
        r.static.check(fm)
        return static_subnet(r.static, target, r.table)
    return fm.uniform_subnet(mlp=target, heads=target)


# -- set_budget -------------------------------------------------------------------------------------
def _remove_hooks(r: Routing) -> None:
    for h in r.hooks:
        h.remove()
    r.hooks.clear()


def _install_adaptive(fm: FlextronModel, router: DynamicRouter, target: float) -> None:
    r = routing(fm)
    device = next(fm.model.parameters()).device
    router.to(device).eval()
    enc1 = encode_target(torch.tensor([target], device=device))
    mlp_w = [torch.tensor(c, device=device) for c in router.mlp_choices]
    head_w = [torch.tensor(c, device=device) for c in router.head_choices]
    kept: dict[int, torch.Tensor] = {}  # layer -> this batch's head counts, decided on the prompt

    def mlp_hook(i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            if kwargs.get("widths") is not None or (len(args) > 1 and args[1] is not None):
                return None
            with torch.no_grad():
                enc = enc1.expand(x.shape[0], -1)
                idx = router.mlp_logits(i, x, enc).argmax(-1)
                if r.record is not None:
                    r.record["mlp"][i] += torch.bincount(idx.flatten(), minlength=len(mlp_w[i])).cpu()
            return (x,), {"widths": mlp_w[i][idx]}
        return hook

    def attn_hook(i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            prev = kept.get(i)
            if x.shape[1] > 1 or prev is None or prev.shape[0] != x.shape[0]:
                with torch.no_grad():
                    enc = enc1.expand(x.shape[0], -1)
                    idx = router.head_logits(i, x, enc).argmax(-1)
                    kept[i] = head_w[i][idx]
                    if r.record is not None:
                        r.record["heads"][i] += torch.bincount(idx, minlength=len(head_w[i])).cpu()
            module.head_budgets = kept[i]
            return None
        return hook

    def clear_hook(module, args, kwargs, output):
        module.head_budgets = None
        return None

    for i, (m, a) in enumerate(zip(fm.mlp_blocks, fm.attention_blocks)):
        r.hooks.append(m.register_forward_pre_hook(mlp_hook(i), with_kwargs=True))
        r.hooks.append(a.register_forward_pre_hook(attn_hook(i), with_kwargs=True))
        r.hooks.append(a.register_forward_hook(clear_hook, with_kwargs=True))


@implements("set_budget")
def set_budget(fm: FlextronModel, target: float | None, *, adaptive: bool = False, guarantee: bool = False) -> Subnet:
    """Make the model run within a latency budget; ``target`` a fraction of the full model's latency in (0, 1].

    ``adaptive=False``: the static router's subnet for ``target`` (projected onto the table with ``guarantee``).
    ``adaptive=True``: the dynamic router's per-token MLP widths and per-sequence head counts, capped by the
    projection of the full model with ``guarantee``. ``target=None``: back to the full model, hooks removed.
    Returns the active subnet (for adaptive routing: the per-layer cap).
    """
    r = routing(fm)
    if target is None:
        _remove_hooks(r)
        fm.set_subnet(None)
        r.budget = None
        return fm.full_subnet()
    target = check_target(target)
    if guarantee:
        if r.table is None:
            raise ValueError("guarantee mode needs a latency table: profile one (flextron profile) and attach it")
        check_table(r.table, fm)
    router = r.dynamic if adaptive else r.static
    if router is None:
        kind = "dynamic" if adaptive else "static"
        raise ValueError(f"set_budget(adaptive={adaptive}) needs a trained {kind} router: train one "
                         f"(flextron route) or load a checkpoint that has one")
    router.check(fm)
    _remove_hooks(r)
    router_input = target
    if adaptive:
        cap = project(fm, fm.full_subnet(), r.table, target) if guarantee else fm.full_subnet()
        fm.set_subnet(cap)
        router_input = adaptive_input(router, target)
        _install_adaptive(fm, router, router_input)
        subnet = cap
    else:
        subnet = static_subnet(router, target, r.table)
        if guarantee:
            subnet = project(fm, subnet, r.table, target)
        fm.set_subnet(subnet)
    r.budget = {"target": target, "adaptive": adaptive, "guarantee": guarantee, "subnet": subnet.to_dict(),
                "router_input": router_input,
                "predicted_fraction": None if r.table is None else r.table.predict_fraction(subnet)}
    return subnet


@contextlib.contextmanager
def record_choices(fm: FlextronModel):
    """Count the adaptive router's choices while the block runs: yields ``{"mlp": [counts [C_l]], "heads": [...]}``
    (tokens per MLP width, sequences per head count), e.g. for :func:`adaptive_fraction`."""
    r = routing(fm)
    if r.dynamic is None:
        raise ValueError("record_choices needs a dynamic router")
    r.record = {"mlp": [torch.zeros(len(c), dtype=torch.long) for c in r.dynamic.mlp_choices],
                "heads": [torch.zeros(len(c), dtype=torch.long) for c in r.dynamic.head_choices]}
    try:
        yield r.record
    finally:
        r.record = None


def adaptive_fraction(fm: FlextronModel, counts: dict, table: LatencyTable | None = None) -> float:
    """Predicted latency fraction of recorded adaptive choices (each token at its own width; the cap of a
    guaranteed budget is applied, as the blocks apply it)."""
    r = routing(fm)
    table = table or r.table
    cap = fm.subnet or fm.full_subnet()
    shares = {}
    for axis, choices, caps in (("mlp", table.mlp_choices, cap.mlp), ("heads", table.head_choices, cap.heads)):
        rows = []
        for i, c in enumerate(counts[axis]):
            share = [0.0] * len(choices[i])
            n = max(1, int(c.sum()))
            for j, k in enumerate(c.tolist()):
                w = min(choices[i][j], caps[i])
                share[choices[i].index(w)] += k / n
            rows.append(share)
        shares[axis] = rows
    return table.predict_mixture(shares["mlp"], shares["heads"]) / table.full_ms()


def adaptive_input(router: DynamicRouter, target: float) -> float:
    """The dynamic router's input for ``target``: with a calibration (:func:`calibrate_adaptive`), the input whose
    realised predicted latency was nearest ``target`` (ties: the faster); without one, ``target`` itself."""
    if not router.calibration:
        return target
    return min(router.calibration, key=lambda p: (abs(p[1] - target), p[1]))[0]


@implements("calibrate_adaptive")
@torch.no_grad()
def calibrate_adaptive(fm: FlextronModel, batches, grid=None) -> list[list[float]]:
    """Measure what the dynamic router realises: for each router input ``t`` of ``grid`` (default 33 points in
    [0.2, 1]), the predicted latency fraction of the choices it makes on ``batches`` (``input_ids`` tensors
    ``[B, S]``), priced with the attached table (each token at its own MLP width, each sequence at its heads).

    The curve is stored on the router (saved with the model) and ``set_budget(target, adaptive=True)`` then feeds
    the router the input whose realised fraction is nearest ``target``: the router keeps deciding *which* tokens
    get which width, the calibration pins the average latency, as the table does for the static router. Returns
    the curve ``[[t, fraction], ...]``. Any active budget is restored afterwards.
    """
    r = routing(fm)
    if r.dynamic is None:
        raise ValueError("calibrate_adaptive needs a dynamic router: train one (flextron route) or load one")
    if r.table is None:
        raise ValueError("calibrate_adaptive needs a latency table: profile one (flextron profile) and attach it")
    batches = list(batches)
    if not batches or any(not isinstance(b, torch.Tensor) or b.dim() != 2 for b in batches):
        raise ValueError("batches must be a non-empty sequence of input_ids tensors [B, S]")
    grid = torch.linspace(ANCHORS[0], 1.0, 33).tolist() if grid is None else [check_target(t) for t in grid]
    prev = r.budget
    router = r.dynamic
    old, router.calibration = router.calibration, None  # measure the raw router
    device = next(fm.model.parameters()).device
    curve = []
    try:
        set_budget(fm, None)
        for t in grid:
            _install_adaptive(fm, router, t)
            with record_choices(fm) as counts:
                for ids in batches:
                    fm(input_ids=ids.to(device), use_cache=False)
            curve.append([float(t), adaptive_fraction(fm, counts)])
            _remove_hooks(r)
    finally:
        _remove_hooks(r)
        router.calibration = curve if len(curve) == len(grid) else old  # a failed run keeps the old curve
        set_budget(fm, None)
        if prev is not None:
            set_budget(fm, prev["target"], adaptive=prev["adaptive"], guarantee=prev["guarantee"])
    return curve


# -- persistence ------------------------------------------------------------------------------------
def save_routing(fm: FlextronModel, path) -> None:
    """Write the routers (``routers.json`` + ``routers.safetensors``) and the table (``latency_table.json``) of
    ``fm`` into directory ``path`` (nothing when there are none)."""
    r = getattr(fm, "routing", None)
    if r is None:
        return
    path = Path(path)
    routers = {k: getattr(r, k) for k in ("static", "dynamic") if getattr(r, k) is not None}
    if routers:
        tensors = {f"{k}.{n}": p.detach().cpu().contiguous() for k, m in routers.items()
                   for n, p in m.state_dict().items()}
        save_file(tensors, str(path / ROUTERS_WEIGHTS))
        (path / ROUTERS_META).write_text(json.dumps({k: m.config() for k, m in routers.items()}, indent=1) + "\n")
    if r.table is not None:
        r.table.save(path / TABLE_FILE)


def load_routing(fm: FlextronModel, path) -> None:
    """Attach the routers and table stored in ``path`` (if any), checking them against ``fm``."""
    path = Path(path)
    if (path / ROUTERS_META).is_file():
        configs = json.loads((path / ROUTERS_META).read_text())
        state = load_file(str(path / ROUTERS_WEIGHTS))
        for kind, cfg in configs.items():
            router = build_router(cfg)
            router.load_state_dict({n[len(kind) + 1:]: t for n, t in state.items() if n.startswith(kind + ".")})
            router.eval()
            attach_router(fm, router)
    if (path / TABLE_FILE).is_file():
        attach_table(fm, LatencyTable.load(path / TABLE_FILE))
