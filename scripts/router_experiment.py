"""Routers on a CPU: latency-table accuracy, budgets held, and quality at equal latency.

Over ~500 lines as one file: its stages write to and read from one results file that docs/routers.md cites.

Stages (each writes into ``--out``/results.json, so a later stage can be re-run alone with ``--stages``):

- ``llama``: a Llama-shaped model with random weights (``--llama``, MHA like Llama-2) profiled on this CPU at a
  compute-bound shape (prefill ``4 x 256`` tokens; decode ``512`` sequences on a ``64``-token cache), validated on
  random subnets; guarantee-mode budgets (projection of the full model) measured.
- ``stories``: the bundled stories260K (ranked on bundled TinyStories text, or ``--model`` a trained checkpoint),
  its own CPU table (prefill ``32 x 256``: enough tokens that its MLP and attention costs grow with width),
  validated; static and dynamic routers trained through the surrogate; budgets held (static, guarantee) measured;
  perplexity of router-chosen subnets vs uniform subnets of equal predicted latency, and dynamic vs static.
- ``dynamic_long``: a longer dynamic-router run on the routed checkpoint (LLM frozen).
- ``joint``: static and dynamic routers each trained with the LLM fine-tuned in the joint phase (``--lr-model``),
  as the paper describes, each on its own copy of the LLM; dynamic vs static on those weights.
- ``plots``: the PNGs in ``--docs``.

Run without ``TRITON_INTERPRET`` (the torch reference paths run on a CPU) and, on a shared machine, with one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from flextron.budget import (
    adaptive_fraction,
    attach_router,
    attach_table,
    calibrate_adaptive,
    project,
    record_choices,
    routing,
    static_subnet,
)
from flextron.cli.profile import random_llama
from flextron.data import load_stories260k, perplexity, read_stories, token_windows
from flextron.latency import measure_many, profile, validate
from flextron.model import FlextronModel
from flextron.router import DynamicRouter, RouterTrainConfig, StaticRouter, train_routers
from flextron.space import ElasticSpace, Subnet

TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9)
TINYSTORIES = Path("/work/shared/data/tinystories/TinyStories-train.part-A.txt")


def _save(out: Path, results: dict) -> None:
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out / "results.json")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage_llama(args, out: Path, results: dict) -> None:
    space = ElasticSpace(mlp=tuple(i / 10 for i in range(1, 11)))
    fm = random_llama(args.llama, space=space)
    res = {"model": f"llama-random:{args.llama}", "tables": {}}
    for phase, bs, sl in (("prefill", 4, 256), ("decode", 512, 64)):
        _log(f"llama {phase}: profiling")
        table = profile(fm, batch_size=bs, seq_len=sl, phase=phase, warmup=2, repeats=args.repeats)
        table.save(out / f"table_llama_{phase}.json")
        _log(f"llama {phase}: {table.describe()}; validating")
        v = validate(fm, table, args.subnets, warmup=1, repeats=args.repeats, seed=1)
        _log(f"llama {phase}: median |err| {v['median_abs_rel_error']:.1%} worst {v['max_abs_rel_error']:.1%}; "
             f"fraction: {v['median_abs_fraction_error']:.1%} / {v['max_abs_fraction_error']:.1%}; "
             f"noise floor {v['noise_floor_full_vs_full']:+.1%}")
        budgets = []
        subnets = [project(fm, fm.full_subnet(), table, t) for t in TARGETS]
        meas = measure_many(fm, [None] + subnets, batch_size=bs, seq_len=sl, phase=phase, warmup=1,
                            repeats=args.repeats, group=6)
        full_meas = meas[0]["median_ms"]
        for t, s, m in zip(TARGETS, subnets, meas[1:]):
            budgets.append({"target": t, "mode": "guarantee", "subnet": s.to_dict(),
                            "predicted_fraction": table.predict_fraction(s), "measured_ms": m["median_ms"],
                            "measured_fraction": m["median_ms"] / full_meas})
        res["tables"][phase] = {"table": table.describe(), "file": f"table_llama_{phase}.json", "validation": v,
                                "budgets": budgets, "full_measured_ms": full_meas}
        results["llama"] = res
        _save(out, results)


def _stories_model(args) -> tuple[FlextronModel, object, str]:
    model, tok = load_stories260k()
    if args.model:
        return FlextronModel.from_pretrained(args.model), tok, f"checkpoint {args.model}"
    fm = FlextronModel.from_hf(model)
    calib = token_windows(tok, read_stories()[: len(read_stories()) // 2], 256, 32)
    fm.rank(list(calib.split(8)))
    return fm, tok, "stories260K ranked on 32 x 256 tokens of the bundled TinyStories excerpt (no elastic training)"


def _data(tok) -> tuple[torch.Tensor, torch.Tensor]:
    stories = read_stories(TINYSTORIES, drop_last=True)
    n = len(stories)
    train = token_windows(tok, stories[: int(n * 0.8)], 256, 2000)
    held = token_windows(tok, stories[int(n * 0.9):], 256, 64)
    return train, held


def _ppl(fm, windows) -> float:
    return perplexity(fm, windows, batch_size=16)


def stage_stories(args, out: Path, results: dict) -> None:
    torch.manual_seed(0)
    fm, tok, what = _stories_model(args)
    train, held = _data(tok)
    res = {"model": what, "train_windows": list(train.shape), "eval_windows": list(held.shape)}
    _log(f"stories: {what}; profiling")
    bs, sl = 32, 256
    table = profile(fm, batch_size=bs, seq_len=sl, phase="prefill", warmup=2, repeats=args.repeats)
    table.save(out / "table_stories_prefill.json")
    _log(f"stories: {table.describe()}; validating")
    v = validate(fm, table, args.subnets, warmup=1, repeats=args.repeats, seed=2)
    _log(f"stories: median |err| {v['median_abs_rel_error']:.1%} worst {v['max_abs_rel_error']:.1%}; "
         f"fraction: {v['median_abs_fraction_error']:.1%} / {v['max_abs_fraction_error']:.1%}; "
         f"noise floor {v['noise_floor_full_vs_full']:+.1%}")
    res["table"] = {"describe": table.describe(), "file": "table_stories_prefill.json", "validation": v}
    attach_table(fm, table)
    results["stories"] = res
    _save(out, results)

    choices = ([fm.mlp_choices(i) for i in range(fm.num_layers)], [fm.head_choices(i) for i in range(fm.num_layers)])
    cfg = RouterTrainConfig(sm_steps=args.sm_steps, sm_warmup=args.sm_warmup, joint_steps=args.joint_steps,
                            batch_size=args.batch_size)
    for kind, router in (("static", StaticRouter(*choices)),
                         ("dynamic", DynamicRouter(*choices, hidden_size=fm.config.hidden_size))):
        _log(f"stories: training the {kind} router ({cfg.sm_steps} SM + {cfg.joint_steps} joint steps)")
        t0 = time.perf_counter()
        log = train_routers(fm, router, table, train, cfg)
        res[f"{kind}_training"] = {"seconds": time.perf_counter() - t0, "config": vars(cfg),
                                   "log": log, "router_steps": sum(1 for r in log if r.get("router_step"))}
        attach_router(fm, router)
        _log(f"stories: {kind} router trained in {time.perf_counter() - t0:.0f} s")
    fm.save_pretrained(out / "stories_routed")
    _save(out, results)

    # Quality: uniform grid (same widths in every layer).
    _log("stories: uniform grid perplexity")
    uniform = []
    for w in fm.mlp_choices(0):
        for h in fm.head_choices(0):
            s = Subnet(mlp=[w] * fm.num_layers, heads=[h] * fm.num_layers)
            fm.set_subnet(s)
            uniform.append({"subnet": s.to_dict(), "predicted_fraction": table.predict_fraction(s),
                            "ppl": _ppl(fm, held)})
    fm.set_subnet(None)
    full_ppl = _ppl(fm, held)
    res["full_ppl"] = full_ppl
    res["uniform"] = uniform
    _save(out, results)

    # Static routing over a dense set of targets (the curve), and the 5 evidence targets in detail.
    _log("stories: static router perplexity")
    static = _eval_static(fm, table, held)
    res["static"] = static
    same_keys = set()  # uniform subnets keeping one common fraction of neurons and heads
    for f in np.linspace(0.02, 1.0, 50).tolist():
        u = fm.uniform_subnet(mlp=f, heads=f)
        same_keys.add((u.mlp[0], u.heads[0]))
    compare = []
    for t in TARGETS:
        srow = min(static, key=lambda r: abs(r["target"] - t))
        pf = srow["predicted_fraction"]
        fitting = [u for u in uniform if u["predicted_fraction"] <= pf + 1e-9]
        best_u = min(fitting, key=lambda u: u["ppl"]) if fitting else None
        same = [u for u in fitting if (u["subnet"]["mlp"][0], u["subnet"]["heads"][0]) in same_keys]
        same_u = max(same, key=lambda u: u["predicted_fraction"]) if same else None
        compare.append({"target": t, "static": srow, "best_uniform": best_u, "same_fraction_uniform": same_u})
    res["compare_static_uniform"] = compare
    _save(out, results)

    # Budgets held: measured whole-model latency of the static and guaranteed subnets at the table's shape.
    _log("stories: budgets held (measured)")
    budgets, subnets = [], []
    for t in TARGETS:
        for guarantee in (False, True):
            s = fm.set_budget(t, guarantee=guarantee)
            subnets.append(s)
            budgets.append({"target": t, "mode": "guarantee" if guarantee else "static", "subnet": s.to_dict(),
                            "predicted_fraction": table.predict_fraction(s), "ppl": _ppl(fm, held)})
    fm.set_budget(None)
    meas = measure_many(fm, [None] + subnets, batch_size=bs, seq_len=sl, warmup=1, repeats=args.repeats, group=11)
    full_meas = meas[0]["median_ms"]
    for b, m in zip(budgets, meas[1:]):
        b.update(measured_ms=m["median_ms"], measured_fraction=m["median_ms"] / full_meas)
    res["budgets"] = {"full_measured_ms": full_meas, "rows": budgets}
    _save(out, results)

    # Dynamic routing: realised predicted latency (tokens at their own widths) and perplexity.
    _log("stories: dynamic router perplexity")
    dynamic = _eval_dynamic(fm, held)
    res["dynamic"] = dynamic
    res["dynamic_vs_static"] = _dyn_vs_static(dynamic, static)
    _save(out, results)
    _log("stories: done")


def _eval_static(fm: FlextronModel, table, held: torch.Tensor) -> list[dict]:
    static = []
    for t in np.round(np.arange(0.35, 1.001, 0.05), 2).tolist():
        s = static_subnet(routing(fm).static, t, table)
        fm.set_subnet(s)
        static.append({"target": t, "subnet": s.to_dict(), "predicted_fraction": table.predict_fraction(s),
                       "raw_subnet": routing(fm).static.choose(t).to_dict(),
                       "raw_predicted_fraction": table.predict_fraction(routing(fm).static.choose(t)),
                       "ppl": _ppl(fm, held)})
    fm.set_subnet(None)
    return static


def _eval_dynamic(fm: FlextronModel, held: torch.Tensor) -> list[dict]:
    dynamic = []
    for t in np.round(np.arange(0.35, 1.001, 0.05), 2).tolist():
        for guarantee in (False, True):
            fm.set_budget(t, adaptive=True, guarantee=guarantee)
            with record_choices(fm) as counts:
                ppl = _ppl(fm, held)
            dynamic.append({"target": t, "guarantee": guarantee, "predicted_fraction": adaptive_fraction(fm, counts),
                            "ppl": ppl, "cap": (fm.subnet or fm.full_subnet()).to_dict(),
                            "mlp_share": [(c / max(1, int(c.sum()))).tolist() for c in counts["mlp"]],
                            "head_share": [(c / max(1, int(c.sum()))).tolist() for c in counts["heads"]]})
    fm.set_budget(None)
    return dynamic


def stage_dynamic_long(args, out: Path, results: dict) -> None:
    """A longer dynamic-router run on the routed checkpoint of the stories stage (same table, same static curve)."""
    torch.manual_seed(0)
    fm = FlextronModel.from_pretrained(out / "stories_routed")
    _, tok = load_stories260k()
    train, held = _data(tok)
    res = results["stories"]
    table = routing(fm).table
    choices = ([fm.mlp_choices(i) for i in range(fm.num_layers)], [fm.head_choices(i) for i in range(fm.num_layers)])
    cfg = RouterTrainConfig(sm_steps=args.long_sm_steps, sm_warmup=args.sm_warmup, joint_steps=args.long_joint_steps,
                            batch_size=args.batch_size)
    router = DynamicRouter(*choices, hidden_size=fm.config.hidden_size)
    _log(f"dynamic_long: training ({cfg.sm_steps} SM + {cfg.joint_steps} joint steps)")
    t0 = time.perf_counter()
    log = train_routers(fm, router, table, train, cfg)
    res["dynamic_long_training"] = {"seconds": time.perf_counter() - t0, "config": vars(cfg), "log": log}
    attach_router(fm, router)
    _log("dynamic_long: perplexity")
    res["dynamic_long"] = _eval_dynamic(fm, held)
    res["dynamic_long_vs_static"] = _dyn_vs_static(res["dynamic_long"], res["static"])
    fm.save_pretrained(out / "stories_routed_long")
    _save(out, results)
    _log("dynamic_long: done")


def stage_joint(args, out: Path, results: dict) -> None:
    """The paper's full recipe: the surrogate phase, then LLM and routers fine-tuned together (``--lr-model`` > 0).
    The static and the dynamic router each get their own copy of the routed stories checkpoint's LLM (the same
    starting weights, steps, data and table) and are evaluated on the weights they were tuned with."""
    _, tok = load_stories260k()
    train, held = _data(tok)
    kinds = args.kinds.split(",")
    joint = {"lr_model": args.lr_model, "seed": args.seed, "lam": args.lam}
    old = results.get("stories", {}).get("joint", {})
    if "static" not in kinds:  # compare with the static router of an earlier run of the same settings
        cfg_old = old.get("static", {}).get("config", {})
        if not (cfg_old.get("lr_model") == args.lr_model and cfg_old.get("seed") == args.seed
                and cfg_old.get("lam") == args.lam):
            raise SystemExit("--kinds without static needs an earlier joint run with the same --lr-model, --seed "
                             "and --lam")
        joint["static"] = old["static"]
    for kind in kinds:
        torch.manual_seed(args.seed)
        fm = FlextronModel.from_pretrained(out / "stories_routed")
        table = routing(fm).table
        choices = ([fm.mlp_choices(i) for i in range(fm.num_layers)],
                   [fm.head_choices(i) for i in range(fm.num_layers)])
        cfg = RouterTrainConfig(sm_steps=args.long_sm_steps, sm_warmup=args.sm_warmup,
                                joint_steps=args.long_joint_steps, batch_size=args.batch_size, lr_model=args.lr_model,
                                seed=args.seed, lam=args.lam)
        router = (StaticRouter(*choices) if kind == "static"
                  else DynamicRouter(*choices, hidden_size=fm.config.hidden_size))
        _log(f"joint: training the {kind} router with the LLM ({cfg.sm_steps} SM + {cfg.joint_steps} joint steps, "
             f"lr_model {cfg.lr_model})")
        t0 = time.perf_counter()
        log = train_routers(fm, router, table, train, cfg)
        attach_router(fm, router)
        fm.set_subnet(None)
        entry = {"seconds": time.perf_counter() - t0, "config": vars(cfg), "full_ppl": _ppl(fm, held),
                 "router_steps": sum(1 for r in log if r.get("router_step"))}
        _log(f"joint: {kind} trained in {entry['seconds']:.0f} s; full model ppl {entry['full_ppl']:.3f}")
        entry["curve"] = _eval_static(fm, table, held) if kind == "static" else _eval_dynamic(fm, held)
        if kind == "dynamic":  # and with the deployment calibration (16 training windows)
            entry["calibration"] = calibrate_adaptive(fm, list(train[:16].split(8)))
            entry["curve_calibrated"] = _eval_dynamic(fm, held)
        joint[kind] = entry
        results.setdefault("stories", {})["joint"] = joint
        _save(out, results)
    joint["dynamic_vs_static"] = _dyn_vs_static(joint["dynamic"]["curve"], joint["static"]["curve"])
    if "curve_calibrated" in joint["dynamic"]:
        joint["calibrated_vs_static"] = _dyn_vs_static(joint["dynamic"]["curve_calibrated"], joint["static"]["curve"])
    _save(out, results)
    _log("joint: done")


def stage_calibrate(args, out: Path, results: dict) -> None:
    """The dynamic router of the routed stories checkpoint, raw and calibrated (``calibrate_adaptive`` on 16 training
    windows): how far each target's realised predicted latency lands from the target, on held-out text, and the
    perplexity there; dynamic vs the static curve of the same checkpoint."""
    fm = FlextronModel.from_pretrained(out / "stories_routed")
    _, tok = load_stories260k()
    train, held = _data(tok)
    entry = {}
    for name in ("raw", "calibrated"):
        if name == "calibrated":
            t0 = time.perf_counter()
            entry["curve"] = calibrate_adaptive(fm, list(train[:16].split(8)))
            entry["calibration_seconds"] = time.perf_counter() - t0
        _log(f"calibrate: evaluating the {name} dynamic router")
        rows = [r for r in _eval_dynamic(fm, held) if not r["guarantee"]]
        for r in rows:
            r["error"] = r["predicted_fraction"] - r["target"]
        entry[name] = rows
        entry[name + "_vs_static"] = _dyn_vs_static(rows, results["stories"]["static"])
    results.setdefault("stories", {})["calibrate"] = entry
    _log("calibrate: done")


def stage_recheck(args, out: Path, results: dict) -> None:
    """Profile and validate the stories260K table again (a second, independent measurement of the same thing)."""
    fm = FlextronModel.from_pretrained(out / "stories_routed")
    _log("recheck: profiling stories260K again")
    table = profile(fm, batch_size=32, seq_len=256, phase="prefill", warmup=2, repeats=args.repeats)
    table.save(out / "table_stories_prefill_recheck.json")
    v = validate(fm, table, args.subnets, warmup=1, repeats=args.repeats, seed=2)
    _log(f"recheck: median |err| {v['median_abs_rel_error']:.1%} worst {v['max_abs_rel_error']:.1%}; "
         f"fraction: {v['median_abs_fraction_error']:.1%} / {v['max_abs_fraction_error']:.1%}; "
         f"noise floor {v['noise_floor_full_vs_full']:+.1%}")
    results["stories"]["table_recheck"] = {"describe": table.describe(), "file": "table_stories_prefill_recheck.json",
                                           "validation": v}
    _save(out, results)


def _interp_ppl(curve: list[tuple[float, float]], x: float) -> float | None:
    """Perplexity of the lower envelope of ``curve`` (fraction, ppl) at fraction ``x`` (log-linear interpolation)."""
    pts = sorted(curve)
    env, best = [], math.inf
    for f, p in pts:  # best ppl reachable at or under each fraction
        best = min(best, p)
        env.append((f, best))
    if x < env[0][0] or x > env[-1][0]:
        return None
    for (f0, p0), (f1, p1) in zip(env, env[1:]):
        if f0 <= x <= f1:
            a = 0 if f1 == f0 else (x - f0) / (f1 - f0)
            return math.exp((1 - a) * math.log(p0) + a * math.log(p1))
    return env[-1][1]


def _dyn_vs_static(dynamic: list[dict], static: list[dict]) -> list[dict]:
    curve = [(r["predicted_fraction"], r["ppl"]) for r in static]
    out = []
    for d in dynamic:
        if d["guarantee"]:
            continue
        s = _interp_ppl(curve, d["predicted_fraction"])
        out.append({"target": d["target"], "dynamic_fraction": d["predicted_fraction"], "dynamic_ppl": d["ppl"],
                    "static_ppl_at_same_fraction": s})
    return out


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)


def _save_fig(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_plots(args, out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    # 1. table accuracy
    panels = []
    if "llama" in results:
        for phase, r in results["llama"]["tables"].items():
            panels.append((f"Llama-shaped random, {phase}\n{r['table']}", r["validation"]))
    for key, name in (("table", "stories260K, prefill"), ("table_recheck", "stories260K, prefill (re-profiled)")):
        if "stories" in results and key in results["stories"]:
            panels.append((f"{name}\n{results['stories'][key]['describe']}", results["stories"][key]["validation"]))
    if panels:
        fig, axes = plt.subplots(2, len(panels), figsize=(5.2 * len(panels), 9), squeeze=False)
        for col, (title, v) in enumerate(panels):
            for row, (mk, pk, unit) in enumerate((("measured_ms", "predicted_ms", "ms"),
                                                  ("measured_fraction", "predicted_fraction", "fraction of full"))):
                ax = axes[row, col]
                m = [r[mk] for r in v["rows"]]
                p = [r[pk] for r in v["rows"]]
                ax.scatter(m, p, s=14)
                lo, hi = min(m + p), max(m + p)
                ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
                ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="g", alpha=0.1,
                                label="±10%")
                if row == 0:
                    sub = f"median |err| {v['median_abs_rel_error']:.1%}, worst {v['max_abs_rel_error']:.1%}"
                else:
                    sub = (f"fraction: median |err| {v['median_abs_fraction_error']:.1%}, worst "
                           f"{v['max_abs_fraction_error']:.1%}; noise floor {v['noise_floor_full_vs_full']:+.1%}")
                ax.set_title(f"{title}\n{sub}", fontsize=7)
                ax.set_xlabel(f"measured ({unit})")
                ax.set_ylabel(f"predicted ({unit})")
                ax.legend(fontsize=7)
        _save_fig(plt, fig, docs / "routers_table_accuracy.png")
    # 2. budgets held
    rows = []
    if "llama" in results:
        for phase, r in results["llama"]["tables"].items():
            rows.append((f"Llama-shaped {phase}", r["budgets"]))
    if "stories" in results and "budgets" in results["stories"]:
        rows.append(("stories260K prefill", results["stories"]["budgets"]["rows"]))
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4.6))
        for name, b in rows:
            for mode, marker in (("static", "o"), ("guarantee", "s")):
                pts = [(r["target"], r["measured_fraction"]) for r in b if r["mode"] == mode]
                if pts:
                    ax.plot(*zip(*pts), marker=marker, label=f"{name}, {mode} (measured)")
        ax.plot([0.45, 0.95], [0.45, 0.95], "k--", lw=0.8, label="target")
        ax.fill_between([0.45, 0.95], [0.405, 0.855], [0.495, 1.045], color="g", alpha=0.1, label="±10%")
        _label(ax, "latency target (fraction of full)", "measured latency (fraction of measured full)",
               "Budgets held on this CPU (2-core, shared)")
        _save_fig(plt, fig, docs / "routers_budgets.png")
    # 3. quality
    s = results.get("stories", {})
    if "uniform" in s:
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        u = s["uniform"]
        ax.scatter([r["predicted_fraction"] for r in u], [r["ppl"] for r in u], s=8, c="0.7", label="uniform grid")
        env = sorted((r["predicted_fraction"], r["ppl"]) for r in u)
        best, fr = math.inf, []
        for f, p in env:
            if p < best:
                best = p
                fr.append((f, p))
        ax.plot(*zip(*fr), c="0.4", lw=1, label="best uniform at or under a latency")
        if "static" in s:
            st = sorted((r["predicted_fraction"], r["ppl"]) for r in s["static"])
            ax.plot(*zip(*st), "o-", ms=3, label="static router")
        for key, name in (("dynamic", "dynamic router"), ("dynamic_long", "dynamic router, longer training")):
            if key not in s:
                continue
            for g, mk in ((False, "^-"), (True, "v--")):
                d = sorted((r["predicted_fraction"], r["ppl"]) for r in s[key] if r["guarantee"] == g)
                ax.plot(*zip(*d), mk, ms=3, label=name + (" (guarantee cap)" if g else ""))
        ax.axhline(s.get("full_ppl", float("nan")), color="k", lw=0.6, ls=":", label="full model")
        ax.set_yscale("log")
        _label(ax, "predicted latency (fraction of full, stories260K CPU prefill table)",
               "held-out TinyStories perplexity", "Quality at equal predicted latency (stories260K)")
        _save_fig(plt, fig, docs / "routers_quality.png")
    # 4. training curves
    if "static_training" in s:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for kind in ("static", "dynamic", "dynamic_long"):
            log = s.get(f"{kind}_training", {}).get("log", [])
            sm = [(r["step"], r["sm_error_ema"]) for r in log if "sm_error_ema" in r]
            if sm:
                axes[0].plot(*zip(*sm), label=kind)
            axes[1].plot([r["step"] for r in log], [r["expected_minus_target"] for r in log], label=kind)
        axes[0].axhline(0.05, color="k", ls=":", lw=0.8, label="threshold")
        axes[0].set_title("surrogate running relative error (SM phase)", fontsize=9)
        axes[1].set_title("expected latency - target (fraction)", fontsize=9)
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        _save_fig(plt, fig, docs / "routers_training.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/router_experiment")
    p.add_argument("--docs", default="docs")
    p.add_argument("--stages", default="llama,stories,plots")
    p.add_argument("--llama", default="256,1024,4,4", help="H,I,HEADS,LAYERS of the random Llama-shaped model")
    p.add_argument("--model", default=None, help="a trained flextron checkpoint of stories260K (default: rank only)")
    p.add_argument("--subnets", type=int, default=24, help="random subnets per validation (plus the full model)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--sm-steps", type=int, default=400)
    p.add_argument("--sm-warmup", type=int, default=60)
    p.add_argument("--joint-steps", type=int, default=120)
    p.add_argument("--long-sm-steps", type=int, default=900, help="SM steps of the dynamic_long stage")
    p.add_argument("--long-joint-steps", type=int, default=400, help="joint steps of the dynamic_long stage")
    p.add_argument("--batch-size", type=int, default=8, help="router training sequences per step")
    p.add_argument("--lr-model", type=float, default=1e-4, help="LLM learning rate in the joint phase (stage joint)")
    p.add_argument("--seed", type=int, default=0, help="router initialisation and data order of stage joint")
    p.add_argument("--kinds", default="static,dynamic", help="routers trained by stage joint (without static: the "
                   "static curve of the earlier joint run in --out, same --lr-model and --seed)")
    p.add_argument("--lam", type=float, default=RouterTrainConfig.lam, help="latency-loss weight (stage joint)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    results["args"] = vars(args)
    for stage in args.stages.split(","):
        {"llama": stage_llama, "stories": stage_stories, "dynamic_long": stage_dynamic_long,
         "recheck": stage_recheck, "joint": stage_joint, "calibrate": stage_calibrate,
         "plots": stage_plots}[stage](args, out, results)
    _save(out, results)


if __name__ == "__main__":
    main()
