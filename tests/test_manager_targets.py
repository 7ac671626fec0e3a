"""The manager's pure target-map logic (manager/targets.py): no process group, no threads."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from eplb_plugin.errors import PlacementError
from eplb_plugin.location import ExpertLocation
from eplb_plugin.manager.targets import (
    MAX_PLAN_PASSES,
    check_plan_shape,
    live_location,
    plan_passes,
    target_maps,
)

# Three layers of 4 experts in 6 slots over 2 GPUs; the trivial map is [0, 1, 2, 3, 0, 1].
LIVE = ExpertLocation.trivial(num_layers=3, num_logical_experts=4, num_physical_experts=6, ep_size=2)
PLAN = torch.tensor([[1, 0, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 2, 2]])
# Replica weights of PLAN: each expert's slots sum to 1 (layer 1: unequal on the trivial map).
WEIGHTS = torch.tensor([[0.25, 0.5, 1.0, 1.0, 0.5, 0.75], [0.25, 0.5, 1.0, 1.0, 0.75, 0.5],
                        [1.0, 1.0, 0.5, 1.0, 0.25, 0.25]])


def test_only_planned_layers_take_the_plan_and_only_changed_maps_move():
    target = target_maps(LIVE, [0, 1], PLAN, None)
    # Layer 2's plan differs but was not planned (a drift rebalance of layers 0 and 1).
    assert target.physical_to_logical_map.tolist() == [PLAN[0].tolist(), PLAN[1].tolist(), [0, 1, 2, 3, 0, 1]]
    assert target.changed == [0] and target.reweighted == []
    assert target.replica_weights is None  # neither the plan nor the live placement weighs replicas
    assert LIVE.physical_to_logical_map[0].tolist() == [0, 1, 2, 3, 0, 1]  # the live map is untouched


def test_new_replica_weights_on_an_unchanged_map_go_live_without_a_move():
    weights = torch.tensor([[0.5, 0.5, 1.0, 1.0, 0.5, 0.5], WEIGHTS[1].tolist(), WEIGHTS[2].tolist()])
    target = target_maps(LIVE, [0, 1, 2], PLAN, weights)
    assert target.changed == [0, 2] and target.reweighted == [1]
    assert torch.equal(target.replica_weights, weights)
    assert target.location(LIVE, source="test").replica_weights is not None


def test_an_invalid_target_is_refused_when_made_a_location():
    orphan = PLAN.clone()
    orphan[0] = 0  # layer 0: experts 1-3 have no replica
    target = target_maps(LIVE, [0], orphan, None)
    try:
        target.location(LIVE, source="rebalance 7 plan")
    except PlacementError as exc:
        assert "rebalance 7 plan" in str(exc)
    else:
        raise AssertionError("a target without a replica of every expert was accepted")


def test_a_layer_that_stopped_short_of_its_target_splits_equally():
    target = target_maps(LIVE, [0, 1, 2], PLAN, WEIGHTS).location(LIVE, source="test")
    reached, short = PLAN[0], torch.tensor([0, 1, 2, 3, 1, 0])  # layer 1 rows 4-5 swapped: not the target
    live = live_location(LIVE, target, {0: reached, 1: short})
    assert live.physical_to_logical_map.tolist() == [PLAN[0].tolist(), short.tolist(), [0, 1, 2, 3, 0, 1]]
    assert live.replica_weights[0].tolist() == WEIGHTS[0].tolist()
    assert live.replica_weights[1].tolist() == [0.5, 0.5, 1.0, 1.0, 0.5, 0.5]  # two replicas of 0 and 1 each
    assert live.replica_weights[2].tolist() == [0.5, 0.5, 1.0, 1.0, 0.5, 0.5]  # untouched: equal split


def test_a_malformed_plan_is_named_before_it_is_broadcast():
    def plan(map_, weights=None):
        return SimpleNamespace(physical_to_logical_map=map_, replica_weights=weights)

    assert check_plan_shape(plan(PLAN), num_layers=3, num_physical_experts=6) is None
    assert "[3, 4], expected shape [3, 6]" in str(check_plan_shape(plan(PLAN[:, :4]), num_layers=3,
                                                                    num_physical_experts=6))
    assert "non-integer" in str(check_plan_shape(plan(PLAN + 0.5), num_layers=3, num_physical_experts=6))
    assert "replica_weights of [3, 5]" in str(check_plan_shape(plan(PLAN, torch.ones(3, 5)), num_layers=3,
                                                                num_physical_experts=6))
    assert "of NoneType" in str(check_plan_shape(None, num_layers=3, num_physical_experts=6))


def test_a_long_window_is_summed_into_equal_buckets_of_consecutive_passes():
    rows = torch.arange(300, dtype=torch.float64).view(300, 1, 1).expand(300, 2, 3).contiguous()
    buckets = plan_passes(rows)
    assert buckets.shape == (MAX_PLAN_PASSES, 2, 3)
    assert torch.equal(buckets.sum(0), rows.sum(0))  # every token counted once
    # Pass i lands in bucket i * 128 // 300: bucket 0 holds passes 0-2, bucket 1 passes 3-4.
    assert buckets[0, 0, 0] == 0 + 1 + 2 and buckets[1, 0, 0] == 3 + 4
    short = rows[:MAX_PLAN_PASSES]
    assert plan_passes(short) is short
