"""Process-group setup and model wrapping for ``torchrun`` (DDP or FSDP2), plus tiny collectives.

A run under ``torchrun`` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the environment and
initialises NCCL on CUDA or gloo on CPU. Without ``torchrun`` nothing is initialised and every
helper here degrades to the single-process case, so the training loop has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    parallel: str  # "none" | "ddp" | "fsdp" (resolved)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_parallel(mode: str, world_size: int) -> str:
    """``auto`` -> ``ddp`` with several processes, else ``none``; one process never wraps."""
    if world_size == 1:
        return "none"
    if mode == "none":
        raise ValueError(
            f"run.parallel='none' but WORLD_SIZE={world_size}; use ddp or fsdp (or auto) under torchrun"
        )
    return "ddp" if mode == "auto" else mode


def init_distributed(parallel: str) -> DistInfo:
    """Initialise the default process group when launched by ``torchrun`` (idempotent)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device, resolve_parallel(parallel, world_size))


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, find_unused: bool = False) -> nn.Module:
    """DDP wrapper, or FSDP2 in place (``fully_shard`` on each block of ``model.layers``, then the root).

    Returns the module to call for forward/backward; ``model`` itself stays the handle for state
    dicts and the optimiser (FSDP2 replaces its parameters by sharded DTensors in place).
    ``find_unused`` tells DDP that some parameters may get no gradient in a step (MoE experts).
    """
    if info.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.local_rank] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)
    if info.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a small tensor (returns a new tensor; identity in one process)."""
    if not dist.is_initialized():
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (used for paths and resume decisions)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
