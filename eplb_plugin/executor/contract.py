"""What a move of expert weights promises and is given: its result (``MoveResult``), its
failure (``LayerMoveError``, carrying the map the weights match), and the checks of its
inputs (the weights, a schedule made ahead, the staging budget). Shared by
``transfer.move_experts``, ``layers.move_layers`` and ``nonblocking.AsyncExpertMover``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from eplb_plugin.errors import ConfigError, TransferError
from eplb_plugin.executor.plan import RankTransferPlan
from eplb_plugin.executor.rounds import LayerMoveSchedule
from eplb_plugin.executor.staging import expert_bytes

DEFAULT_MAX_STAGED_EXPERTS = 4
FaultHook = Callable[[str, int, int], None]  # (point, rank, layer); raise to inject a failure


class LayerMoveError(TransferError):
    """A layer's move failed on some rank. ``live_physical_to_logical_map`` ([P]) is the map the
    layer's weights match now on every rank (the old map unless an earlier round committed).

    From ``move_layers``: ``layer`` is the failed layer's id, ``index`` its position in the
    call, and ``live_physical_to_logical_maps`` holds every layer's live [P] map, in call
    order (one entry, the failed layer's, from ``move_experts``). ``bytes_moved``: this
    rank's bytes sent and received by the rounds (of every layer) that committed."""

    def __init__(self, message: str, *, rank: int, layer: int, live_map: torch.Tensor,
                 index: int = 0, live_maps: Sequence[torch.Tensor] | None = None, bytes_moved: int = 0):
        super().__init__(message)
        self.bytes_moved = bytes_moved  # this rank's traffic (sent + received) of the rounds that committed
        self.rank = rank
        self.layer = layer
        self.index = index
        self.live_physical_to_logical_map = live_map
        self.live_physical_to_logical_maps = list(live_maps) if live_maps is not None else [live_map]


@dataclass(frozen=True)
class MoveResult:
    """What one rank moved for one layer. Bytes are this rank's P2P traffic."""

    slots_changed: int
    local_copies: int
    experts_sent: int
    experts_received: int
    bytes_sent: int
    bytes_received: int
    seconds: float
    rounds: int
    peak_staging_bytes: int

    @classmethod
    def from_plans(cls, plans: Sequence[RankTransferPlan], *, expert_bytes: int, seconds: float,
                   peak_staging_bytes: int) -> MoveResult:
        """This rank's totals over the rounds it committed (``plans``: its share of each);
        no plans: nothing moved."""
        sent, received = sum(len(p.sends) for p in plans), sum(len(p.recvs) for p in plans)
        return cls(
            slots_changed=sum(len(p.changed_local_slots) for p in plans),
            local_copies=sum(len(p.local_copies) for p in plans), experts_sent=sent, experts_received=received,
            bytes_sent=sent * expert_bytes, bytes_received=received * expert_bytes, seconds=seconds,
            rounds=len(plans), peak_staging_bytes=peak_staging_bytes,
        )


def max_staged_experts(weights: Sequence[torch.Tensor], budget_bytes: int | None) -> int:
    """Experts per rank that fit in ``budget_bytes`` (None: DEFAULT_MAX_STAGED_EXPERTS)."""
    if budget_bytes is None:
        return DEFAULT_MAX_STAGED_EXPERTS
    per = expert_bytes(weights)
    if budget_bytes < per:
        raise ConfigError(
            f"budget_bytes={budget_bytes} is below one expert ({per} bytes over "
            f"{len(weights)} tensors); raise it to at least {per}"
        )
    return budget_bytes // per


def check_weights(weights: Sequence[torch.Tensor], num_local_slots: int) -> None:
    """Raise ConfigError unless every tensor is contiguous with dim 0 = num_local_slots."""
    if not weights:
        raise ConfigError("weights is empty: pass every tensor whose dim 0 is the local slot")
    for i, t in enumerate(weights):
        if t.dim() < 1 or t.shape[0] != num_local_slots or not t.is_contiguous():
            raise ConfigError(
                f"weights[{i}] has shape {tuple(t.shape)} (contiguous={t.is_contiguous()}); "
                f"it must be contiguous with dim 0 = {num_local_slots} local slots"
            )


def check_schedule(schedule: LayerMoveSchedule, old: torch.Tensor, new: torch.Tensor, *, ep_size: int,
                   max_staged_experts: int | None, gpus_per_node: int | None, pipeline: bool | None,
                   what: str) -> None:
    """Raise ConfigError unless ``schedule`` was made for these [P] maps and options
    (pipeline None: either kind of rounds is accepted)."""
    if not isinstance(schedule, LayerMoveSchedule):
        raise ConfigError(f"{what} is a {type(schedule).__name__}; pass a LayerMoveSchedule or None")
    wrong = [
        f"{name}: made for {made!r}, the move has {want!r}"
        for name, made, want in [("ep_size", schedule.ep_size, ep_size),
                                 ("max_staged_experts (budget_bytes // expert_bytes)", schedule.cap, max_staged_experts),
                                 ("gpus_per_node", schedule.gpus_per_node, gpus_per_node),
                                 ("pipeline", schedule.pipeline, schedule.pipeline if pipeline is None else pipeline)]
        if made != want
    ]
    for name, made, want in [("old_physical_to_logical_map", schedule.old, old),
                             ("new_physical_to_logical_map", schedule.new, new)]:
        if made.shape != want.shape or not torch.equal(made, want):
            wrong.append(f"{name}: the schedule's differs from the one passed")
    if wrong:
        raise ConfigError(f"{what} does not match the move ({'; '.join(wrong)}); make it with "
                          f"LayerMoveSchedule(old, new, ...) for these arguments, or pass None")
