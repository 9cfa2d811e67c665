"""Elastic continued training: one run that teaches every sub-network of a ranked Flextron model.

Each optimizer step draws one global batch of token blocks and runs it through several sub-networks, summing their
losses (Flextron's Eq. 5, the "sandwich" of slimmable networks): always the full model and the smallest subnet of
the space, plus ``k`` random heterogeneous subnets (each layer's MLP width and head count drawn independently from
the space). Subnets and data are pure functions of ``(seed, step)``, so every rank of a distributed run trains the
same subnets without any broadcast, and a resumed run sees exactly what an uninterrupted one would have.

Loss per subnet: next-token cross-entropy, or ``(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)`` with
distillation: ``inplace`` takes the full model's logits of the same step (detached; the full model itself learns
from CE only), ``parent`` takes the logits of a frozen copy of the model as it was when training started.

Scale-out: run the same command under ``torchrun``; ``parallel="ddp"`` wraps the model in
``DistributedDataParallel``, ``parallel="fsdp"`` shards each decoder layer and the root with FSDP2 ``fully_shard``.
Every rank takes its slice of the global batch; gradients are synchronised once per step (after the last subnet's
backward of the last micro-batch); rank 0 logs, evaluates into the metrics file and saves.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from flextron_kernels import distill_cross_entropy

from . import checkpoint as ckpt
from .data import perplexity
from .distributed import init_distributed, mean_across_ranks
from .model import FlextronModel
from .space import ElasticSpace, Subnet
from .tokens import TokenData


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. ``batch_size`` is per rank and micro-batch: a step sees
    ``batch_size * grad_accum * world_size`` blocks of ``seq_len`` tokens (+1 for the last target)."""

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.99)
    clip: float = 1.0
    sampling: str = "sandwich"  # "sandwich": full + smallest + k random subnets; "full": the full model only
    k_random: int = 2
    # Weight of the full model's loss in the sandwich sum (every other subnet weighs 1). Above 1 it protects the
    # full model, whose gradient the smaller subnets' larger losses otherwise outweigh. Logged losses stay unweighted.
    full_weight: float = 1.0
    # How the k random subnets are drawn: "layerwise" (each layer independently), "uniform" (one quantile of the
    # space for every layer: the deployment targets a latency budget usually maps to), or "mixed" (alternating).
    random_kind: str = "layerwise"
    distill: str = "none"  # "none" | "inplace" | "parent"
    alpha: float = 0.5
    temperature: float = 1.0
    data_mode: str = "random"  # "random" | "sequential" blocks
    seed: int = 0
    eval_every: int = 100  # 0: only at the start and the end
    eval_widths: tuple = (0.25, 0.5, 0.75, 1.0)
    eval_windows: int | None = 64  # None or 0: the whole validation split
    eval_batch_size: int = 16
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    stop_at: int | None = None  # stop (after saving) at this step; the schedule still runs to ``steps``
    parallel: str = "none"  # "none" | "ddp" | "fsdp"
    bf16: bool = True  # autocast to bfloat16 on CUDA (ignored on a CPU)
    device: str = "auto"  # "auto" (this rank's GPU when there is one, else the CPU) | "cuda" | "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas, self.eval_widths = tuple(self.betas), tuple(self.eval_widths)
        choices = {"sampling": ("sandwich", "full"), "distill": ("none", "inplace", "parent"),
                   "random_kind": ("layerwise", "uniform", "mixed"),
                   "data_mode": ("random", "sequential"), "parallel": ("none", "ddp", "fsdp"),
                   "device": ("auto", "cuda", "cpu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise ValueError(f"alpha must be in [0, 1] and temperature > 0, got {self.alpha}, {self.temperature}")
        if not self.full_weight > 0:
            raise ValueError(f"full_weight must be > 0, got {self.full_weight}")
        if self.k_random < 0:
            raise ValueError(f"k_random must be >= 0, got {self.k_random}")


# -- sub-networks -----------------------------------------------------------------------------------------------
def check_space(fm: FlextronModel) -> None:
    """Raise ``ValueError`` unless every layer of ``fm`` has at least one MLP width and head count in its space."""
    for i in range(fm.num_layers):
        try:
            mlp, heads = fm.mlp_choices(i), fm.head_choices(i)
        except (TypeError, ValueError) as e:
            raise ValueError(f"space {fm.space.to_dict()} has no valid subnet for this model (layer {i}): {e}") from e
        if not mlp or not heads:
            raise ValueError(f"space {fm.space.to_dict()} has no valid subnet for this model (layer {i})")


def smallest_subnet(fm: FlextronModel) -> Subnet:
    return Subnet(mlp=[fm.mlp_choices(i)[0] for i in range(fm.num_layers)],
                  heads=[fm.head_choices(i)[0] for i in range(fm.num_layers)])


def random_subnet(fm: FlextronModel, rng: np.random.Generator) -> Subnet:
    """Each layer's MLP width and head count drawn uniformly and independently from the space."""
    mlp, heads = [], []
    for i in range(fm.num_layers):
        m, h = fm.mlp_choices(i), fm.head_choices(i)
        mlp.append(m[int(rng.integers(len(m)))])
        heads.append(h[int(rng.integers(len(h)))])
    return Subnet(mlp=mlp, heads=heads)


def quantile_subnet(fm: FlextronModel, rng: np.random.Generator) -> Subnet:
    """One quantile of the space per axis, the same in every layer: with a uniform space, a uniform subnet."""
    qm, qh = rng.random(), rng.random()
    pick = lambda choices, q: choices[min(len(choices) - 1, int(q * len(choices)))]
    return Subnet(mlp=[pick(fm.mlp_choices(i), qm) for i in range(fm.num_layers)],
                  heads=[pick(fm.head_choices(i), qh) for i in range(fm.num_layers)])


def sample_subnets(fm: FlextronModel, step: int, cfg: TrainConfig) -> list[tuple[str, Subnet | None]]:
    """The ``(name, subnet)`` pairs of step ``step`` (``None``: the full model), a pure function of (seed, step)."""
    if cfg.sampling == "full":
        return [("full", None)]
    rng = np.random.default_rng([cfg.seed, step, 0x5B])
    out = [("full", None), ("smallest", smallest_subnet(fm))]
    for j in range(cfg.k_random):
        uniform = cfg.random_kind == "uniform" or (cfg.random_kind == "mixed" and j % 2 == 0)
        out.append((f"random{j}", quantile_subnet(fm, rng) if uniform else random_subnet(fm, rng)))
    return out


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def parameter_signature(fm: FlextronModel) -> dict:
    """What must match for a checkpoint to belong to this model: class and every parameter's name and shape."""
    return {"architecture": type(fm.model).__name__,
            "params": {k: list(v.shape) for k, v in fm.model.state_dict().items()}}


def _signature_diff(a: dict, b: dict) -> str:
    if a["architecture"] != b["architecture"]:
        return f"architecture {a['architecture']} vs {b['architecture']}"
    pa, pb = a["params"], b["params"]
    diffs = [f"{k}: {pa.get(k)} vs {pb.get(k)}" for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)]
    return "; ".join(diffs[:3]) + (f"; ... ({len(diffs)} differences)" if len(diffs) > 3 else "")


# -- the trainer ------------------------------------------------------------------------------------------------
class Trainer:
    """Train ``fm`` on ``data`` per ``cfg``; writes ``metrics.jsonl``, ``checkpoints/`` and ``model/`` into ``out_dir``.

    ``resume``: a checkpoint directory, or ``"latest"`` for the newest one in ``out_dir/checkpoints``. Every input is
    checked before anything is written: a bad one raises and leaves ``out_dir`` as it was.
    """

    def __init__(self, fm: FlextronModel, data: TokenData, cfg: TrainConfig, out_dir: str | Path,
                 resume: str | Path | None = None, teacher: torch.nn.Module | None = None) -> None:
        self.cfg, self.data, self.out = cfg, data, Path(out_dir)
        self.rank, self.world, self.device = init_distributed(cfg.device, group=cfg.parallel != "none")
        self.main = self.rank == 0
        limit = max_positions(fm.config)
        if limit is not None and cfg.seq_len > limit:
            raise ValueError(f"seq_len={cfg.seq_len} is longer than the model allows ({limit} positions)")
        data.check_seq_len(cfg.seq_len)
        check_space(fm)
        for w in cfg.eval_widths:
            fm.uniform_subnet(mlp=w, heads=w)  # raises for a width outside (0, 1]
        if cfg.parallel != "none" and not dist.is_initialized():
            raise ValueError(f"parallel={cfg.parallel!r} needs torch.distributed: run under torchrun")
        if cfg.parallel == "none" and self.world > 1:  # each process would train its own copy on its own blocks
            raise ValueError(f"parallel='none' with {self.world} processes: pass parallel='ddp' or 'fsdp' "
                             "(--parallel) to train one model across them")
        self.signature = parameter_signature(fm)
        self.resume_path = self._find_resume(resume)
        self.val = data.val_windows(cfg.seq_len + 1, cfg.eval_windows or None)

        fm.set_subnet(None)
        self.fm = fm.to(self.device).train()
        self.teacher = None
        if cfg.distill == "parent":  # the given teacher (e.g. the parent of an extracted subnet), else a frozen copy
            self.teacher = (teacher if teacher is not None else copy.deepcopy(fm)).to(self.device)
            self.teacher.eval().requires_grad_(False)
        self._export_template = None
        if cfg.parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # The mesh on this run's device type (FSDP2's default mesh is CUDA whenever a GPU exists).
            mesh = init_device_mesh(self.device.type, (self.world,))
            if self.main:  # FSDP2 shards the parameters in place: keep a CPU copy to export the final model into
                self._export_template = copy.deepcopy(fm).cpu()
            for m in [self.teacher] if self.teacher is not None else []:
                for layer in m.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(m, mesh=mesh)
            for layer in fm.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(fm, mesh=mesh)
            self.engine = fm
        elif cfg.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.engine = DistributedDataParallel(fm, device_ids=[self.device.index] if self.device.type == "cuda"
                                                  else None)
        else:
            self.engine = fm
        decay = [p for p in fm.parameters() if p.ndim >= 2]
        no_decay = [p for p in fm.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step = 0
        self.history: list[dict] = []
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (
            cfg.bf16 and self.device.type == "cuda") else contextlib.nullcontext()
        if self.resume_path is not None:
            self._load(self.resume_path)

    # -- inputs ---------------------------------------------------------------------------------------
    def _find_resume(self, resume) -> Path | None:
        root = self.out / "checkpoints"
        if resume is None:
            if ckpt.list_checkpoints(root):
                raise ValueError(f"out_dir {str(self.out)!r} already holds checkpoints: pass resume to continue "
                                 f"from them, or choose another out_dir (nothing was changed)")
            return None
        path = ckpt.latest_checkpoint(root) if str(resume) == "latest" else Path(resume)
        if path is None:
            raise ValueError(f"resume: no complete checkpoint under {str(root)!r}")
        saved = ckpt.read_trainer_state(path)
        if saved["signature"] != self.signature:
            raise ValueError(f"resume: checkpoint {str(path)!r} belongs to another model "
                             f"({_signature_diff(saved['signature'], self.signature)}); nothing was loaded or changed")
        return path

    def _load(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = ckpt.load_checkpoint(path)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.fm, state["model"], options=opts)
        set_optimizer_state_dict(self.fm, self.optimizer, state["optimizer"], options=opts)
        trainer = state["trainer"]
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.step = trainer["step"]
        ckpt.set_rng_state(state["rng"])
        if self.main:
            changed = {k: (v, getattr(self.cfg, k)) for k, v in trainer["config"].items()
                       if k in ("seed", "seq_len", "batch_size", "grad_accum", "sampling", "k_random", "random_kind",
                                "data_mode", "distill", "steps") and getattr(self.cfg, k) != v}
            if changed or trainer["world_size"] != self.world:
                print(f"resume: settings differ from the checkpoint, so the run is not a bit-exact continuation: "
                      f"{changed}, world size {trainer['world_size']} -> {self.world}")
            self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint by the run that stopped)."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            path.write_text("".join(ln + "\n" for ln in keep))

    # -- one step -------------------------------------------------------------------------------------
    def _sync(self, last: bool):
        if self.cfg.parallel == "ddp" and not last:
            return self.engine.no_sync()
        if self.cfg.parallel == "fsdp":
            self.fm.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _logits(self, model, inp: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return model(input_ids=inp).logits

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        local = cfg.batch_size
        global_n = local * cfg.grad_accum * self.world
        starts = self.data.batch_starts(step, global_n, cfg.seq_len, seed=cfg.seed, mode=cfg.data_mode)
        subnets = sample_subnets(self.fm, step, cfg)
        # Each subnet's loss summed on the device, in float64 (the same arithmetic as summing ``loss.item()``s) and
        # read once per step: a ``.item()`` after every backward would make the host wait for the GPU before it
        # could queue the next subnet's launches, leaving the GPU idle while it does.
        sums = {name: torch.zeros((), dtype=torch.float64, device=self.device) for name, _ in subnets}
        for micro in range(cfg.grad_accum):
            lo = (micro * self.world + self.rank) * local
            block = self.data.blocks(starts[lo:lo + local], cfg.seq_len).to(self.device)
            inp, tgt = block[:, :-1], block[:, 1:]
            teacher = None  # the teacher's logits, read by every subnet's loss
            if self.teacher is not None and cfg.alpha > 0:
                with torch.no_grad():
                    if isinstance(self.teacher, FlextronModel):
                        self.teacher.set_subnet(None)
                    teacher = self._logits(self.teacher, inp)
            for j, (name, subnet) in enumerate(subnets):
                last = micro == cfg.grad_accum - 1 and j == len(subnets) - 1
                self.fm.set_subnet(subnet)
                with self._sync(last):
                    logits = self._logits(self.engine, inp)
                    # CE blended with distillation, loss and gradient in one pass over the logits (no float32 copies
                    # of them); without a teacher, or at alpha 0, cross-entropy alone.
                    loss = distill_cross_entropy(logits, tgt, teacher, cfg.alpha, cfg.temperature)
                    weight = cfg.full_weight if name == "full" else 1.0
                    (loss * (weight / cfg.grad_accum)).backward()
                sums[name] += loss.detach().double() / cfg.grad_accum
                if cfg.distill == "inplace" and name == "full" and cfg.alpha > 0:
                    teacher = logits.detach()
                del logits, loss
        self.fm.set_subnet(None)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.fm.parameters(), cfg.clip if cfg.clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        names = list(sums)
        means = mean_across_ranks(torch.stack([sums[n] for n in names]).tolist(), self.device)
        losses = dict(zip(names, means))
        return {"step": self.step, "lr": lr, "loss": sum(means), "losses": losses, "grad_norm": float(grad_norm),
                "tokens": self.step * global_n * cfg.seq_len}

    # -- evaluation, saving ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation perplexity of the uniform subnets at ``eval_widths`` (every rank runs it: FSDP needs all)."""
        self.fm.eval()
        out = {}
        try:
            for w in self.cfg.eval_widths:
                self.fm.set_subnet(self.fm.uniform_subnet(mlp=w, heads=w))
                with self.autocast:
                    out[f"{w:g}"] = perplexity(self.fm, self.val.to(self.device), self.cfg.eval_batch_size)
        finally:
            self.fm.set_subnet(None)
            self.fm.train()
        return out

    def _full_states(self) -> tuple[dict | None, dict | None]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
        model = get_model_state_dict(self.fm, options=opts)
        optim = get_optimizer_state_dict(self.fm, self.optimizer, options=opts)
        if not dist.is_initialized():  # same layout as under torchrun: tensors on the CPU
            model = {k: v.detach().cpu().clone() for k, v in model.items()}
        return (model, optim) if self.main else (None, None)

    def save(self) -> Path:
        model, optim = self._full_states()
        trainer = {"step": self.step, "scheduler": self.scheduler.state_dict(), "config": asdict(self.cfg),
                   "signature": self.signature, "world_size": self.world, "data_position": self.step,
                   "data": {"path": str(self.data.path), "tokens": self.data.meta["tokens"]}}
        return ckpt.save_checkpoint(self.out / "checkpoints", self.step, model_state=model, optimizer_state=optim,
                                    trainer_state=trainer, keep=self.cfg.keep_checkpoints)

    def export(self) -> Path:
        """Write the trained model as a flextron checkpoint (``FlextronModel.from_pretrained``) to ``out_dir/model``."""
        path = self.out / "model"
        if self.cfg.parallel == "fsdp":
            model, _ = self._full_states()
            if self.main:
                self._export_template.load_state_dict(model)
                self._export_template.save_pretrained(path, overwrite=True)  # this run's own earlier export
        elif self.main:
            self.fm.save_pretrained(path, overwrite=True)
        if dist.is_initialized():
            dist.barrier()
        return path

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train until ``steps`` (or ``stop_at``); returns the records written to ``metrics.jsonl``."""
        cfg = self.cfg
        end = min(cfg.steps, cfg.stop_at) if cfg.stop_at is not None else cfg.steps
        if self.step == 0 and self.resume_path is None:
            self._log({"step": 0, "eval": self.evaluate()})
        bar = tqdm(total=end, initial=self.step, desc="train", disable=not (cfg.progress and self.main),
                   dynamic_ncols=True)
        t0, tokens0 = time.perf_counter(), self.step
        per_step = cfg.batch_size * cfg.grad_accum * self.world * cfg.seq_len
        while self.step < end:
            rec = self.train_step()
            elapsed = time.perf_counter() - t0
            rec["tokens_per_s"] = (self.step - tokens0) * per_step / max(elapsed, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if self.step % max(1, cfg.log_every) == 0 or self.step == end:
                self._log(rec)
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps:
                self._log({"step": self.step, "eval": self.evaluate()})
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == end:
                self.save()
        bar.close()
        if self.step == cfg.steps:
            self.export()
        return self.history


def load_model(path: str | Path, *, space: ElasticSpace | None = None, data: TokenData | None = None,
               rank_windows: int = 64, seq_len: int = 256) -> FlextronModel:
    """A flextron checkpoint as it is, or a Hugging Face model made elastic and ranked on the first
    ``rank_windows`` training windows of ``data`` (``space`` replaces the checkpoint's space when given)."""
    path = Path(path)
    if (path / "flextron.json").is_file():
        fm = FlextronModel.from_pretrained(path)
        if space is not None:
            fm.space = space
        return fm
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {str(path)!r} is neither a flextron checkpoint nor a Hugging Face model dir")
    from transformers import AutoModelForCausalLM

    fm = FlextronModel.from_hf(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), space)
    if data is not None and rank_windows > 0:
        n = min(rank_windows, len(data.train) // seq_len)
        windows = torch.from_numpy(np.asarray(data.train[: n * seq_len]).astype(np.int64)).view(n, seq_len)
        fm.rank(windows.split(8))
    return fm


def train(fm: FlextronModel, data: TokenData, cfg: TrainConfig, out_dir: str | Path,
          resume: str | Path | None = None, teacher: torch.nn.Module | None = None) -> list[dict]:
    """Run :class:`Trainer` to the end; returns its metrics records."""
    return Trainer(fm, data, cfg, out_dir, resume=resume, teacher=teacher).fit()
