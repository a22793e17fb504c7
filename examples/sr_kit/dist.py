"""torchrun / DistributedDataParallel plumbing: one process per device (NCCL on CUDA, gloo on CPU), rank 0 writes.

Every collective below is the identity in a single process, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job (a single process when torchrun did not start it)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` is this process's CUDA device when there is one, else the CPU."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was given but CUDA is not available; use --device cpu.")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def init_distributed(device_name: str = "auto", timeout_minutes: int = 30) -> DistInfo:
    """Join the process group when launched by torchrun (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` set)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", 0)))
    if world_size > 1 and not dist.is_initialized():
        cuda: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes), **cuda)
    return DistInfo(rank, world_size, device)


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce(values: torch.Tensor, info: DistInfo, op: str = "mean") -> torch.Tensor:
    """``values`` (a float tensor) averaged (``"mean"``) or maximised (``"max"``) over all ranks, on the CPU."""
    if not info.distributed:
        return values
    values = values.to(info.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return (values if op == "max" else values / info.world_size).cpu()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    out: list[Any] = [obj] * info.world_size
    if info.distributed:
        dist.all_gather_object(out, obj)
    return out
