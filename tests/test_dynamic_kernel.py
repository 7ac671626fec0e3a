"""The dynamic-dispatch Triton kernel against the dispatcher's torch path (interpreted on CPU)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

import pytest

from eplb_plugin.dispatch import DYNAMIC_WATERFILL_ITERATIONS, ExpertDispatcher
from eplb_plugin.kernels import triton_available
from eplb_plugin.location import ExpertLocation

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed: int, num_experts: int, num_slots: int, ep: int, tokens: int, top_k: int):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.rand(2, num_experts, generator=gen) ** 4 * 1000  # skewed
    location = ExpertLocation.from_logical_count(counts, num_physical_experts=num_slots, ep_size=ep,
                                                 algorithm="eplb_plugin_equal")
    hot = torch.multinomial(counts[0] + 1, tokens * top_k, replacement=True, generator=gen)
    ids = hot.view(tokens, top_k)
    ids[torch.rand(tokens, top_k, generator=gen) < 0.05] = -1  # padding
    return location, ids


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("seed, num_experts, num_slots, ep, tokens, top_k",
                         [(0, 16, 20, 4, 37, 4), (1, 64, 72, 8, 96, 6), (2, 8, 16, 2, 5, 2),
                          (3, 256, 288, 8, 512, 8)])  # the last: DeepSeek-V3's experts and slots
def test_kernel_dispatches_like_the_torch_path(seed, num_experts, num_slots, ep, tokens, top_k):
    """Every pair goes to a replica of its own expert (padding stays -1), and the kernel
    picks the torch path's replica for (all but boundary-rounding) pairs: per-slot loads
    differ by at most one pair."""
    from eplb_plugin.kernels.dynamic import dynamic_dispatch_triton

    location, ids = _case(seed, num_experts, num_slots, ep, tokens, top_k)
    for rank in (0, ep - 1):
        torch_path = ExpertDispatcher(location, rank=rank, algorithm="dynamic")
        for layer in range(location.num_layers):
            want = torch_path.dispatch(layer, ids)
            got = dynamic_dispatch_triton(
                ids.to(DEVICE), location.logical_to_physical_map[layer].to(DEVICE),
                num_local=location.num_local_physical_experts, num_gpus=ep,
                iterations=DYNAMIC_WATERFILL_ITERATIONS,
            ).cpu()
            assert torch.equal(got == -1, ids == -1)
            valid = ids >= 0
            p2l = location.physical_to_logical_map[layer]
            assert torch.equal(p2l[got[valid]], ids[valid]), "a pair went to another expert's slot"
            assert (got == want).float().mean() >= 0.99
            loads = [torch.bincount(x[valid], minlength=num_slots) for x in (got, want)]
            assert (loads[0] - loads[1]).abs().max() <= 1


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_dispatcher_on_the_triton_backend_follows_an_in_place_update():
    """ExpertDispatcher(backend="triton") runs the kernel; after update_ (new tables in the
    same memory, as under a captured CUDA graph) it dispatches by the new placement."""
    location, ids = _case(4, 16, 24, 4, 64, 4)
    newer, _ = _case(5, 16, 24, 4, 64, 4)
    kernel = ExpertDispatcher(location, rank=1, algorithm="dynamic", backend="triton", device=DEVICE)
    assert kernel._kernel
    for loc in (location, newer):
        if loc is newer:
            assert kernel.update_(newer)
        want = ExpertDispatcher(loc, rank=1, algorithm="dynamic")
        for layer in range(loc.num_layers):
            got = kernel.dispatch(layer, ids.to(DEVICE)).cpu()
            assert (got == want.dispatch(layer, ids)).float().mean() >= 0.99
            valid = ids >= 0
            assert torch.equal(loc.physical_to_logical_map[layer][got[valid]], ids[valid])
