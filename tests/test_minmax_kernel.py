"""The minmax dispatch's Triton kernels against the dispatcher's torch path (interpreted on CPU)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

import pytest

from eplb_plugin.dispatch import ExpertDispatcher
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
                         [(0, 16, 20, 4, 37, 4), (1, 64, 72, 8, 333, 6), (2, 8, 16, 2, 5, 2),
                          (3, 256, 288, 8, 97, 8),  # DeepSeek-V3's experts and slots
                          (6, 16, 20, 4, 1500, 4)])  # many tiles, several per program
def test_kernel_dispatches_like_the_torch_path(seed, num_experts, num_slots, ep, tokens, top_k):
    """Every pair goes to a replica of its own expert (padding stays -1); per-slot loads
    match the torch path's within one pair (float sums in another order may move a pair on
    a quota boundary), and the counts the kernel adds are exactly the slots it chose."""
    location, ids = _case(seed, num_experts, num_slots, ep, tokens, top_k)
    torch_path = ExpertDispatcher(location, rank=1, algorithm="minmax")
    kernel = ExpertDispatcher(location, rank=1, algorithm="minmax", backend="triton", device=DEVICE)
    counts = torch.zeros(2, num_slots, dtype=torch.int32, device=DEVICE)
    for layer in range(2):
        got = kernel.dispatch(layer, ids.to(DEVICE), counts_out=counts).cpu()
        want = torch_path.dispatch(layer, ids)
        assert torch.equal(got == -1, ids == -1)
        phy2log = location.physical_to_logical_map[layer]
        assert torch.equal(phy2log[got[ids >= 0]], ids[ids >= 0])
        got_load = torch.bincount(got[got >= 0], minlength=num_slots)
        want_load = torch.bincount(want[want >= 0], minlength=num_slots)
        assert (got_load - want_load).abs().max() <= 1
        assert torch.equal(counts[layer].cpu(), got_load.to(torch.int32))


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_kernel_follows_a_new_placement_copied_in_place():
    """After update_, the kernel reads the new tables (what a captured graph replays)."""
    old, ids = _case(4, 16, 20, 4, 50, 4)
    new, _ = _case(5, 16, 20, 4, 50, 4)
    kernel = ExpertDispatcher(old, rank=0, algorithm="minmax", backend="triton", device=DEVICE)
    assert kernel.update_(new)
    got = kernel.dispatch(0, ids.to(DEVICE)).cpu()
    want = ExpertDispatcher(new, rank=0, algorithm="minmax").dispatch(0, ids)
    got_load = torch.bincount(got[got >= 0], minlength=20)
    assert (got_load - torch.bincount(want[want >= 0], minlength=20)).abs().max() <= 1


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_kernel_leaves_rows_that_pad_the_batch_out_like_the_torch_path():
    """minmax_dispatch(num_valid_rows=) on the kernels: the real rows' choice is the kernels'
    choice for those rows alone, padding rows keep a slot of their expert, counts the real rows."""
    from eplb_plugin.dispatch import minmax_dispatch
    from eplb_plugin.kernels.minmax import build_minmax_tables

    location, ids = _case(7, 16, 20, 4, 61, 4)
    tables = build_minmax_tables(location.physical_to_logical_map.to(DEVICE), 16, num_gpus=4)
    real = 45
    counts = torch.zeros(2, 20, dtype=torch.int32, device=DEVICE)
    got = minmax_dispatch(ids.to(DEVICE), tables, layer=1, num_slots=20, use_kernel=True, counts_out=counts,
                          num_valid_rows=torch.tensor([real], device=DEVICE)).cpu()
    alone = minmax_dispatch(ids[:real].to(DEVICE), tables, layer=1, num_slots=20, use_kernel=True).cpu()
    assert torch.equal(got[:real], alone)
    pad = ids[real:]
    assert torch.equal(location.physical_to_logical_map[1][got[real:][pad >= 0]], pad[pad >= 0])
    assert torch.equal(counts[1].cpu(), torch.bincount(alone[alone >= 0], minlength=20).to(torch.int32))
