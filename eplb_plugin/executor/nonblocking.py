"""Non-blocking expert moves: stage in a background thread, commit at pass boundaries.

Concurrency design:

- Work is cut into units, one per round of a layer (``LayerMoveSchedule``: rounds of
  half the budget; one unit per layer when it fits). Small units keep each commit, which
  the serving stream runs between passes, short. A background
  thread stages units in order (P2P into a staging pool, then one agreement that every rank
  staged the unit) while forward passes go on. It never writes a slot: only the serving
  thread does, in ``commit_ready``, so a pass never sees half-written weights.
- Process groups, created once by the (collective) constructor and reused by every run:
  the thread talks only on ``transfer_group`` (same backend as the EP group; with NCCL its
  CTAs can be capped by ``transfer_max_ctas`` so the serving kernels keep their SMs), and
  the serving thread agrees on commits over a CPU gloo ``control_group``. Nothing of ours
  runs on the EP group, so our collectives never interleave with the model's. (Gloo needs
  this: two threads issuing collectives on one group would pair them in the wrong order.)
  PITFALLS: NCCL from a side thread has deadlocked DeepEP low-latency kernels that wait for
  SMs NCCL holds; where DeepEP runs, set ``transfer_max_ctas``, as vLLM did.
- GPU: the thread's copies run on a side stream (default priority, the lowest CUDA has);
  NCCL runs on the transfer communicator's own stream.
- Memory: one ``StagingPool`` per run, allocated by the thread before its first transfer and
  agreed on by every rank (pre-flight), sized to the budget; rows are reused once the
  commit that read them has run (CUDA events).
- Agreement at pass boundaries: ``commit_ready`` is collective over every rank at the same
  pass boundary. It reads the result of a MIN all-reduce (gloo, CPU, no GPU sync) posted at
  the previous boundary (how many units each rank has staged, whether any failed) and posts
  the next one, so it never waits for the other ranks in the common case; every rank then
  commits the same units at the same pass, at most ``max_layers`` per boundary.
- Failure: a thread error (any rank) surfaces on every rank at the same ``commit_ready`` call
  as a TransferError; committed units stay committed, the rest keep their maps.
- Every wait has a timeout (``timeout_s``): the thread's waits for commits, staging room and
  agreements, and the serving thread's agreement.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from eplb_plugin.comm import group_info
from eplb_plugin.errors import ConfigError, TransferError
from eplb_plugin.executor.agreement import Agreement, Stopped, wait_work
from eplb_plugin.executor.contract import (
    FaultHook,
    LayerMoveError,
    check_weights,
    max_staged_experts,
)
from eplb_plugin.executor.peers import PeerViews, barrier_needed, check_transport, resolve_peers
from eplb_plugin.executor.plan import LayerTransferPlan, RankTransferPlan
from eplb_plugin.executor.rounds import LayerMoveSchedule
from eplb_plugin.executor.staging import (
    StagedRound,
    StagingPool,
    check_received,
    commit_round,
    expert_bytes,
    is_nccl,
    signature,
    stage_round,
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
    plan: RankTransferPlan  # this rank's share
    round_plan: LayerTransferPlan  # every rank's share
    previous: _Unit | None  # the same layer's previous round (commits first)
    committed: bool = False
    commit_event: object = None  # torch.cuda.Event recorded after the commit's copies


def _transfer_options(backend: str, max_ctas: int | None):
    """NCCL options capping the transfer communicator's CTAs (None: NCCL's defaults)."""
    if max_ctas is None or "nccl" not in backend:
        return None
    try:
        opts = dist.ProcessGroupNCCL.Options()
        opts.config.max_ctas = max_ctas
        opts.config.min_ctas = 1
    except (AttributeError, TypeError) as exc:
        raise ConfigError(f"transfer_max_ctas={max_ctas} needs torch built with NCCL >= 2.17 "
                          f"(ProcessGroupNCCL.Options().config): {exc}; pass None") from exc
    return opts


class AsyncExpertMover:
    """Moves many layers in the background; ``commit_ready`` applies them at pass boundaries.

    The constructor is collective over the default (WORLD) group: it creates two process
    groups with ``dist.new_group``, which every rank of WORLD must call in the same order,
    and warms them up. One mover serves many rebalances: ``start`` again once ``done`` (or
    after a failure) and ``close``. transfer_max_ctas: cap on the CTAs (SMs) of the NCCL
    transfer communicator (None: NCCL's default); poll_s: the thread's longest sleep between
    polls of an agreement (sleeps double up to it; each wake takes the GIL from a serving
    thread: on CPU, a host-bound loop ran 1.114x slower polled every 0.1 ms, 1.019x every
    2 ms, where two runs without the thread differ by 2%; ``benchmarks/results/
    mover_polling_cpu.json``).
    pace_with_passes: the thread stages at most one unit per pass boundary, right after
    ``commit_ready`` returns (while the serving thread waits for its pass on the GPU), so
    its Python work rarely holds the GIL when the serving thread needs it (measured on
    2 x H200: no better than unpaced, hence off by default). transport: "nccl" (P2P on the
    transfer communicator), "ipc" (experts from same-host peers pulled by copy engines
    through CUDA IPC, no SMs; ConfigError at ``start`` where impossible) or "auto" (ipc
    where possible); see ``peers.py``. peers: fixed ``PeerViews`` of every tensor the mover
    will move, used instead of ``transport`` (e.g. ``SharedPeerViews`` between CPU processes).
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
        transfer_max_ctas: int | None = None,
        poll_s: float = 2e-3,
        pace_with_passes: bool = False,
        transport: str = "nccl",
        peers: PeerViews | None = None,
    ):
        self.group, self.rank, self.world = group_info(group)
        self.transfer_group = self.control_group = None
        if self.group is not None and self.world > 1:
            ranks = dist.get_process_group_ranks(self.group)
            backend = str(dist.get_backend(self.group))
            opts = _transfer_options(backend, transfer_max_ctas)
            self.transfer_group = dist.new_group(ranks, backend="nccl" if opts else backend, pg_options=opts)
            self.control_group = dist.new_group(ranks, backend="gloo")
        self._nccl = is_nccl(self.transfer_group)  # the transfer group's backend, asked once
        if self._nccl:
            self._warm_up()
        self.budget_bytes, self.gpus_per_node = budget_bytes, gpus_per_node
        self.verify, self.timeout_s, self.poll_s = verify, timeout_s, poll_s
        self.transfer_max_ctas, self.pace_with_passes = transfer_max_ctas, pace_with_passes
        self.fault_hook = fault_hook or (lambda point, rank, layer: None)
        check_transport(transport)
        self.transport = transport
        self.peers, self._fixed_peers = peers, peers is not None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._side = None  # the thread's CUDA stream, created on first use
        self._reset([])

    def _warm_up(self) -> None:
        """Create the NCCL transfer communicator and its P2P connections now, not mid-serving."""
        dev = torch.device("cuda", torch.cuda.current_device())
        x = torch.zeros(self.world, dtype=torch.uint8, device=dev)
        dist.all_reduce(x[:1], group=self.transfer_group)
        ops = []
        for d in range(1, self.world):  # every pair of ranks, once each way
            to, frm = (self.rank + d) % self.world, (self.rank - d) % self.world
            ops.append(dist.P2POp(dist.isend, x[d : d + 1], dist.get_global_rank(self.transfer_group, to), self.transfer_group))
            ops.append(dist.P2POp(dist.irecv, x[:1].clone(), dist.get_global_rank(self.transfer_group, frm), self.transfer_group))
        for w in dist.batch_isend_irecv(ops):
            w.wait()  # stream-level: the sync below then covers the P2P too
        torch.cuda.current_stream().synchronize()  # the constructor returns with both set up

    def _reset(self, units: list[_Unit]) -> None:
        self._units = units
        self._ready: list[tuple[_Unit, StagedRound]] = []
        self._staged = 0  # units this rank staged and every rank agreed on
        self._next_commit = 0
        self._error: BaseException | None = None
        self._failed = False
        self._control = None  # (tensor, work) of the agreement posted at the last boundary
        self._pool: StagingPool | None = None
        self._pool_recorded = False
        self._boundaries = 0  # pass boundaries seen (commit_ready calls), for pacing
        self.bytes_committed = 0  # this rank's P2P bytes (sent + received) of the committed units

    # -- serving thread ---------------------------------------------------------------------
    def start(self, moves: Sequence[LayerMove]) -> None:
        """Plan every layer's rounds (same on every rank) and start staging in the background.

        Every rank calls it with the same moves at the same pass boundary. Allowed again
        once the previous run is done (or failed) and its thread has ended (``close``).
        """
        if self._thread is not None:
            if self._thread.is_alive():
                raise TransferError("AsyncExpertMover.start: the previous move is still running; "
                                    "wait for done, then close()")
            self._thread = None
        units: list[_Unit] = []
        sig = None
        for move in moves:
            old = move.old_physical_to_logical_map.detach().to("cpu", torch.int64)
            new = move.new_physical_to_logical_map.detach().to("cpu", torch.int64)
            check_weights(move.weights, old.numel() // self.world)
            if sig is not None and signature(move.weights) != sig:
                raise ConfigError(f"layer {move.layer}'s weights differ in shape or dtype from the "
                                  f"first layer's; one mover run moves layers of one kind")
            sig = signature(move.weights)
            cap = max_staged_experts(move.weights, self.budget_bytes)
            # Maps and plans only (this runs on the serving thread: no prefetch verdicts).
            sched = LayerMoveSchedule(old, new, ep_size=self.world, max_staged_experts=cap,
                                      gpus_per_node=self.gpus_per_node, pipeline=not self.verify)
            prev, before = None, old
            for k, after in enumerate(sched.maps):
                plan = sched.plan(k)
                prev = _Unit(move, before, after, plan.ranks[self.rank], plan, prev)
                units.append(prev)
                before = after
        self._reset(units)
        if not units:
            return
        if not self._fixed_peers and not self.verify and self.control_group is not None:
            # Collective over the control group: the serving thread, at the same pass boundary
            # on every rank.
            self.peers = resolve_peers(self.transport, [t for move in moves for t in move.weights],
                                       self.control_group, known=self.peers)
        self._start_event = None
        if units[0].move.weights[0].is_cuda:
            # The thread's stream starts after what the serving stream queued (the last run's
            # commits): its sends and pulls read those slots.
            self._start_event = torch.cuda.Event()
            self._start_event.record()
        self._thread = threading.Thread(target=self._run, name="eplb-expert-mover", daemon=True)
        self._thread.start()

    @property
    def pulls(self) -> bool:
        """Whether this run's same-host experts are pulled (copy engines) rather than sent."""
        return self.peers is not None and self.peers.active and not self.verify

    @property
    def done(self) -> bool:
        """True once every unit has committed (the same on every rank), or after a failure."""
        return self._failed or self._next_commit == len(self._units)

    def commit_ready(self, max_layers: int = 1) -> list[int]:
        """Commit up to ``max_layers`` staged units (a unit is one layer, or one round of a
        layer moved in rounds) in place; return the layers whose live map changed.

        Collective: every rank calls it at the same pass boundary, between forward passes.
        A unit commits at the second boundary after every rank staged it (the agreement
        posted at one boundary is read at the next). Raises TransferError on every rank if
        any rank's background staging failed.
        """
        if self.done:
            return []
        try:
            return self._commit_ready(max_layers)
        finally:
            with self._cond:
                self._boundaries += 1  # the paced thread stages its next unit now, as we return
                self._cond.notify_all()

    def _commit_ready(self, max_layers: int) -> list[int]:
        if self.control_group is None:
            with self._cond:
                ready, ok = self._staged, self._error is None
        elif self._control is None:
            self._post_control()
            return []
        else:
            counts, work = self._control
            self._control = None
            wait_work(work, self.timeout_s, "the mover's control agreement")  # posted a pass ago: normally done
            ready, ok = int(counts[0]), bool(counts[1])
        if not ok:
            self._fail()
        layers: list[int] = []
        for _ in range(min(ready - self._next_commit, max_layers)):
            with self._cond:
                unit, staged = self._ready.pop(0)
            self._commit(unit, staged)
            if unit.move.layer not in layers:
                layers.append(unit.move.layer)
        if not self.done and self.control_group is not None:
            self._post_control()
        return layers

    def _post_control(self) -> None:
        with self._cond:
            counts = torch.tensor([self._staged, int(self._error is None)], dtype=torch.int64)
        # Every rank must commit the same units at the same pass: agree on the minimum.
        work = dist.all_reduce(counts, op=dist.ReduceOp.MIN, group=self.control_group, async_op=True)
        self._control = (counts, work)

    def _fail(self) -> None:
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

    def _commit(self, unit: _Unit, staged: StagedRound) -> None:
        weights = unit.move.weights
        cuda = weights[0].is_cuda
        if staged.ready_event is not None:
            # The serving stream reads the rows after the side stream's staging copies (the
            # P2P itself is known complete: the thread saw the agreement that follows it).
            torch.cuda.current_stream().wait_event(staged.ready_event)
        if cuda and not self._pool_recorded:
            for buf in staged.buffers:
                buf.record_stream(torch.cuda.current_stream())  # the pool outlives our copies
            self._pool_recorded = True
        commit_round(weights, staged)
        self.bytes_committed += (len(unit.plan.sends) + len(unit.plan.recvs)) * expert_bytes(weights)
        if unit.move.live_map is not None:
            unit.move.live_map.copy_(unit.after)
        if self.verify and staged.plan.changed_local_slots:
            verify_committed(weights, staged, rank=self.rank, layer=unit.move.layer)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        with self._cond:
            self._pool.give_back(staged.rows, event)  # rewritten only after these copies
            unit.commit_event = event
            unit.committed = True
            self._next_commit += 1
            self._cond.notify_all()

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
        self._thread = None

    # -- background thread ------------------------------------------------------------------
    def _wait_for(self, predicate, what: str) -> None:
        """Wait for predicate under the lock; Stopped if the mover was stopped."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._failed or predicate(), timeout=self.timeout_s)
            if self._failed:
                raise Stopped(what)
            if not ok:
                raise TransferError(f"rank {self.rank}: waited {self.timeout_s} s for {what}")

    def _run(self) -> None:
        try:
            first = self._units[0].move.weights[0]
            if first.is_cuda:
                if self._side is None or self._side.device != first.device:
                    # One side stream per mover: pool memory the caching allocator keeps for
                    # it is reused by the next run instead of piling up per stream.
                    self._side = torch.cuda.Stream(first.device)
                with torch.cuda.device(first.device), torch.cuda.stream(self._side):
                    self._side.wait_event(self._start_event)
                    self._stage_all(first.device)
            else:
                self._stage_all(first.device)
        except Stopped:
            pass  # the serving thread already reports the failure that stopped us
        except Exception as exc:  # stored and re-raised on the serving thread by commit_ready
            with self._cond:
                self._error = exc

    def _stage_all(self, device: torch.device) -> None:
        units, group = self._units, self.transfer_group
        agreement = Agreement(group, device if self._nccl else torch.device("cpu"), len(units) + 1,
                              sleep_s=self.poll_s, stop=lambda: self._failed)
        weights = units[0].move.weights
        need = [u.plan.num_staged_experts for u in units]
        cap = max_staged_experts(weights, self.budget_bytes)
        error = None
        try:
            self.fault_hook("before_transfer", self.rank, units[0].move.layer)
            pool = StagingPool(weights, max(max(need), min(cap, sum(need))))
        except Exception as exc:  # reported to every rank by the pre-flight agreement
            error = exc
        agreement.post(0, error is None)
        if not agreement.result(0, self.timeout_s, "the mover's pre-flight agreement"):
            raise LayerMoveError(
                f"rank {self.rank}: staging pool failed ({error or 'on another rank'})",
                rank=self.rank, layer=units[0].move.layer, live_map=units[0].before.clone()) from error
        with self._cond:
            self._pool = pool
        tags: dict[tuple[bool, int], int] = {}
        paced = -1  # boundary count when the last unit was staged (-1: stage the first at once)
        peers = None if self.verify else self.peers
        for u, unit in enumerate(units):
            # Staging that reads slots an earlier round of this layer writes waits for its
            # commit; with pulls, for every rank's (a barrier after this rank's commits).
            earlier, prev, rounds = [], unit.previous, []
            while prev is not None:
                rounds.append(prev)
                if unit.plan.staging_reads & set(prev.plan.changed_local_slots):
                    earlier.append(prev)
                prev = prev.previous
            barrier = barrier_needed(peers, u == 0, [r.round_plan for r in rounds], unit.round_plan)
            if barrier:
                earlier = rounds
            self._wait_for(lambda earlier=earlier, n=need[u], paced=paced:
                           all(e.committed for e in earlier) and pool.find(n) is not None
                           and (not self.pace_with_passes or self._boundaries > paced),
                           "a commit (slots to read, or staging room) or a pass boundary")
            paced = self._boundaries
            with self._cond:
                rows, events = pool.take(need[u])
                events += [e.commit_event for e in earlier if e.commit_event is not None]
            if device.type == "cuda":
                stream = torch.cuda.current_stream()
                for ev in events:
                    stream.wait_event(ev)  # GPU order: those commits' copies before we read or overwrite
            self._stage_unit(u, unit, agreement, rows, tags, peers, barrier)

    def _stage_unit(self, u: int, unit: _Unit, agreement: Agreement, rows: list[int], tags,
                    peers: PeerViews | None, barrier: bool) -> None:
        layer, weights = unit.move.layer, unit.move.weights
        staged = StagedRound(plan=unit.plan, new_map=unit.after, buffers=self._pool.buffers, rows=rows,
                             round_plan=unit.round_plan)
        time.sleep(0)  # yield the GIL: a serving thread waiting for it goes first
        try:
            stage_round(weights, staged, group=self.transfer_group, verify=self.verify,
                        timeout_s=self.timeout_s, tags=tags, nccl=self._nccl, peers=peers, barrier=barrier)
            self.fault_hook("after_staging", self.rank, layer)
        except Exception as exc:  # this rank votes no; every rank then fails this unit
            staged.error = exc
        time.sleep(0)  # yield the GIL again between our two Python-heavy steps
        agreement.post(u + 1, staged.error is None, staged.device_ok)
        ok = agreement.result(u + 1, self.timeout_s, f"layer {layer}'s staging agreement")
        if ok and self.verify and staged.plan.recvs and self._nccl:
            check_received(staged)  # records the fingerprints verify_committed compares
        if not ok:
            cause = f"{type(staged.error).__name__}: {staged.error}" if staged.error else "another rank failed"
            raise LayerMoveError(f"rank {self.rank}: layer {layer} staging failed ({cause})",
                                 rank=self.rank, layer=layer, live_map=unit.before.clone()) from staged.error
        for w in staged.works:
            w.wait()  # complete (the vote follows it): orders our stream after it, frees NCCL's hold
        staged.works = []
        if weights[0].is_cuda:
            staged.ready_event = torch.cuda.Event()
            staged.ready_event.record()
        with self._cond:
            self._ready.append((unit, staged))
            self._staged += 1
            self._cond.notify_all()
