"""ExpertLocation: where every logical expert lives, and ``--init-expert-location`` I/O.

Slots are rank-major: slot ``p`` lives on rank ``p // (P / ep_size)``. Maps:

- ``physical_to_logical_map``: [L, P] int64, the logical expert each slot holds.
- ``logical_to_physical_map``: [L, E, X] int64, each expert's slots in ascending order,
  padded with -1 to the fixed width ``X = P - E + 1`` (the most replicas one expert can
  have), so buffers sized once stay valid after any rebalance.
- ``logical_replica_count``: [L, E] int64.
- ``replica_weights``: [L, P] float32 share of its expert's tokens each slot should get
  (the shares of one expert's slots sum to 1), or None for an equal split.

Files: ``--init-expert-location`` accepts what SGLang 0.5.23 accepts (``trivial``; a ``.pt``
read with ``weights_only=True``; a ``.json``; inline JSON) holding ``physical_to_logical_map``
[L][P] or ``logical_count`` [L][E] / [B][L][E]. ``save`` writes files stock SGLang loads
unchanged (only ``physical_to_logical_map``: SGLang passes any other key on as a keyword);
replica weights go to a sidecar ``<file>.weights.json`` that only the plugin reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eplb_plugin.errors import CountsError, ExpertLocationFileError, PlacementError

INLINE_SOURCE = "<inline JSON>"
WEIGHTS_SUFFIX = ".weights.json"
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
        """Slots of ``rank`` as a slice of the P axis."""
        n = self.num_local_physical_experts
        return slice(rank * n, (rank + 1) * n)

    def local_physical_to_logical_map(self, rank: int) -> torch.Tensor:
        """[L, P / ep_size]: the logical expert each of ``rank``'s slots holds."""
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
        source: str = "physical_to_logical_map",
    ) -> ExpertLocation:
        """Validate a map [L, P] (tensor or nested lists) and derive the other views.

        Raises PlacementError naming ``source`` when the shape, an id, a missing replica,
        P's divisibility by ep_size or the replica weights are wrong.
        """
        phy2log = _as_tensor(physical_to_logical_map, source, "physical_to_logical_map")
        if phy2log.dtype.is_floating_point or phy2log.dtype == torch.bool:
            if not torch.equal(phy2log, phy2log.round()):
                raise PlacementError(f"{source}: physical_to_logical_map holds non-integer ids")
        phy2log = phy2log.to(torch.int64).cpu()
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
        _check_sizes(num_logical_experts, num_physical, ep_size, source=source)
        bad = (phy2log < 0) | (phy2log >= num_logical_experts)
        if bad.any():
            layer, slot = (int(i) for i in bad.nonzero()[0])
            raise PlacementError(
                f"{source}: physical_to_logical_map[{layer}][{slot}] = {int(phy2log[layer, slot])} "
                f"is outside [0, {num_logical_experts})"
            )
        counts = replica_count(phy2log, num_logical_experts)
        missing = (counts == 0).nonzero()
        if len(missing):
            layer, expert = (int(i) for i in missing[0])
            raise PlacementError(
                f"{source}: logical expert {expert} has no replica in layer {layer} "
                f"({len(missing)} (layer, expert) pairs without one); every expert needs a slot"
            )
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
        algorithm: str = "auto",
        previous: ExpertLocation | None = None,
        num_layers: int | None = None,
        source: str = "logical_count",
    ) -> ExpertLocation:
        """Plan a placement from loads [L, E] or [B, L, E] with a placement policy."""
        from eplb_plugin.algorithms import plan  # the planner imports this module

        count = validate_logical_count(logical_count, source=source, num_layers=num_layers)
        placement = plan(
            count,
            num_physical_experts=num_physical_experts,
            num_gpus=ep_size,
            num_nodes=num_nodes,
            num_groups=num_groups,
            algorithm=algorithm,
            previous=previous.physical_to_logical_map if previous is not None else None,
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
        """Write ``path`` (.json or .pt) for SGLang, and the replica-weights sidecar if any."""
        path = Path(path)
        if path.suffix == ".pt":
            torch.save({"physical_to_logical_map": self.physical_to_logical_map.clone()}, path)
        elif path.suffix == ".json":
            path.write_text(json.dumps(self.to_sglang_dict()))
        else:
            raise PlacementError(f"placement file {path} must end in .json or .pt")
        if self.replica_weights is not None:
            sidecar = weights_sidecar(path)
            sidecar.write_text(
                json.dumps(
                    {
                        "physical_to_logical_map": self.physical_to_logical_map.tolist(),
                        "replica_weights": self.replica_weights.tolist(),
                    }
                )
            )
        return path


def weights_sidecar(path: str | Path) -> Path:
    """The plugin-only file beside a placement file that holds its replica weights."""
    path = Path(path)
    return path.with_name(path.name + WEIGHTS_SUFFIX)


def replica_count(physical_to_logical_map: torch.Tensor, num_logical_experts: int) -> torch.Tensor:
    """[L, P] map -> [L, E] int64: how many slots hold each logical expert."""
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


def validate_logical_count(
    logical_count: Any, *, source: str = "logical_count", num_layers: int | None = None,
    num_logical_experts: int | None = None,
) -> torch.Tensor:
    """Check loads [L, E] or [B, L, E]; return them summed to [L, E] float64 on CPU.

    Raises CountsError for a wrong shape, NaN, infinite or negative counts.
    """
    count = _as_tensor(logical_count, source, "logical_count", error=CountsError)
    if count.dim() == 3:
        count = count.to(torch.float64).sum(0)
    if count.dim() != 2:
        raise CountsError(f"{source}: logical_count must be [L, E] or [B, L, E], got shape {list(count.shape)}")
    count = count.to(torch.float64).cpu()
    if not torch.isfinite(count).all():
        raise CountsError(f"{source}: logical_count holds NaN or infinite values")
    if (count < 0).any():
        layer, expert = (int(i) for i in (count < 0).nonzero()[0])
        raise CountsError(f"{source}: logical_count[{layer}][{expert}] = {float(count[layer, expert])} is negative")
    if num_layers is not None and count.shape[0] != num_layers:
        raise CountsError(f"{source}: logical_count has {count.shape[0]} layers, the model has {num_layers}")
    if num_logical_experts is not None and count.shape[1] != num_logical_experts:
        raise CountsError(
            f"{source}: logical_count has {count.shape[1]} experts per layer, the model has {num_logical_experts}"
        )
    return count


def read_location_source(source: str) -> tuple[dict[str, Any], str]:
    """Parse an ``--init-expert-location`` value into its dict, as SGLang does.

    Returns (dict, a name for messages). ``.pt`` files load with ``weights_only=True``.
    """
    if source.endswith(".pt"):
        name = source
        try:
            data = torch.load(source, weights_only=True, map_location="cpu")
        except FileNotFoundError:
            raise ExpertLocationFileError(name, None, "file not found") from None
        except Exception as exc:  # torch raises many types for a bad archive; name it once
            raise ExpertLocationFileError(name, None, f"not a loadable torch file ({exc})") from exc
    elif source.endswith(".json"):
        name = source
        try:
            data = json.loads(Path(source).read_text())
        except FileNotFoundError:
            raise ExpertLocationFileError(name, None, "file not found") from None
        except json.JSONDecodeError as exc:
            raise ExpertLocationFileError(name, None, f"invalid JSON ({exc})") from exc
    else:
        name = INLINE_SOURCE
        try:
            data = json.loads(source)
        except json.JSONDecodeError as exc:
            raise ExpertLocationFileError(
                name, None, f"neither 'trivial', a .pt/.json path, nor valid JSON ({exc})"
            ) from exc
    if not isinstance(data, Mapping):
        raise ExpertLocationFileError(name, None, f"expected a dict, got {type(data).__name__}")
    return dict(data), name


def load_init_expert_location(
    source: str,
    *,
    num_layers: int,
    num_logical_experts: int,
    num_physical_experts: int,
    ep_size: int,
    num_nodes: int = 1,
    num_groups: int | None = None,
    algorithm: str = "auto",
) -> ExpertLocation:
    """Resolve ``--init-expert-location`` into a validated ExpertLocation.

    Accepts ``trivial``, a ``.pt`` / ``.json`` path or inline JSON holding
    ``physical_to_logical_map`` [L][P] (plus, from the plugin's sidecar, replica weights) or
    ``logical_count`` [L][E] / [B][L][E] (planned with ``algorithm``).
    Raises ExpertLocationFileError naming the source, the key and the problem.
    """
    if source == "trivial":
        return ExpertLocation.trivial(
            num_layers=num_layers,
            num_logical_experts=num_logical_experts,
            num_physical_experts=num_physical_experts,
            ep_size=ep_size,
        )
    data, name = read_location_source(source)
    try:
        if "physical_to_logical_map" in data:
            key = "physical_to_logical_map"
            extra = set(data) - {key}
            if extra:
                raise PlacementError(f"unexpected keys {sorted(extra)} (SGLang passes them on and fails)")
            weights = _sidecar_weights(source, data[key]) if name != INLINE_SOURCE else None
            location = ExpertLocation.from_physical_to_logical_map(
                data[key], num_logical_experts=num_logical_experts, ep_size=ep_size,
                replica_weights=weights, num_layers=num_layers, source=name,
            )
            if location.num_physical_experts != num_physical_experts:
                raise PlacementError(
                    f"map has {location.num_physical_experts} slots per layer, but the model has "
                    f"{num_logical_experts} logical + redundant = {num_physical_experts} "
                    "(check --ep-num-redundant-experts)"
                )
            return location
        if "logical_count" in data:
            key = "logical_count"
            count = validate_logical_count(
                data[key], source=name, num_layers=num_layers, num_logical_experts=num_logical_experts
            )
            return ExpertLocation.from_logical_count(
                count, num_physical_experts=num_physical_experts, ep_size=ep_size,
                num_nodes=num_nodes, num_groups=num_groups, algorithm=algorithm, source=name,
            )
    except (PlacementError, CountsError) as exc:
        if isinstance(exc, ExpertLocationFileError):
            raise
        raise ExpertLocationFileError(name, key, str(exc).removeprefix(f"{name}: ")) from exc
    raise ExpertLocationFileError(
        name, None, f"holds neither 'physical_to_logical_map' nor 'logical_count' (keys: {sorted(data)})"
    )


# ---------------------------------------------------------------------- helpers


def _sidecar_weights(source: str, phy2log: Any) -> Any:
    sidecar = weights_sidecar(source)
    if not sidecar.exists():
        return None
    side = json.loads(sidecar.read_text())
    if side.get("physical_to_logical_map") != _as_tensor(phy2log, source, "physical_to_logical_map").tolist():
        raise PlacementError(f"sidecar {sidecar.name} belongs to another map; delete it or re-plan")
    return side["replica_weights"]


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
