"""Pure helpers on placement maps (a leaf module: the placement policies, balancedness and
``ExpertLocation`` all read them). Shapes as in ``location.py``: ``physical_to_logical_map``
[L, P], each slot's logical expert; E logical experts."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from .errors import PlacementError

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


def integer_map_ids(phy2log: torch.Tensor, source: str) -> torch.Tensor:
    """A map's ids as int64 on the CPU; PlacementError naming ``source`` for bool, complex or
    non-integer (fractional, NaN, infinite) ids."""
    if phy2log.dtype == torch.bool or phy2log.is_complex():
        raise PlacementError(f"{source}: physical_to_logical_map has dtype {phy2log.dtype}; expected integer ids")
    if phy2log.dtype.is_floating_point:
        if not torch.isfinite(phy2log).all() or not torch.equal(phy2log, phy2log.round()):
            raise PlacementError(f"{source}: physical_to_logical_map holds non-integer ids")
    return phy2log.to(torch.int64).cpu()


def checked_replica_count(phy2log: torch.Tensor, num_logical_experts: int, source: str) -> torch.Tensor:
    """[L, P] int64 map -> [L, E] replica counts, after checking that every id names a logical
    expert and every expert has a slot in every layer (PlacementError naming ``source``)."""
    bad = (phy2log < 0) | (phy2log >= num_logical_experts)
    if bad.any():
        layer, slot = (int(i) for i in bad.nonzero()[0])
        value = int(phy2log[layer, slot])
        raise PlacementError(
            f"{source}: physical_to_logical_map[{layer}][{slot}] = {value} is outside [0, {num_logical_experts})"
            + ("; -1 marks an unused slot (as vLLM writes maps), but every slot must hold an expert here"
               if value == -1 else "")
        )
    counts = replica_count(phy2log, num_logical_experts)
    missing = (counts == 0).nonzero()
    if len(missing):
        layer, expert = (int(i) for i in missing[0])
        raise PlacementError(
            f"{source}: logical expert {expert} has no replica in layer {layer} "
            f"({len(missing)} (layer, expert) pairs without one); every expert needs a slot"
        )
    return counts
