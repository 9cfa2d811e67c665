"""Training checkpoints: written atomically, resumed bit for bit.

A run's ``checkpoints/`` folder holds one directory per saved step, ``step-00000100/``:

- ``model.pt``: the full (unsharded) state dict of the model;
- ``optimizer.pt``: the full optimizer state (keyed by parameter name, so it loads under DDP, FSDP2 or neither);
- ``trainer.pt``: step, scheduler state, the training config, the model's signature, the data position;
- ``rng-rank{r}.pt``: each rank's python, numpy, torch and CUDA generator states;
- ``meta.json``: written last; a directory without it is never used.

Everything goes into ``.tmp-step-.../`` first, is flushed to disk, and is renamed into place, so a run killed mid-save
leaves the previous checkpoints intact and an ignored temporary folder (removed by the next save). Older checkpoints
are deleted only after a newer one is in place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

META = "meta.json"
PREFIX = "step-"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (a run's ``checkpoints/`` folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: str | Path, step: int, *, model_state: dict | None, optimizer_state: dict | None,
                    trainer_state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root``. Collective under torch.distributed: every rank calls it;
    each writes its RNG state, rank 0 writes the rest (``model_state``/``optimizer_state`` may be ``None`` elsewhere).
    ``keep``: complete checkpoints to keep (the newest); ``0`` keeps all."""
    root = Path(root)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    main = _rank() == 0
    if main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".tmp-{PREFIX}*"):  # a save killed earlier
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    torch.save(rng_state(), tmp / f"rng-rank{_rank()}.pt")
    _barrier()
    if main:
        try:
            torch.save(model_state, tmp / "model.pt")
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(trainer_state, tmp / "trainer.pt")
            world = dist.get_world_size() if _dist() else 1
            (tmp / META).write_text(json.dumps({"step": step, "world_size": world}) + "\n")
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (a resumed run): move the old one aside first
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_tree(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path) -> dict:
    """``{"model", "optimizer", "trainer", "rng", "meta", "path"}`` of a checkpoint directory (this rank's RNG)."""
    path = Path(path)
    if not (path / META).is_file():
        raise ValueError(f"resume: {str(path)!r} is not a complete training checkpoint (no {META})")
    meta = json.loads((path / META).read_text())
    rng_file = path / f"rng-rank{_rank()}.pt"
    if not rng_file.is_file():  # resumed on more ranks than saved: every rank's stream comes from (seed, step) anyway
        rng_file = path / "rng-rank0.pt"
    load = lambda name: torch.load(path / name, map_location="cpu", weights_only=True)
    return {"model": load("model.pt"), "optimizer": load("optimizer.pt"), "trainer": load("trainer.pt"),
            "rng": load(rng_file.name), "meta": meta, "path": path}


def read_trainer_state(path: str | Path) -> dict:
    """Only ``trainer.pt`` (cheap): to check a checkpoint before loading the rest."""
    path = Path(path)
    if not (path / META).is_file():
        raise ValueError(f"resume: {str(path)!r} is not a complete training checkpoint (no {META})")
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
