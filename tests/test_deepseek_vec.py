"""SGLang's deepseek_vec policy: replicas follow the per-pass peaks, snake packing, SGLang parity."""

import numpy as np
import pytest
import torch

from eplb_plugin.algorithms import plan
from eplb_plugin.algorithms.deepseek import deepseek
from eplb_plugin.algorithms.deepseek_vec import deepseek_vec


def test_replicas_follow_the_per_pass_peaks_not_the_window_sum():
    """Expert 2 has the largest sum, but experts 0 and 1 set the maximum of one pass each:
    the time-resolved policy replicates a peak expert, the flat recipe expert 2."""
    per_pass = np.array([[[6.0, 0.0, 5.0]], [[0.0, 6.0, 5.0]]])
    vec = deepseek_vec(per_pass, 4, num_gpus=2)
    flat = deepseek(per_pass.sum(0), 4, num_gpus=2)
    assert np.bincount(vec[0], minlength=3).tolist() == [1, 2, 1]
    assert np.bincount(flat[0], minlength=3).tolist() == [1, 1, 2]


def test_snake_packing_deals_heaviest_slots_back_and_forth():
    """One pass, no redundancy: slots by load 8 > 7 > 6 > 5 go to GPUs 0, 1, 1, 0."""
    per_pass = np.array([[[5.0, 8.0, 6.0, 7.0]]])
    phy2log = deepseek_vec(per_pass, 4, num_gpus=2)
    assert [sorted(phy2log[0, :2].tolist()), sorted(phy2log[0, 2:].tolist())] == [[0, 1], [2, 3]]


def test_plan_hands_the_passes_to_deepseek_vec():
    """plan() with [B, L, E] counts plans deepseek_vec from the passes (the result differs
    from planning on their sum) and every other policy from the sum."""
    per_pass = torch.tensor([[[6.0, 0.0, 5.0]], [[0.0, 6.0, 5.0]]])
    by_pass = plan(per_pass, num_physical_experts=4, num_gpus=2, algorithm="deepseek_vec")
    by_sum = plan(per_pass.sum(0), num_physical_experts=4, num_gpus=2, algorithm="deepseek_vec")
    assert torch.bincount(by_pass.physical_to_logical_map[0], minlength=3).tolist() == [1, 2, 1]
    assert torch.bincount(by_sum.physical_to_logical_map[0], minlength=3).tolist() == [1, 1, 2]
    flat = plan(per_pass, num_physical_experts=4, num_gpus=2, algorithm="deepseek")
    assert torch.bincount(flat.physical_to_logical_map[0], minlength=3).tolist() == [1, 1, 2]


@pytest.mark.sglang
@pytest.mark.parametrize(("passes", "layers", "experts", "slots", "gpus"),
                         [(5, 3, 16, 24, 4), (8, 2, 64, 72, 8), (1, 2, 12, 16, 8), (12, 4, 256, 288, 32)])
def test_every_gpu_holds_what_sglangs_deepseek_vec_puts_there(passes, layers, experts, slots, gpus):
    """Against SGLang's own module (decode form): the same experts on every GPU."""
    sglang_vec = pytest.importorskip("sglang.srt.eplb.eplb_algorithms.deepseek_vec")
    counts = np.random.default_rng(passes * 7 + experts).gamma(0.5, 10.0, (passes, layers, experts))
    ours = deepseek_vec(counts, slots, num_gpus=gpus)
    theirs = sglang_vec.rebalance_experts(torch.tensor(counts, dtype=torch.float32), slots, slots // gpus,
                                          None, 1, False)[0].numpy()
    for layer in range(layers):
        mine = sorted(sorted(g) for g in ours[layer].reshape(gpus, -1).tolist())
        want = sorted(sorted(g) for g in theirs[layer].reshape(gpus, -1).tolist())
        assert mine == want
