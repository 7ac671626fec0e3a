"""Placement policies: golden example, invariants, bad input, quality on real counts."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch

from eplb_plugin.algorithms import ALGORITHMS, plan, rebalance_experts
from eplb_plugin.algorithms.evaluate import pass_counts, per_pass_balancedness, simulate
from eplb_plugin.balance import placement_balancedness
from eplb_plugin.errors import ConfigError, CountsError, PlacementError
from eplb_plugin.location import validate_logical_count

from conftest import trace_path


def _gpu_sets(phy2log, num_gpus):
    rows = np.asarray(phy2log).reshape(len(phy2log), num_gpus, -1)
    return [[sorted(g.tolist()) for g in layer] for layer in rows]


def test_deepseek_hierarchical_reproduces_golden_example():
    """GPU-level expert sets equal DeepSeek's README example."""
    d = json.loads(trace_path("eplb_readme_golden_SYNTHETIC.json").read_text())
    weight = torch.tensor(d["weight"])
    phy2log, log2phy, count = rebalance_experts(weight, d["num_replicas"], d["num_replicas"] // d["num_gpus"],
                                                d["num_groups"], d["num_nodes"], "deepseek_hierarchical")
    assert _gpu_sets(phy2log, d["num_gpus"]) == _gpu_sets(d["expected_phy2log"], d["num_gpus"])
    assert count.tolist() == d["expected_logcnt"]
    assert log2phy.shape == (2, 12, 16 - 12 + 1)


def test_balancedness_hand_example_through_plan_api():
    """Two GPUs, loads 3+1 vs 2+2 -> mean 4 / max 4 = 1.0; swapped map -> 4/5 = 0.8."""
    counts = torch.tensor([[3.0, 1.0, 2.0, 2.0]])
    assert placement_balancedness(counts, torch.tensor([[0, 1, 2, 3]]), 2) == pytest.approx(1.0)
    assert placement_balancedness(counts, torch.tensor([[0, 2, 1, 3]]), 2) == pytest.approx(4 / 5)
    p = plan(counts, num_physical_experts=4, num_gpus=2, algorithm="eplb_plugin_equal")
    assert placement_balancedness(counts, p.physical_to_logical_map, 2) == pytest.approx(1.0)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_every_logical_expert_keeps_a_replica_and_width_is_fixed(algorithm):
    """Skewed counts with zeros: each expert >= 1 replica; log2phy width is P - E + 1."""
    gen = torch.Generator().manual_seed(0)
    counts = (torch.rand(5, 24, generator=gen) ** 4) * 1000
    counts[:, 3] = 0
    phy2log, log2phy, count = rebalance_experts(counts, 32, 4, 4, 2, algorithm)
    assert phy2log.dtype == torch.int64 and phy2log.shape == (5, 32)
    assert (count >= 1).all() and (count.sum(1) == 32).all()
    assert log2phy.shape == (5, 24, 9)
    for layer in range(5):
        for expert in range(24):
            slots = log2phy[layer, expert][log2phy[layer, expert] >= 0]
            assert (phy2log[layer, slots] == expert).all() and len(slots) == count[layer, expert]


def test_replica_weights_sum_to_one_per_expert():
    """Each expert's slot shares sum to 1."""
    counts = torch.tensor([[900.0, 10, 20, 30, 40, 50, 60, 70]] * 3)
    p = plan(counts, num_physical_experts=12, num_gpus=4, split="weighted")
    sums = torch.zeros(3, 8).scatter_add_(1, p.physical_to_logical_map, p.replica_weights)
    assert torch.allclose(sums, torch.ones(3, 8), atol=1e-5)


def test_same_counts_as_previous_moves_no_slot():
    """Re-planning on the counts the previous plan was made on moves nothing."""
    gen = torch.Generator().manual_seed(1)
    counts = torch.rand(4, 16, generator=gen) * 100
    first = plan(counts, num_physical_experts=20, num_gpus=4)
    second = plan(counts, num_physical_experts=20, num_gpus=4, previous=first)
    assert second.slots_moved == 0
    assert torch.equal(second.physical_to_logical_map, first.physical_to_logical_map)


def test_batched_counts_are_summed_over_passes():
    """[B, L, E] plans like its sum over B."""
    counts = torch.rand(3, 2, 8) * 10
    a = plan(counts, num_physical_experts=8, num_gpus=2, algorithm="deepseek")
    b = plan(counts.sum(0), num_physical_experts=8, num_gpus=2, algorithm="deepseek")
    assert torch.equal(a.physical_to_logical_map, b.physical_to_logical_map)


@pytest.mark.parametrize(
    ("counts", "kwargs", "error"),
    [
        (torch.ones(8), {}, CountsError),
        (torch.tensor([[1.0, float("nan"), 1, 1]]), {}, CountsError),
        (torch.tensor([[1.0, -1, 1, 1]]), {}, CountsError),
        (torch.ones(1, 4), {"num_physical_experts": 6, "num_gpus": 4}, ConfigError),
        (torch.ones(1, 4), {"num_physical_experts": 4, "num_gpus": 8}, ConfigError),
        (torch.ones(1, 4), {"num_groups": 3}, ConfigError),
        (torch.ones(1, 4), {"algorithm": "nope"}, ConfigError),
        (torch.ones(1, 4), {"previous": torch.zeros(1, 3, dtype=torch.int64)}, PlacementError),
    ],
)
def test_bad_input_raises_typed_error(counts, kwargs, error):
    """Shapes, NaN, negatives, indivisible P, too many GPUs, bad groups, unknown names."""
    args = {"num_physical_experts": 4, "num_gpus": 2, **kwargs}
    with pytest.raises(error):
        plan(counts, **args)


def test_groups_that_a_recipe_does_not_use_are_not_refused_as_deepseeks_are_not():
    """DeepSeek's recipe falls back to its global form where the groups do not divide over the
    nodes and then ignores them; the global recipe never reads them. So groups that do not
    divide the experts are refused only where a policy plans with them."""
    w = torch.tensor([[10.0, 20, 30, 40]])
    for algorithm, nodes in (("deepseek", 1), ("deepseek", 2), ("deepseek_hierarchical", 2), ("auto", 2)):
        phy2log, _, count = rebalance_experts(w, 8, 4, 3, nodes, algorithm)  # 3 groups over 4 experts
        flat, _, _ = rebalance_experts(w, 8, 4, None, 1, "deepseek")
        assert torch.equal(phy2log, flat) and count.sum() == 8
    for algorithm, nodes in (("deepseek_hierarchical", 1), ("eplb_plugin", 1), ("eplb_plugin", 2)):
        with pytest.raises(ConfigError, match="num_groups=3 does not divide the 4 logical experts"):
            rebalance_experts(w, 8, 4, 3, nodes, algorithm)


def test_plan_and_expert_location_refuse_bad_count_values_alike():
    """One value check: plan() and validate_logical_count name the same problem."""
    for bad, fragment in (([[1.0, -2.0, 1.0, 1.0]], "logical_count[0][1] = -2.0 is negative"),
                          ([[1.0, float("inf"), 1.0, 1.0]], "NaN or infinite")):
        with pytest.raises(CountsError, match=re.escape(fragment)):
            plan(torch.tensor(bad), num_physical_experts=4, num_gpus=2)
        with pytest.raises(CountsError, match=re.escape(fragment)):
            validate_logical_count(bad)


def test_unknown_algorithm_lists_known_names():
    with pytest.raises(ConfigError, match="deepseek"):
        plan(torch.ones(1, 4), num_physical_experts=4, num_gpus=2, algorithm="greedy")


def test_cross_node_share_reported_with_several_nodes():
    counts = torch.rand(2, 16) * 10
    p = plan(counts, num_physical_experts=16, num_gpus=4, num_nodes=2)
    assert p.cross_node_share == pytest.approx(0.5)  # one replica each: half the senders are remote
    assert plan(counts, num_physical_experts=16, num_gpus=4).cross_node_share is None


def test_minmax_dispatch_is_never_worse_than_equal_split():
    counts = np.random.default_rng(0).random((3, 2, 8)) ** 3 * 100
    p = plan(counts.sum(0), num_physical_experts=12, num_gpus=4, algorithm="deepseek")
    m = p.physical_to_logical_map.numpy()
    eq = per_pass_balancedness(counts, m, num_gpus=4, dispatch="random")
    dyn = per_pass_balancedness(counts, m, num_gpus=4, dispatch="minmax")
    assert (dyn >= eq - 1e-9).all()


@pytest.mark.parametrize(("num_gpus", "redundant"), [(8, 0), (16, 16), (32, 32), (64, 64)])
def test_beats_deepseek_on_qwen3_counts(num_gpus, redundant):
    """Equal split: halves DeepSeek's distance from 1.0; with weights: >= 0.998 and at least as good."""
    counts = torch.tensor(json.loads(trace_path("sglang_qwen3_235b_a22b_L512_counts.json").read_text())["counts"])
    num_physical = 128 + redundant
    ds = plan(counts, num_physical_experts=num_physical, num_gpus=num_gpus, algorithm="deepseek")
    equal = plan(counts, num_physical_experts=num_physical, num_gpus=num_gpus, algorithm="eplb_plugin_equal")
    ours = plan(counts, num_physical_experts=num_physical, num_gpus=num_gpus, split="weighted")
    b_ds = placement_balancedness(counts, ds.physical_to_logical_map, num_gpus)
    b_eq = placement_balancedness(counts, equal.physical_to_logical_map, num_gpus)
    b_w = placement_balancedness(counts, ours.physical_to_logical_map, num_gpus, ours.replica_weights)
    assert 1 - b_eq <= (1 - b_ds) / 2
    assert b_w >= max(b_eq - 1e-7, 0.998)
    if redundant >= num_gpus:  # the chain plan: every GPU at the mean load
        assert b_w > 0.99999


def test_simulate_moves_fewer_slots_than_deepseek_and_reports_per_pass_balancedness():
    ids = np.load(trace_path("esft_dsv2lite_law_top6.npz"))["topk_ids"][:4096]
    counts = pass_counts(ids, num_logical=64, pass_tokens=256)
    res = simulate(counts, num_physical=72, num_gpus=8, interval=4, window=4, dispatches=("random", "minmax"))
    assert res.balancedness["minmax"].shape == (16,)
    assert len(res.slots_moved) == 3
    ds = simulate(counts, num_physical=72, num_gpus=8, interval=4, window=4, algorithm="deepseek",
                  dispatches=("random",))
    assert sum(res.slots_moved) < sum(ds.slots_moved)
    assert (res.balancedness["minmax"] >= res.balancedness["random"] - 1e-9).all()


def test_a_previous_map_is_checked_as_a_placement_before_planning():
    """A previous map in which an expert has no slot, or with fractional ids, is refused
    (PlacementError naming the expert and layer) rather than planned from: its missing
    experts' tokens would score as no load and the broken map would be kept."""
    counts = np.random.default_rng(0).integers(0, 50, (8, 4, 16)).astype(float)
    previous = plan(counts, num_physical_experts=24, num_gpus=4).physical_to_logical_map.clone()
    broken = previous.clone()
    broken[0] = 0
    for algorithm in ("eplb_plugin", "eplb_plugin_perpass"):
        with pytest.raises(PlacementError, match="previous map: logical expert 1 has no replica in layer 0"):
            plan(counts, num_physical_experts=24, num_gpus=4, algorithm=algorithm, previous=broken)
    with pytest.raises(PlacementError, match="previous map: physical_to_logical_map holds non-integer ids"):
        plan(counts, num_physical_experts=24, num_gpus=4, previous=previous.double() + 0.7)
    assert plan(counts, num_physical_experts=24, num_gpus=4, previous=previous.double()).slots_moved == 0


@pytest.mark.parametrize("name", ["num_gpus", "num_physical_experts", "num_nodes", "num_groups"])
@pytest.mark.parametrize("value", [True, 4.0, "4"])
def test_plan_sizes_must_be_ints(name, value):
    args = {"num_physical_experts": 16, "num_gpus": 4, name: value}
    for algorithm in ("eplb_plugin", "deepseek_vec"):
        with pytest.raises(ConfigError, match=f"{name}={value!r} must be an int"):
            plan(torch.ones(2, 2, 8), algorithm=algorithm, **args)


@pytest.mark.parametrize(("algorithm", "per_pass"), [("deepseek_vec", True), ("eplb_plugin", False)])
def test_simulate_gives_per_pass_policies_the_window_s_passes(monkeypatch, algorithm, per_pass):
    """A per-pass policy plans from the window's passes [W, L, E] (as the manager gives it),
    not from their sum; the others get the sum (or, with a decay, the weighted sum)."""
    import eplb_plugin.algorithms as algorithms

    seen = []
    real_plan = algorithms.plan

    def recording_plan(counts, **kwargs):
        seen.append(np.asarray(counts).shape)
        return real_plan(counts, **kwargs)

    monkeypatch.setattr(algorithms, "plan", recording_plan)
    counts = np.random.default_rng(0).integers(0, 20, (12, 2, 8)).astype(float)
    simulate(counts, num_physical=12, num_gpus=4, interval=4, window=3, algorithm=algorithm, dispatches=("static",))
    assert seen == ([(3, 2, 8)] * 2 if per_pass else [(2, 8)] * 2)
    seen.clear()
    simulate(counts, num_physical=12, num_gpus=4, interval=4, algorithm=algorithm, dispatches=("static",), decay=0.5)
    assert seen == ([(4, 2, 8), (8, 2, 8)] if per_pass else [(2, 8)] * 2)


ADVERSARIAL_W = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def test_rebalance_experts_accepts_lists_and_numpy_as_plan_does():
    """A nested list or a numpy array plans as the tensor does (plan() accepts them too)."""
    expected = rebalance_experts(ADVERSARIAL_W, 16, 2, 4, 2, "deepseek")
    for counts in (ADVERSARIAL_W.tolist(), ADVERSARIAL_W.numpy()):
        got = rebalance_experts(counts, 16, 2, 4, 2, "deepseek")
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def test_counts_on_the_meta_device_are_a_counts_error_naming_the_device():
    counts = torch.empty(2, 12, device="meta")
    with pytest.raises(CountsError, match="meta"):
        plan(counts, num_physical_experts=16, num_gpus=4)
    with pytest.raises(CountsError, match="meta"):
        rebalance_experts(counts, 16, 4, None, 1, "deepseek")


@pytest.mark.parametrize("num_physical, num_local", [(12, 5), (10, 3)])
def test_rebalance_experts_refuses_local_slots_that_do_not_divide_the_slots(num_physical, num_local):
    """num_gpus is never made up by flooring P / local: the error names the two values passed."""
    with pytest.raises(ConfigError, match=f"num_physical_experts={num_physical} is not divisible by "
                                          f"num_local_physical_experts={num_local}"):
        rebalance_experts(ADVERSARIAL_W[:, :10], num_physical, num_local, None, 1, "deepseek")


def test_counts_that_sum_past_the_float_range_are_a_counts_error():
    """Finite per-pass counts whose sum over passes overflows are refused, not planned from inf."""
    counts = torch.full((4, 2, 12), 1e308, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning on the way to the error
        with pytest.raises(CountsError, match="float range"):
            plan(counts, num_physical_experts=16, num_gpus=8)


def test_a_numpy_object_array_is_a_counts_error_naming_its_dtype():
    counts = np.array([[1, "a", None, 2]], dtype=object)
    with pytest.raises(CountsError, match="object"):
        plan(counts, num_physical_experts=4, num_gpus=2)

