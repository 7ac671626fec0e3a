"""Redundancy sizing: which redundant counts are possible, what a memory budget allows."""

import numpy as np
import pytest

from eplb_plugin.algorithms.sizing import (
    max_redundant_for_memory,
    max_useful_redundant,
    min_redundant,
    redundancy_curve,
    redundant_choices,
    redundant_per_gpu,
)
from eplb_plugin.errors import ConfigError


def test_redundant_choices_keep_the_slots_divisible_over_the_gpus():
    assert redundant_choices(64, 8, 32) == [0, 8, 16, 24, 32]
    assert redundant_choices(60, 8, 20) == [4, 12, 20]  # 60 + 0 slots do not divide over 8 GPUs
    assert all((60 + r) % 8 == 0 for r in redundant_choices(60, 8, 100))


def test_a_memory_budget_allows_the_redundant_slots_whose_weights_fit_on_every_gpu():
    """One redundant slot per GPU costs one expert in every MoE layer."""
    per_slot = 3 * 100  # expert_bytes x num_layers
    assert max_redundant_for_memory(2.9 * per_slot, expert_bytes=3, num_layers=100, num_logical=64, num_gpus=8) == 16
    assert max_redundant_for_memory(0.9 * per_slot, expert_bytes=3, num_layers=100, num_logical=64, num_gpus=8) == 0
    assert max_redundant_for_memory(1.0 * per_slot, expert_bytes=3, num_layers=100, num_logical=60, num_gpus=8) == 4
    with pytest.raises(ConfigError, match="must be >= 0"):
        max_redundant_for_memory(-1, expert_bytes=3, num_layers=100, num_logical=64, num_gpus=8)


def test_a_memory_budget_is_capped_where_every_gpu_holds_every_expert():
    """Past E * (G - 1) redundant slots every GPU holds every expert and more buy no balance:
    a budget above that, inf included, gives that many (it gave millions, or NaN for inf)."""
    assert max_useful_redundant(64, 8) == 448 and redundant_per_gpu(64, 448, 8) == 56
    kwargs = dict(expert_bytes=3, num_layers=100, num_logical=64, num_gpus=8)
    assert max_redundant_for_memory(1e30, **kwargs) == 448
    assert max_redundant_for_memory(float("inf"), **kwargs) == 448
    assert max_redundant_for_memory(56 * 300, **kwargs) == 448 and max_redundant_for_memory(55.9 * 300, **kwargs) == 440
    assert max_redundant_for_memory(float("inf"), expert_bytes=3, num_layers=100, num_logical=30, num_gpus=4) == 90
    with pytest.raises(ConfigError, match="must be >= 0"):
        max_redundant_for_memory(float("nan"), **kwargs)


def test_a_budget_below_one_slot_per_gpu_gives_the_fewest_slots_that_divide():
    """30 experts over 4 GPUs need 2 redundant slots to divide (0 made P = 30 and the plan
    failed); where E divides, none."""
    assert min_redundant(30, 4) == 2 and min_redundant(64, 8) == 0
    assert max_redundant_for_memory(0, expert_bytes=3, num_layers=100, num_logical=30, num_gpus=4) == 2
    assert max_redundant_for_memory(0, expert_bytes=3, num_layers=100, num_logical=64, num_gpus=8) == 0
    assert max_redundant_for_memory(300, expert_bytes=3, num_layers=100, num_logical=30, num_gpus=4) == 2
    assert max_redundant_for_memory(600, expert_bytes=3, num_layers=100, num_logical=30, num_gpus=4) == 6
    assert redundant_per_gpu(30, 2, 4) == 1 and redundant_per_gpu(30, 6, 4) == 2


def test_the_curve_scores_held_out_passes_and_refuses_counts_that_do_not_divide():
    gen = np.random.default_rng(0)
    counts = gen.poisson(gen.gamma(0.5, 1.0, (12, 2, 16)) * 30).astype(np.float64)
    curve = redundancy_curve(counts, num_gpus=4, redundant=[0, 4, 8], dispatch="minmax")
    assert [(p.redundant, p.per_gpu, p.held_out) for p in curve] == [(0, 0, True), (4, 1, True), (8, 2, True)]
    assert curve[-1].balancedness > curve[0].balancedness
    assert not redundancy_curve(counts.sum(0), num_gpus=4, redundant=[4])[0].held_out
    with pytest.raises(ConfigError, match="do not divide"):
        redundancy_curve(counts, num_gpus=4, redundant=[2])
