"""Elastic training evidence on the real stories260K (docs/training.md): one elastic run vs dedicated baselines.

(a) the parent, ranked and permuted but not trained; (b) one elastic run (full + smallest + k random subnets per
step, distillation from the frozen parent); (c) each uniform subnet (25/50/75%) extracted as a plain Llama model and
trained alone, with the same loss, on as many tokens as the elastic run drew. All evaluated by validation perplexity
(the last 10% of the TinyStories stories, held out) at uniform 25/50/75/100% widths.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_experiment.py --out runs/train_experiment

Run without TRITON_INTERPRET on a CPU (the kernels fall back to plain torch). Each stage writes its result to
``<out>/results.json`` and is skipped when rerun (``--force`` reruns everything); ``docs/training.png`` is redrawn.

At scale on a GPU: ``--tokens-cache DIR`` trains on a corpus ``flextron sample-corpus`` wrote (its validation split is
real held-out text), and ``--time-limit SECONDS`` stops a stage at a checkpoint before that wall time and exits
with status 3; the same command continues it, so a long run fits in commands of a few minutes each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from flextron.checkpoint import latest_checkpoint
from flextron.data import perplexity
from flextron.export import slim
from flextron.model import FlextronModel
from flextron.space import ElasticSpace
from flextron.tokens import mix, open_cache, tokenize_files
from flextron.train import TrainConfig, Trainer, load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WIDTHS = (0.25, 0.5, 0.75, 1.0)
# llama2.c doc/stories260K.md: batch_size=128, max_seq_len=512, gradient_accumulation_steps=1, max_iters=100000.
PRETRAIN_TOKENS = 128 * 512 * 100_000


def evaluate(fm: FlextronModel, windows: torch.Tensor, widths=WIDTHS) -> dict:
    fm.eval()
    out = {}
    with torch.no_grad():
        for w in widths:
            fm.set_subnet(fm.uniform_subnet(mlp=w, heads=w))
            out[f"{w:g}"] = perplexity(fm, windows, 32)
    fm.set_subnet(None)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "train_experiment"))
    p.add_argument("--model", default=str(SHARED / "models" / "stories260K" / "hf"))
    p.add_argument("--text", default=str(SHARED / "tinystories" / "TinyStories-train.part-A.txt"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--k-random", type=int, default=2)
    p.add_argument("--random-kind", default="layerwise", choices=("layerwise", "uniform", "mixed"))
    p.add_argument("--distill", default="parent")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--full-weight", type=float, default=1.0, help="weight of the full model's loss in the sum")
    p.add_argument("--stages", default="parent,elastic,baselines")
    p.add_argument("--force", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot", default=None, help="where the plot goes (perplexity by width and against tokens, "
                   "training losses; default: OUT/training.png)")
    p.add_argument("--tokens-cache", default=None, help="a corpus folder from `flextron sample-corpus` (train on its "
                   "sampled text, validate on its real held-out split) instead of tokenising --text")
    p.add_argument("--mix-text-share", type=float, default=0.0, help="with --tokens-cache: this share of every "
                   "batch from the training split of --text (real text; its held-out split is never read)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows at each in-run evaluation")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--time-limit", type=float, default=None, help="stop at a checkpoint before this many seconds "
                   "and exit with status 3; the same command continues")
    p.add_argument("--baseline-widths", type=lambda s: tuple(float(x) for x in s.split(",")), default=WIDTHS[:-1],
                   help="uniform widths trained alone (1.0: the full model trained alone, a dense control)")
    p.add_argument("--pretrain-tokens", type=float, default=PRETRAIN_TOKENS,
                   help="the parent's reported pretraining tokens (default: stories260K's); the run is reported as a "
                        "share of it")
    p.add_argument("--title", default="stories260K on held-out TinyStories", help="the plot's title")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = {} if args.force or not res_path.is_file() else json.loads(res_path.read_text())

    def save():
        res_path.write_text(json.dumps(results, indent=2) + "\n")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.tokens_cache:
        data = open_cache(args.tokens_cache)
        if args.mix_text_share:  # real text (the training split of --text) as a share of every batch
            data = mix(data, tokenize_files(args.text, tokenizer, out / "tokens", val_fraction=0.1),
                       args.mix_text_share)
    else:
        data = tokenize_files(args.text, tokenizer, out / "tokens", val_fraction=0.1)
    val = data.val_windows(args.seq_len + 1)  # the whole held-out split
    print(data, f"validation: {val.shape[0]} windows of {val.shape[1]}")
    space = ElasticSpace(mlp=WIDTHS, heads=WIDTHS)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=20,
                      k_random=args.k_random, random_kind=args.random_kind, distill=args.distill, alpha=args.alpha,
                      full_weight=args.full_weight, device=args.device, progress=False,
                      eval_every=args.eval_every, eval_windows=args.eval_windows, log_every=10,
                      save_every=args.save_every)
    deadline = None if args.time_limit is None else time.perf_counter() + args.time_limit
    tokens = cfg.steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len
    results["setup"] = {
        "train_tokens_available": int(len(data.train)), "val_tokens": int(len(data.val)),
        "val_windows": list(val.shape), "documents": data.meta["documents"], "config": vars(args),
        "tokens_per_run": tokens, "pretrain_tokens_upper_bound": args.pretrain_tokens,
        "fraction_of_pretraining": tokens / args.pretrain_tokens,
    }
    save()
    stages = args.stages.split(",")
    parent_dir = out / "parent_ranked"
    if "parent" in stages and ("parent" not in results or args.force):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        dev = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
        fm = load_model(args.model, space=space, data=data, rank_windows=64, seq_len=args.seq_len)
        fm.save_pretrained(parent_dir, overwrite=True)
        fm.model.to(dev)
        unranked = load_model(args.model, space=space)  # same weights, not permuted: what ranking buys
        unranked.model.to(dev)
        results["parent"] = {"ppl": evaluate(fm, val), "ppl_unranked": evaluate(unranked, val),
                             "params": {f"{w:g}": fm.num_parameters(fm.uniform_subnet(w, w)) for w in WIDTHS},
                             "subnets": {f"{w:g}": fm.uniform_subnet(w, w).to_dict() for w in WIDTHS},
                             "seconds": time.perf_counter() - t0}
        save()
        print("parent", results["parent"]["ppl"])

    if "elastic" in stages and ("elastic" not in results or args.force):
        run = out / "elastic"
        trainer, history, secs = fit_in_time(lambda: FlextronModel.from_pretrained(parent_dir), data, cfg, run,
                                             deadline, args.force)
        results["elastic"] = {"ppl": evaluate(trainer.fm, val), "seconds": secs, "tokens": tokens,
                              "tokens_per_s": tokens / secs, "subnet_passes_per_step": 2 + cfg.k_random,
                              "history": [r for r in history if "losses" in r or "eval" in r]}
        save()
        print("elastic", results["elastic"]["ppl"], f"{secs:.0f} s")

    if "baselines" in stages:
        results.setdefault("baselines", {})
        for w in args.baseline_widths:
            key = f"{w:g}"
            if key in results["baselines"] and not args.force:
                continue
            parent = FlextronModel.from_pretrained(parent_dir)
            run = out / f"baseline_{key}"
            bcfg = TrainConfig(**{**vars(cfg), "sampling": "full", "eval_widths": (1.0,)})
            # The subnet cut out physically (its weights are copies of the prefixes): the same function as
            # ``parent.extract`` (a plain LlamaForCausalLM), which transformers 5.24 cannot save_pretrained at 6 of 8
            # heads (its config validator wants hidden_size % num_attention_heads == 0 even with head_dim given).
            trainer, history, secs = fit_in_time(lambda p=parent, w=w: slim(p, p.uniform_subnet(w, w)), data, bcfg,
                                                 run, deadline, args.force, teacher=parent)
            results["baselines"][key] = {"ppl": evaluate(trainer.fm, val, (1.0,))["1"], "seconds": secs,
                                         "tokens": tokens, "tokens_per_s": tokens / secs,
                                         "history": [r for r in history if "losses" in r or "eval" in r]}
            save()
            print("baseline", key, results["baselines"][key]["ppl"], f"{secs:.0f} s")
    plot(results, Path(args.plot) if args.plot else out / "training.png", args.title)


def fit_in_time(make_model, data, cfg: TrainConfig, run: Path, deadline: float | None, force: bool, teacher=None):
    """Train ``run`` to ``cfg.steps``: continued from its latest checkpoint where one exists (a stage an earlier
    command stopped), in chunks of steps that end at a checkpoint before ``deadline``; past it, exit with status 3.
    Returns ``(trainer, history, training seconds over every command)``."""
    if force:
        shutil.rmtree(run, ignore_errors=True)
    clock = run / "seconds.json"  # training time spent by earlier commands on this run
    spent = json.loads(clock.read_text())["seconds"] if clock.is_file() and not force else 0.0
    chunk, step_s = 25, None
    while True:
        resume = "latest" if (run / "checkpoints").is_dir() and latest_checkpoint(run / "checkpoints") else None
        trainer = Trainer(make_model(), data, cfg, run, resume=resume, teacher=teacher)
        if trainer.step >= cfg.steps:  # every command's records, as the run's metrics file holds them
            metrics = run / "metrics.jsonl"
            history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
            return trainer, history, spent
        stop = cfg.steps
        if deadline is not None:
            left = deadline - time.perf_counter()
            steps_left = int(left / step_s) - 5 if step_s else chunk
            if steps_left < 1:
                print(f"{run.name}: time limit reached at step {trainer.step} of {cfg.steps}; run again to continue")
                sys.exit(3)
            stop = min(cfg.steps, trainer.step + steps_left)
        trainer.cfg = dataclasses.replace(cfg, stop_at=stop if stop < cfg.steps else None)
        t0, first = time.perf_counter(), trainer.step
        trainer.fit()
        took = time.perf_counter() - t0
        spent += took
        run.mkdir(parents=True, exist_ok=True)
        clock.write_text(json.dumps({"seconds": spent}))
        step_s = took / max(1, trainer.step - first)


def _evals_by_tokens(history: list[dict]) -> tuple[list[float], list[dict]]:
    """The in-run evaluations of a run's history and the training tokens (millions) at each."""
    per_step = next((r["tokens"] / r["step"] for r in history if r.get("tokens") and r.get("step")), None)
    evals = [r for r in history if "eval" in r]
    if per_step is None or not evals:
        return [], []
    return [r["step"] * per_step / 1e6 for r in evals], [r["eval"] for r in evals]


def plot(results: dict, path: Path, title: str) -> None:
    """Three panels: perplexity by width (ranked parent, the elastic run, dedicated models), the in-run evaluations
    against training tokens, and the training losses per sampled subnet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax3, ax2) = plt.subplots(1, 3, figsize=(16, 4.2))
    xs = [int(w * 100) for w in WIDTHS]
    if "parent" in results:
        ax.plot(xs, [results["parent"]["ppl"][f"{w:g}"] for w in WIDTHS], "o-", label="(a) parent, ranked, not trained")
    if "elastic" in results:
        ax.plot(xs, [results["elastic"]["ppl"][f"{w:g}"] for w in WIDTHS], "s-", label="(b) one elastic run")
    base = results.get("baselines", {})
    if base:
        bx = [int(float(k) * 100) for k in sorted(base, key=float)]
        ax.plot(bx, [base[k]["ppl"] for k in sorted(base, key=float)], "^--", label="(c) dedicated, trained alone")
    ax.set_yscale("log")
    ax.set_xlabel("uniform width (% of MLP neurons and heads)")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title(title)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    if "elastic" in results:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        tok, evals = _evals_by_tokens(results["elastic"]["history"])
        for i, w in enumerate(WIDTHS):
            if tok:
                ax3.plot(tok, [e[f"{w:g}"] for e in evals], "o-", ms=3, color=colors[i], label=f"elastic {w:.0%}")
            if f"{w:g}" in base:
                btok, bev = _evals_by_tokens(base[f"{w:g}"]["history"])
                if btok:
                    ax3.plot(btok, [e[f"{w:g}"] if f"{w:g}" in e else e.get("1", float("nan")) for e in bev],
                             "^--", ms=3, color=colors[i], label=f"dedicated {w:.0%}")
        ax3.set_yscale("log")
        ax3.set_xlabel("training tokens (millions)")
        ax3.set_ylabel("validation perplexity (log scale)")
        ax3.set_title("in-run evaluations against tokens")
        ax3.grid(alpha=0.3, which="both")
        ax3.legend(fontsize=7)
        hist = [r for r in results["elastic"]["history"] if "losses" in r]
        steps = [r["step"] for r in hist]
        for name in hist[0]["losses"]:
            ax2.plot(steps, [r["losses"][name] for r in hist], label=f"elastic: {name}")
        for k in sorted(base, key=float):
            h = [r for r in base[k]["history"] if "losses" in r]
            ax2.plot([r["step"] for r in h], [r["losses"]["full"] for r in h], "--", label=f"dedicated {float(k):.0%}")
        ax2.set_xlabel("step")
        ax2.set_ylabel("training loss (CE/KD mix)")
        ax2.set_title("training loss per sampled subnet")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
    else:
        ax3.set_visible(False)
        ax2.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print("wrote", path)


if __name__ == "__main__":
    main()
