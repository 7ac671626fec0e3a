"""ExpertLocation: where every logical expert lives, and ``--init-expert-location`` I/O.

Slots are rank-major: slot ``p`` lives on rank ``p // (P / ep_size)``. Maps:

- ``physical_to_logical_map``: [L, P] int64, the logical expert each slot holds.
- ``logical_to_physical_map``: [L, E, X] int64, each expert's slots in ascending order,
  padded with -1 to the fixed width ``X = P - E + 1`` (the most replicas one expert can
  have), so buffers sized once stay valid after any rebalance.
- ``logical_replica_count``: [L, E] int64.
- ``replica_weights``: [L, P] float32 share of its expert's tokens each slot should get
  (the shares of one expert's slots sum to 1), or None for an equal split.

Files (``location_files.py``): ``--init-expert-location`` accepts what SGLang 0.5.23 accepts (``trivial``; a ``.pt``
read with ``weights_only=True``; a ``.json``; inline JSON) holding ``physical_to_logical_map``
[L][P] or ``logical_count`` [L][E] / [B][L][E]. ``save`` writes files stock SGLang loads
unchanged (only ``physical_to_logical_map``: SGLang passes any other key on as a keyword);
replica weights go to a sidecar ``<file>.weights.json`` that only the plugin reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eplb_plugin.algorithms import DEFAULT_ALGORITHM, plan
from eplb_plugin.counts import checked_count_values
from eplb_plugin.errors import ConfigError, CountsError, PlacementError, UsageError
from eplb_plugin.maps import (
    checked_replica_count,
    compute_logical_to_physical_map,
    equal_split_weights,
    integer_map_ids,
    replica_count,
)
from eplb_plugin.placement_format import WEIGHTS_SUFFIX, save_placement, weights_sidecar

INLINE_SOURCE = "<inline JSON>"
REPLICA_WEIGHT_TOLERANCE = 1e-3


@dataclass(frozen=True, eq=False)
class ExpertLocation:
    """A validated placement of E logical experts into P slots over ``ep_size`` ranks.

    Build it with ``trivial``, ``from_physical_to_logical_map`` or ``from_logical_count``;
    the constructor assumes consistent fields.
    """

    physical_to_logical_map: torch.Tensor
    logical_to_physical_map: torch.Tensor
    logical_replica_count: torch.Tensor
    replica_weights: torch.Tensor | None
    ep_size: int

    # ------------------------------------------------------------------ shape

    @property
    def num_layers(self) -> int:
        return self.physical_to_logical_map.shape[0]

    @property
    def num_physical_experts(self) -> int:
        return self.physical_to_logical_map.shape[1]

    @property
    def num_logical_experts(self) -> int:
        return self.logical_replica_count.shape[1]

    @property
    def num_local_physical_experts(self) -> int:
        return self.num_physical_experts // self.ep_size

    def local_slots(self, rank: int) -> slice:
        """Slots of ``rank`` as a slice of the P axis (ConfigError for a rank outside [0, ep_size))."""
        check_rank(rank, self.ep_size)
        n = self.num_local_physical_experts
        return slice(rank * n, (rank + 1) * n)

    def local_physical_to_logical_map(self, rank: int) -> torch.Tensor:
        """[L, P / ep_size]: the logical expert each of ``rank``'s slots holds (ConfigError for a
        rank outside [0, ep_size))."""
        return self.physical_to_logical_map[:, self.local_slots(rank)]

    def equal_split_weights(self) -> torch.Tensor:
        """[L, P] float32: 1 / replica count of each slot's expert (from the stored counts)."""
        return 1.0 / torch.gather(self.logical_replica_count, 1, self.physical_to_logical_map).to(torch.float32)

    def effective_replica_weights(self) -> torch.Tensor:
        return self.replica_weights if self.replica_weights is not None else self.equal_split_weights()

    # ------------------------------------------------------------------ construction

    @classmethod
    def trivial(
        cls, *, num_layers: int, num_logical_experts: int, num_physical_experts: int, ep_size: int
    ) -> ExpertLocation:
        """Slot p holds expert ``p % E`` in every layer (SGLang's trivial placement)."""
        _check_ints(num_layers=num_layers, num_logical_experts=num_logical_experts,
                    num_physical_experts=num_physical_experts, ep_size=ep_size)
        _check_sizes(num_logical_experts, num_physical_experts, ep_size, source="trivial")
        row = torch.arange(num_physical_experts, dtype=torch.int64) % num_logical_experts
        return cls.from_physical_to_logical_map(
            row.repeat(num_layers, 1), num_logical_experts=num_logical_experts, ep_size=ep_size
        )

    @classmethod
    def from_physical_to_logical_map(
        cls,
        physical_to_logical_map: Any,
        *,
        num_logical_experts: int,
        ep_size: int,
        replica_weights: Any = None,
        num_layers: int | None = None,
        num_physical_experts: int | None = None,
        source: str = "physical_to_logical_map",
    ) -> ExpertLocation:
        """Validate a map [L, P] (tensor or nested lists) and derive the other views.

        Raises PlacementError naming ``source`` when the shape (against ``num_layers`` and
        ``num_physical_experts`` when given, before anything is derived), an id (-1, an
        unused slot as vLLM writes it, included), a missing replica, P's divisibility by
        ep_size or the replica weights are wrong.
        """
        _check_ints(num_logical_experts=num_logical_experts, ep_size=ep_size, num_layers=num_layers,
                    num_physical_experts=num_physical_experts)
        phy2log = _as_tensor(physical_to_logical_map, source, "physical_to_logical_map")
        phy2log = integer_map_ids(phy2log, source)
        if phy2log.dim() != 2:
            raise PlacementError(
                f"{source}: physical_to_logical_map must be [num_layers, num_physical_experts], "
                f"got shape {list(phy2log.shape)}"
            )
        num_map_layers, num_physical = phy2log.shape
        if num_layers is not None and num_map_layers != num_layers:
            raise PlacementError(
                f"{source}: physical_to_logical_map has {num_map_layers} layers, the model has {num_layers}"
            )
        if num_physical_experts is not None and num_physical != num_physical_experts:
            raise PlacementError(
                f"{source}: physical_to_logical_map has {num_physical} slots per layer, but the model has "
                f"{num_logical_experts} logical + redundant = {num_physical_experts} (check --ep-num-redundant-experts)"
            )
        _check_sizes(num_logical_experts, num_physical, ep_size, source=source)
        counts = checked_replica_count(phy2log, num_logical_experts, source)
        weights = None
        if replica_weights is not None:
            weights = _validate_replica_weights(replica_weights, phy2log, num_logical_experts, source)
        return cls(
            physical_to_logical_map=phy2log,
            logical_to_physical_map=compute_logical_to_physical_map(phy2log, num_logical_experts),
            logical_replica_count=counts,
            replica_weights=weights,
            ep_size=ep_size,
        )

    @classmethod
    def from_logical_count(
        cls,
        logical_count: Any,
        *,
        num_physical_experts: int,
        ep_size: int,
        num_nodes: int = 1,
        num_groups: int | None = None,
        algorithm: str = DEFAULT_ALGORITHM,
        previous: ExpertLocation | None = None,
        num_layers: int | None = None,
        source: str = "logical_count",
        split: str = "equal",
        dispatch: str | None = None,
    ) -> ExpertLocation:
        """Plan a placement from loads [L, E] or [B, L, E] with a placement policy, for an
        ``equal`` (default) or ``weighted`` split of each expert's tokens over its replicas
        and, for a policy that plans per pass, the ``dispatch`` that will run (``plan``'s)."""
        _check_ints(num_physical_experts=num_physical_experts, ep_size=ep_size, num_nodes=num_nodes,
                    num_groups=num_groups, num_layers=num_layers)
        count = validate_logical_count(logical_count, source=source, num_layers=num_layers, keep_passes=True)
        placement = plan(
            count,
            num_physical_experts=num_physical_experts,
            num_gpus=ep_size,
            num_nodes=num_nodes,
            num_groups=num_groups,
            algorithm=algorithm,
            previous=previous.physical_to_logical_map if previous is not None else None,
            split=split,
            dispatch=dispatch,
        )
        return cls.from_physical_to_logical_map(
            placement.physical_to_logical_map,
            num_logical_experts=count.shape[-1],
            ep_size=ep_size,
            replica_weights=placement.replica_weights,
            source=source,
        )

    # ------------------------------------------------------------------ files

    def to_sglang_dict(self) -> dict[str, list]:
        """What stock SGLang's ``--init-expert-location`` accepts: the map alone."""
        return {"physical_to_logical_map": self.physical_to_logical_map.tolist()}

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.json or .pt) for SGLang, the meta sidecar (EP size and shape), and
        the replica-weights sidecar if any (``placement_format.save_placement``)."""
        return save_placement(path, self.physical_to_logical_map, ep_size=self.ep_size,
                              num_logical_experts=self.num_logical_experts, replica_weights=self.replica_weights)


def validate_logical_count(
    logical_count: Any, *, source: str = "logical_count", num_layers: int | None = None,
    num_logical_experts: int | None = None, keep_passes: bool = False,
) -> torch.Tensor:
    """Check loads [L, E] or [B, L, E]; return them summed to [L, E] float64 on CPU, or with
    ``keep_passes`` as given ([B, L, E] stays per pass: what a per-pass policy plans from).

    Raises CountsError for a wrong shape, NaN, infinite or negative counts.
    """
    count = _as_tensor(logical_count, source, "logical_count", error=CountsError)
    if count.dim() not in (2, 3):
        raise CountsError(f"{source}: logical_count must be [L, E] or [B, L, E], got shape {list(count.shape)}")
    passes = None
    if count.dim() == 3 and count.dtype != torch.bool and not count.is_complex():
        passes = count
        count = count.to(torch.float64).sum(0)  # passes summed before the value check, as always
    count = checked_count_values(count, source=source)
    if num_layers is not None and count.shape[0] != num_layers:
        raise CountsError(f"{source}: logical_count has {count.shape[0]} layers, the model has {num_layers}")
    if num_logical_experts is not None and count.shape[1] != num_logical_experts:
        raise CountsError(
            f"{source}: logical_count has {count.shape[1]} experts per layer, the model has {num_logical_experts}"
        )
    if keep_passes and passes is not None:
        return checked_count_values(passes, source=source)  # a pass's own count may be negative where the sum is not
    return count


# ---------------------------------------------------------------------- helpers


def check_rank(rank: Any, ep_size: int) -> None:
    """Raise ConfigError unless ``rank`` is an int (not a bool) in [0, ep_size)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ConfigError(f"rank {rank!r} is a {type(rank).__name__}; expected an int in [0, ep_size={ep_size})")
    if not 0 <= rank < ep_size:
        raise ConfigError(f"rank {rank} is outside [0, ep_size={ep_size})")


def _check_ints(**values: Any) -> None:
    """Raise UsageError naming the first argument that is neither None nor an int (bools refused)."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UsageError(f"{name}={value!r} is a {type(value).__name__}; expected an int")


def _check_sizes(num_logical: int, num_physical: int, ep_size: int, *, source: str) -> None:
    if num_logical < 1 or ep_size < 1:
        raise PlacementError(f"{source}: need >= 1 logical expert and rank (got E={num_logical}, ep_size={ep_size})")
    if num_physical < num_logical:
        raise PlacementError(
            f"{source}: {num_physical} slots cannot hold {num_logical} logical experts"
        )
    if num_physical % ep_size:
        raise PlacementError(
            f"{source}: {num_physical} slots are not divisible by ep_size {ep_size}; "
            f"set --ep-num-redundant-experts so that logical + redundant is a multiple of {ep_size}"
        )


def _as_tensor(value: Any, source: str, key: str, *, error: type[Exception] = PlacementError) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        return torch.tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise error(f"{source}: {key} is not a rectangular array of numbers ({exc})") from exc


def _validate_replica_weights(weights: Any, phy2log: torch.Tensor, num_logical: int, source: str) -> torch.Tensor:
    w = _as_tensor(weights, source, "replica_weights").to(torch.float32)
    if w.shape != phy2log.shape:
        raise PlacementError(f"{source}: replica_weights shape {list(w.shape)} != map shape {list(phy2log.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise PlacementError(f"{source}: replica_weights must be finite and non-negative")
    sums = torch.zeros(phy2log.shape[0], num_logical, dtype=torch.float64).scatter_add_(1, phy2log, w.double())
    worst = float((sums - 1).abs().max())
    if not math.isclose(worst, 0.0, abs_tol=REPLICA_WEIGHT_TOLERANCE):
        raise PlacementError(f"{source}: replica_weights of an expert's slots must sum to 1 (off by {worst:.3g})")
    return w


__all__ = [
    "INLINE_SOURCE", "REPLICA_WEIGHT_TOLERANCE", "WEIGHTS_SUFFIX", "ExpertLocation", "compute_logical_to_physical_map",
    "check_rank", "equal_split_weights", "replica_count", "validate_logical_count", "weights_sidecar",
]
