"""Non-blocking expert moves: stage in a background thread, commit at pass boundaries.

Concurrency design:

- Work is cut into units, one per round of a layer (``plan_layer_rounds``; one unit per layer
  when the budget holds its incoming experts). A background thread stages units in order
  (pre-flight agreement, P2P into staging buffers, success agreement; see transfer.py) while
  forward passes go on. It never writes a slot: only the serving thread does, in
  ``commit_ready``, so a pass never sees half-written weights.
- Process groups: the thread talks only on its own group (``transfer_group``, same backend
  as the EP group) and the serving thread agrees on commits over a CPU gloo group
  (``control_group``), both created once in the constructor. Nothing of ours runs on the
  EP group, so our collectives never interleave with the model's. (Gloo needs this: two
  threads issuing collectives on one group would pair them in the wrong order.)
- GPU: the thread runs on a side stream; NCCL P2P on a separate communicator runs next to
  the model's kernels. PITFALLS: NCCL from a side thread has deadlocked DeepEP low-latency
  kernels that wait for SMs NCCL holds; where DeepEP runs, cap NCCL's CTAs
  (NCCL_MAX_CTAS / NCCL_MAX_NCHANNELS) for this communicator, as vLLM did.
- Memory: staged-but-uncommitted bytes stay within ``budget_bytes`` in total (the thread
  waits for commits), except a single unit that alone needs more (a forced cycle).
- Agreement: ``commit_ready`` is collective over every rank at the same pass boundary; it
  all-reduces (MIN over gloo, CPU, no GPU sync) how many units each rank has staged and
  whether any rank failed, so every rank commits the same units at the same pass.
- Failure: a thread error (any rank) surfaces on every rank at the same ``commit_ready``
  call as a TransferError; committed layers stay committed, the rest keep their maps.
- Every wait has a timeout (``timeout_s``): the thread's waits for commits and transfers,
  and the serving thread's agreement.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from eplb_plugin.errors import TransferError
from eplb_plugin.executor.plan import plan_layer_rounds, plan_layer_transfer
from eplb_plugin.executor.transfer import (
    DEFAULT_MAX_STAGED_EXPERTS,
    FaultHook,
    LayerMoveError,
    StagedRound,
    agree,
    allocate_round,
    check_weights,
    commit_round,
    exchange_round,
    expert_bytes,
    group_info,
    max_staged_experts,
    verify_committed,
)


@dataclass(frozen=True)
class LayerMove:
    """One layer to move: weights [num_local_slots, ...] each; maps [P] integer."""

    layer: int
    weights: Sequence[torch.Tensor]
    old_physical_to_logical_map: torch.Tensor
    new_physical_to_logical_map: torch.Tensor
    live_map: torch.Tensor | None = None  # [P], set to each committed round's map


@dataclass
class _Unit:
    move: LayerMove
    before: torch.Tensor  # [P] map this round starts from
    after: torch.Tensor  # [P] map once it commits
    previous: _Unit | None  # the same layer's previous round (must commit first)
    committed: bool = False
    commit_event: object = None  # torch.cuda.Event recorded after the commit's copies


class AsyncExpertMover:
    """Moves many layers in the background; ``commit_ready`` applies them at pass boundaries.

    The constructor is collective over the default (WORLD) group: it creates two process
    groups with ``dist.new_group``, which every rank of WORLD must call in the same order.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        budget_bytes: int | None = None,
        gpus_per_node: int | None = None,
        verify: bool = False,
        timeout_s: float = 300.0,
        fault_hook: FaultHook | None = None,
    ):
        self.group, self.rank, self.world = group_info(group)
        self.transfer_group = self.control_group = None
        if self.group is not None and self.world > 1:
            ranks = dist.get_process_group_ranks(self.group)
            self.transfer_group = dist.new_group(ranks, backend=dist.get_backend(self.group))
            self.control_group = dist.new_group(ranks, backend="gloo")
        self.budget_bytes, self.gpus_per_node = budget_bytes, gpus_per_node
        self.verify, self.timeout_s = verify, timeout_s
        self.fault_hook = fault_hook or (lambda point, rank, layer: None)
        self._cond = threading.Condition()
        self._units: list[_Unit] = []
        self._ready: list[tuple[_Unit, StagedRound]] = []
        self._next_commit = 0
        self._error: BaseException | None = None
        self._failed = False
        self._thread: threading.Thread | None = None

    # -- serving thread ---------------------------------------------------------------------
    def start(self, moves: Sequence[LayerMove]) -> None:
        """Plan every layer's rounds (same on every rank) and start staging in the background."""
        if self._thread is not None:
            raise TransferError("AsyncExpertMover.start called twice; make a new mover per rebalance")
        for move in moves:
            old = move.old_physical_to_logical_map.detach().to("cpu", torch.int64)
            new = move.new_physical_to_logical_map.detach().to("cpu", torch.int64)
            check_weights(move.weights, old.numel() // self.world)
            cap = max_staged_experts(move.weights, self.budget_bytes)
            prev, before = None, old
            for after in plan_layer_rounds(old, new, ep_size=self.world, max_staged_experts=cap):
                prev = _Unit(move, before, after, prev)
                self._units.append(prev)
                before = after
        self._thread = threading.Thread(target=self._run, name="eplb-expert-mover", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        """True once every unit has committed (the same on every rank), or after a failure."""
        return self._failed or self._next_commit == len(self._units)

    def commit_ready(self, max_layers: int = 1) -> list[int]:
        """Commit up to ``max_layers`` staged units (a unit is one layer, or one round of a
        layer moved in rounds) in place; return the layers whose live map changed.

        Collective: every rank calls it at the same pass boundary, between forward passes.
        Raises TransferError on every rank if any rank's background staging failed.
        """
        if self.done:
            return []
        with self._cond:
            local_ready, ok = len(self._ready), self._error is None
        counts = torch.tensor([local_ready, int(ok)], dtype=torch.int64)
        if self.control_group is not None:
            # Every rank must commit the same units at the same pass: agree on the minimum.
            work = dist.all_reduce(counts, op=dist.ReduceOp.MIN, group=self.control_group, async_op=True)
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        ready, all_ok = int(counts[0]), bool(counts[1])
        if not all_ok:
            self._failed = True
            with self._cond:
                self._ready.clear()  # staged data of uncommitted units is dropped
                self._cond.notify_all()
                cause = self._error
            raise TransferError(
                f"rank {self.rank}: non-blocking move failed "
                f"({type(cause).__name__ + ': ' + str(cause) if cause else 'on another rank'}); "
                f"{self._next_commit}/{len(self._units)} units committed, the rest keep their maps"
            ) from cause
        layers: list[int] = []
        for _ in range(min(ready, max_layers)):
            with self._cond:
                unit, staged = self._ready.pop(0)
            weights = unit.move.weights
            if staged.ready_event is not None:
                # Serving stream waits for the side stream's staging (already complete on the
                # host's word; the event makes the ordering explicit to the GPU).
                torch.cuda.current_stream().wait_event(staged.ready_event)
            commit_round(weights, staged)
            if unit.move.live_map is not None:
                unit.move.live_map.copy_(unit.after)
            if self.verify and staged.plan.changed_local_slots:
                verify_committed(weights, staged, rank=self.rank, layer=unit.move.layer)
            if weights[0].is_cuda:
                for buf in staged.buffers:
                    buf.record_stream(torch.cuda.current_stream())  # freed after the copies
                unit.commit_event = torch.cuda.Event()
                unit.commit_event.record()
            with self._cond:
                unit.committed = True
                self._next_commit += 1
                self._cond.notify_all()
            if unit.move.layer not in layers:
                layers.append(unit.move.layer)
        return layers

    def close(self, timeout_s: float | None = None) -> None:
        """Join the background thread (after done or a failure); raise if it does not end."""
        if self._thread is None:
            return
        with self._cond:
            self._failed = self._failed or not self.done
            self._cond.notify_all()
        self._thread.join(timeout_s if timeout_s is not None else self.timeout_s)
        if self._thread.is_alive():
            raise TransferError(f"rank {self.rank}: expert mover thread did not stop in time")

    # -- background thread ------------------------------------------------------------------
    def _wait_for(self, predicate, what: str) -> bool:
        """Wait for predicate under the lock; False if the mover was stopped."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._failed or predicate(), timeout=self.timeout_s)
            if not ok:
                raise TransferError(f"rank {self.rank}: waited {self.timeout_s} s for {what}")
            return not self._failed

    def _run(self) -> None:
        try:
            first = self._units[0].move.weights[0] if self._units else None
            if first is not None and first.is_cuda:
                side = torch.cuda.Stream(device=first.device)
                with torch.cuda.device(first.device), torch.cuda.stream(side):
                    self._stage_all(side)
            else:
                self._stage_all(None)
        except Exception as exc:  # stored and re-raised on the serving thread by commit_ready
            with self._cond:
                self._error = exc

    def _stage_all(self, side) -> None:
        def pending_bytes() -> int:
            return sum(b.numel() * b.element_size() for _, s in self._ready for b in s.buffers)

        for unit in self._units:
            plan = plan_layer_transfer(
                unit.before, unit.after, ep_size=self.world, gpus_per_node=self.gpus_per_node
            ).ranks[self.rank]
            need = plan.num_staged_experts * expert_bytes(unit.move.weights)  # bytes
            # Sends read slots the previous round wrote, and staging stays within the budget.
            prev = unit.previous
            if not self._wait_for(lambda prev=prev: prev is None or prev.committed, "a commit"):
                return
            per = expert_bytes(unit.move.weights)
            budget = self.budget_bytes or DEFAULT_MAX_STAGED_EXPERTS * per
            if not self._wait_for(
                lambda need=need, budget=budget: not self._ready or pending_bytes() + need <= budget,
                "staging room",
            ):
                return
            if side is not None and prev is not None and prev.commit_event is not None:
                side.wait_event(prev.commit_event)  # GPU order: commit copies before our sends
            self._stage_unit(unit, plan, side)

    def _stage_unit(self, unit: _Unit, plan, side) -> None:
        layer, weights = unit.move.layer, unit.move.weights
        device = weights[0].device if side is not None else torch.device("cpu")
        error: BaseException | None = None
        staged = None
        try:
            self.fault_hook("before_transfer", self.rank, layer)
            staged = allocate_round(weights, plan, unit.after, verify=self.verify)
        except Exception as exc:  # reported to every rank by the agreement below
            error = exc
        # Pre-flight agreement on the transfer group: no P2P unless every rank staged.
        ok = agree(error is None, self.transfer_group, device, self.timeout_s)
        if ok:
            try:
                exchange_round(weights, staged, group=self.transfer_group, verify=self.verify,
                               timeout_s=self.timeout_s)
                self.fault_hook("after_staging", self.rank, layer)
            except Exception as exc:  # reported to every rank by the agreement below
                error = exc
            # Success agreement (its .item() is the host sync that says the data landed).
            ok = agree(error is None, self.transfer_group, device, self.timeout_s)
        if not ok:
            cause = f"{type(error).__name__}: {error}" if error else "another rank failed"
            raise LayerMoveError(f"rank {self.rank}: layer {layer} staging failed ({cause})",
                                 rank=self.rank, layer=layer, live_map=unit.before.clone()) from error
        if side is not None:
            staged.ready_event = torch.cuda.Event()
            staged.ready_event.record(side)
        with self._cond:
            self._ready.append((unit, staged))
            self._cond.notify_all()
