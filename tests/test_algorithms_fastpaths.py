"""Vectorized planner steps against plain per-layer references, and the work they skip."""

from __future__ import annotations

import numpy as np
import pytest

from eplb_plugin.algorithms import packing
from eplb_plugin.algorithms.deepseek import deepseek
from eplb_plugin.algorithms.migrate import align_to_previous
from eplb_plugin.algorithms.nodes import assign_gpus_to_nodes
from eplb_plugin.algorithms.packing import refine_swaps
from eplb_plugin.algorithms.split import waterfill_slot_loads
from eplb_plugin.maps import replica_count


def _align_reference(new, previous, num_gpus):
    """One layer at a time: GPUs matched by expert overlap, then old slots keep their expert
    while the new GPU has a copy left, and the rest fill the freed slots, last first."""
    from scipy.optimize import linear_sum_assignment

    num_layers, num_slots = new.shape
    per_gpu = num_slots // num_gpus
    out = np.empty_like(new)
    for layer in range(num_layers):
        gpus_new = [list(new[layer, g * per_gpu:(g + 1) * per_gpu]) for g in range(num_gpus)]
        gpus_old = [list(previous[layer, g * per_gpu:(g + 1) * per_gpu]) for g in range(num_gpus)]
        overlap = np.array([[sum(min(a.count(e), b.count(e)) for e in set(a)) for b in gpus_old] for a in gpus_new])
        for g_new, g_old in zip(*linear_sum_assignment(-overlap)):
            todo = list(gpus_new[g_new])
            slot = []
            for e in gpus_old[g_old]:
                if e in todo:
                    todo.remove(e)
                    slot.append(e)
                else:
                    slot.append(None)
            slot = [todo.pop() if e is None else e for e in slot]
            out[layer, g_old * per_gpu:(g_old + 1) * per_gpu] = slot
    return out


def test_alignment_keeps_every_slot_it_can_with_duplicates_on_a_gpu():
    """Old GPU 0 holds expert 1 twice, its new counterpart (new GPU 1) once and 2 twice:
    one copy of 1 and one of 2 stay, the spare 2 takes the freed slot; new GPU 0 lands on
    old GPU 1 with 3 and 5 in place."""
    previous = np.array([[1, 1, 2, 3, 4, 5]])
    new = np.array([[3, 5, 6, 2, 2, 1]])
    aligned = align_to_previous(new, previous, num_gpus=2)
    assert aligned.tolist() == [[1, 2, 2, 3, 6, 5]]
    assert int((aligned == previous).sum()) == 4


@pytest.mark.parametrize("seed", range(6))
def test_alignment_matches_the_per_layer_reference(seed):
    """Odd sizes, few distinct experts (many duplicates per GPU), identical output."""
    rng = np.random.default_rng(seed)
    num_gpus, per_gpu, num_layers = 7, 5, 9
    hi = [2, 4, 9, 35][seed % 4]
    new = rng.integers(0, hi, size=(num_layers, num_gpus * per_gpu))
    previous = rng.integers(0, hi, size=(num_layers, num_gpus * per_gpu))
    previous[::3] = new[::3, rng.permutation(num_gpus * per_gpu)]  # same multiset, shuffled
    assert np.array_equal(align_to_previous(new, previous, num_gpus=num_gpus),
                          _align_reference(new, previous, num_gpus))


def _waterfill_reference(load, phy2log, num_gpus, iters):
    """Every slot every iteration (single-replica slots get step 0)."""
    rows, num_slots = phy2log.shape
    per_gpu = num_slots // num_gpus
    count = replica_count(phy2log, load.shape[1])
    slot_count = np.take_along_axis(count, phy2log, axis=1)
    own = np.take_along_axis(load, phy2log, axis=1)
    x = own / slot_count
    movable = slot_count > 1
    step = np.where(movable, 1.0 / np.maximum(np.repeat(movable.reshape(rows, num_gpus, -1).sum(-1), per_gpu, 1), 1), 0)
    for _ in range(iters):
        g = np.repeat(x.reshape(rows, num_gpus, -1).sum(-1), per_gpu, axis=1)
        mean_g = np.zeros_like(load)
        np.add.at(mean_g, (np.arange(rows)[:, None], phy2log), g)
        x = np.maximum(x + step * (np.take_along_axis(mean_g / np.maximum(count, 1), phy2log, axis=1) - g), 0)
        total = np.zeros_like(load)
        np.add.at(total, (np.arange(rows)[:, None], phy2log), x)
        scale = np.take_along_axis(total, phy2log, axis=1)
        x = np.where(scale > 0, x * own / np.where(scale > 0, scale, 1.0), own / slot_count)
    return x


def test_waterfill_on_replicated_slots_matches_the_all_slot_reference():
    """Odd sizes, zero-load experts, one layer without any replicated expert."""
    rng = np.random.default_rng(2)
    load = rng.zipf(1.5, size=(6, 37)).astype(np.float64) * (rng.random((6, 37)) > 0.2)
    phy2log = deepseek(load, 45, num_gpus=9)
    phy2log[5] = np.arange(45) % 37  # a second replica of experts 0..7 only
    phy2log[4, :37] = np.arange(37)
    phy2log[4, 37:] = 36  # 9 replicas of one expert
    got = waterfill_slot_loads(load, phy2log, 9, iters=25)
    assert np.allclose(got, _waterfill_reference(load, phy2log, 9, 25), rtol=1e-12, atol=1e-9)
    once = np.arange(36)[None, :]  # every expert once: nothing moves
    assert np.array_equal(waterfill_slot_loads(load[:1, :36], once, 4), load[:1, :36])


def test_node_assignment_is_a_maximum_affinity_assignment_per_layer():
    """The GPU order built for all layers at once keeps GPU sets and is optimal for each
    layer's affinity computed the per-layer way (np.add.at)."""
    from scipy.optimize import linear_sum_assignment

    from eplb_plugin.algorithms.deepseek import balanced_packing

    rng = np.random.default_rng(5)
    weight = rng.zipf(1.6, size=(5, 32)).astype(np.float64)
    phy2log = deepseek(weight, 48, num_gpus=8)
    perm = assign_gpus_to_nodes(weight, phy2log, num_gpus=8, num_nodes=2, num_groups=4)
    slot_load = np.take_along_axis(weight / replica_count(phy2log, 32), phy2log, axis=1)
    group_home, _ = balanced_packing(weight.reshape(5, 4, 8).sum(-1), 2)
    slot_home = np.take_along_axis(group_home, phy2log // 8, axis=1)
    for layer in range(5):
        blocks = perm[layer].reshape(8, 6)
        assert (blocks // 6 == blocks[:, :1] // 6).all() and (np.diff(blocks, axis=1) == 1).all()
        affinity = np.zeros((8, 2))
        np.add.at(affinity, (np.arange(48) // 6, slot_home[layer]), slot_load[layer])
        cost = -np.repeat(affinity, 4, axis=1)  # column = node position
        gpu, pos = linear_sum_assignment(cost)
        chosen = blocks[:, 0] // 6  # old GPU placed at each position
        assert cost[chosen, np.arange(8)].sum() == pytest.approx(cost[gpu, pos].sum(), rel=1e-12)


def test_swap_refinement_stops_evaluating_rows_that_cannot_improve(monkeypatch):
    """Row 0 is balanced from the start; row 1 needs several swaps. After the first
    iteration only row 1 is evaluated (same answer as refining it alone)."""
    slot_load = np.array([[5.0, 1, 5, 1, 5, 1, 5, 1],
                          [9.0, 8, 7, 6, 1, 1, 1, 1]])
    phy2log = np.arange(8)[None, :].repeat(2, 0)
    seen: list[int] = []
    real_argsort = np.argsort

    def spy(a, *args, **kwargs):
        seen.append(a.shape[0])
        return real_argsort(a, *args, **kwargs)

    monkeypatch.setattr(packing.np, "argsort", spy)
    alone_map, alone_load = phy2log[1:].copy(), slot_load[1:].copy()
    refine_swaps(phy2log, slot_load, 4)
    monkeypatch.undo()
    refine_swaps(alone_map, alone_load, 4)
    assert seen[0] == 2 and len(seen) > 2 and set(seen[1:]) == {1}
    assert np.array_equal(phy2log[1], alone_map[0]) and np.array_equal(slot_load[1], alone_load[0])
    assert slot_load[0].tolist() == [5.0, 1, 5, 1, 5, 1, 5, 1]


def test_hierarchical_peak_bound_never_exceeds_the_recipes_peak():
    """Odd sizes (30 experts in 6 groups, 3 nodes of 2 GPUs, 42 slots), skewed counts."""
    from eplb_plugin.algorithms.nodes import hierarchical_peak_bound
    from eplb_plugin.algorithms.split import peak_load

    rng = np.random.default_rng(7)
    weight = rng.zipf(1.4, size=(9, 30)).astype(np.float64)
    hier = deepseek(weight, 42, num_gpus=6, num_nodes=3, num_groups=6, hierarchical=True)
    bound = hierarchical_peak_bound(weight, num_gpus=6, num_nodes=3, num_groups=6)
    assert (bound <= peak_load(weight, hier, 6) * (1 + 1e-12)).all()
    assert (bound >= weight.sum(1) / 6 * (1 - 1e-12)).all()  # never below the mean GPU load


def test_node_aware_plan_runs_the_hierarchical_recipe_only_where_its_bound_leaves_it_a_chance(monkeypatch):
    """Layer 0 spreads its load over the groups (the recipe may be taken there); layers 1-2
    put 80% of it in one group, so one node would carry 1.6x the mean GPU load: the recipe
    runs on layer 0 alone, and the plan equals the one computed with the recipe on every layer."""
    import torch

    from eplb_plugin.algorithms import nodes, plan

    rng = np.random.default_rng(11)
    counts = rng.integers(50, 60, size=(3, 24)).astype(np.float64)
    counts[1:, :6] *= 20  # group 0 (experts 0-5) hot
    kw = dict(num_physical_experts=32, num_gpus=8, num_nodes=2, num_groups=4)
    rows_seen: list[int] = []
    real = nodes.deepseek

    def spy(weight, *args, **kwargs):
        rows_seen.append(weight.shape[0])
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(nodes, "deepseek", spy)
    fast = plan(torch.from_numpy(counts), **kw)
    assert rows_seen == [1]
    monkeypatch.setattr(nodes, "hierarchical_peak_bound", lambda weight, **_: np.zeros(weight.shape[0]))
    every = plan(torch.from_numpy(counts), **kw)
    assert rows_seen == [1, 3]
    assert torch.equal(fast.physical_to_logical_map, every.physical_to_logical_map)


def test_migration_aware_plan_for_an_equal_split_computes_no_replica_weights(monkeypatch):
    """Water-filling only serves a weighted split: the equal-split re-plan skips it and
    returns the same map as the weighted one."""
    import torch

    from eplb_plugin.algorithms import migrate, plan

    rng = np.random.default_rng(3)
    counts = torch.from_numpy(rng.zipf(1.5, size=(4, 20)).astype(np.float64))
    previous = plan(torch.from_numpy(rng.zipf(1.5, size=(4, 20)).astype(np.float64)), num_physical_experts=24,
                    num_gpus=4, algorithm="deepseek")
    calls: list[int] = []
    real = migrate.replica_weights
    monkeypatch.setattr(migrate, "replica_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    equal = plan(counts, num_physical_experts=24, num_gpus=4, previous=previous)
    assert equal.replica_weights is None and calls == []
    weighted = plan(counts, num_physical_experts=24, num_gpus=4, previous=previous, split="weighted")
    assert calls == [1] and weighted.replica_weights is not None
    assert torch.equal(equal.physical_to_logical_map, weighted.physical_to_logical_map)


def test_trying_a_rows_remaining_donors_at_once_gives_the_same_plan_in_fewer_rounds(monkeypatch):
    """The replica-count search with every row's remaining donors tried in one round equals
    the one-donor-per-round search, and re-packs fewer times (odd sizes: 9 GPUs, 45 slots)."""
    from eplb_plugin.algorithms import balanced

    rng = np.random.default_rng(4)
    weight = rng.zipf(1.7, size=(12, 37)).astype(np.float64) * rng.random((12, 37))
    plans, calls = [], []
    real = balanced.pack_counts

    def spy(*args, **kwargs):
        calls[-1] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(balanced, "pack_counts", spy)
    for rows_at_once in (0, 10**6):
        monkeypatch.setattr(balanced, "SPECULATE_ROWS", rows_at_once)
        calls.append(0)
        plans.append(balanced.balanced_plan_numpy(weight, 45, num_gpus=9))
    assert np.array_equal(plans[0], plans[1])
    assert 1 < calls[1] < calls[0]


def _migration_reference(weight, previous, num_gpus, gain_per_slot):
    """Every layer aligned, then kept where the drop of its peak pays for its moved slots."""
    from eplb_plugin.algorithms.split import peak_load

    fresh = align_to_previous(deepseek(weight, previous.shape[1], num_gpus=num_gpus), previous, num_gpus=num_gpus)
    mean = weight.sum(1) / num_gpus
    gain = (peak_load(weight, previous, num_gpus) - peak_load(weight, fresh, num_gpus)) / mean
    moved = (fresh != previous).mean(1)
    take = (moved > 0) & (gain > gain_per_slot * moved)
    return np.where(take[:, None], fresh, previous)


def test_migration_aware_plan_aligns_only_layers_whose_gain_could_pay_for_a_move(monkeypatch):
    """Layers whose previous placement is the recipe's plan for today's counts gain nothing and
    are not aligned; the others are; the plan equals aligning every layer (odd sizes: 7 GPUs,
    35 slots, 29 experts)."""
    from eplb_plugin.algorithms import migrate

    rng = np.random.default_rng(9)
    weight = rng.zipf(1.5, size=(10, 29)).astype(np.float64)
    previous = deepseek(rng.zipf(1.5, size=(10, 29)).astype(np.float64), 35, num_gpus=7)
    previous[::2] = deepseek(weight[::2], 35, num_gpus=7)  # even layers: already today's plan
    rows_aligned: list[int] = []
    real = migrate.align_to_previous
    monkeypatch.setattr(migrate, "align_to_previous",
                        lambda new, prev, **kw: rows_aligned.append(new.shape[0]) or real(new, prev, **kw))
    got, _ = migrate.plan_migration_aware(weight, previous, num_gpus=7, with_weights=False)
    assert rows_aligned and rows_aligned[0] <= 5
    monkeypatch.undo()
    assert np.array_equal(got, _migration_reference(weight, previous, 7, migrate.GAIN_PER_SLOT))
    assert np.array_equal(got[::2], previous[::2])
