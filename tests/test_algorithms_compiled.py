"""The compiled planner steps (numba) against their numpy forms: the same outputs, bit for bit."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from scipy.optimize import linear_sum_assignment  # noqa: E402

from eplb_plugin.algorithms import balanced, balanced_jit, compiled, nodes, plan  # noqa: E402
from eplb_plugin.algorithms.balanced_jit import pairwise_sum  # noqa: E402
from eplb_plugin.algorithms.deepseek import deepseek  # noqa: E402
from eplb_plugin.algorithms.nodes_jit import min_cost_assignment  # noqa: E402
from eplb_plugin.algorithms.split import peak_load  # noqa: E402


def _counts(rng, num_layers, num_logical, kind):
    """Skewed counts with the cases that break ties: integer counts, zero experts, a zero layer."""
    if kind == "zipf":
        weight = rng.zipf(1.5, size=(num_layers, num_logical)).astype(np.float64).clip(max=1e4)
    elif kind == "lognormal":
        weight = rng.lognormal(0.0, 1.5, size=(num_layers, num_logical)) * 100
    else:  # few distinct values: many equal GPU loads
        weight = rng.integers(0, 3, size=(num_layers, num_logical)).astype(np.float64)
    weight[0, :3] = 0.0
    weight[-1] = 0.0
    return weight


# (experts, GPUs, slots): odd sizes, one slot per GPU, one GPU, no redundant slot, long GPUs
SHAPES = [(37, 9, 45), (29, 7, 35), (16, 16, 16), (13, 1, 20), (40, 8, 40), (23, 3, 27), (64, 8, 72), (30, 2, 300)]


@pytest.mark.parametrize(("num_logical", "num_gpus", "num_physical"), SHAPES)
@pytest.mark.parametrize("kind", ["zipf", "lognormal", "ties"])
def test_compiled_equal_split_plan_is_the_numpy_plan(num_logical, num_gpus, num_physical, kind):
    """Steps 1-4 compiled give the numpy form's map, layer for layer."""
    rng = np.random.default_rng(num_logical * num_gpus + len(kind))
    weight = _counts(rng, 7, num_logical, kind)
    got = balanced.balanced_plan(weight, num_physical, num_gpus=num_gpus, compiled=True)
    assert np.array_equal(got, balanced.balanced_plan_numpy(weight, num_physical, num_gpus=num_gpus))


def test_compiled_divisor_counts_are_the_numpy_counts():
    """Bisection and the hand-out of ties give the same counts (zero layers, ties, no redundant slot)."""
    rng = np.random.default_rng(1)
    for kind in ("zipf", "lognormal", "ties"):
        weight = _counts(rng, 6, 37, kind)
        for num_physical in (37, 40, 45, 111):
            assert np.array_equal(balanced.divisor_counts(weight, num_physical, compiled=True),
                                  balanced.divisor_counts(weight, num_physical, compiled=False))


@pytest.mark.parametrize("hierarchical", [False, True])
def test_compiled_recipe_is_the_numpy_recipe(hierarchical):
    """DeepSeek's recipe with its two loops compiled: the same maps (one item per pack included)."""
    rng = np.random.default_rng(2)
    for num_nodes, num_gpus, num_groups, num_logical, num_physical in [
        (1, 9, 1, 37, 45), (2, 4, 4, 24, 32), (3, 6, 6, 30, 42), (2, 8, 8, 64, 72), (2, 2, 2, 8, 8),
    ]:
        for kind in ("zipf", "ties"):
            weight = _counts(rng, 5, num_logical, kind)
            kw = dict(num_gpus=num_gpus, num_nodes=num_nodes, num_groups=num_groups, hierarchical=hierarchical)
            assert np.array_equal(deepseek(weight, num_physical, compiled=True, **kw), deepseek(weight, num_physical, **kw))


def test_pairwise_sum_is_numpys_sum():
    """Runs of every length up to and past numpy's block of 128 values, bit for bit."""
    rng = np.random.default_rng(3)
    values = rng.random(700) * rng.choice([1.0, 1e6, 1e-3], size=700)
    for n in [*range(1, 40), 64, 127, 128, 129, 255, 256, 300, 511, 700]:
        assert pairwise_sum(values, 0, n) == values[:n].sum()
        assert pairwise_sum(values, 700 - n, n) == values[700 - n:].sum()


def test_compiled_assignment_is_scipys_on_matrices_full_of_ties():
    """Node-position costs (each node's column repeated per GPU of it, zeros included), small
    integers and random floats, 1 to 33 rows: scipy's ``linear_sum_assignment`` columns, tie for tie."""
    rng = np.random.default_rng(6)
    for n in [1, 2, 3, 5, 8, 12, 16, 32, 33]:
        for trial in range(60):
            kind = trial % 4
            if kind == 0:
                cost = rng.random((n, n))
            elif kind == 1:
                cost = rng.integers(0, 3, size=(n, n)).astype(np.float64)
            else:  # columns in blocks of equal costs, like GPUs to node positions
                blocks = int(rng.integers(1, n + 1))
                per_block = rng.zipf(1.5, size=(n, blocks)).astype(np.float64) if kind == 2 \
                    else rng.integers(0, 4, size=(n, blocks)).astype(np.float64)
                cost = -np.repeat(per_block, -(-n // blocks), axis=1)[:, :n]
            cost = np.ascontiguousarray(cost)
            got = np.empty(n, dtype=np.int64)
            min_cost_assignment(cost, got)
            assert np.array_equal(got, linear_sum_assignment(cost)[1]), (n, trial)


@pytest.mark.parametrize(("num_logical", "num_groups", "num_nodes", "num_gpus", "num_physical"),
                         [(48, 8, 4, 32, 64), (30, 6, 3, 6, 42), (24, 4, 2, 8, 32), (36, 4, 3, 9, 45), (40, 5, 2, 4, 40)])
def test_compiled_node_assignment_is_the_numpy_one(num_logical, num_groups, num_nodes, num_gpus, num_physical):
    """GPUs to nodes compiled (``nodes_jit``) and in numpy with scipy: the same order, with
    groups packed onto nodes and homed round robin (groups not a multiple of nodes), ties and zero layers."""
    rng = np.random.default_rng(num_logical + num_nodes)
    for kind in ("zipf", "lognormal", "ties"):
        weight = _counts(rng, 9, num_logical, kind)
        phy2log = balanced.balanced_plan(weight, num_physical, num_gpus=num_gpus)
        kw = dict(num_gpus=num_gpus, num_nodes=num_nodes, num_groups=num_groups)
        assert np.array_equal(nodes.assign_gpus_to_nodes(weight, phy2log, compiled=True, **kw),
                              nodes.assign_gpus_to_nodes(weight, phy2log, compiled=False, **kw))


@pytest.mark.parametrize("compiled_search", [True, False])
def test_the_equal_plans_peak_is_its_maps_peak(monkeypatch, compiled_search):
    """The peak an equal-split plan hands on (the search's, or the recipe's where that wins)
    is ``split.peak_load`` of the map, float for float, so the node step need not recompute it."""
    monkeypatch.setattr(compiled, "COMPILED_MIN_SLOTS", 0)  # small plans compiled as well
    if not compiled_search:
        monkeypatch.setattr(balanced, "balanced_kernels", lambda: None)
    searches: list[int] = []
    real_search = balanced_jit.search_rows
    monkeypatch.setattr(balanced_jit, "search_rows", lambda *a, **k: searches.append(1) or real_search(*a, **k))
    rng = np.random.default_rng(8)
    for num_logical, num_gpus, num_physical in SHAPES:
        for kind in ("zipf", "lognormal", "ties"):
            weight = _counts(rng, 7, num_logical, kind)
            fresh = balanced.plan_balanced(weight, num_physical, num_gpus=num_gpus, with_weights=False)
            assert fresh.weights is None and fresh.peak is not None
            assert np.array_equal(fresh.peak, peak_load(weight, fresh.phy2log, num_gpus))
    assert bool(searches) == compiled_search  # the search the case names ran


def test_plan_without_numba_is_the_same_placement(monkeypatch):
    """The numpy fallback (numba absent) plans the same maps through ``plan``, node-aware and weighted too."""
    monkeypatch.setattr(compiled, "COMPILED_MIN_SLOTS", 0)  # small plans compiled as well
    rng = np.random.default_rng(4)
    counts = torch.from_numpy(_counts(rng, 6, 48, "zipf"))
    cases = [dict(num_physical_experts=56, num_gpus=8),
             dict(num_physical_experts=64, num_gpus=8, num_nodes=2, num_groups=4),
             dict(num_physical_experts=64, num_gpus=16, split="weighted")]
    searches: list[int] = []
    real_search = balanced_jit.search_rows
    monkeypatch.setattr(balanced_jit, "search_rows", lambda *a, **k: searches.append(1) or real_search(*a, **k))
    fast = [plan(counts, **kw) for kw in cases]
    assert searches  # the compiled search ran
    # Where the policies look the kernels up (they import the names, not the module).
    monkeypatch.setattr(balanced, "balanced_kernels", lambda: None)
    for module in ("deepseek", "nodes"):
        monkeypatch.setattr(importlib.import_module(f"eplb_plugin.algorithms.{module}"), "recipe_kernels", lambda: None)
    monkeypatch.setattr(nodes, "node_kernels", lambda: None)
    searches.clear()
    for kw, got in zip(cases, fast):
        slow = plan(counts, **kw)
        assert not searches  # numpy planned it
        assert torch.equal(got.physical_to_logical_map, slow.physical_to_logical_map)
        assert (got.replica_weights is None) == (slow.replica_weights is None)
        if got.replica_weights is not None:
            assert torch.equal(got.replica_weights, slow.replica_weights)


def test_small_plans_stay_in_numpy_and_large_ones_compile(monkeypatch):
    """Below ``COMPILED_MIN_SLOTS`` layer-slots the numpy form plans (no numba to load for a
    tiny model); from there on the compiled one; the plans are the same either way."""
    calls: list[int] = []
    real = balanced.balanced_plan_numpy
    monkeypatch.setattr(balanced, "balanced_plan_numpy", lambda w, *a, **k: calls.append(w.shape[0]) or real(w, *a, **k))
    rng = np.random.default_rng(5)
    small = _counts(rng, 4, 30, "zipf")  # 4 x 36 slots
    large = _counts(rng, compiled.COMPILED_MIN_SLOTS // 36 + 1, 30, "zipf")
    balanced.balanced_plan(small, 36, num_gpus=6)
    assert calls == [4]
    got = balanced.balanced_plan(large, 36, num_gpus=6)
    assert calls == [4]
    assert np.array_equal(got, real(large, 36, num_gpus=6))
