"""Two processes (DDP, then FSDP2) train exactly what one process trains with the same global batch, and a
two-process run killed after a checkpoint resumes on two processes bit for bit: gloo on the CPU everywhere, NCCL
with one GPU per process where a machine has two (float32 there, as on the CPU: the comparison is of arithmetic,
not of bf16 rounding). Where a machine has one GPU, the NCCL path (process group, device placement, DDP and FSDP2
on CUDA, sharded checkpoints) runs as one process with the whole batch, as torchrun --nproc_per_node 1 starts it
(gloo too: a group of one).

On the CPU every op runs its plain-torch path (``flextron_kernels.cpu_reference``), as a CPU run of ``flextron train``
does; the kernels under the Triton interpreter add minutes here and are tested against the same references on
their own. On a GPU the kernels run."""

from __future__ import annotations

import contextlib
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist

import flextron_kernels
from flextron import FlextronModel
from flextron.train import TrainConfig, Trainer

from .train_utils import start_ranks, tiny_fm, token_data

STEPS = 2
# (device, processes): each process has one device; the global batch is 2 blocks per step
DEVICES = [pytest.param("cpu", 2, id="gloo"), pytest.param("cpu", 1, id="gloo-one-process"),
           pytest.param("cuda", 2, id="nccl", marks=pytest.mark.skipif(
               not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")),
           pytest.param("cuda", 1, id="nccl-one-gpu", marks=pytest.mark.skipif(
               not torch.cuda.is_available(), reason="NCCL needs a GPU"))]
RESUME_DEVICES = [d for d in DEVICES if d.id != "gloo-one-process"]  # CI time: the group of one is covered above


def _cfg(parallel: str, batch_size: int, device: str = "cpu", **kw) -> TrainConfig:
    # device "cpu": gloo on the CPU, also on a machine with GPUs
    return TrainConfig(**{**dict(steps=STEPS, batch_size=batch_size, seq_len=16, warmup=1, k_random=0,
                                 distill="parent", log_every=1, eval_every=0, eval_widths=(1.0,), eval_windows=1,
                                 parallel=parallel, progress=False, device=device, bf16=False), **kw})


def _worker(rank: int, world: int, port: int, parallel: str, out: str, device: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        with _ops(device):
            history = Trainer(tiny_fm(), token_data(), _cfg(parallel, batch_size=2 // world, device=device), out).fit()
        if rank == 0:
            torch.save(history, os.path.join(out, "history.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ops(device: str):
    """The plain-torch ops on the CPU (what a CPU run executes); the kernels on a GPU."""
    return flextron_kernels.cpu_reference() if device == "cpu" else contextlib.nullcontext()


_SINGLE: dict = {}


def _single(device: str, tmp_path_factory):
    """One process, the whole global batch of 2 blocks per step (made once per device)."""
    if device not in _SINGLE:
        out = tmp_path_factory.mktemp(f"single_{device}")
        with _ops(device):
            history = Trainer(tiny_fm(), token_data(), _cfg("none", batch_size=2, device=device), out).fit()
        _SINGLE[device] = history, FlextronModel.from_pretrained(out / "model").model.state_dict()
    return _SINGLE[device]


@pytest.mark.parametrize("device,world", DEVICES)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one(parallel, device, world, tmp_path_factory, tmp_path):
    single = _single(device, tmp_path_factory)
    start_ranks(_worker, (world, _free_port(), parallel, str(tmp_path), device), world, device)
    history = torch.load(tmp_path / "history.pt", weights_only=True)
    ref_history, ref_state = single
    losses = [r["losses"] for r in history if "losses" in r]
    ref_losses = [r["losses"] for r in ref_history if "losses" in r]
    assert len(losses) == STEPS and losses[0].keys() == ref_losses[0].keys()
    for got, ref in zip(losses, ref_losses):
        for name in ref:
            assert got[name] == pytest.approx(ref[name], rel=1e-5), name
    evals = [r["eval"]["1"] for r in history if "eval" in r]
    assert evals == pytest.approx([r["eval"]["1"] for r in ref_history if "eval" in r], rel=1e-5)
    # rank 0 exported the trained model (gathered from the shards under FSDP2)
    state = FlextronModel.from_pretrained(tmp_path / "model").model.state_dict()
    for k, ref in ref_state.items():
        assert torch.allclose(state[k], ref, rtol=1e-4, atol=1e-6), k
    assert any(not torch.equal(ref_state[k], v) for k, v in tiny_fm().model.state_dict().items())  # it trained


RESUME_STEPS = 3


def _resume_worker(rank: int, world: int, port: int, parallel: str, out: str, phase: str, device: str) -> None:
    """``full``: three steps straight through. ``kill``: the same run, every process gone without any clean-up
    (``os._exit``: no export, no process-group teardown) right after the step-1 checkpoint. ``resume``: fresh
    processes continue from the latest checkpoint to the end, given the parent again (as ``flextron train
    --resume`` is: the frozen teacher is a copy of the model it is given; the trained weights come from the
    checkpoint)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = _cfg(parallel, batch_size=2 // world, device=device, steps=RESUME_STEPS, save_every=1, k_random=1)
    if phase == "kill":
        real_save = Trainer.save

        def save_then_die(self):
            real_save(self)
            dist.barrier()  # every rank is past the checkpoint (rank 0 wrote it)
            os._exit(0)

        Trainer.save = save_then_die
    trainer = Trainer(tiny_fm(), token_data(), cfg, out, resume="latest" if phase == "resume" else None)
    with _ops(device):
        history = trainer.fit()
    if rank == 0:
        torch.save(history, os.path.join(out, f"history_{phase}.pt"))
    dist.destroy_process_group()


def _spawn(parallel: str, out, phase: str, device: str, world: int) -> None:
    start_ranks(_resume_worker, (world, _free_port(), parallel, str(out), phase, device), world, device)


@pytest.mark.parametrize("device,world", RESUME_DEVICES)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_killed_run_resumes_bit_for_bit(parallel, device, world, tmp_path):
    _spawn(parallel, tmp_path / "full", "full", device, world)
    _spawn(parallel, tmp_path / "cut", "kill", device, world)
    assert not (tmp_path / "cut" / "model").exists()  # killed before the end: no export
    assert not (tmp_path / "cut" / "history_kill.pt").exists()
    _spawn(parallel, tmp_path / "cut", "resume", device, world)

    def losses(history):
        return {r["step"]: r["losses"] for r in history if "losses" in r}

    full = losses(torch.load(tmp_path / "full" / "history_full.pt", weights_only=True))
    resumed = losses(torch.load(tmp_path / "cut" / "history_resume.pt", weights_only=True))
    assert sorted(full) == [1, 2, 3] and sorted(resumed) == [2, 3]
    assert {s: full[s] for s in resumed} == resumed  # every subnet's loss of the resumed steps, bit for bit
    a = FlextronModel.from_pretrained(tmp_path / "full" / "model").model.state_dict()
    b = FlextronModel.from_pretrained(tmp_path / "cut" / "model").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the metrics file holds each step once: the killed run's records past its checkpoint were dropped
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if '"losses"' in ln]
    assert steps == [1, 2, 3]
