"""Where work runs: the device, and the processes torchrun started.

Nothing here starts a process group by itself: ``join_torchrun`` does so only when torchrun
set ``WORLD_SIZE`` above 1, and the command line calls it. A Python caller that never calls
it runs as a single process (rank 0 of 1).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from noduledet.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but no GPU is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r}; choose from ['auto', 'cpu', 'cuda', 'cuda:N']") from None


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_torchrun(device: torch.device) -> torch.device:
    """Join the process group torchrun set up (WORLD_SIZE > 1): gloo on the CPU, nccl on GPUs.

    Returns the device this process should use (its own GPU under torchrun).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and rank_and_world()[1] > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order (one element outside a process group)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (nothing outside a process group)."""
    if rank_and_world()[1] > 1:
        dist.barrier()
