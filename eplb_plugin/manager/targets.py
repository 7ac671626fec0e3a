"""Pure target-map logic of a rebalance: from the window's counts and the live placement to
the placement the rebalance moves to, and from the layers that landed to the live placement.

Tensors in, tensors out: no ``torch.distributed``, no threads, no state (the manager does
the collectives and keeps the state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eplb_plugin.counts import bucket_passes
from eplb_plugin.errors import PlacementError
from eplb_plugin.location import ExpertLocation, equal_split_weights
from eplb_plugin.maps import integer_map_ids

MAX_PLAN_PASSES = 128  # per-pass policies see at most this many rows (consecutive passes summed)


def plan_passes(rows: torch.Tensor) -> torch.Tensor:
    """[n, L, E] per-pass counts -> at most MAX_PLAN_PASSES rows, consecutive passes summed
    into equal buckets (bounds what every rank all-reduces and the planner reads)."""
    return bucket_passes(rows, MAX_PLAN_PASSES)


def check_plan_shape(result: Any, *, num_layers: int, num_physical_experts: int) -> PlacementError | None:
    """A plan whose map ([L, P] integer ids) or replica weights ([L, P] or None) have the
    wrong type or shape, as the error saying so; None for a well-formed plan. Rank 0 checks
    before broadcasting: a malformed plan would make the broadcast itself disagree."""
    want = [num_layers, num_physical_experts]
    map_ = getattr(result, "physical_to_logical_map", None)
    if not isinstance(map_, torch.Tensor) or list(map_.shape) != want:
        got = list(map_.shape) if isinstance(map_, torch.Tensor) else type(map_).__name__
        return PlacementError(f"the planner returned a physical_to_logical_map of {got}, expected shape {want}")
    try:
        integer_map_ids(map_, "the planner's plan")  # bool, complex, fractional, NaN or infinite ids
    except PlacementError as exc:
        return exc
    weights = getattr(result, "replica_weights", None)
    if weights is not None and (not isinstance(weights, torch.Tensor) or list(weights.shape) != want):
        got = list(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        return PlacementError(f"the planner returned replica_weights of {got}, expected shape {want}")
    return None


@dataclass(frozen=True)
class TargetMaps:
    """The placement a rebalance moves to, before validation.

    physical_to_logical_map: [L, P] int64, the live map with the planned layers replaced.
    replica_weights: [L, P] float32, or None where neither the plan nor the live placement
        weighs replicas (equal split).
    changed: planned layers whose map changes (their weights move), in plan order.
    reweighted: planned layers whose replica weights alone change (they go live at once).
    """

    physical_to_logical_map: torch.Tensor
    replica_weights: torch.Tensor | None
    changed: list[int]
    reweighted: list[int]

    def location(self, live: ExpertLocation, *, source: str) -> ExpertLocation:
        """The target as an ExpertLocation of ``live``'s sizes; PlacementError if invalid."""
        return ExpertLocation.from_physical_to_logical_map(
            self.physical_to_logical_map, num_logical_experts=live.num_logical_experts, ep_size=live.ep_size,
            replica_weights=self.replica_weights, source=source,
        )


def target_maps(live: ExpertLocation, planned: Sequence[int], new_map: torch.Tensor,
                new_weights: torch.Tensor | None) -> TargetMaps:
    """The live placement with the ``planned`` layers taken from the plan.

    new_map: [L, P] int64 planned map (only the ``planned`` rows are read); new_weights:
    [L, P] float32 planned replica weights, or None for an equal split of each expert's
    tokens over its replicas."""
    live_map = live.physical_to_logical_map
    target_map = live_map.clone()
    target_map[planned] = new_map[planned]
    target_weights = None
    live_weights = live.effective_replica_weights()
    if new_weights is not None or live.replica_weights is not None:
        planned_weights = new_weights if new_weights is not None else equal_split_weights(
            new_map, live.num_logical_experts)
        target_weights = live_weights.clone()
        target_weights[planned] = planned_weights[planned]
    changed = [layer for layer in planned if not torch.equal(target_map[layer], live_map[layer])]
    reweighted = [
        layer for layer in planned if layer not in changed and target_weights is not None
        and not torch.equal(target_weights[layer], live_weights[layer])
    ]
    return TargetMaps(target_map, target_weights, changed, reweighted)


def slots_changed(old: torch.Tensor, new: torch.Tensor) -> int:
    """Slots whose expert differs between two maps of the same shape."""
    return int((old != new).sum())


def live_location(live: ExpertLocation, target: ExpertLocation, rows: Mapping[int, torch.Tensor]) -> ExpertLocation:
    """The live placement once the layers in ``rows`` serve on their new rows ([P] each).

    A layer that reached its target row takes the target's replica weights; one that stopped
    short (a failed move) splits its experts' tokens equally over the replicas it has."""
    new_map = live.physical_to_logical_map.clone()
    for layer, row in rows.items():
        new_map[layer] = row.to("cpu", torch.int64)
    weights = None
    if target.replica_weights is not None or live.replica_weights is not None:
        weights = live.effective_replica_weights().clone()
        equal = equal_split_weights(new_map, live.num_logical_experts)
        planned = target.effective_replica_weights()
        for layer in rows:
            reached = torch.equal(new_map[layer], target.physical_to_logical_map[layer])
            weights[layer] = planned[layer] if reached else equal[layer]
    return ExpertLocation.from_physical_to_logical_map(
        new_map, num_logical_experts=live.num_logical_experts, ep_size=live.ep_size,
        replica_weights=weights, source="live placement",
    )
