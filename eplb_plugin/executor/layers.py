"""Move a whole rebalance (several layers) with every layer's rounds queued ahead.

``move_experts`` moves one layer and waits on the host for its vote before it returns, so
in a rebalance of L layers the host sits idle L times and layer i's commit copies never
overlap layer i+1's transfer. ``move_layers`` queues every layer's rounds ("units", in
layer order; a layer is one unit when its staging fits the budget) without waiting:

- Schedules: ``LayerMoveSchedule(pipeline=False)`` per layer (full-budget rounds, as
  ``move_experts``' default), or the caller's (computed off the serving path).
- Memory: one ``StagingPool`` for the call: ``staging`` (from ``prepare_staging``, agreed
  when made) when every unit fits it, else one allocated here with one pre-flight
  agreement, sized to the largest unit and, within the budget, to twice that.
- Double buffering: unit u+1 is staged (its P2P posted) before unit u's commit is queued
  when, on every rank, both fit the pool side by side (one at each end, see
  ``StagingPool``) and u+1 reads no slot u writes (only possible within one layer). Unit
  u's commit then runs on the current stream while u+1's P2P runs on the NCCL stream.
  Otherwise u's commit is queued first, and u+1's P2P (which NCCL orders after the current
  stream) waits for it on the device; the host still never waits.
- Deferred votes (as in ``move_experts`` within a layer): unit u's vote is a MIN all-reduce
  of this rank's flag times unit u-1's agreed flag, so once a unit fails no later unit
  commits on any rank; each commit is queued after its vote and writes the slots only if
  the agreed flag is 1 (``commit_round(only_if=...)``, decided on the device). Unit u+1's
  vote is posted after the current stream was made to wait for unit u's vote (the
  multiplication reads it). The host reads one vote, the last, at the end: 1 means every
  unit committed everywhere; 0: all votes are read to find the first failed unit.
- Atomicity per layer: a layer moved in one round commits on every rank or on none. A
  failure at layer i (any rank) leaves layers before i committed, layer i on its old map
  (on its last committed intermediate map if it moved in several rounds, a valid placement
  as in ``move_experts``) and later layers on their old maps, weights matching, on every
  rank; every rank raises ``LayerMoveError`` naming layer i with every layer's live map.
  The ``before_transfer`` fault hook runs per layer just before its first unit is staged;
  a failure there is voted in that unit (which still stages: every rank's P2P must match).
- verify: layers move one at a time through ``move_experts(verify=True)`` (verify checks
  each round on the host), with the same failure semantics.

``move_layers`` is collective: every rank of ``group`` calls it with the same layers, maps
and options, in the same order as its other collectives on ``group``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from eplb_plugin.comm import group_info
from eplb_plugin.errors import ConfigError, TransferError
from eplb_plugin.executor import transfer
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
from eplb_plugin.executor.plan import RankTransferPlan
from eplb_plugin.executor.rounds import LayerMoveSchedule
from eplb_plugin.executor.staging import (
    StagedRound,
    StagingPool,
    commit_round,
    expert_bytes,
    is_nccl,
    signature,
    stage_round,
)
from eplb_plugin.executor.transfer import move_experts

LayerToMove = tuple[Sequence[torch.Tensor], torch.Tensor, torch.Tensor]  # (weights, old map, new map)


def move_layers(
    layers: Sequence[LayerToMove],
    group: dist.ProcessGroup | None = None,
    *,
    layer_ids: Sequence[int] | None = None,
    budget_bytes: int | None = None,
    gpus_per_node: int | None = None,
    live_maps: Sequence[torch.Tensor | None] | None = None,
    verify: bool = False,
    timeout_s: float = 300.0,
    fault_hook: FaultHook | None = None,
    staging: StagingPool | None = None,
    schedules: Sequence[LayerMoveSchedule | None] | None = None,
    peers: PeerViews | None = None,
) -> list[MoveResult]:
    """Move several layers' experts in place, pipelined across layers; one result per layer.

    layers: per layer (weights, old_physical_to_logical_map, new_physical_to_logical_map):
        this rank's tensors, each contiguous [num_local_slots, ...], of the same per-slot
        shapes and dtypes in every layer (one staging pool serves them all); maps [P]
        integer, the same on every rank.
    layer_ids: the layers' ids for errors and ``fault_hook`` (default 0..len(layers)-1).
    budget_bytes: max staging memory per rank (None: DEFAULT_MAX_STAGED_EXPERTS experts).
    live_maps: optional [P] tensor per layer (or None), set to the layer's map once the
        call's outcome is known (its new map, or the map it stays on after a failure).
    verify: as ``move_experts``; layers then move one at a time.
    fault_hook(point, rank, layer): "before_transfer" per layer before its first round is
        staged, "after_staging" per round after its P2P is posted; raise to inject a failure.
    staging: a pool from ``prepare_staging`` (same budget and per-slot shapes), used when
        every round fits it (the same decision on every rank); else one is made here.
    schedules: per layer a ``LayerMoveSchedule`` computed ahead (off the serving path), or
        None; each must match its layer's maps, ep_size, budget and gpus_per_node (either
        kind of rounds), else ConfigError names the mismatch. None: computed here.
    peers: ``PeerViews.exchange`` of (at least) these layers' tensors on group: experts
        from same-host peers are pulled by copy engines instead of sent by NCCL, on a copy
        stream beside the commits (ignored with verify).
    Results: each layer's counts; ``seconds`` is the whole call's (the layers move together).
    Collective over group. Raises LayerMoveError on every rank if any rank fails (see the
    module docstring for what stays committed). On return the last commit's copies are
    queued on the current stream (stream order covers later use).
    """
    start = time.perf_counter()
    cur = torch.cuda.current_stream() if layers and layers[0][0][0].is_cuda and transfer._TRACE is not None else None
    transfer._mark("start", cur)
    group, rank, world = group_info(group)
    num = len(layers)
    ids = list(range(num)) if layer_ids is None else list(layer_ids)
    for name, seq in (("layer_ids", ids), ("live_maps", live_maps), ("schedules", schedules)):
        if seq is not None and len(seq) != num:
            raise ConfigError(f"{name} has {len(seq)} entries for {num} layers; pass one per layer")
    olds, scheds = [], []
    sig = None
    for i, (weights, old_map, new_map) in enumerate(layers):
        old = old_map.detach().to("cpu", torch.int64)
        new = new_map.detach().to("cpu", torch.int64)
        if old.numel() % world:
            raise ConfigError(f"layer {ids[i]}: {old.numel()} slots do not divide over ep_size={world} ranks")
        check_weights(weights, old.numel() // world)
        if sig is not None and signature(weights) != sig:
            raise ConfigError(f"layer {ids[i]}'s weights differ in per-slot shape, dtype or device from layer "
                              f"{ids[0]}'s; one move_layers call moves layers of one kind (one pool)")
        sig = signature(weights)
        cap = max_staged_experts(weights, budget_bytes)
        given = schedules[i] if schedules is not None else None
        if given is None:
            given = LayerMoveSchedule(old, new, ep_size=world, max_staged_experts=cap,
                                      gpus_per_node=gpus_per_node, pipeline=False)
        else:
            check_schedule(given, old, new, ep_size=world, max_staged_experts=cap, gpus_per_node=gpus_per_node,
                           pipeline=False if verify else None, what=f"layer {ids[i]}'s schedule")
        olds.append(old)
        scheds.append(given)
    transfer._mark("scheduled")
    if verify:
        return _move_one_by_one(layers, group, ids, scheds, budget_bytes=budget_bytes, gpus_per_node=gpus_per_node,
                                live_maps=live_maps, timeout_s=timeout_s, fault_hook=fault_hook, staging=staging)
    units = [(i, k) for i, s in enumerate(scheds) for k in range(len(s))]  # (layer position, round)
    if not units:
        seconds = time.perf_counter() - start
        return [MoveResult.from_plans([], expert_bytes=0, seconds=seconds, peak_staging_bytes=0) for _ in layers]
    hook = fault_hook or (lambda point, r, lay: None)
    weights0 = layers[units[0][0]][0]
    cap = max_staged_experts(weights0, budget_bytes)
    nccl = is_nccl(group)
    device = weights0[0].device if nccl else torch.device("cpu")
    # Step 0: pre-flight (when this call allocates its pool); step u + 1: unit u.
    agreement = Agreement(group, device, len(units) + 1, reuse=True)

    def plan(u: int):
        i, k = units[u]
        return scheds[i].plan(k)

    def fail(u: int | None, committed: list[int], error: BaseException | None) -> LayerMoveError:
        """The error every rank raises: unit u failed (None: the pool), committed[i] rounds of
        layer i landed."""
        live = [scheds[i].maps[c - 1].clone() if c else olds[i].clone() for i, c in enumerate(committed)]
        i = units[0 if u is None else u][0]
        cause = f"{type(error).__name__}: {error}" if error else "another rank failed"
        if u is None:
            message = f"rank {rank}: no staging pool for the move of {num} layers ({cause}); no layer moved"
        else:
            message = (f"rank {rank}: layer {ids[i]} move failed in round {units[u][1] + 1}/{len(scheds[i])} "
                       f"({cause}); layers before it are moved, it stays on its "
                       f"{'intermediate' if committed[i] else 'old'} map and later layers on their old maps")
        moved = sum(len(p.sends) + len(p.recvs) for j, c in enumerate(committed)
                    for p in (scheds[j].plan(k).ranks[rank] for k in range(c)))
        return LayerMoveError(message, rank=rank, layer=ids[i], live_map=live[i], index=i, live_maps=live,
                              bytes_moved=moved * expert_bytes(layers[units[0][0]][0]))

    # Step 1: the pool. Rows per rank: the largest round (the schedules' bound, so no round is
    # planned before the first transfer) and, within the budget, room for two (double
    # buffering); every rank computes every rank's rows alike.
    largest = [max(s.pool_rows[r] for s in scheds) for r in range(world)]
    if staging is not None and max(largest) <= staging.rows:
        if staging.signature != sig:
            raise ConfigError("staging was made for tensors of other shapes, dtypes or devices")
        pool, rows = staging, [staging.rows] * world
        pool.reset()
    else:
        rows = [max(n, min(cap, 2 * n)) for n in largest]
        error, pool = None, None
        try:
            pool = StagingPool(weights0, rows[rank])
        except Exception as exc:  # reported to every rank by the agreement, then re-raised
            error = exc
        agreement.post(0, error is None)
        # Host wait: no rank posts P2P unless every rank has its pool.
        try:
            ok = agreement.result(0, timeout_s, "the staging pool's pre-flight agreement")
        except TransferError as exc:  # a peer did not answer: nothing moved
            raise fail(None, [0] * num, exc) from exc
        if not ok:
            agreement.release()  # its one posted step was read
            raise fail(None, [0] * num, error) from error
    transfer._mark("pool_ready")

    def prefetch(u: int) -> bool:
        """Unit u may be staged before unit u-1 commits (the same verdict on every rank)."""
        same_layer = units[u][0] == units[u - 1][0]
        for r, (a, b) in enumerate(zip(plan(u - 1).ranks, plan(u).ranks)):
            if a.num_staged_experts + b.num_staged_experts > rows[r]:
                return False
            if same_layer and not b.staging_reads.isdisjoint(a.changed_local_slots):
                return False
        return True

    tags: dict[tuple[bool, int], int] = {}
    errors: list[BaseException | None] = [None] * len(units)
    staged_units: dict[int, StagedRound] = {}
    last = len(units) - 1

    def post(u: int) -> None:
        """Stage unit u and vote on it (chained to unit u-1's agreed flag); never blocks on
        the GPU (NCCL). Unit u-1's vote must be ordered before this on the current stream."""
        i, k = units[u]
        weights = layers[i][0]
        round_plan = plan(u)
        mine: RankTransferPlan = round_plan.ranks[rank]
        taken, _ = pool.take(mine.num_staged_experts)  # free by the prefetch rule
        staged = StagedRound(plan=mine, new_map=scheds[i].maps[k], buffers=pool.buffers, rows=taken,
                             round_plan=round_plan)
        try:
            if k == 0:
                hook("before_transfer", rank, ids[i])
        except Exception as exc:
            staged.error = exc  # staged anyway (peers' P2P must match); votes no
        barrier = barrier_needed(peers, u == 0, [scheds[i].plan(j) for j in range(k)], round_plan)
        with pulling(peers, weights[0].device):  # the unit's copies and its vote
            try:
                stage_round(weights, staged, group=group, verify=False, timeout_s=timeout_s, tags=tags, nccl=nccl,
                            peers=peers, barrier=barrier)
                hook("after_staging", rank, ids[i])
            except Exception as exc:  # this rank votes no; every rank then raises
                staged.error = staged.error or exc
            agreement.post(u + 1, staged.error is None, agreement.flags[u : u + 1] if u > 0 else None,
                           read=u == last)  # the host reads only the last vote
        transfer._mark(f"posted{u}", agreement.stream if agreement.gpu and cur is not None else None)
        errors[u] = staged.error
        staged_units[u] = staged

    post(0)
    landed = 0  # gloo: units known committed (the host read their flags)
    def settle(num_units: int) -> list[int]:
        """Units [0, num_units) committed on every rank: the rounds each layer committed, and
        each live map set to the map those rounds reach (the old one with none)."""
        committed = [0] * num
        for i, _ in units[:num_units]:
            committed[i] += 1
        if live_maps is not None:
            for i, live in enumerate(live_maps):
                if live is not None:
                    live.copy_(scheds[i].maps[committed[i] - 1] if committed[i] else olds[i])
        return committed

    for u in range(len(units)):
        try:
            flag = agreement.device_flag(u + 1, timeout_s)  # the stream (not the host) waits for the vote
        except TransferError as exc:  # gloo: a peer did not answer; units before u landed alike everywhere
            committed = settle(landed)
            pool = agreement = staging = None
            staged_units.clear()
            errors.clear()
            raise fail(u, committed, exc) from exc
        if not agreement.gpu and bool(flag):
            landed = u + 1  # votes are cumulative: every earlier unit landed too
        early = u < last and prefetch(u + 1)
        if early:
            post(u + 1)  # its P2P runs while unit u commits
        staged = staged_units.pop(u)
        for w in staged.works:
            w.wait()  # stream-level; releases NCCL's hold on the rows
        staged.works = []
        commit_round(layers[units[u][0]][0], staged, only_if=flag)  # a no-op unless every rank agreed
        transfer._mark(f"committed{u}", cur)
        pool.give_back(staged.rows)  # reused only by P2P posted later, which waits for this stream
        del staged
        if u < last and not early:
            post(u + 1)
    # The last vote follows every unit's P2P and vote on the communicator's stream, so reading
    # it drains them all; votes are cumulative: 1 means every unit committed on every rank.
    done = len(units)
    if not agreement.result(len(units), timeout_s, f"the agreement on {len(units)} rounds of {num} layers"):
        done = agreement.read_all(len(units) + 1)[1:].index(False)
    transfer._mark("voted")
    committed = settle(done)
    if done < len(units):
        error = next((e for e in errors[done:] if e is not None), None)
        # The error's traceback keeps this frame: drop the pool and agreement now.
        pool = agreement = staging = None
        errors.clear()
        raise fail(done, committed, error) from error
    agreement.release()  # every step's result was read
    seconds = time.perf_counter() - start
    per = expert_bytes(weights0)
    results = [MoveResult.from_plans([s.plan(k).ranks[rank] for k in range(len(s))], expert_bytes=per,
                                     seconds=seconds, peak_staging_bytes=pool.nbytes if len(s) else 0)
               for s in scheds]
    transfer._mark("end")
    return results


def _move_one_by_one(layers: Sequence[LayerToMove], group, ids: list[int], scheds: list[LayerMoveSchedule], *,
                     budget_bytes, gpus_per_node, live_maps, timeout_s, fault_hook, staging) -> list[MoveResult]:
    """verify: one ``move_experts`` per layer; a failure at layer i leaves later layers untouched."""
    results: list[MoveResult] = []
    for i, (weights, old, new) in enumerate(layers):
        live = live_maps[i] if live_maps is not None else None
        try:
            results.append(move_experts(weights, old, new, group, layer=ids[i], budget_bytes=budget_bytes,
                                        gpus_per_node=gpus_per_node, live_map=live, verify=True,
                                        timeout_s=timeout_s, fault_hook=fault_hook, staging=staging,
                                        schedule=scheds[i]))
        except LayerMoveError as exc:
            maps = [layers[j][2].detach().to("cpu", torch.int64) for j in range(i)]
            maps += [exc.live_physical_to_logical_map]
            maps += [layers[j][1].detach().to("cpu", torch.int64) for j in range(i + 1, len(layers))]
            moved = sum(r.bytes_sent + r.bytes_received for r in results) + exc.bytes_moved
            raise LayerMoveError(str(exc), rank=exc.rank, layer=ids[i], live_map=exc.live_physical_to_logical_map,
                                 index=i, live_maps=maps, bytes_moved=moved) from exc
    return results
