"""Moving a rebalance's expert weights: one ``Mover`` protocol, a blocking and a background
implementation, chosen once when the manager is built (``make_mover``).

A mover owns how weights travel (``--eplb-transport``, the peers' views for pulls, the
staging budget) and what moved (slots, this rank's bytes); the manager only asks it, at
each pass boundary where a chunk may go live, which layers' new maps go live now.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from eplb_plugin.args import EPLBArgs
from eplb_plugin.comm import group_info, is_nccl
from eplb_plugin.errors import ConfigError, TransferError
from eplb_plugin.manager.protocols import LayersMover
from eplb_plugin.manager.records import MIB
from eplb_plugin.manager.targets import slots_changed
from eplb_plugin.transports import IPC, NCCL, TRANSPORTS

if TYPE_CHECKING:
    from eplb_plugin.executor.peers import PeerViews

ExpertWeights = Sequence[Sequence[torch.Tensor]]  # per layer, this rank's tensors; dim 0 is the local slot


class MoveStep(NamedTuple):
    """What one pass boundary of a move brought.

    live: layer -> its [P] map whose weights landed on every rank (goes live now).
    done: nothing more to move (all moved, or the move failed).
    error: the failure (live then holds what did land), None if none; failure: what failed,
        for the error's message.
    """

    live: dict[int, torch.Tensor]
    done: bool
    error: TransferError | None = None
    failure: str = ""


@runtime_checkable
class Mover(Protocol):
    """Moves one rebalance's layers at a time. Every method is collective over the EP group:
    every rank calls it with the same arguments at the same pass boundary."""

    @property
    def slots_moved(self) -> int:
        """Slots (whole EP group) whose expert changed in this rebalance's live layers so far."""
        ...

    @property
    def bytes_moved(self) -> int:
        """This rank's bytes sent and received by this rebalance's moves so far."""
        ...

    def start(self, layers: Sequence[int], *, live_map: torch.Tensor, target_map: torch.Tensor) -> str:
        """Begin moving ``layers`` from ``live_map`` to ``target_map`` ([L, P] each); return
        the transport same-host ranks use ("ipc" or the P2P backend). ConfigError or
        TransferError when the move cannot start (nothing moved)."""
        ...

    def step(self, max_layers: int | None) -> MoveStep:
        """Move or commit up to ``max_layers`` layers (None: all) at this pass boundary."""
        ...

    def close(self) -> None: ...


def default_layers_mover(*args: Any, **kwargs: Any) -> Any:
    """``executor.move_layers`` (imported when first called)."""
    from eplb_plugin.executor import move_layers

    return move_layers(*args, **kwargs)


def executor_options(args: EPLBArgs) -> dict[str, Any]:
    """What either mover passes the executor: the staging budget per rank
    (``--eplb-transfer-budget-mb``), GPUs per node (several nodes only), verify, timeout."""
    return dict(budget_bytes=int(args.eplb_transfer_budget_mb * MIB),
                gpus_per_node=args.num_gpus_per_node if args.nnodes > 1 else None,
                verify=args.eplb_verify_weights, timeout_s=args.eplb_rebalance_timeout_s)


def p2p_backend(group: Any) -> str:
    """The backend point-to-point moves run on: the EP group's ("nccl", "gloo"), "local" with one rank."""
    group, _, world = group_info(group)
    if world == 1:
        return "local"
    return "nccl" if is_nccl(group) else str(dist.get_backend(group))


class BlockingMover:
    """Moves each chunk on the serving thread, in one ``layers_mover`` call (``move_layers``:
    layer i's commit overlaps layer i+1's transfer). ``peers``: the PeerViews of every
    layer's weights pulls go through (None before the first move, or without pulls)."""

    def __init__(self, layers_mover: LayersMover, *, args: EPLBArgs, group: Any, expert_weights: ExpertWeights):
        self.layers_mover = layers_mover
        self.group, self.expert_weights = group, expert_weights
        self.options = executor_options(args)
        self.transport = NCCL.name if args.eplb_verify_weights else args.eplb_transport
        self.peers: PeerViews | None = None
        self._pulls = False  # this rebalance's moves pull through self.peers
        self._pending: list[int] = []
        self._old: dict[int, torch.Tensor] = {}
        self._new: dict[int, torch.Tensor] = {}
        self._slots = self._bytes = 0

    @property
    def slots_moved(self) -> int:
        return self._slots

    @property
    def bytes_moved(self) -> int:
        return self._bytes

    def start(self, layers: Sequence[int], *, live_map: torch.Tensor, target_map: torch.Tensor) -> str:
        """The peers' weights for pulls are exchanged at the first rebalance and again when
        any rank's weight tensors were reallocated since (e.g. by a weight reload).
        ConfigError where ipc was asked for and is impossible."""
        from eplb_plugin.executor.peers import resolve_peers

        self._pending = list(layers)
        self._old = {layer: live_map[layer] for layer in layers}
        self._new = {layer: target_map[layer] for layer in layers}
        self._slots = self._bytes = 0
        tensors = [t for weights in self.expert_weights for t in weights]  # dense layers: none
        peers = resolve_peers(self.transport, tensors, self.group, known=self.peers)
        self.peers = peers or self.peers
        self._pulls = peers is not None and peers.active
        return IPC.name if self._pulls else p2p_backend(self.group)

    def step(self, max_layers: int | None) -> MoveStep:
        """On LayerMoveError, live holds the layers before the failed one and the failed
        layer's live map."""
        chunk = max_layers or len(self._pending)
        layers, self._pending = self._pending[:chunk], self._pending[chunk:]
        live: dict[int, torch.Tensor] = {}
        try:
            results = self.layers_mover(
                [(self.expert_weights[layer], self._old[layer], self._new[layer]) for layer in layers],
                self.group,
                layer_ids=layers,
                peers=self.peers if self._pulls else None,
                **self.options,
            )
        except TransferError as exc:
            from eplb_plugin.executor import LayerMoveError

            failed = None
            if isinstance(exc, LayerMoveError):
                failed = exc.layer
                live = {layer: self._new[layer] for layer in layers[:exc.index]}
                live[layers[exc.index]] = exc.live_physical_to_logical_map
                self._bytes += exc.bytes_moved
            # What moved before the failure is recorded (it is live): slots and this rank's bytes.
            self._slots += sum(slots_changed(self._old[layer], row) for layer, row in live.items())
            self._pending = []
            return MoveStep(live, done=True, error=exc, failure=f"moving layer {failed} failed")
        for layer, result in zip(layers, results):
            live[layer] = self._new[layer]
            self._slots += slots_changed(self._old[layer], self._new[layer])
            self._bytes += result.bytes_sent + result.bytes_received
        return MoveStep(live, done=not self._pending)

    def close(self) -> None:
        """Nothing runs between calls."""


class BackgroundMover:
    """Moves in a background thread (``executor.AsyncExpertMover``, ``--eplb-non-blocking``);
    each step commits, at the pass boundary, what every rank has staged.

    The constructor is collective: the mover creates its own process groups, so every rank
    builds its manager at the same point of its start-up."""

    def __init__(self, *, args: EPLBArgs, group: Any, expert_weights: ExpertWeights):
        from eplb_plugin.executor import AsyncExpertMover

        self.async_mover = AsyncExpertMover(group, transport=args.eplb_transport, **executor_options(args))
        self.group, self.expert_weights = group, expert_weights
        self._old: dict[int, torch.Tensor] = {}
        self._live_maps: dict[int, torch.Tensor] = {}  # [P] per layer, written by the mover as rounds commit
        self._served: dict[int, torch.Tensor] = {}  # [P] per layer, the row serving now

    @property
    def slots_moved(self) -> int:
        return sum(slots_changed(self._old[layer], row) for layer, row in self._served.items())

    @property
    def bytes_moved(self) -> int:
        return self.async_mover.bytes_committed

    def start(self, layers: Sequence[int], *, live_map: torch.Tensor, target_map: torch.Tensor) -> str:
        from eplb_plugin.executor import LayerMove

        self._old = {layer: live_map[layer].clone() for layer in layers}
        self._served = {layer: row.clone() for layer, row in self._old.items()}
        self._live_maps = {layer: row.clone() for layer, row in self._old.items()}
        self.async_mover.start([
            LayerMove(layer=layer, weights=self.expert_weights[layer], old_physical_to_logical_map=live_map[layer],
                      new_physical_to_logical_map=target_map[layer], live_map=self._live_maps[layer])
            for layer in layers
        ])
        return IPC.name if self.async_mover.pulls else p2p_backend(self.group)

    def step(self, max_layers: int | None) -> MoveStep:
        try:
            layers = self.async_mover.commit_ready(max_layers=max_layers or len(self._live_maps))
        except TransferError as exc:
            changed = {layer: row for layer, row in self._live_maps.items()
                       if not torch.equal(row, self._served[layer])}
            return MoveStep(self._serve(changed), done=True, error=exc, failure="non-blocking move failed")
        return MoveStep(self._serve({layer: self._live_maps[layer] for layer in layers}), done=self.async_mover.done)

    def _serve(self, rows: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        self._served.update({layer: row.clone() for layer, row in rows.items()})
        return rows

    def close(self) -> None:
        self.async_mover.close()


def make_mover(args: EPLBArgs, *, group: Any, expert_weights: ExpertWeights, layers_mover: LayersMover) -> Mover:
    """The mover ``args`` ask for: background with ``--eplb-non-blocking``, else blocking.
    ConfigError where ``--eplb-transport`` requires pulls and the weights are not all on CUDA."""
    transport = TRANSPORTS.get(args.eplb_transport)
    if transport.requires_pulls and not all(t.is_cuda for weights in expert_weights for t in weights):
        others = [name for name in TRANSPORTS if not TRANSPORTS.get(name).requires_pulls]
        raise ConfigError(f"--eplb-transport {transport.name} pulls weights through CUDA IPC, but the expert "
                          f"weights are not all on CUDA devices; use {' or '.join(others)}")
    if args.eplb_non_blocking:
        return BackgroundMover(args=args, group=group, expert_weights=expert_weights)
    return BlockingMover(layers_mover, args=args, group=group, expert_weights=expert_weights)
