"""Pure helpers on placement maps (a leaf module: the placement policies, balancedness and
``ExpertLocation`` all read them). Shapes as in ``location.py``: ``physical_to_logical_map``
[L, P], each slot's logical expert; E logical experts."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

_Map = TypeVar("_Map", torch.Tensor, np.ndarray)


def replica_count(physical_to_logical_map: _Map, num_logical_experts: int) -> _Map:
    """[L, P] map -> [L, E] int64: how many slots hold each logical expert.

    The one count for both array kinds: a numpy map gives a numpy array, a tensor a tensor.
    """
    if isinstance(physical_to_logical_map, np.ndarray):
        as_tensor = torch.from_numpy(np.array(physical_to_logical_map, dtype=np.int64))
        return replica_count(as_tensor, num_logical_experts).numpy()
    phy2log = physical_to_logical_map.to(torch.int64)
    counts = torch.zeros(phy2log.shape[0], num_logical_experts, dtype=torch.int64)
    return counts.scatter_add_(1, phy2log, torch.ones_like(phy2log))


def equal_split_weights(physical_to_logical_map: torch.Tensor, num_logical_experts: int) -> torch.Tensor:
    """[L, P] float32: 1 / replica count of each slot's expert (an equal split over replicas)."""
    phy2log = physical_to_logical_map.to(torch.int64)
    return 1.0 / torch.gather(replica_count(phy2log, num_logical_experts), 1, phy2log).to(torch.float32)


def compute_logical_to_physical_map(physical_to_logical_map: torch.Tensor, num_logical_experts: int) -> torch.Tensor:
    """[L, P] -> [L, E, P - E + 1]: each expert's slots ascending, -1 padded (fixed width)."""
    num_layers, num_physical = physical_to_logical_map.shape
    width = num_physical - num_logical_experts + 1
    phy2log = physical_to_logical_map.to(torch.int64)
    # Sort slots by (expert, slot): a stable sort on the expert id keeps slots ascending.
    order = torch.sort(phy2log, dim=1, stable=True).indices
    sorted_experts = torch.gather(phy2log, 1, order)
    counts = replica_count(phy2log, num_logical_experts)
    starts = torch.cumsum(counts, 1) - counts
    rank_in_expert = torch.arange(num_physical).expand(num_layers, -1) - torch.gather(starts, 1, sorted_experts)
    out = torch.full((num_layers, num_logical_experts, width), -1, dtype=torch.int64)
    layer_idx = torch.arange(num_layers).unsqueeze(1).expand(-1, num_physical)
    out[layer_idx, sorted_experts, rank_in_expert] = order
    return out
