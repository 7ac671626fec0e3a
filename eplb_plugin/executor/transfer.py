"""Move one layer's expert weights between EP ranks, in place, with bounded staging memory.

Design (atomicity, memory, speed):

- ``LayerMoveSchedule`` (``schedule_layer_move``) splits the move into rounds that each
  stage at most the budget (``budget_bytes // expert_bytes`` experts per rank), one at a
  time; a layer whose staging fits the budget moves in one round (atomically). With
  ``pipeline=True`` rounds take half the budget each so that two can be in flight: round
  k+1's P2P runs while round k commits (double buffering within the budget). Measured on
  2 x H200 (benchmarks/results/NVIDIA_H200/), pipelining lost: each round costs ~0.8 ms of
  host time (Python and torch.distributed calls) there, more than the overlap saves, so it
  is off by default.
- Transport: NCCL P2P as below, or, given ``peers`` (``PeerViews``, peers.py), the receiver
  pulls experts of same-host peers with copy engines on a copy stream (no SMs, no sender
  work), at P2P speed or above on 2 x H200; votes and commits are the same either way.
- Messages: one ``batch_isend_irecv`` per round; experts with consecutive source slots and
  receive rows travel as one message per tensor (NCCL costs tens of microseconds per
  message to a peer, whatever its size); commits copy such runs in one copy per tensor.
- Memory: one ``StagingPool`` per call, allocated before any transfer, sized to what the
  rounds need at once (at most the budget; more only for a forced cycle of single replicas,
  see ``plan_layer_rounds``), reused by every round. Nothing else of a layer's size is
  allocated.
- Pre-flight: one agreement per call (after the pool is allocated and the
  ``before_transfer`` hook ran), so a rank that cannot stage never leaves peers waiting.
  With ``staging=prepare_staging(...)`` (one pool for a whole rebalance, agreed once) the
  per-layer pool and pre-flight are skipped; a hook failure is then voted in round 1.
- Per round: (a) stage: staged local-copy sources, then one ``batch_isend_irecv`` with every
  tensor of every expert into pool rows; slots are only read, so they keep the weights of the
  last committed map; (b) agree: one MIN all-reduce of a success flag, queued after the P2P
  on the same NCCL stream (so "1" means every rank's data landed), read by polling an event;
  (c) commit: only if every rank succeeded, rows and local copies are written into the slots
  in place (addresses unchanged: CUDA graphs stay valid), and ``live_map`` is updated.
  The host never blocks on the GPU except to read the flags.
- Deferred votes (several rounds run one at a time: no verify, no double buffering): the
  host queues every round without waiting for its vote. Each vote includes the previous
  round's agreed result (MIN of this rank's flag times it), and each commit is queued on the
  current stream after its vote and writes the slots only if that agreed flag is 1
  (``commit_round(only_if=...)``: a ``torch.where`` into the slots, in place, decided on the
  device). The host reads one vote, the last: 1 means every round committed on every rank;
  0 means the rounds from the first failed one on wrote nothing anywhere (then all flags are
  read to find it). Measured per round on 2 x H200, this replaces ~0.8 ms of host time
  (two host waits) with ~0.5 ms of queueing that overlaps the transfers.
- Host cost per call: the agreement's side stream, pinned flags and events are kept
  between moves on a group (``Agreement(reuse=True)``, released once every posted step's
  result was read); plans cache their derived slot sets. Planning works on Python lists
  and visits only changed slots (tens of microseconds for a layer); a caller may compute
  the ``LayerMoveSchedule`` ahead, off the serving path, and pass it (``schedule=``).
  A whole rebalance is cheaper still through ``layers.move_layers``: one pool and
  pre-flight, every layer's rounds queued without a host wait, one vote read at the end.
- Atomicity: a round commits only if every rank's staging of it succeeded; after a failed
  round nothing more commits. So a failure on any rank leaves every rank on the last
  committed map (the old map if the layer moved in one round, else a valid intermediate
  placement: every logical expert of the new map keeps a replica), which ``LayerMoveError``
  carries and ``live_map`` shows. Rounds posted early are drained on every rank (the same
  ones everywhere, ``MoveSchedule.prefetch``) before the error is raised.
- A rank whose host code fails after the pre-flight still posts its matching P2P and votes
  "no"; a rank that dies or hangs makes the others time out (``timeout_s``) with a
  TransferError, and the communicator should then be considered broken.

``move_experts`` is collective: every rank of ``group`` must call it with the same maps and
the same options, in the same order as its other collectives on ``group``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from eplb_plugin.comm import group_info
from eplb_plugin.errors import ConfigError, TransferError
from eplb_plugin.executor.agreement import Agreement
from eplb_plugin.executor.contract import (
    FaultHook,
    LayerMoveError,
    MoveResult,
    check_schedule,
    check_weights,
    max_staged_experts,
)
from eplb_plugin.executor.peers import PeerViews, barrier_needed, pulling
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

# Benchmark hook: when a list, move_experts appends (label, host seconds, CUDA timing event
# or None) at each step, so benchmarks/bench_executor.py can lay out where the time goes.
_TRACE: list | None = None


def _mark(label: str, stream=None) -> None:
    if _TRACE is None:
        return
    event = None
    if stream is not None:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
    _TRACE.append((label, time.perf_counter(), event))


def prepare_staging(
    weights: Sequence[torch.Tensor],
    group: dist.ProcessGroup | None = None,
    *,
    budget_bytes: int | None = None,
    timeout_s: float = 300.0,
) -> StagingPool:
    """A staging pool of the budget (``budget_bytes // expert_bytes`` rows) for a whole
    rebalance, agreed on by every rank: pass it as ``move_experts(..., staging=pool)`` for
    each layer (tensors of the same per-slot shapes), which then skips its per-layer pool and
    pre-flight agreement. Collective over group; raises TransferError on every rank if any
    rank cannot allocate it. The pool holds its memory until dropped."""
    group, rank, world = group_info(group)
    rows = max_staged_experts(weights, budget_bytes)
    nccl = is_nccl(group)
    agreement = Agreement(group, weights[0].device if nccl else torch.device("cpu"), 1, reuse=True)
    error: BaseException | None = None
    pool = None
    try:
        pool = StagingPool(weights, rows)
    except Exception as exc:
        error = exc
    agreement.post(0, error is None)
    ok = agreement.result(0, timeout_s, "the staging pool's agreement")
    agreement.release()
    if not ok:
        pool = None
        cause = f"{type(error).__name__}: {error}" if error else "another rank failed"
        raise TransferError(f"rank {rank}: no staging pool of {rows} experts ({cause})") from error
    return pool


def move_experts(
    weights: Sequence[torch.Tensor],
    old_physical_to_logical_map: torch.Tensor,
    new_physical_to_logical_map: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    layer: int = 0,
    budget_bytes: int | None = None,
    gpus_per_node: int | None = None,
    live_map: torch.Tensor | None = None,
    verify: bool = False,
    timeout_s: float = 300.0,
    fault_hook: FaultHook | None = None,
    pipeline: bool = False,
    staging: StagingPool | None = None,
    schedule: LayerMoveSchedule | None = None,
    peers: PeerViews | None = None,
) -> MoveResult:
    """Move one layer's experts in place from the old map to the new one.

    weights: this rank's tensors, each contiguous [num_local_slots, ...] (w13, w2, scales...).
    old_physical_to_logical_map, new_physical_to_logical_map: [P] integer, same on all ranks.
    group: the EP process group (None: WORLD, or a single rank when not initialized).
    budget_bytes: max staging memory per rank (None: DEFAULT_MAX_STAGED_EXPERTS experts).
    live_map: optional [P] tensor (any device) set to each round's map once it commits.
    verify: check P2P payloads against the senders' fingerprints and every changed slot
    afterwards (rounds then run one at a time, and fingerprints take temporary memory).
    fault_hook(point, rank, layer) is called at "before_transfer" (once, before the
    pre-flight agreement) and "after_staging" (each round, after its P2P is posted); tests
    raise from it to inject a failure on one rank. pipeline: double-buffer rounds of half
    the budget (see ``schedule_layer_move``); default: full-budget rounds, one at a time.
    staging: a pool from ``prepare_staging`` (same budget, same per-slot shapes), reused by
    every layer of a rebalance: it exists on every rank (agreed when it was made), so the
    move skips its own allocation and pre-flight agreement (a "before_transfer" failure is
    then voted in round 1, which still stages so that every rank's P2P is matched). Used
    when the layer's rounds fit in it (the same decision on every rank); else as without.
    schedule: the layer's ``LayerMoveSchedule``, computed ahead (e.g. off the serving path);
    it must be made for these maps, ep_size, budget (``budget_bytes // expert_bytes``),
    gpus_per_node and pipeline (``pipeline and not verify``), else ConfigError names the
    mismatch. None: computed here.
    peers: ``PeerViews.exchange`` of (at least) these tensors on group: experts from
    same-host peers are pulled by copy engines instead of sent by NCCL (ignored with verify).
    Collective over group. Raises LayerMoveError (a TransferError) on any rank's failure,
    on every rank; the layer then holds ``err.live_physical_to_logical_map``. On return the
    last commit's copies are queued on the current stream (stream order covers later use).
    """
    start = time.perf_counter()
    cur = torch.cuda.current_stream() if weights and weights[0].is_cuda and _TRACE is not None else None
    _mark("start", cur)
    group, rank, world = group_info(group)
    old = old_physical_to_logical_map.detach().to("cpu", torch.int64)
    new = new_physical_to_logical_map.detach().to("cpu", torch.int64)
    if old.numel() % world:
        raise ConfigError(f"{old.numel()} slots do not divide over ep_size={world} ranks")
    check_weights(weights, old.numel() // world)
    cap = max_staged_experts(weights, budget_bytes)
    if schedule is None:
        schedule = LayerMoveSchedule(old, new, ep_size=world, max_staged_experts=cap,
                                     gpus_per_node=gpus_per_node, pipeline=pipeline and not verify)
    else:
        check_schedule(schedule, old, new, ep_size=world, max_staged_experts=cap, gpus_per_node=gpus_per_node,
                       pipeline=pipeline and not verify, what=f"layer {layer}'s schedule")
    _mark("scheduled")
    hook = fault_hook or (lambda point, r, lay: None)
    n = len(schedule)
    if n == 0:
        return MoveResult.from_plans([], expert_bytes=0, seconds=time.perf_counter() - start, peak_staging_bytes=0)
    nccl = is_nccl(group)
    device = weights[0].device if nccl else torch.device("cpu")
    # step 0: pre-flight; step k + 1: round k. Its stream, buffers and events are reused
    # from the previous move on this group (released below once every result was read).
    agreement = Agreement(group, device, n + 1, reuse=True)
    _mark("agreement_ready")

    def fail(k: int, current: torch.Tensor, error: BaseException | None, landed: int | None = None) -> LayerMoveError:
        """Round k failed; ``landed`` rounds committed (default: the k before it)."""
        cause = f"{type(error).__name__}: {error}" if error else "another rank failed"
        where = "before the transfer" if k < 0 else f"in round {k + 1}/{n}"
        rounds = max(k, 0) if landed is None else landed
        moved = sum(len(p.sends) + len(p.recvs) for p in (schedule.plan(j).ranks[rank] for j in range(rounds)))
        return LayerMoveError(
            f"rank {rank}: layer {layer} move failed {where} ({cause}); the layer stays on its "
            f"{'old' if k <= 0 else 'intermediate'} map",
            rank=rank, layer=layer, live_map=current.clone(), bytes_moved=moved * expert_bytes(weights),
        )

    error: BaseException | None = None
    pool = None
    early_error: BaseException | None = None  # this rank's failure voted in round 1 (staging given)
    # staging.rows is the same on every rank (prepare_staging agreed on it), and so is the
    # schedule: every rank takes the same branch.
    if staging is not None and max(schedule.pool_rows) <= staging.rows:
        if staging.signature != signature(weights):
            raise ConfigError("staging was made for tensors of other shapes, dtypes or devices")
        pool = staging
        pool.reset()
        try:
            hook("before_transfer", rank, layer)
        except Exception as exc:
            early_error = exc
        schedule.plan(0)
    else:
        # Pre-flight: every rank has its pool before any P2P is posted.
        try:
            hook("before_transfer", rank, layer)
            pool = StagingPool(weights, schedule.pool_rows[rank])
        except Exception as exc:  # reported to every rank by the agreement, then re-raised
            error = exc
        _mark("pool_ready")
        agreement.post(0, error is None)
        _mark("preflight_posted", agreement.stream if agreement.gpu and cur is not None else None)
        schedule.plan(0)  # host planning while the pre-flight vote travels
        # Host wait: no rank posts P2P unless every rank has its pool.
        try:
            ok = agreement.result(0, timeout_s, f"layer {layer}'s pre-flight agreement")
        except TransferError as exc:  # a peer did not answer: nothing moved
            raise fail(-1, old, exc) from exc
        if not ok:
            agreement.release()  # its one posted step was read
            raise fail(-1, old, error) from error

    _mark("preflight_done")
    tags: dict[tuple[bool, int], int] = {}
    posted: dict[int, StagedRound] = {}
    pulls = None if verify else peers

    # Deferred votes (several rounds, one at a time): the host queues every round without
    # waiting for its vote; each round's commit runs on the device only if its agreed flag
    # is 1, and each vote includes the previous one's result (once a round fails, no later
    # round commits on any rank). The host reads the votes once, at the end.
    defer = n > 1 and not verify and not (schedule.pipeline and (schedule.cap or 0) >= 2)

    def post(k: int) -> None:
        """Stage round k and vote on it; never blocks on the GPU (NCCL)."""
        _mark(f"post{k}")
        round_plan = schedule.plan(k)
        plan = round_plan.ranks[rank]
        rows, _ = pool.take(plan.num_staged_experts)  # free by construction of the schedule
        staged = StagedRound(plan=plan, new_map=schedule.maps[k], buffers=pool.buffers, rows=rows,
                             round_plan=round_plan)
        if k == 0 and early_error is not None:
            staged.error = early_error  # staged anyway (peers' P2P must match); votes no
        barrier = barrier_needed(pulls, k == 0, [schedule.plan(j) for j in range(k)], round_plan)
        with pulling(pulls, weights[0].device):  # the round's copies and its vote
            try:
                stage_round(weights, staged, group=group, verify=verify, timeout_s=timeout_s, tags=tags,
                            nccl=nccl, peers=pulls, barrier=barrier)
                _mark(f"p2p_posted{k}")
                hook("after_staging", rank, layer)
            except Exception as exc:  # this rank votes no; every rank then raises
                staged.error = exc
            agreement.post(k + 1, staged.error is None,
                           agreement.flags[k : k + 1] if defer and k > 0 else staged.device_ok,
                           read=not defer or k == n - 1)  # deferred: the host reads only the last vote
        _mark(f"posted{k}", agreement.stream if agreement.gpu and cur is not None else None)  # GPU: vote k done
        posted[k] = staged
        del staged  # this frame is in its error's traceback: no cycle holding the pool

    current = old
    if defer:
        queued: list[StagedRound] = []
        landed = 0  # gloo: rounds known committed (the host read their flags)
        for k in range(n):
            post(k)
            staged = posted.pop(k)
            try:
                flag = agreement.device_flag(k + 1, timeout_s)  # the stream (not the host) waits for the vote
            except TransferError as exc:  # gloo: a peer did not answer; rounds before k landed (or not) alike everywhere
                current = schedule.maps[landed - 1] if landed else old
                if live_map is not None:
                    live_map.copy_(current)
                pool = agreement = staged = None
                queued.clear()
                posted.clear()
                raise fail(k, current, exc, landed=landed) from exc
            if not agreement.gpu and bool(flag):
                landed = k + 1  # votes are cumulative: a true flag means every earlier round landed too
            for w in staged.works:
                w.wait()  # stream-level; releases NCCL's hold on the rows
            staged.works = []
            commit_round(weights, staged, only_if=flag)  # a no-op on the device unless every rank agreed
            _mark(f"committed{k}", cur)
            pool.give_back(staged.rows)  # reused only by P2P posted later, which waits for this stream
            queued.append(staged)
            del staged
        # The last vote follows every round's P2P and vote on the communicator's stream, so
        # reading it drains them all; votes are cumulative: 1 means every round committed.
        done = n
        if not agreement.result(n, timeout_s, f"layer {layer}'s agreement on its {n} rounds"):
            votes = agreement.read_all(n + 1)[1:]
            done = votes.index(False)
        _mark("voted")
        current = schedule.maps[done - 1] if done else old
        if live_map is not None:
            live_map.copy_(current)
        if done < n:
            errors = [s.error for s in queued[done:] if s.error is not None]
            error = errors[0] if errors else None
            pool = agreement = None
            queued.clear()
            raise fail(done, current, error) from error
        queued.clear()
    else:
        post(0)
    for k in range(n if defer else 0, n):
        # Planning round k+1 (host) overlaps round k's P2P; every rank decides alike.
        early = k + 1 < n and schedule.prefetch(k + 1)
        if early:
            post(k + 1)  # its P2P runs while this round commits
        # The one host wait per round: round k's vote (its P2P landed on every rank).
        try:
            ok = agreement.result(k + 1, timeout_s, f"layer {layer} round {k + 1}'s agreement")
        except TransferError as exc:  # a peer did not answer: rounds before k are committed
            pool = agreement = None
            posted.clear()
            raise fail(k, current, exc) from exc
        _mark(f"voted{k}")
        staged = posted.pop(k)
        if ok and verify and nccl and staged.plan.recvs:
            check_received(staged)  # records the fingerprints verify_committed compares
        if not ok:
            for j in sorted(posted):  # drain rounds posted early (the same on every rank)
                agreement.result(j + 1, timeout_s, f"layer {layer} round {j + 1}'s agreement")
                for w in posted[j].works + staged.works:
                    w.wait()  # complete; releases NCCL's hold on the pool
                posted[j].works = []
            error = staged.error
            if error is None and staged.device_ok is not None and not int(staged.device_ok):
                try:
                    check_received(staged)
                except TransferError as exc:
                    error = exc
            # The error's traceback keeps this frame (in reference cycles until a garbage
            # collection): drop the pool and the works now.
            pool = staged = agreement = None
            posted.clear()
            raise fail(k, current, error) from error
        for w in staged.works:
            w.wait()  # already complete (the vote follows it); releases NCCL's hold on the rows
        staged.works = []
        commit_round(weights, staged)
        _mark(f"committed{k}", cur)  # GPU: this commit's copies done
        pool.give_back(staged.rows)  # reused only by P2P posted later, which waits for this stream
        if live_map is not None:
            live_map.copy_(staged.new_map)
        if verify and staged.plan.changed_local_slots:
            verify_committed(weights, staged, rank=rank, layer=layer)
        current = staged.new_map
        if k + 1 < n and not early:
            post(k + 1)
    agreement.release()  # every step's result was read
    _mark("end")
    # Returning means every round committed: the totals are this rank's share of every plan.
    return MoveResult.from_plans([schedule.plan(k).ranks[rank] for k in range(n)], expert_bytes=expert_bytes(weights),
                                 seconds=time.perf_counter() - start, peak_staging_bytes=pool.nbytes)

