"""Training throughput of ``flextron train`` on one GPU: tokens/s and model FLOP utilisation of an elastic step
against a dense one, with bf16 autocast over fp32 master weights (the trainer's default on CUDA).

Rows, per shape:

- ``elastic``: the recipe of docs/training.md: each step the full model (loss weight 4), the smallest subnet and 2
  random layerwise ones, each distilled from a frozen copy of the parent (``alpha`` 0.5) and the teacher's forward;
- ``dense``: the full model alone with cross-entropy (``--sampling full``, no teacher): a plain training step of the
  same model through the same trainer, the baseline a user would otherwise run.

Shapes: ``stories260k`` (the real checkpoint of ../shared/data), ``smollm2-135m`` (SmolLM2-135M's shape: 30 layers,
hidden 576, 9 query / 3 KV heads, vocabulary 49,152, tied embedding) and ``llama-1b`` (the ~1B Llama-3 shape of
bench_end_to_end.py), random weights where no checkpoint is named. Tokens are random ids (the step's cost does not
depend on them).

Measured: after ``--warmup`` steps, ``--steps`` steps of ``Trainer.train_step`` between two synchronisations
(tokens/s counts the data tokens of a step, ``batch x seq_len``); then as many further steps under
``torch.utils.flop_counter.FlopCounterMode``, whose count (matmuls and attention, forward and backward, teacher
included; attention over every key, as torch counts it, so causal attention counts double) gives FLOPs per data
token. Utilisation is the achieved FLOP rate over the bf16 matmul rate measured on
this GPU in the same run (8192^3, ``_common.measure_ceilings``). ``--profile`` adds the top CUDA kernels of two
steps by total time (``torch.profiler``).

Several GPUs: ``torchrun --nproc_per_node N benchmarks/bench_train.py --parallel ddp|fsdp``. Every rank trains
``batch`` blocks per step (the global batch is ``N x batch``), tokens/s counts the global batch, FLOPs per token
are each rank's own count over its own tokens (the same work per token as on one GPU), and utilisation is against
``N`` times the matmul rate measured on rank 0's GPU. Rank 0 writes ``train_multi_<GPU>.json``; set the rows
against the one-GPU file's, run at the same per-GPU batch. ``N = 1`` times the DDP or FSDP2 wrapper on one GPU (into
``train_multi_<GPU>.json`` too).

Usage: ``python benchmarks/bench_train.py [--out DIR] [--shapes a,b] [--modes elastic,dense] [--profile]``;
writes ``train_<GPU>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# shape -> (config values or None for the real checkpoint, batch, seq_len)
SHAPES = {
    "stories260k": (None, 256, 512),
    "smollm2-135m": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
                          tie_word_embeddings=True), 32, 512),
    "llama-1b": ("llama-1b", 8, 1024),
}
LOSSES = ("fused", "torch")
MODES = ("elastic", "dense")
WIDTHS = (0.25, 0.5, 0.75, 1.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="folder of the results file")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, autotune, allocator)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (and as many counted steps)")
    p.add_argument("--batch", type=int, default=None, help="blocks per step (default: per shape)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per block (default: per shape)")
    p.add_argument("--losses", default="fused", help="comma list of fused (the distill_cross_entropy kernel, "
                   "the trainer's default on CUDA), torch (the same loss in torch ops): one row per mode and loss")
    p.add_argument("--profile", action="store_true", help="add the top CUDA kernels of two steps per row")
    p.add_argument("--quick", action="store_true", help="smollm2-135m only, 2 + 4 steps")
    p.add_argument("--parallel", default="none", choices=("none", "ddp", "fsdp"),
                   help="under torchrun: DistributedDataParallel or FSDP2 across the ranks (one GPU each)")
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.parallel == "none":
        p.error(f"--parallel: none under torchrun (WORLD_SIZE={world}): pass ddp or fsdp")
    if args.parallel != "none" and "MASTER_ADDR" not in os.environ:
        p.error(f"--parallel {args.parallel} needs torchrun (--nproc_per_node N; N = 1 times the wrapper on one GPU)")
    if args.quick:
        args.shapes, args.warmup, args.steps = "smollm2-135m", 2, 4
    for name in ("shapes", "modes", "losses"):
        allowed = {"shapes": SHAPES, "modes": MODES, "losses": LOSSES}[name]
        vals = [v for v in getattr(args, name).split(",") if v]
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            p.error(f"--{name}: {bad or 'nothing given'} not in {list(allowed)}")
        setattr(args, name, vals)
    if args.warmup < 0 or args.steps < 1:
        p.error("--warmup must be >= 0 and --steps >= 1")
    return args


def build(shape: str, device) -> torch.nn.Module:
    """The HF model of ``shape`` in fp32 (master weights) on ``device``."""
    values = SHAPES[shape][0]
    if values is None:
        from transformers import AutoModelForCausalLM

        from flextron.data import STORIES260K_DIR

        return AutoModelForCausalLM.from_pretrained(STORIES260K_DIR, dtype=torch.float32).to(device)
    from bench_end_to_end import build_model

    return build_model(values, device, dtype=torch.float32).train()


def random_tokens(vocab: int, n: int, seed: int = 0):
    """A :class:`flextron.tokens.TokenData` of random ids (train ``n`` tokens, validation 64K)."""
    from flextron.tokens import TokenData

    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    return TokenData(train=rng.integers(0, vocab, n, dtype=dtype), val=rng.integers(0, vocab, 1 << 16, dtype=dtype),
                     meta={"documents": {"train": 1, "val": 1}}, path=Path("<random ids>"))


def config(mode: str, batch: int, seq_len: int, device: str, parallel: str = "none"):
    from flextron.train import TrainConfig

    common = dict(steps=1_000_000, batch_size=batch, seq_len=seq_len, lr=1e-4, warmup=0, eval_every=0,
                  save_every=0, log_every=1_000_000, progress=False, device=device, parallel=parallel)
    if mode == "elastic":
        return TrainConfig(**common, sampling="sandwich", k_random=2, random_kind="layerwise", distill="parent",
                           alpha=0.5, full_weight=4.0)
    return TrainConfig(**common, sampling="full", distill="none")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def top_kernels(trainer, steps: int = 2, top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.train_step()
        _sync(trainer.device)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:120], "ms_per_step": t / 1e3 / steps, "calls_per_step": e.count / steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows[:top]


@contextlib.contextmanager
def loss_kernel(enabled: bool):
    """The trainer's loss through the ``distill_cross_entropy`` kernel (``True``) or its torch-op reference."""
    from flextron_kernels import distill_loss

    previous, distill_loss._ENABLED = distill_loss._ENABLED, enabled
    try:
        yield
    finally:
        distill_loss._ENABLED = previous


@contextlib.contextmanager
def gqa_flop_counts():
    """FlopCounterMode's SDPA formulas with fewer KV heads than query heads. torch 2.13 counts GQA itself; older
    releases (2.11) raise on it for the fused CUDA kernels (the CPU's math path is counted through its matmuls):
    there the KV shapes are broadcast to the query heads, as the kernels do."""
    import torch.utils.flop_counter as fc

    try:
        fc.sdpa_flop_count((1, 2, 1, 16), (1, 1, 1, 16), (1, 1, 1, 16))
        yield
        return
    except AssertionError:
        pass
    fwd, bwd = fc.sdpa_flop_count, fc.sdpa_backward_flop_count

    def wide(q, kv):
        return tuple(kv) if kv[1] == q[1] else (kv[0], q[1], *kv[2:])

    fc.sdpa_flop_count = lambda q, k, v: fwd(q, wide(q, k), wide(q, v))
    fc.sdpa_backward_flop_count = lambda g, q, k, v: bwd(g, q, wide(q, k), wide(q, v))
    try:
        yield
    finally:
        fc.sdpa_flop_count, fc.sdpa_backward_flop_count = fwd, bwd


def measure(shape: str, mode: str, args, device: torch.device, peak: float | None) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from flextron.model import FlextronModel
    from flextron.space import ElasticSpace
    from flextron.train import Trainer
    from flextron_kernels import distill_loss

    _, batch, seq_len = SHAPES[shape]
    batch, seq_len = args.batch or batch, args.seq_len or seq_len
    hf = build(shape, device)
    fm = FlextronModel.from_hf(hf, space=ElasticSpace(mlp=WIDTHS, heads=WIDTHS))
    params = fm.num_parameters()  # before FSDP2 shards them
    per_step = batch * seq_len  # this rank's tokens per step
    n_steps = args.warmup + 2 * args.steps + (2 if args.profile else 0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = random_tokens(fm.config.vocab_size, max(per_step * world * 4, 1 << 20) + seq_len + 1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(fm, data, config(mode, batch, seq_len, device.type, getattr(args, "parallel", "none")), tmp)
        world = trainer.world
        for _ in range(args.warmup):
            trainer.train_step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            rec = trainer.train_step()
        _sync(device)
        secs = time.perf_counter() - t0
        counter = FlopCounterMode(display=False)
        with gqa_flop_counts(), counter:
            for _ in range(args.steps):
                trainer.train_step()
        flops = counter.get_total_flops() / (args.steps * per_step)
        kernels = top_kernels(trainer) if args.profile and device.type == "cuda" else None
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    tokens_per_s = args.steps * per_step * world / secs
    row = {"shape": shape, "mode": mode, "batch": batch, "seq_len": seq_len, "params": params,
           "step_ms": secs * 1e3 / args.steps, "tokens_per_s": tokens_per_s, "flops_per_token": flops,
           "tflops_per_s": flops * tokens_per_s / 1e12, "last_loss": rec["loss"], "steps_total": n_steps,
           "passes_per_step": (2 + trainer.cfg.k_random) if mode == "elastic" else 1,
           "teacher": trainer.teacher is not None, "peak_mem_gib": peak_mem,
           "loss": "fused" if distill_loss._ENABLED and device.type == "cuda" else "torch",
           "six_n_flops_per_token": 6 * params, "world": world, "parallel": trainer.cfg.parallel,
           "flops_counted_by": "torch.utils.flop_counter.FlopCounterMode: aten matmuls and SDPA (every key, "
                               "causal masking not discounted), forward and backward; a Triton launch would not be "
                               "seen (a training step of uniform-width layers makes none)"}
    if peak:
        row["utilisation_vs_measured_matmul"] = flops * tokens_per_s / (peak * world)
    if kernels is not None:
        row["top_kernels"] = kernels
    del trainer, fm, hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def line(r: dict) -> str:
    util = r.get("utilisation_vs_measured_matmul")
    gpus = f" {r['parallel']} x{r['world']}" if r.get("world", 1) > 1 else ""
    return (f"{r['shape']:13} {r['mode']:8}{gpus} {r['batch']:4} x {r['seq_len']:5}: {r['step_ms']:9.1f} ms/step "
            f"{r['tokens_per_s']:12,.0f} tok/s  {r['flops_per_token'] / 1e9:6.2f} GFLOP/token  "
            f"{r['tflops_per_s']:7.1f} TFLOP/s" + (f"  {util:.1%} of the measured matmul rate" if util else ""))


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import measure_ceilings, run_info, write_result

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    torch.cuda.set_device(device)
    ceilings = measure_ceilings()
    name = "train_multi" if args.parallel != "none" else "train"  # a wrapped run of one GPU too
    payload = {"benchmark": name, "info": run_info(), "ceilings": ceilings,
               "settings": {"warmup": args.warmup, "steps": args.steps, "bf16_autocast": True,
                            "master_weights": "float32", "widths": list(WIDTHS), "world": world,
                            "parallel": args.parallel}, "rows": []}
    for shape in args.shapes:
        for mode, loss in ((m, x) for m in args.modes for x in args.losses):
            with loss_kernel(loss == "fused"):
                row = measure(shape, mode, args, device, ceilings["bf16_flops_per_s"])
            if rank:
                continue
            payload["rows"].append(row)
            print(line(row), flush=True)
            for k in row.get("top_kernels", [])[:6]:
                print(f"    {k['ms_per_step']:8.2f} ms/step  {k['calls_per_step']:7.0f} calls  {k['kernel'][:80]}")
            write_result(args.out, name, payload)  # after each row: a run cut short keeps its figures
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
