"""Redundancy sizing: which redundant counts are possible, what a memory budget allows."""

import numpy as np
import pytest

from eplb_plugin.algorithms.sizing import (
    max_redundant_for_memory,
    redundancy_curve,
    redundant_choices,
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


def test_the_curve_scores_held_out_passes_and_refuses_counts_that_do_not_divide():
    gen = np.random.default_rng(0)
    counts = gen.poisson(gen.gamma(0.5, 1.0, (12, 2, 16)) * 30).astype(np.float64)
    curve = redundancy_curve(counts, num_gpus=4, redundant=[0, 4, 8], dispatch="minmax")
    assert [(p.redundant, p.per_gpu, p.held_out) for p in curve] == [(0, 0, True), (4, 1, True), (8, 2, True)]
    assert curve[-1].balancedness > curve[0].balancedness
    assert not redundancy_curve(counts.sum(0), num_gpus=4, redundant=[4])[0].held_out
    with pytest.raises(ConfigError, match="do not divide"):
        redundancy_curve(counts, num_gpus=4, redundant=[2])
