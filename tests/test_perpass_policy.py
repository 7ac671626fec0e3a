"""The per-pass policy: placements scored on the window's passes under minmax dispatch."""

import numpy as np
import torch

from eplb_plugin.algorithms import plan
from eplb_plugin.algorithms.evaluate import pass_counts, per_pass_balancedness
from eplb_plugin.algorithms.perpass import mean_pass_balancedness

from conftest import trace_path


def _window():
    ids = np.load(trace_path("esft_dsv2lite_law_top6.npz"))["topk_ids"][: 256 * 16]
    return pass_counts(ids, num_logical=64, pass_tokens=256)  # [16, 26, 64]


def test_the_refined_plan_scores_at_least_the_equal_plan_on_every_layer_of_its_window():
    """On the window it plans from, every layer's mean per-pass balancedness under minmax is
    at least the equal-split plan's, and the mean is higher; every expert keeps a replica."""
    counts = _window()[:8]
    equal = plan(counts, num_physical_experts=72, num_gpus=8, algorithm="eplb_plugin_equal").physical_to_logical_map
    ours = plan(counts, num_physical_experts=72, num_gpus=8, algorithm="eplb_plugin_perpass").physical_to_logical_map
    assert ours.shape == (26, 72)
    assert all(set(ours[layer].tolist()) == set(range(64)) for layer in range(26))
    rows = torch.from_numpy(counts).float().permute(1, 0, 2)
    before = mean_pass_balancedness(equal, rows, num_gpus=8)
    after = mean_pass_balancedness(ours, rows, num_gpus=8)
    assert (after >= before - 1e-6).all() and after.mean() > before.mean() + 0.01


def test_it_also_serves_the_next_passes_better_than_the_equal_plan():
    """Planned on 8 passes, scored on the 8 that follow (not seen by the planner)."""
    counts = _window()
    kwargs = dict(num_physical_experts=72, num_gpus=8)
    equal = plan(counts[:8], algorithm="eplb_plugin_equal", **kwargs).physical_to_logical_map.numpy()
    ours = plan(counts[:8], algorithm="eplb_plugin_perpass", **kwargs).physical_to_logical_map.numpy()
    later = counts[8:]
    assert per_pass_balancedness(later, ours, num_gpus=8, dispatch="minmax").mean() > \
        per_pass_balancedness(later, equal, num_gpus=8, dispatch="minmax").mean()


def test_the_plan_is_repeatable():
    counts = _window()[:4, :3]
    a = plan(counts, num_physical_experts=72, num_gpus=8, algorithm="eplb_plugin_perpass").physical_to_logical_map
    b = plan(counts, num_physical_experts=72, num_gpus=8, algorithm="eplb_plugin_perpass").physical_to_logical_map
    assert torch.equal(a, b)
