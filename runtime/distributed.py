"""The one distributed set-up of both stages: a process started by torchrun joins its process group, with
one backend rule, and picks its device from its local rank.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dpal.errors import UserError


class DeviceUnavailableError(UserError):
    """A CUDA device was asked for on a machine where none is visible."""


def setup_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; under torchrun (WORLD_SIZE > 1) it joins the process group.

    ``device``: ``cpu``, ``cuda`` (this rank's GPU, cuda:LOCAL_RANK), ``cuda:N``, or ``None`` / ``auto`` (this
    rank's GPU when CUDA is visible, else the CPU). A CUDA device becomes the current one. The backend follows
    the device: NCCL for CUDA, gloo for the CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        chosen = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    elif device == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError("--device cuda was asked for but no CUDA device is visible")
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device(device)
    on_cuda = chosen.type == "cuda"
    if on_cuda:
        torch.cuda.set_device(chosen)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if on_cuda else "gloo", device_id=chosen if on_cuda else None)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), chosen
    return 0, 1, chosen


def is_rank0() -> bool:
    """Whether this process is the first rank (or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()
