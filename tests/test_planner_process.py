"""PlannerProcess: algorithms.plan in a worker process gives the plan the in-process call gives."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

import eplb_plugin.algorithms
from eplb_plugin.algorithms import Policy, plan
from eplb_plugin.planner_process import PlannerProcess
from eplb_plugin.registry import Registry


def _forbid_planning_here(monkeypatch) -> None:
    """Make ``algorithms.plan`` and every policy raise in this process: a planner that planned
    in-process would fail, while the spawned worker imports them afresh and is unaffected."""
    def in_process(*args, **kwargs):
        raise AssertionError("planned in the calling process, not in the worker")

    monkeypatch.setattr(eplb_plugin.algorithms, "plan", in_process)
    forbidden: Registry[Policy] = Registry("placement policy")
    for policy in eplb_plugin.algorithms.POLICIES.entries():
        forbidden.register(dataclasses.replace(policy, plan=in_process))
    monkeypatch.setattr(eplb_plugin.algorithms, "POLICIES", forbidden)


def test_the_worker_plans_exactly_what_plan_returns(monkeypatch):
    rng = np.random.default_rng(0)
    counts = torch.from_numpy(rng.zipf(1.5, (4, 16)).astype(np.float64))
    previous = torch.arange(20).remainder(16).repeat(4, 1)
    kwargs = dict(num_physical_experts=20, num_gpus=4, algorithm="eplb_plugin_equal")
    want = plan(counts, previous=previous, **kwargs)
    want_weighted = plan(counts, **dict(kwargs, algorithm="eplb_plugin", split="weighted"))
    _forbid_planning_here(monkeypatch)
    planner = PlannerProcess("eplb_plugin_equal")
    assert planner.warm_up_error is None  # the worker planned a tiny placement before returning
    try:
        got = planner(counts, previous=previous, **kwargs)
        weighted = planner(counts, **dict(kwargs, algorithm="eplb_plugin", split="weighted"))
    finally:
        planner.close()
    assert torch.equal(got.physical_to_logical_map, want.physical_to_logical_map)
    assert got.slots_moved == want.slots_moved and got.replica_weights is None
    assert torch.equal(weighted.physical_to_logical_map, want_weighted.physical_to_logical_map)
    assert want_weighted.replica_weights is not None  # the weighted policy returns weights
    assert torch.equal(weighted.replica_weights, want_weighted.replica_weights)


def test_a_warm_up_plan_that_fails_is_reported_and_the_worker_still_plans():
    planner = PlannerProcess("no_such_policy")
    try:
        assert planner.warm_up_error is not None and "no_such_policy" in planner.warm_up_error
        counts = torch.arange(1.0, 25.0).reshape(2, 12)
        got = planner(counts, num_physical_experts=16, num_gpus=4, algorithm="eplb_plugin_equal")
    finally:
        planner.close()
    want = plan(counts, num_physical_experts=16, num_gpus=4, algorithm="eplb_plugin_equal")
    assert torch.equal(got.physical_to_logical_map, want.physical_to_logical_map)
