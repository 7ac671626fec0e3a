"""Planning jobs and rank 0's verdict (manager/planning.py), without a process group."""

from __future__ import annotations

import threading

import pytest
import torch

from eplb_plugin.manager.planning import (
    PLAN_TIME_SHARE,
    PlanningJob,
    PlanOutcome,
    PlanStatus,
    PolicyChoice,
    ThreadPlanningJob,
    broadcast_plan,
    failure_message,
    rank0_status,
)


def test_a_thread_job_runs_off_the_caller_and_hands_over_the_plan():
    release = threading.Event()

    def planner(counts, *, scale):
        release.wait(10)
        return counts * scale

    job = ThreadPlanningJob(planner, torch.ones(2), {"scale": 3})
    assert isinstance(job, PlanningJob)
    assert job.poll() is None  # still planning: poll never blocks
    release.set()
    job.cancel(10)  # waits for the thread
    outcome = job.poll()
    assert outcome.error is None and outcome.placement.tolist() == [3.0, 3.0]


def test_a_thread_jobs_planner_exception_is_handed_over_not_raised_in_the_thread():
    def broken(counts):
        raise ValueError("solver exploded")

    job = ThreadPlanningJob(broken, torch.ones(2), {})
    job.cancel(10)
    outcome = job.poll()
    assert outcome.placement is None and isinstance(outcome.error, ValueError)


@pytest.mark.parametrize("outcome, timed_out, status", [
    (None, False, PlanStatus.PENDING),
    (None, True, PlanStatus.FAILED),
    (PlanOutcome("plan", None), False, PlanStatus.READY),
    (PlanOutcome("plan", None), True, PlanStatus.READY),  # a plan that came in time is used
    (PlanOutcome(None, ValueError("x")), False, PlanStatus.FAILED),
])
def test_rank0_reads_ready_failed_or_pending(outcome, timed_out, status):
    assert rank0_status(outcome, timed_out=timed_out) is status


def test_each_rank_says_why_planning_failed_as_far_as_it_knows():
    assert failure_message(None, rank=1, plan_timeout_s=5.0) == "planning failed on rank 0"
    assert failure_message(None, rank=0, plan_timeout_s=5.0) == "planning took longer than 5.0 s"
    assert failure_message(ValueError("x"), rank=0, plan_timeout_s=5.0) == "planning failed on rank 0 (ValueError('x'))"


def test_one_rank_receives_its_own_plan_with_or_without_replica_weights():
    from types import SimpleNamespace

    phy2log = torch.tensor([[1, 0, 2], [0, 1, 2]], dtype=torch.int32)
    new_map, weights, predicted = broadcast_plan(
        SimpleNamespace(physical_to_logical_map=phy2log, replica_weights=None), shape=(2, 3), group=None)
    assert new_map.dtype == torch.int64 and new_map.tolist() == phy2log.tolist() and weights is None
    assert predicted != predicted  # NaN: not scored
    planned = torch.full((2, 3), 0.5, dtype=torch.float64)
    _, weights, predicted = broadcast_plan(SimpleNamespace(physical_to_logical_map=phy2log, replica_weights=planned),
                                           shape=(2, 3), group=None, predicted=0.75)
    assert weights.dtype == torch.float32 and weights.tolist() == planned.tolist() and predicted == 0.75


def test_the_policy_is_resolved_once_and_a_move_budget_reaches_the_planner_in_slots():
    from eplb_plugin.args import EPLBArgs
    from eplb_plugin.location import ExpertLocation

    # Layer 0 is dense (no weights); one expert of layer 1 is 256 x 1024 float32 = 1 MiB.
    weights = [[], [torch.zeros(6, 256, 1024)]]
    args = EPLBArgs(ep_size=2, enable_eplb=True, eplb_algorithm="eplb_plugin_perpass", ep_dispatch_algorithm="minmax",
                    eplb_move_budget_mb=3.5).resolve()
    choice = PolicyChoice.resolve(args, expert_weights=weights)
    assert choice == PolicyChoice(algorithm="eplb_plugin_perpass", split="equal", per_pass=True, max_slots_moved=3,
                                  follows_pass=True, anytime=True, dispatch="minmax")
    live = ExpertLocation.trivial(num_layers=2, num_logical_experts=4, num_physical_experts=6, ep_size=2)
    kwargs = choice.plan_kwargs(live, num_nodes=1, num_groups=None)
    assert kwargs.pop("previous") is live.physical_to_logical_map
    assert kwargs == dict(num_physical_experts=6, num_gpus=2, num_nodes=1, num_groups=None,
                          algorithm="eplb_plugin_perpass", split="equal", max_slots_moved=3, dispatch="minmax")
    # the per-pass policy's search is asked to stop within PLAN_TIME_SHARE of the plan timeout
    timed = choice.plan_kwargs(live, num_nodes=1, num_groups=None, plan_timeout_s=300.0)
    assert timed["time_limit_s"] == pytest.approx(PLAN_TIME_SHARE * 300.0) and PLAN_TIME_SHARE < 1
    unbudgeted = PolicyChoice.resolve(EPLBArgs(ep_size=2, enable_eplb=True, eplb_algorithm="deepseek_vec",
                                               ep_dispatch_algorithm="weighted").resolve(), expert_weights=weights)
    assert unbudgeted == PolicyChoice(algorithm="deepseek_vec", split="weighted", per_pass=True, max_slots_moved=None,
                                      follows_pass=False, dispatch="weighted")
    assert "max_slots_moved" not in unbudgeted.plan_kwargs(live, num_nodes=1, num_groups=None)
    assert "time_limit_s" not in unbudgeted.plan_kwargs(live, num_nodes=1, num_groups=None, plan_timeout_s=300.0)
