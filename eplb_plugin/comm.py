"""The few collectives the manager and executor share, returning early with one rank.

``group=None`` means the default group once torch.distributed is initialized, and a single
rank without any communication before that. Helpers that take host tensors move them to the
device the group's backend needs (CUDA for NCCL) and back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from eplb_plugin.errors import UsageError


def group_info(group: Any) -> tuple[Any, int, int]:
    """(group, this rank in it, its size); (None, 0, 1) when torch.distributed is not set up."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise UsageError("a process group was given but torch.distributed is not initialized")
        return None, 0, 1
    group = group if group is not None else dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


def is_nccl(group: Any) -> bool:
    """Whether the group's backend is NCCL (also within a combined "cpu:gloo,cuda:nccl")."""
    return group is not None and "nccl" in str(dist.get_backend(group))


def backend_device(group: Any) -> torch.device:
    """Where the group's collectives take tensors: the current CUDA device for NCCL, else CPU."""
    if is_nccl(group):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_host(tensor: torch.Tensor, group: Any, *, op: str = "sum") -> torch.Tensor:
    """Sum (op="sum") or max (op="max") a host tensor over ``group``; collective; returns a host tensor."""
    group, _, world = group_info(group)
    if world == 1:
        return tensor
    buf = tensor.to(backend_device(group))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return buf.cpu()


def broadcast_host(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """The group's rank 0's copy of a host tensor, on every rank; collective."""
    group, _, world = group_info(group)
    if world == 1:
        return tensor
    buf = tensor.to(backend_device(group))
    dist.broadcast(buf, src=dist.get_global_rank(group, 0), group=group)
    return buf.cpu()
