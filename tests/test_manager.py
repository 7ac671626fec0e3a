"""EPLBManager over real gloo ranks: triggers, agreement, moves, and failures that keep serving."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from eplb_plugin.args import EPLBArgs
from eplb_plugin.dispatch import ExpertDispatcher
from eplb_plugin.errors import ConfigError, RebalanceError
from eplb_plugin.executor import move_layers
from eplb_plugin.location import ExpertLocation
from eplb_plugin.manager import EPLBManager
from eplb_plugin.manager.movers import BackgroundMover
from eplb_plugin.manager.planning import default_planner
from eplb_plugin.recorder import ExpertDistributionRecorder

from conftest import run_gloo_cases

NUM_LAYERS, NUM_EXPERTS, NUM_SLOTS, TOKENS, TOP_K = 3, 8, 12, 64, 2


def expert_weights(location: ExpertLocation, rank: int) -> list[list[torch.Tensor]]:
    """Per layer: w13 float32 [slots, 4, 3] and w2 bfloat16 [slots, 2], encoding (layer, expert)."""
    out = []
    for layer in range(location.num_layers):
        experts = location.local_physical_to_logical_map(rank)[layer]
        w13 = (experts * 1000 + layer * 100).to(torch.float32).view(-1, 1, 1) + torch.arange(12.0).view(1, 4, 3)
        w2 = (experts * 10 + layer).to(torch.bfloat16).view(-1, 1).repeat(1, 2)
        out.append([w13.contiguous(), w2.contiguous()])
    return out


def weights_match(weights, location: ExpertLocation, rank: int) -> bool:
    return all(
        torch.equal(w, e) for got, want in zip(weights, expert_weights(location, rank)) for w, e in zip(got, want)
    )


def skewed_ids(pass_index: int, rank: int, hot: int | list[int]) -> torch.Tensor:
    """[TOKENS, L, k] logical ids: expert ``hot`` (or ``hot[layer]``) takes most tokens of
    every layer.

    Under the trivial placement (12 slots for 8 experts on 2 ranks) experts 0-3 have a
    replica on each rank and experts 4-7 one replica."""
    gen = torch.Generator().manual_seed(pass_index * 7 + rank)
    ids = torch.randint(0, NUM_EXPERTS, (TOKENS, NUM_LAYERS, TOP_K), generator=gen)
    ids[: TOKENS * 3 // 4, :, 0] = torch.as_tensor(hot)
    return ids


class Host:
    """The serving side: dispatcher + recorder + manager, as a runtime wires them."""

    def __init__(self, rank: int, group, args: EPLBArgs, *, buffer_size: int | None = None, **manager_kwargs):
        self.rank = rank
        location = ExpertLocation.trivial(
            num_layers=NUM_LAYERS, num_logical_experts=NUM_EXPERTS, num_physical_experts=NUM_SLOTS, ep_size=2
        )
        self.weights = expert_weights(location, rank)
        self.recorder = ExpertDistributionRecorder(
            "stat", physical_to_logical_map=location.physical_to_logical_map, num_logical_experts=NUM_EXPERTS,
            buffer_size=args.eplb_rebalance_num_iterations if buffer_size is None else buffer_size,
            rank=rank, ep_size=2, group=group,
        )
        self.dispatcher = ExpertDispatcher(location, rank=rank)
        self.location_changes = 0
        self.manager = EPLBManager(
            args, location=location, recorder=self.recorder, expert_weights=self.weights, group=group, rank=rank,
            on_location_change=self._on_change, **manager_kwargs,
        )

    def _on_change(self, location: ExpertLocation) -> None:
        self.location_changes += 1
        self.dispatcher = ExpertDispatcher(location, rank=self.rank)

    def serve(self, num_passes: int, *, hot: int = 5, start: int = 0, until=None) -> list[tuple[int, str]]:
        """Run passes (or until ``until(manager)``, whose verdict is the same on every rank since
        the manager's state is); return (pass, error) for every RebalanceError it raised."""
        errors = []
        for i in range(start, start + num_passes):
            if until is not None and until(self.manager):
                break
            ids = skewed_ids(i, self.rank, hot)
            with self.recorder.with_forward_pass(i):
                for layer in range(NUM_LAYERS):
                    with self.recorder.with_current_layer(layer):
                        self.recorder.on_select_experts(self.dispatcher.dispatch(layer, ids[:, layer]))
            try:
                self.manager.on_forward_pass_end()
            except RebalanceError as exc:
                errors.append((self.manager.num_passes, str(exc)))
        return errors


def _args(**kw) -> EPLBArgs:
    base = dict(ep_size=2, enable_eplb=True, eplb_rebalance_num_iterations=10, eplb_verify_weights=True)
    return EPLBArgs(**{**base, **kw}).resolve()


def _gather(obj):
    out = [None, None]
    dist.all_gather_object(out, obj)
    return out


def case_interval_rebalances_move_weights_and_agree(rank, group):
    host = Host(rank, group, _args())
    before = host.manager.location.physical_to_logical_map.clone()
    finished = lambda m: len([r for r in m.history if r.end_pass is not None]) >= 2  # noqa: E731
    assert host.serve(5000, until=finished) == []
    assert all(r.error is None and r.skipped is None for r in host.manager.history)
    done = [r for r in host.manager.history if r.end_pass is not None]
    starts = [r.start_pass for r in host.manager.history]
    # Every 10 passes, or as soon as the previous rebalance is done when planning takes longer.
    assert starts[0] == 10 and len(starts) >= 2, host.manager.history
    assert all(b - a >= 10 and b >= prev.end_pass for a, b, prev in zip(starts, starts[1:], host.manager.history))
    first = done[0]
    assert first.slots_moved > 0 and first.balancedness_predicted > first.balancedness_before
    assert not torch.equal(before, host.manager.location.physical_to_logical_map)
    # The hot expert (trivially on rank 0 only) got replicas on both ranks.
    assert (host.manager.location.logical_replica_count[:, 5] > 1).all()
    assert weights_match(host.weights, host.manager.location, rank)
    assert torch.equal(host.recorder.physical_to_logical_map.cpu(), host.manager.location.physical_to_logical_map)
    maps = _gather(host.manager.location.physical_to_logical_map.tolist())
    assert maps[0] == maps[1]
    starts = _gather([(r.start_pass, r.end_pass, r.slots_moved) for r in host.manager.history])
    assert starts[0] == starts[1]
    assert done[0].balancedness_achieved is not None and done[0].balancedness_achieved > done[0].balancedness_before


def case_planning_in_a_process_rebalances_like_the_thread(rank, group):
    """--eplb-plan-in-process: rank 0 plans in a worker process; the rebalance moves weights,
    every rank agrees, and closing the manager stops the worker."""
    host = Host(rank, group, _args(eplb_plan_in_process=True))
    assert (host.manager._planner_process is not None) == (rank == 0)
    if rank == 0:
        assert host.manager.planner is host.manager._planner_process  # the worker plans, not the thread
    finished = lambda m: any(r.end_pass is not None for r in m.history)  # noqa: E731
    assert host.serve(5000, until=finished) == []
    done = [r for r in host.manager.history if r.end_pass is not None]
    assert done[0].error is None and done[0].slots_moved > 0
    assert (host.manager.location.logical_replica_count[:, 5] > 1).all()
    assert weights_match(host.weights, host.manager.location, rank)
    maps = _gather(host.manager.location.physical_to_logical_map.tolist())
    assert maps[0] == maps[1]
    host.manager.close()
    if rank == 0:  # the worker pool is shut down: it takes no more work
        with pytest.raises(RuntimeError):
            host.manager._planner_process._pool.submit(int)


def case_planner_failure_surfaces_on_every_rank_and_keeps_the_placement(rank, group):
    def broken_planner(*args, **kwargs):
        raise ValueError("solver exploded")

    host = Host(rank, group, _args(), planner=broken_planner)
    before = host.manager.location.physical_to_logical_map.clone()
    errors = host.serve(25)
    assert [p for p, _ in errors] == _gather([p for p, _ in errors])[0]
    assert len(errors) == 2 and "planning failed" in errors[0][1]
    assert torch.equal(before, host.manager.location.physical_to_logical_map)
    assert weights_match(host.weights, host.manager.location, rank)
    assert all(r.error for r in host.manager.history)


def case_transfer_failure_on_one_rank_leaves_every_rank_on_the_old_placement(rank, group):
    def failing_mover(*args, **kwargs):
        def hook(point, r, layer):
            if point == "after_staging" and r == 1 and layer == 1:
                raise RuntimeError("injected NCCL error")

        return move_layers(*args, fault_hook=hook, **kwargs)  # verify on: one layer at a time

    host = Host(rank, group, _args(), layers_mover=failing_mover)
    before = host.manager.location.physical_to_logical_map.clone()
    errors = host.serve(5000, until=lambda m: m.history and m.history[0].end_pass is not None)
    assert len(errors) == 1 and "layer 1" in errors[0][1]
    loc = host.manager.location
    # Layer 0 moved before the failure and is live; layer 1 kept its old map; layer 2 never started.
    assert torch.equal(loc.physical_to_logical_map[1:], before[1:])
    assert weights_match(host.weights, loc, rank)
    # Serving goes on, and the next rebalance (with a healthy link) completes.
    host.manager.layers_mover = move_layers
    host.manager.rebalance_now()
    assert host.serve(5000, start=300, until=lambda m: m.history[-1].end_pass is not None and len(m.history) > 1) == []
    assert host.manager.history[-1].error is None
    assert weights_match(host.weights, host.manager.location, rank)


def mover_failing_at_layer_1(*args, **kwargs):
    """move_layers with an NCCL error injected on rank 1 once layer 1 is staged."""
    def hook(point, r, layer):
        if point == "after_staging" and r == 1 and layer == 1:
            raise RuntimeError("injected NCCL error")

    return move_layers(*args, fault_hook=hook, **kwargs)


def case_unverified_chunk_moves_layers_together_and_a_failed_layer_keeps_later_layers_old(rank, group):
    """Without verify a chunk's layers are pipelined in one move_layers call; a failure at layer 1 on rank 1
    keeps layer 0 moved (live) and layers 1-2 old, weights matching, and the next
    rebalance completes."""
    host = Host(rank, group, _args(eplb_verify_weights=False), layers_mover=mover_failing_at_layer_1)
    before = host.manager.location.physical_to_logical_map.clone()
    errors = host.serve(5000, until=lambda m: m.history and m.history[0].end_pass is not None)
    assert len(errors) == 1 and "layer 1" in errors[0][1]
    loc = host.manager.location
    assert host.manager.history[0].layers[:2] == [0, 1]
    assert not torch.equal(loc.physical_to_logical_map[0], before[0])
    assert torch.equal(loc.physical_to_logical_map[1:], before[1:])
    assert weights_match(host.weights, loc, rank)
    host.manager.layers_mover = move_layers
    host.manager.rebalance_now()
    assert host.serve(5000, start=300, until=lambda m: m.history[-1].end_pass is not None and len(m.history) > 1) == []
    record = host.manager.history[-1]
    assert record.error is None and record.slots_moved > 0 and record.bytes_moved > 0
    assert record.transport == "gloo"  # --eplb-transport auto: CPU weights cannot be pulled; P2P over gloo
    assert weights_match(host.weights, host.manager.location, rank)


def case_time_trigger_fires_on_every_rank_when_one_clock_is_due(rank, group):
    now = [0.0]
    host = Host(rank, group, _args(eplb_rebalance_num_iterations=10_000, eplb_rebalance_interval_s=5.0),
                check_every_passes=4, clock=lambda: now[0])
    host.serve(8)
    assert host.manager.history == []
    if rank == 1:
        now[0] = 6.0  # only rank 1's clock is due
    host.serve(4, start=8)
    assert [r.trigger for r in host.manager.history] == ["time"]
    assert host.manager.history[0].start_pass == 12


def case_drift_trigger_replans_only_drifted_layers(rank, group):
    """A drift rebalance plans the drifted layers alone (the planner sees their counts and
    live maps only, so a move budget is spent on them) and the other layers keep their maps."""
    planned_layers = []

    def recording_planner(counts, **kwargs):
        from eplb_plugin.algorithms import plan

        planned_layers.append((counts.shape[-2], kwargs["previous"].shape[0]))
        return plan(counts, **kwargs)

    host = Host(rank, group, _args(eplb_rebalance_num_iterations=10, eplb_drift_threshold=0.9),
                check_every_passes=5, planner=recording_planner)
    host.serve(5000, hot=5, until=lambda m: m.history and m.history[0].end_pass is not None)
    assert [r.trigger for r in host.manager.history] == ["interval"]
    planned = host.manager.location.physical_to_logical_map.clone()
    host.manager.args = _args(eplb_rebalance_num_iterations=10_000, eplb_drift_threshold=0.9)
    # The hot expert changes in layers 0 and 2 only: their loads drift, layer 1's does not.
    replanned = lambda m: not m.busy and bool((m.location.logical_replica_count[[0, 2], 4] > 1).all())  # noqa: E731
    host.serve(5000, hot=[4, 5, 4], start=5000, until=replanned)
    assert replanned(host.manager)
    drifts = [r for r in host.manager.history[1:] if r.trigger == "drift"]
    assert drifts and len(drifts) == len(host.manager.history) - 1
    assert all(r.layers and set(r.layers) <= {0, 2} for r in drifts), [r.layers for r in drifts]
    if rank == 0:  # the interval rebalance planned every layer, each drift one its drifted layers (0, 2)
        assert planned_layers[0] == (NUM_LAYERS, NUM_LAYERS), planned_layers
        assert len(planned_layers) == 1 + len(drifts), planned_layers
        assert all(n == m and 1 <= n <= 2 for n, m in planned_layers[1:]), planned_layers
    assert torch.equal(host.manager.location.physical_to_logical_map[1], planned[1])
    assert weights_match(host.weights, host.manager.location, rank)


def case_threshold_skips_rebalancing_a_balanced_window(rank, group):
    host = Host(rank, group, _args(eplb_min_rebalancing_utilization_threshold=0.1))
    host.serve(11)
    assert host.manager.history[0].skipped and "threshold" in host.manager.history[0].skipped
    assert host.location_changes == 0


def case_layers_per_chunk_go_live_one_pass_at_a_time(rank, group):
    host = Host(rank, group, _args(eplb_rebalance_layers_per_chunk=1, eplb_rebalance_num_iterations=10_000))
    host.serve(10)
    host.manager.rebalance_now()
    changes = []
    for i in range(5000):
        if host.manager.history and host.manager.history[0].end_pass is not None:
            break
        host.serve(1, start=10 + i)
        changes.append(host.location_changes)
    record = host.manager.history[0]
    assert changes[-1] == len(record.layers) > 1
    assert max(b - a for a, b in zip([0] + changes, changes)) == 1  # never two layers in one pass
    assert weights_match(host.weights, host.manager.location, rank)


def case_non_blocking_moves_land_while_serving_and_go_live_at_pass_boundaries(rank, group):
    host = Host(rank, group, _args(eplb_non_blocking=True, eplb_rebalance_layers_per_chunk=1))
    assert isinstance(host.manager.mover, BackgroundMover)
    host.manager.layers_mover = lambda *a, **k: pytest.fail("the blocking mover ran in non-blocking mode")
    errors = host.serve(5000, until=lambda m: len([r for r in m.history if r.end_pass is not None]) >= 2)
    assert errors == []
    finished = [r for r in host.manager.history if r.end_pass is not None]
    assert len(finished) >= 2 and finished[0].slots_moved > 0 and finished[0].bytes_moved > 0
    assert all(r.transport == "gloo" for r in finished)
    assert weights_match(host.weights, host.manager.location, rank)
    assert torch.equal(host.recorder.physical_to_logical_map.cpu(), host.manager.location.physical_to_logical_map)
    host.manager.close()


def case_a_planner_past_its_timeout_fails_and_its_late_plan_is_dropped(rank, group):
    def slow_planner(*args, **kwargs):
        time.sleep(1.0)
        return default_planner(*args, **kwargs)

    host = Host(rank, group, _args(eplb_rebalance_num_iterations=10_000), planner=slow_planner, plan_timeout_s=0.2)
    before = host.manager.location.physical_to_logical_map.clone()
    host.serve(2)
    host.manager.rebalance_now()
    errors = host.serve(5000, until=lambda m: m.history and m.history[0].end_pass is not None)
    assert len(errors) == 1 and (rank != 0 or "longer than 0.2 s" in errors[0][1])
    time.sleep(1.2)  # the late planner finishes into its own, abandoned attempt
    assert host.serve(5, start=5000) == []
    assert torch.equal(host.manager.location.physical_to_logical_map, before)
    assert weights_match(host.weights, host.manager.location, rank)


def case_weights_reallocated_between_rebalances_are_exchanged_again(rank, group):
    """--eplb-transport auto exchanges where the weights live at the first move, keeps that
    while they stay, and exchanges again once they were reallocated (e.g. reloaded)."""
    host = Host(rank, group, _args(eplb_verify_weights=False, eplb_rebalance_num_iterations=10_000))
    host.serve(10)
    host.manager.rebalance_now()
    done = lambda n: lambda m: len([r for r in m.history if r.end_pass is not None]) >= n  # noqa: E731
    assert host.serve(5000, start=10, until=done(1)) == []
    first = host.manager.mover.peers
    assert first is not None and not first.active and "not on CUDA" in first.reason
    host.manager.rebalance_now()
    assert host.serve(5000, start=6000, hot=3, until=done(2)) == []
    assert host.manager.history[1].transport == "gloo"  # its move resolved the transport (the blocking mover's start)
    assert host.manager.mover.peers is first  # same tensors: no new exchange
    for layer in host.weights:  # reallocate every tensor in place in the list the manager holds
        layer[:] = [t.clone() for t in layer]
    host.manager.rebalance_now()
    assert host.serve(5000, start=12000, hot=5, until=done(3)) == []
    assert host.manager.history[2].transport == "gloo" and host.manager.mover.peers is not first
    assert set(host.manager.mover.peers.index) == {t.data_ptr() for layer in host.weights for t in layer}
    assert weights_match(host.weights, host.manager.location, rank)


def case_layers_without_weights_go_live_without_a_move(rank, group):
    """A dense layer (no routed experts: no weight tensors, as the SGLang adapter passes it)
    whose map the plan changes goes live at once; the other layers move, blocking or not."""
    for non_blocking in (False, True):
        host = Host(rank, group, _args(eplb_non_blocking=non_blocking, eplb_verify_weights=False))
        host.weights[0] = []  # the list the manager holds
        assert host.serve(5000, until=lambda m: m.history and m.history[0].end_pass is not None) == []
        record, loc = host.manager.history[0], host.manager.location
        assert record.error is None and 0 in record.layers and record.slots_moved > 0
        want = expert_weights(loc, rank)
        assert all(torch.equal(w, e) for got, exp in zip(host.weights[1:], want[1:]) for w, e in zip(got, exp))
        host.manager.close()


def case_ipc_transport_is_refused_for_cpu_weights_at_start_up(rank, group):
    with pytest.raises(ConfigError, match="--eplb-transport ipc.*not all on CUDA"):
        Host(rank, group, _args(eplb_transport="ipc"))
    with pytest.raises(ConfigError, match="--eplb-transport ipc.*not all on CUDA"):
        Host(rank, group, _args(eplb_transport="ipc", eplb_non_blocking=True))


def case_a_users_stop_dump_or_start_never_empties_the_window_eplb_plans_on(rank, group):
    """POST /stop_expert_distribution_record, then a dump, between rebalances: the next
    rebalance still plans on every pass of its window and moves weights; a start after it
    leaves the window as it was."""
    host = Host(rank, group, _args(eplb_verify_weights=False))
    host.serve(3)
    host.recorder.stop_record()
    host.serve(3, start=3)
    host.recorder.dump_record("object")  # collective: the stat dump sums over ranks
    assert host.serve(5000, start=6, until=lambda m: m.history and m.history[0].end_pass is not None) == []
    record = host.manager.history[0]
    assert record.skipped is None and record.error is None, record
    assert record.start_pass == 10 and record.slots_moved > 0
    assert weights_match(host.weights, host.manager.location, rank)
    held = host.recorder.num_passes_in_window
    host.recorder.start_record()
    assert host.recorder.num_passes_in_window == held == 10


def case_a_per_pass_policy_plans_from_the_windows_passes_summed_over_ranks(rank, group):
    """deepseek_vec gets the window's passes [B, L, E] (each summed over ranks), not their sum."""
    seen = []

    def recording_planner(counts, **kwargs):
        from eplb_plugin.algorithms import plan

        seen.append(counts.clone())
        return plan(counts, **kwargs)

    host = Host(rank, group, _args(eplb_algorithm="deepseek_vec"), planner=recording_planner)
    finished = lambda m: any(r.end_pass is not None for r in m.history)  # noqa: E731
    assert host.serve(200, until=finished) == []
    assert all(r.error is None for r in host.manager.history), host.manager.history
    if rank == 0:  # only rank 0 plans
        curve = host.manager.redundancy_curve(max_per_gpu=2)  # on the window's passes: held out
        assert [(p.redundant, p.per_gpu, p.held_out) for p in curve] == [(0, 0, True), (2, 1, True), (4, 2, True)]
        assert all(0 < p.balancedness <= 1 for p in curve)
        counts = seen[0]
        assert counts.shape == (10, NUM_LAYERS, NUM_EXPERTS), counts.shape
        per_rank = 2 * TOKENS * TOP_K  # both ranks' tokens in every pass
        assert counts.sum(dim=(1, 2)).tolist() == [per_rank * NUM_LAYERS] * 10
    assert weights_match(host.weights, host.manager.location, rank)


def case_a_window_without_bound_holds_only_the_passes_since_the_last_rebalance(rank, group):
    """--expert-distribution-recorder-buffer-size -1: each rebalance plans on the passes since
    the one before (SGLang's EPLBManager empties its recorder at each rebalance), so the
    window, and its device memory, does not grow with the run."""
    seen = []

    def recording_planner(counts, **kwargs):
        from eplb_plugin.algorithms import plan

        seen.append(int(counts.sum()))
        return plan(counts, **kwargs)

    host = Host(rank, group, _args(eplb_verify_weights=False), buffer_size=-1, planner=recording_planner)
    assert host.serve(95) == []
    assert [r.start_pass for r in host.manager.history] == list(range(10, 91, 10))
    assert host.recorder.num_passes_in_window == 5
    if rank == 0:  # only rank 0 plans: on 10 passes of both ranks' tokens, every time
        assert seen == [10 * 2 * TOKENS * TOP_K * NUM_LAYERS] * 9, seen


def case_a_move_budget_reaches_the_planner_in_slots_and_bounds_what_moves(rank, group):
    """--eplb-move-budget-mb becomes slots (the budget over one expert's bytes): the planner
    gets it, and every rebalance moves at most that many slots; a budget below one expert,
    or with a policy that takes none, is refused at start-up. The per-pass policy's search
    is also given its share of the plan timeout (it stops there with its best map so far)."""
    from eplb_plugin.manager.planning import PLAN_TIME_SHARE

    seen, limits = [], []

    def recording_planner(counts, **kwargs):
        from eplb_plugin.algorithms import plan

        seen.append(kwargs.get("max_slots_moved"))
        limits.append(kwargs.get("time_limit_s"))
        return plan(counts, **kwargs)

    location = ExpertLocation.trivial(num_layers=NUM_LAYERS, num_logical_experts=NUM_EXPERTS,
                                      num_physical_experts=NUM_SLOTS, ep_size=2)
    slot_mb = sum(t[0].numel() * t.element_size() for t in expert_weights(location, rank)[0]) / (1 << 20)
    args = _args(eplb_algorithm="eplb_plugin_perpass", ep_dispatch_algorithm="minmax", eplb_move_budget_mb=3.5 * slot_mb,
                 eplb_move_budget_carry=0)  # a hard cap per rebalance
    host = Host(rank, group, args, planner=recording_planner)
    finished = lambda m: sum(r.end_pass is not None for r in m.history) >= 2  # noqa: E731
    assert host.serve(5000, until=finished) == []
    records = [r for r in host.manager.history if r.end_pass is not None]
    assert all(r.error is None and r.slots_moved <= 3 for r in records), records
    assert records[0].slots_moved > 0, records  # the budget is spent, not refused
    if rank == 0:
        assert seen and set(seen) == {3}
        assert set(limits) == {PLAN_TIME_SHARE * host.manager.plan_timeout_s}
    assert weights_match(host.weights, host.manager.location, rank)

    # Carried over (--eplb-move-budget-carry 2): each plan may move what earlier ones left,
    # up to 3 budgets, and the slots moved stay within 3 per rebalance on average.
    seen.clear()
    carried = Host(rank, group, _args(eplb_algorithm="eplb_plugin_perpass", ep_dispatch_algorithm="minmax",
                                      eplb_move_budget_mb=3.5 * slot_mb, eplb_move_budget_carry=2),
                   planner=recording_planner)
    finished = lambda m: sum(r.end_pass is not None for r in m.history) >= 3  # noqa: E731
    assert carried.serve(5000, until=finished) == []
    records = [r for r in carried.manager.history if r.end_pass is not None]
    assert all(r.error is None for r in records), records
    if rank == 0:
        left = 0
        for budget, record in zip(seen, records):
            assert budget == min(left + 3, 9), (seen, records)
            assert record.slots_moved <= budget, (seen, records)
            left = budget - record.slots_moved
        assert max(seen) > 3, seen  # a rebalance was granted what an earlier one left
    assert sum(r.slots_moved for r in records) <= 3 * len(records), records
    assert weights_match(carried.weights, carried.manager.location, rank)
    with pytest.raises(ConfigError, match="below one expert"):
        Host(rank, group, _args(eplb_algorithm="eplb_plugin_perpass", eplb_move_budget_mb=0.5 * slot_mb))
    with pytest.raises(ConfigError, match="needs a policy that takes a move budget.*eplb_plugin_perpass"):
        Host(rank, group, _args(eplb_move_budget_mb=10 * slot_mb))


def case_a_rebalance_goes_idle_planning_moving_idle_and_no_other_way(rank, group):
    """A rebalance that moves enters planning, moving and idle, in that order (all may
    happen within one pass); ``phase`` reads idle between rebalances; a transition the state
    machine lacks is refused."""
    from eplb_plugin.manager import Phase

    host = Host(rank, group, _args(eplb_verify_weights=False))
    entered = []
    enter = host.manager._enter
    host.manager._enter = lambda phase: (entered.append(phase), enter(phase))[-1]
    finished = lambda m: bool(m.history) and m.history[0].end_pass is not None  # noqa: E731
    assert host.serve(200, until=finished) == []
    assert host.manager.history[0].slots_moved > 0
    assert entered == [Phase.PLANNING, Phase.MOVING, Phase.IDLE], entered
    assert host.manager.phase is Phase.IDLE and not host.manager.busy
    with pytest.raises(RuntimeError, match="no transition from idle to moving"):
        enter(Phase.MOVING)


CASES = [v for k, v in dict(globals()).items() if k.startswith("case_")]


@pytest.fixture(scope="module")
def results():
    return run_gloo_cases(CASES)


@pytest.mark.parametrize("case", [c.__name__ for c in CASES])
def test_manager_case_on_two_gloo_ranks(results, case):
    for rank in range(2):
        assert results.get((rank, case)) == "ok", results.get((rank, case), "case did not run")
