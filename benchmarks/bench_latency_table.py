"""Latency-table accuracy and budgets held on a GPU, for a Llama-2-7B-shaped model with random weights.

GPU only. For each phase
(prefill: ``--prefill-batch x --prefill-len`` tokens; decode: ``--decode-batch`` sequences, one token each, after
``--decode-len`` cached tokens) it

1. profiles the table (:func:`flextron.latency.profile`: every layer's MLP at every width and attention at every
   head count, CUDA events, medians of interleaved rounds),
2. validates it: predicted vs measured whole-model latency of the full model and ``--subnets`` random subnets
   (median and worst relative error; targets: median <= 5%, worst <= 10%),
3. measures budgets held for targets 0.5..0.9: the guarantee projection of the full model (never over, by
   construction, in prediction; measured here) and the uniform subnet whose prediction is nearest the target
   (the static choice without a trained router; pass ``--checkpoint`` with routers for the router's own choice).

Writes one JSON file (GPU, versions, commit, date, tables, every row) to ``--out``. Shapes: hidden 4096, MLP 11008,
32 heads of 128 (MHA), ``--layers`` layers (default 32; fewer to save time; the fixed cost is measured either
way), bf16. Space: MLP widths and head counts in 10% steps. Each phase is timed both ways unless
``--prefill-timing``/``--decode-timing`` picks one: ``cuda_graph`` (each block and
each whole step captured and replayed: the device time a served, graph-captured decode step sees) and ``eager``
(what a Python ``generate`` loop sees; for a 7B model at batch 16 it is mostly launch cost, flat in width).
A guarantee target below the smallest reachable latency is recorded as unreachable (the error names it).

Usage: ``python benchmarks/bench_latency_table.py --out benchmarks/results [--layers 32] [--quick]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
from pathlib import Path

import torch

from flextron.budget import project
from flextron.latency import measure_many, profile, validate
from flextron.model import FlextronModel
from flextron.space import ElasticSpace

TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9)


def _commit() -> str:
    if os.environ.get("FLEXTRON_COMMIT"):  # a copied working tree may carry a stale .git
        return os.environ["FLEXTRON_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def build(layers: int) -> FlextronModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    space = ElasticSpace(mlp=tuple(i / 10 for i in range(1, 11)), heads=tuple(i / 10 for i in range(1, 11)))
    return FlextronModel.from_hf(model, space)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--subnets", type=int, default=24)
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--decode-batch", type=int, default=16)
    p.add_argument("--decode-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--checkpoint", default=None, help="a Llama-2-7B-shaped flextron checkpoint with routers")
    p.add_argument("--quick", action="store_true", help="8 layers, 12 subnets, 10 repeats")
    p.add_argument("--decode-timing", choices=("cuda_graph", "eager", "both", "none"), default="both")
    p.add_argument("--prefill-timing", choices=("cuda_graph", "eager", "both", "none"), default="both")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_latency_table.py needs a CUDA GPU")
    if args.quick:
        args.layers, args.subnets, args.repeats = 8, 12, 10
    fm = FlextronModel.from_pretrained(args.checkpoint).cuda() if args.checkpoint else build(args.layers)
    import transformers
    import triton

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "transformers": transformers.__version__, "commit": _commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "model": {"layers": fm.num_layers, "hidden": 4096, "mlp": 11008, "heads": 32, "dtype": "bfloat16"},
              "phases": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"latency_table_{torch.cuda.get_device_name().replace(' ', '_')}.json"
    if path.is_file():  # phases this run does not time stay as they were measured (each carries its commit and date)
        previous = json.loads(path.read_text())
        if previous.get("model") == result["model"]:
            result["phases"] = dict(previous.get("phases", {}))
    runs = [("prefill", t, args.prefill_batch, args.prefill_len)
            for t in ("eager", "cuda_graph") if args.prefill_timing in (t, "both")]
    runs += [("decode", t, args.decode_batch, args.decode_len)
             for t in ("cuda_graph", "eager") if args.decode_timing in (t, "both")]
    for phase, timing, bs, sl in runs:
        graphs = timing == "cuda_graph"
        table = profile(fm, batch_size=bs, seq_len=sl, phase=phase, warmup=3, repeats=args.repeats, graphs=graphs)
        v = validate(fm, table, args.subnets, warmup=3, repeats=args.repeats)
        print(f"{phase} ({timing}): {table.describe()}\n  median |err| {v['median_abs_rel_error']:.1%}, "
              f"worst {v['max_abs_rel_error']:.1%} (targets 5% / 10%); "
              f"noise floor {v['noise_floor_full_vs_full']:+.1%}", flush=True)
        subnets, modes, unreachable = [], [], []
        for t in TARGETS:
            try:
                subnets.append(project(fm, fm.full_subnet(), table, t))
                modes.append(("guarantee", t))
            except ValueError as e:  # the documented refusal: no subnet of the space is fast enough
                unreachable.append({"target": t, "error": str(e)})
                print(f"  guarantee target {t:.1f}: unreachable ({str(e)[:90]}...)")
            uni = min((fm.uniform_subnet(mlp=f / 20, heads=f / 20) for f in range(1, 21)),
                      key=lambda s, t=t: abs(table.predict_fraction(s) - t))
            subnets.append(uni)
            modes.append(("uniform_nearest", t))
        if args.checkpoint and getattr(fm, "routing", None) is not None and fm.routing.static is not None:
            for t in TARGETS:
                subnets.append(fm.set_budget(t))
                modes.append(("static", t))
            fm.set_budget(None)
        meas = measure_many(fm, [None] + subnets, batch_size=bs, seq_len=sl, phase=phase, warmup=3,
                            repeats=args.repeats, group=len(subnets) + 1 if phase == "prefill" else 4, graphs=graphs)
        full = meas[0]["median_ms"]
        budgets = [{"mode": m, "target": t, "subnet": s.to_dict(), "predicted_fraction": table.predict_fraction(s),
                    "measured_ms": r["median_ms"], "measured_fraction": r["median_ms"] / full}
                   for (m, t), s, r in zip(modes, subnets, meas[1:])]
        for b in budgets:
            print(f"  {b['mode']:>15} target {b['target']:.1f}: predicted {b['predicted_fraction']:.3f}, "
                  f"measured {b['measured_fraction']:.3f}")
        result["phases"][f"{phase}_{timing}"] = {"timing": timing, "table": table.to_dict(), "validation": v,
                                                 "budgets": budgets, "unreachable": unreachable,
                                                 "full_measured_ms": full, "commit": result["commit"],
                                                 "date": result["date"]}
        tmp = path.with_suffix(".json.tmp")  # written after every phase: a later failure keeps what was measured
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
