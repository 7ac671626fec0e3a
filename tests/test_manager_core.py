"""EPLBManager's state machine driven by a fake planning job and a fake load window, on one
process without torch.distributed (every collective returns early)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from eplb_plugin.args import EPLBArgs
from eplb_plugin.errors import RebalanceError
from eplb_plugin.location import ExpertLocation
from eplb_plugin.manager import EPLBManager, Phase
from eplb_plugin.manager.planning import PlanOutcome

NUM_LAYERS, NUM_EXPERTS, NUM_SLOTS = 2, 4, 6
# The trivial map is [0, 1, 2, 3, 0, 1] in both layers; the plan swaps layer 0's first two
# slots (2 slots change) and gives layer 1's last two slots to expert 2 (2 slots change).
PLANNED = torch.tensor([[1, 0, 2, 3, 0, 1], [0, 1, 2, 3, 2, 2]])


class FakeWindow:
    """A LoadWindow with fixed counts: expert 2 takes most tokens in every layer."""

    def __init__(self, location: ExpertLocation):
        self.physical_to_logical_map = location.physical_to_logical_map.clone()
        self.logical = torch.tensor([[10.0, 10.0, 100.0, 10.0]] * NUM_LAYERS)
        self.kept = False
        self.maps: list[torch.Tensor] = []

    def logical_count_window(self) -> torch.Tensor:
        return self.logical

    def logical_count_passes(self) -> torch.Tensor:
        return self.logical[None]

    def physical_count_window(self) -> torch.Tensor:
        """Each expert's tokens split equally over its replicas: [L, P]."""
        phy2log = self.physical_to_logical_map
        replicas = torch.stack([torch.bincount(row, minlength=NUM_EXPERTS) for row in phy2log])
        return torch.gather(self.logical, 1, phy2log) / torch.gather(replicas, 1, phy2log)

    def keep_window_for_eplb(self) -> None:
        self.kept = True

    def eplb_window_gathered(self) -> None:
        pass

    def set_physical_to_logical_map(self, new_map: torch.Tensor) -> None:
        self.physical_to_logical_map = new_map.clone()
        self.maps.append(new_map.clone())


class FakeJob:
    """A PlanningJob whose outcome the test sets; records what it was started with."""

    def __init__(self, planner, counts, kwargs):
        self.counts, self.kwargs = counts, kwargs
        self.outcome: PlanOutcome | None = None
        self.cancelled: float | None = None

    def poll(self) -> PlanOutcome | None:
        return self.outcome

    def cancel(self, wait_s: float) -> None:
        self.cancelled = wait_s


def build(args: EPLBArgs | None = None, window_type: type[FakeWindow] = FakeWindow, **kwargs):
    """A manager over one process, its window, its weights (one [P, 1] tensor per layer whose
    rows name the slot's expert) and the planning jobs it starts."""
    location = ExpertLocation.trivial(num_layers=NUM_LAYERS, num_logical_experts=NUM_EXPERTS,
                                      num_physical_experts=NUM_SLOTS, ep_size=2)
    window = window_type(location)
    weights = [[location.physical_to_logical_map[layer].to(torch.float32).view(-1, 1)] for layer in range(NUM_LAYERS)]
    jobs: list[FakeJob] = []

    def start_job(planner, counts, job_kwargs):
        jobs.append(FakeJob(planner, counts, job_kwargs))
        return jobs[-1]

    args = args or EPLBArgs(ep_size=2, enable_eplb=True, eplb_rebalance_num_iterations=10_000).resolve()
    manager = EPLBManager(args, location=location, recorder=window, expert_weights=weights,
                          planning_job=start_job, **kwargs)
    return manager, window, weights, jobs


def test_a_planning_job_holds_the_manager_in_planning_until_its_plan_comes_then_the_plan_goes_live():
    manager, window, weights, jobs = build()
    assert window.kept and manager.phase is Phase.IDLE
    manager.rebalance_now()
    for _ in range(4):
        manager.on_forward_pass_end()
        assert manager.phase is Phase.PLANNING and len(jobs) == 1
    job = jobs[0]
    assert torch.equal(job.counts, window.logical.to(torch.float64))
    assert job.kwargs["num_physical_experts"] == NUM_SLOTS and job.kwargs["num_gpus"] == 2
    assert torch.equal(job.kwargs["previous"], ExpertLocation.trivial(
        num_layers=NUM_LAYERS, num_logical_experts=NUM_EXPERTS, num_physical_experts=NUM_SLOTS,
        ep_size=2).physical_to_logical_map)
    assert manager.history[0].end_pass is None
    job.outcome = PlanOutcome(SimpleNamespace(physical_to_logical_map=PLANNED, replica_weights=None), None)
    manager.on_forward_pass_end()
    record = manager.history[0]
    assert manager.phase is Phase.IDLE and record.error is None and record.skipped is None
    assert (record.start_pass, record.end_pass, record.layers, record.slots_moved) == (1, 5, [0, 1], 4)
    assert torch.equal(manager.location.physical_to_logical_map, PLANNED)
    assert torch.equal(window.maps[-1], PLANNED)
    assert [w[0].flatten().tolist() for w in weights] == PLANNED.to(torch.float32).tolist()
    assert manager.totals.done == 1


@pytest.mark.parametrize("outcome, words", [
    (PlanOutcome(None, ValueError("solver exploded")), "planning failed on rank 0 \\(ValueError"),
    (PlanOutcome(SimpleNamespace(physical_to_logical_map=PLANNED[:, :4], replica_weights=None), None),
     "planning failed on rank 0 .*expected shape \\[2, 6\\]"),
    (None, "planning took longer than 0.0 s"),
])
def test_a_failed_malformed_or_late_plan_fails_the_rebalance_and_keeps_the_placement(outcome, words):
    manager, window, weights, jobs = build(plan_timeout_s=0.0 if outcome is None else 60.0)
    before = manager.location.physical_to_logical_map.clone()
    manager.rebalance_now()
    if outcome is not None:
        manager.on_forward_pass_end()
        assert manager.phase is Phase.PLANNING
        jobs[0].outcome = outcome
    with pytest.raises(RebalanceError, match=f"rebalance 0: {words}.*keeping the old placement"):
        manager.on_forward_pass_end()
    assert manager.phase is Phase.IDLE and manager.history[0].error and manager.totals.failed == 1
    assert torch.equal(manager.location.physical_to_logical_map, before) and window.maps == []
    assert [w[0].flatten().tolist() for w in weights] == before.to(torch.float32).tolist()
    manager.close()
    assert jobs[0].cancelled == manager.plan_timeout_s  # close waits for the last job


def test_a_rebalance_due_while_a_timed_out_plan_still_runs_is_skipped_until_that_plan_ends():
    """At most one plan runs: a rebalance due while the plan of an earlier, timed-out one is
    still running is skipped (counted, with its reason) without starting another; once that
    plan ends, the next rebalance plans again, and the late plan is never used."""
    manager, window, weights, jobs = build(plan_timeout_s=0.0)
    before = manager.location.physical_to_logical_map.clone()
    manager.rebalance_now()
    with pytest.raises(RebalanceError, match="longer than 0.0 s"):
        manager.on_forward_pass_end()
    for _ in range(2):
        manager.rebalance_now()
        manager.on_forward_pass_end()
    assert len(jobs) == 1 and manager.phase is Phase.IDLE
    assert [r.skipped for r in manager.history[1:]] == [
        "the plan of an earlier rebalance, past its timeout, is still running (one plan at a time); "
        "planning resumes once it ends"] * 2
    assert (manager.totals.failed, manager.totals.skipped) == (1, 2)
    jobs[0].outcome = PlanOutcome(SimpleNamespace(physical_to_logical_map=PLANNED, replica_weights=None), None)
    manager.plan_timeout_s = 60.0
    manager.rebalance_now()
    manager.on_forward_pass_end()
    assert len(jobs) == 2 and manager.phase is Phase.PLANNING  # a fresh job; the late plan is dropped
    assert torch.equal(manager.location.physical_to_logical_map, before) and window.maps == []


def test_planning_threads_never_stack_behind_a_planner_past_its_timeout():
    """With the real planning thread: a planner stuck past the timeout is never joined by a
    second one however many rebalances come due; once it returns, the next rebalance plans."""
    import threading

    location = ExpertLocation.trivial(num_layers=NUM_LAYERS, num_logical_experts=NUM_EXPERTS,
                                      num_physical_experts=NUM_SLOTS, ep_size=2)
    weights = [[location.physical_to_logical_map[layer].to(torch.float32).view(-1, 1)] for layer in range(NUM_LAYERS)]
    release, calls = threading.Event(), []

    def stuck_planner(counts, **kwargs):
        calls.append(threading.current_thread())
        release.wait(timeout=60.0)
        raise RuntimeError("late")

    args = EPLBArgs(ep_size=2, enable_eplb=True, eplb_rebalance_num_iterations=2).resolve()
    manager = EPLBManager(args, location=location, recorder=FakeWindow(location), expert_weights=weights,
                          planner=stuck_planner, plan_timeout_s=0.0)
    failures = 0
    for _ in range(20):
        try:
            manager.on_forward_pass_end()
        except RebalanceError:
            failures += 1
    assert (len(calls), failures, manager.totals.skipped) == (1, 1, 9)
    release.set()
    calls[0].join(timeout=60.0)
    with pytest.raises(RebalanceError):
        for _ in range(2):
            manager.on_forward_pass_end()
    assert len(calls) == 2
    manager.close()


class MinmaxWindow(FakeWindow):
    """Two passes, each split by minmax dispatch: the first's hot expert (0) has a replica on
    each GPU, the second's (2) one replica; the physical window is what that dispatch
    realized (each GPU's load on its first slot)."""

    def __init__(self, location: ExpertLocation):
        super().__init__(location)
        self.passes = torch.tensor([[[100.0, 10.0, 10.0, 10.0]] * NUM_LAYERS, [[10.0, 10.0, 100.0, 10.0]] * NUM_LAYERS])

    def logical_count_passes(self) -> torch.Tensor:
        return self.passes

    def logical_count_window(self) -> torch.Tensor:
        return self.passes.sum(0)

    def physical_count_window(self) -> torch.Tensor:
        from eplb_plugin.algorithms.evaluate import minmax_gpu_loads

        gpu = minmax_gpu_loads(self.passes.numpy(), self.physical_to_logical_map.numpy(), num_gpus=2).sum(0)
        slots = torch.zeros(NUM_LAYERS, NUM_SLOTS, dtype=torch.float64)
        slots[:, ::NUM_SLOTS // 2] = torch.from_numpy(gpu)
        return slots


def test_under_minmax_a_plan_that_moves_nothing_predicts_the_balancedness_the_window_realized():
    """The predicted balancedness scores the plan with the dispatch that runs (minmax splits
    each pass), as the window's own figure was realized: a plan that keeps the live map
    predicts exactly that figure (an equal split of the window's sum predicted 130/175, minmax
    on the window's sum 1.0)."""
    location = ExpertLocation.trivial(num_layers=NUM_LAYERS, num_logical_experts=NUM_EXPERTS,
                                      num_physical_experts=NUM_SLOTS, ep_size=2)
    weights = [[location.physical_to_logical_map[layer].to(torch.float32).view(-1, 1)] for layer in range(NUM_LAYERS)]

    def keep_live_map(counts, *, previous, **kwargs):
        return SimpleNamespace(physical_to_logical_map=previous.clone(), replica_weights=None)

    args = EPLBArgs(ep_size=2, enable_eplb=True, eplb_rebalance_num_iterations=10_000, ep_dispatch_algorithm="minmax",
                    eplb_algorithm="eplb_plugin_perpass").resolve()
    manager = EPLBManager(args, location=location, recorder=MinmaxWindow(location), expert_weights=weights,
                          planner=keep_live_map)
    manager.rebalance_now()
    while not manager.history or manager.history[0].end_pass is None:
        manager.on_forward_pass_end()
    record = manager.history[0]
    assert record.error is None and record.slots_moved == 0
    assert record.balancedness_before == pytest.approx(130 / 165)  # GPU loads 65 + 100 and 65 + 30
    assert record.balancedness_predicted == pytest.approx(record.balancedness_before, abs=1e-9)
    manager.close()


class PassWindow(FakeWindow):
    """A LoadWindow of explicit passes ([B, L, E]; the test replaces them as traffic changes)."""

    def __init__(self, location: ExpertLocation):
        super().__init__(location)
        self.passes = torch.tensor([[[10.0, 10.0, 100.0, 10.0]] * NUM_LAYERS] * 4)

    def logical_count_passes(self) -> torch.Tensor:
        return self.passes

    def logical_count_window(self) -> torch.Tensor:
        return self.passes.sum(0)


def _drifting(interval: int = 6, **flags):
    args = EPLBArgs(ep_size=2, enable_eplb=True, eplb_rebalance_num_iterations=interval, eplb_drift_threshold=0.9,
                    **flags).resolve()
    return build(args, window_type=PassWindow, check_every_passes=1)


def _finish(manager, job) -> None:
    """Hand the job its layers' live maps back (a plan that moves nothing) and run the pass
    that ends it."""
    job.outcome = PlanOutcome(SimpleNamespace(physical_to_logical_map=job.kwargs["previous"].clone(),
                                              replica_weights=None), None)
    manager.on_forward_pass_end()
    assert not manager.busy


def test_a_drift_rebalance_of_some_layers_does_not_postpone_the_interval_rebalance_of_the_others():
    """The interval is every layer's: a drift rebalance of layer 0 two passes after the
    interval rebalance leaves the next interval rebalance where it was (pass 12, not 14)."""
    manager, window, _, jobs = _drifting()
    for _ in range(6):
        manager.on_forward_pass_end()
    assert [r.trigger for r in manager.history] == ["interval"] and manager.history[0].start_pass == 6
    _finish(manager, jobs[-1])  # pass 7
    window.passes = window.passes.clone()
    window.passes[:, 0] = torch.tensor([100.0, 10.0, 10.0, 10.0])  # layer 0's hot expert moves
    manager.on_forward_pass_end()  # pass 8: the drift check
    assert [r.trigger for r in manager.history] == ["interval", "drift"] and manager.history[1].layers == [0]
    _finish(manager, jobs[-1])  # pass 9
    while len(manager.history) < 3:
        manager.on_forward_pass_end()
    assert manager.history[2].trigger == "interval" and manager.history[2].start_pass == 12


def test_a_drift_rebalance_keeps_the_load_the_other_layers_were_planned_on():
    """Drift is measured from the load a layer was last planned on: a drift rebalance of
    layer 0 does not make layer 1's load at that time its new reference, so layer 1's load
    drifting in two small steps (each above the threshold, together below it) is caught."""
    manager, window, _, jobs = _drifting(interval=10_000)
    manager.rebalance_now()
    manager.on_forward_pass_end()
    _finish(manager, jobs[-1])  # planned on expert 2 hot in both layers
    window.passes = window.passes.clone()
    window.passes[:, 0] = torch.tensor([100.0, 10.0, 10.0, 10.0])  # layer 0 drifts ...
    window.passes[:, 1] = torch.tensor([10.0, 45.0, 100.0, 10.0])  # ... layer 1 a little (cosine 0.95)
    manager.on_forward_pass_end()
    assert manager.history[-1].trigger == "drift" and manager.history[-1].layers == [0]
    _finish(manager, jobs[-1])
    window.passes[:, 1] = torch.tensor([10.0, 80.0, 100.0, 10.0])  # cosine 0.97 to the last step, 0.84 to the plan
    manager.on_forward_pass_end()
    assert manager.history[-1].trigger == "drift" and manager.history[-1].layers == [1]


def test_a_drift_rebalance_plans_on_the_last_passes_of_the_window():
    """--eplb-drift-window-passes 2: the drifted layers are planned on the window's last 2
    passes (the load after the shift), summed for a policy of sums and as passes for a
    per-pass policy; an interval rebalance still plans on the whole window."""
    for policy, per_pass in (("eplb_plugin", False), ("eplb_plugin_perpass", True)):
        manager, window, _, jobs = _drifting(interval=10_000, eplb_algorithm=policy, eplb_drift_window_passes=2)
        manager.rebalance_now()
        manager.on_forward_pass_end()
        assert jobs[-1].counts.shape[-3:] == ((4, 2, 4) if per_pass else (2, 4))  # the whole window
        _finish(manager, jobs[-1])
        window.passes = window.passes.clone()
        window.passes[2:, 0] = torch.tensor([100.0, 10.0, 10.0, 10.0])  # layer 0's last two passes change
        manager.on_forward_pass_end()
        assert manager.history[-1].trigger == "drift" and manager.history[-1].layers == [0]
        want = window.passes[2:, :1].to(torch.float64)
        assert torch.equal(jobs[-1].counts, want if per_pass else want.sum(0)), policy


def test_a_drift_rebalance_is_granted_the_move_budget_of_its_passes():
    """The move budget is a rate: with 4 slots per 6-pass interval, the interval rebalance at
    pass 6 may move 4, and a drift rebalance 2 passes later the 4 it left plus a third of a
    budget (1), not another whole budget."""
    manager, window, _, jobs = _drifting(eplb_algorithm="eplb_plugin_perpass", eplb_move_budget_mb=16 / 2**20)
    for _ in range(6):
        manager.on_forward_pass_end()
    assert jobs[-1].kwargs["max_slots_moved"] == 4
    _finish(manager, jobs[-1])  # pass 7
    window.passes = window.passes.clone()
    window.passes[:, 0] = torch.tensor([100.0, 10.0, 10.0, 10.0])
    manager.on_forward_pass_end()  # pass 8
    assert manager.history[-1].trigger == "drift" and jobs[-1].kwargs["max_slots_moved"] == 5
