"""Process groups for runs under ``torchrun``: each rank's device, and means across ranks."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: str = "auto", group: bool = False) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; initialises the process group under ``torchrun`` (NCCL on GPUs, else gloo)
    where it runs more than one process, or one process with ``group`` (DDP or FSDP2 asked for: they need a group,
    also of one).

    ``device="cpu"`` keeps a run on the CPU (gloo) even where GPUs exist; ``"cuda"`` requires one GPU per local rank.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda:
        count = torch.cuda.device_count()
        if local >= count:
            raise ValueError(f"LOCAL_RANK={local} needs GPU {local} but this machine has {count} GPU(s): "
                             f"start at most {count} processes per node, or pass device='cpu'")
    dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    launched = "MASTER_ADDR" in os.environ and "RANK" in os.environ  # torchrun (or its environment) set this up
    if (world > 1 or (group and launched)) and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dev
    return 0, 1, dev


def mean_across_ranks(values: list[float], device) -> list[float]:
    """The mean of each value over all ranks (the values themselves outside a distributed run)."""
    if not dist.is_initialized() or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()
