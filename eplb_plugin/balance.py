"""Balancedness: the one definition the whole project uses.

For one MoE layer, GPU load is the number of tokens the GPU's slots receive; balancedness
is ``mean(gpu_load) / max(gpu_load)`` (1.0 = perfect; a layer with no tokens counts 1.0).
Over layers it is the plain mean of the per-layer values. "Per step" when scored on one
forward pass, "realized" when scored on traffic the placement did not see.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from eplb_plugin.errors import UsageError
from eplb_plugin.maps import replica_count

_Loads = TypeVar("_Loads", torch.Tensor, np.ndarray)


def gpu_loads(slot_load: _Loads, num_gpus: int) -> _Loads:
    """Sum slot loads into GPU loads.

    slot_load: [..., P] tokens per physical slot; P divisible by num_gpus, rank-major.
    Returns [..., num_gpus] float64, a numpy array for a numpy input and a tensor for a tensor.
    """
    num_slots = slot_load.shape[-1]
    if num_gpus <= 0 or num_slots % num_gpus:
        raise UsageError(
            f"num_gpus={num_gpus} must be positive and divide the number of slots {num_slots}"
        )
    if isinstance(slot_load, np.ndarray):
        as_float: _Loads = np.asarray(slot_load, dtype=np.float64)
    else:
        as_float = slot_load.to(torch.float64)
    return as_float.reshape(*slot_load.shape[:-1], num_gpus, -1).sum(-1)


def layer_balancedness(gpu_load: torch.Tensor) -> torch.Tensor:
    """Per-layer mean/max of GPU load. gpu_load: [..., num_gpus]; returns [...] float64."""
    gpu_load = gpu_load.to(torch.float64)
    peak = gpu_load.amax(-1)
    mean = gpu_load.mean(-1)
    return torch.where(peak > 0, mean / peak.clamp_min(1e-300), torch.ones_like(peak))


def balancedness(gpu_load: torch.Tensor) -> float:
    """Mean over layers of per-layer balancedness. gpu_load: [L, num_gpus] (or [num_gpus])."""
    return float(layer_balancedness(gpu_load).mean())


def slot_loads(
    logical_count: torch.Tensor,
    physical_to_logical_map: torch.Tensor,
    replica_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expected tokens per slot when each expert's tokens split over its replicas.

    logical_count: [L, E] tokens per logical expert.
    physical_to_logical_map: [L, P] int, logical expert held by each slot.
    replica_weights: [L, P] share of its expert's tokens each slot gets; None = equal split.
    Returns [L, P] float64.
    """
    counts = logical_count.to(torch.float64)
    phy2log = physical_to_logical_map.long()
    per_slot = torch.gather(counts, 1, phy2log)
    if replica_weights is None:
        share = 1.0 / torch.gather(replica_count(phy2log, counts.shape[1]), 1, phy2log).to(torch.float64)
    else:
        share = replica_weights.to(torch.float64)
    return per_slot * share


def placement_balancedness(
    logical_count: torch.Tensor,
    physical_to_logical_map: torch.Tensor,
    num_gpus: int,
    replica_weights: torch.Tensor | None = None,
) -> float:
    """Balancedness of a placement on given counts ([L, E]); see module docstring."""
    return balancedness(gpu_loads(slot_loads(logical_count, physical_to_logical_map, replica_weights), num_gpus))
