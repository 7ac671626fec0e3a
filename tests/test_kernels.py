"""Count and fused map+count kernels against numpy references (exact)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must be set before eplb_plugin.kernels.triton_kernels is first imported (decoration time).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from test_recorder_helpers import np_slot_count, padded_ids

from eplb_plugin.errors import ConfigError, CountsError
from eplb_plugin.kernels import (
    _launch,
    count_reference,
    count_topk,
    launch_geometry,
    map_and_count,
    map_and_count_reference,
    triton_available,
)

# Triton kernels run on the GPU where there is one, interpreted on the CPU otherwise.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOKENS = (1, 7, 1823)
TOP_K = (1, 6, 8)
SLOTS = (8, 64, 257)
# The Triton interpreter is slow: small odd sizes, one case crossing several blocks.
INTERPRETED_CASES = [(1, 1, 8), (7, 6, 257), (37, 8, 65), (151, 7, 64)]

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("top_k", TOP_K)
@pytest.mark.parametrize("num_slots", SLOTS)
def test_torch_count_matches_numpy(tokens, top_k, num_slots):
    """The torch path adds exactly numpy's histogram into the chosen row only."""
    gen = torch.Generator().manual_seed(tokens * 1000 + top_k * 10 + num_slots)
    ids = padded_ids(gen, tokens, top_k, num_slots)
    counts = torch.zeros(3, num_slots, dtype=torch.int32)
    count_topk(ids, counts, 1, backend="torch")
    count_topk(ids, counts, 1, backend="torch")
    assert np.array_equal(counts[1].numpy(), 2 * np_slot_count(ids, num_slots))
    assert not counts[0].any() and not counts[2].any()
    assert np.array_equal(count_reference(ids, num_slots).numpy(), np_slot_count(ids, num_slots))


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("top_k", TOP_K)
@pytest.mark.parametrize("num_logical", SLOTS)
def test_torch_fused_maps_and_counts_like_numpy(tokens, top_k, num_logical):
    """The torch fused path writes table[layer, id] (-1 kept) and counts the slots."""
    gen = torch.Generator().manual_seed(tokens + top_k + num_logical)
    num_slots = num_logical + 5
    table = torch.randint(0, num_slots, (2, num_logical), generator=gen)
    ids = padded_ids(gen, tokens, top_k, num_logical).to(torch.int64)
    counts = torch.zeros(2, num_slots, dtype=torch.int32)
    physical = map_and_count(ids, table, counts, 1, backend="torch")
    expected = np.where(ids.numpy() >= 0, table[1].numpy()[ids.numpy().clip(0)], -1)
    assert np.array_equal(physical.numpy(), expected)
    assert np.array_equal(counts[1].numpy(), np_slot_count(torch.from_numpy(expected), num_slots))
    assert not counts[0].any()


@needs_triton
@pytest.mark.parametrize("tokens,top_k,num_slots", INTERPRETED_CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_triton_count_matches_numpy(tokens, top_k, num_slots, dtype):
    """The Triton count kernel (interpreted on CPU) gives numpy's histogram exactly."""
    gen = torch.Generator().manual_seed(tokens * 7 + num_slots)
    ids = padded_ids(gen, tokens, top_k, num_slots).to(dtype)
    ids[0, 0] = num_slots + 3  # out of range: skipped like padding
    counts = torch.zeros(2, num_slots, dtype=torch.int32, device=TRITON_DEVICE)
    count_topk(ids.to(TRITON_DEVICE), counts, 1, backend="triton")
    assert np.array_equal(counts[1].cpu().numpy(), np_slot_count(ids, num_slots))
    assert not counts[0].any()


@needs_triton
def test_triton_count_with_several_iterations_per_program(monkeypatch):
    """Programs that loop over several blocks still count every id once."""
    monkeypatch.setattr(_launch, "MAX_BLOCK_IDS", 16)
    monkeypatch.setattr(_launch, "MAX_PROGRAMS", 3)
    geo = launch_geometry(233, 31)
    assert geo.iters > 1 and geo.programs * geo.iters * geo.block >= 233
    gen = torch.Generator().manual_seed(5)
    ids = padded_ids(gen, 233, 1, 31)
    counts = torch.zeros(1, 31, dtype=torch.int32, device=TRITON_DEVICE)
    count_topk(ids.to(TRITON_DEVICE), counts, 0, backend="triton")
    assert np.array_equal(counts[0].cpu().numpy(), np_slot_count(ids, 31))


@needs_triton
@pytest.mark.parametrize("tokens,top_k,num_logical", INTERPRETED_CASES)
def test_triton_fused_matches_reference(tokens, top_k, num_logical):
    """The fused Triton kernel maps and counts exactly like the torch reference."""
    gen = torch.Generator().manual_seed(tokens + 3 * num_logical)
    num_slots = num_logical + 3
    table = torch.randint(0, num_slots, (3, num_logical), generator=gen, dtype=torch.int32)
    ids = padded_ids(gen, tokens, top_k, num_logical)
    counts = torch.zeros(3, num_slots, dtype=torch.int32, device=TRITON_DEVICE)
    out = torch.empty_like(ids, device=TRITON_DEVICE)
    physical = map_and_count(ids.to(TRITON_DEVICE), table.to(TRITON_DEVICE), counts, 2, out=out, backend="triton")
    ref_physical, ref_counts = map_and_count_reference(ids, table[2], num_slots)
    assert physical.data_ptr() == out.data_ptr()
    assert torch.equal(physical.cpu(), ref_physical)
    assert torch.equal(counts[2].long().cpu(), ref_counts)
    assert not counts[:2].any()


def test_bad_inputs_raise_typed_errors():
    """Wrong dtypes and unknown backends are user errors with typed exceptions."""
    counts = torch.zeros(1, 8, dtype=torch.int32)
    with pytest.raises(ConfigError, match="int32 or int64"):
        count_topk(torch.zeros(2, 2), counts, 0)
    with pytest.raises(CountsError, match="int32"):
        count_topk(torch.zeros(2, 2, dtype=torch.int32), counts.long(), 0)
    with pytest.raises(ConfigError, match="backend="):
        count_topk(torch.zeros(2, 2, dtype=torch.int32), counts, 0, backend="cuda")


def test_empty_ids_count_nothing():
    """A pass with zero tokens leaves the counts untouched on every path."""
    counts = torch.zeros(1, 8, dtype=torch.int32)
    count_topk(torch.empty(0, 8, dtype=torch.int32), counts, 0)
    map_and_count(torch.empty(0, 8, dtype=torch.int32), torch.zeros(1, 8, dtype=torch.int32), counts, 0)
    assert not counts.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs a CUDA GPU and triton")
def test_counts_captured_in_a_cuda_graph_keep_counting_on_replay():
    """Both kernels captured in one CUDA graph add their counts again on every replay."""
    gen = torch.Generator().manual_seed(21)
    ids = padded_ids(gen, 37, 8, 257).cuda()
    table = torch.randint(0, 257, (2, 200), generator=gen, dtype=torch.int32).cuda()
    logical = padded_ids(gen, 37, 8, 200).cuda()
    counts = torch.zeros(2, 257, dtype=torch.int32, device="cuda")
    out = torch.empty_like(logical)
    count_topk(ids, counts, 0)  # compile outside capture
    map_and_count(logical, table, counts, 1, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        count_topk(ids, counts, 0)
        map_and_count(logical, table, counts, 1, out=out)
    counts.zero_()
    for _ in range(3):
        graph.replay()
    _, fused_ref = map_and_count_reference(logical.cpu(), table[1].cpu(), 257)
    assert torch.equal(counts[0].cpu().long(), 3 * count_reference(ids, 257))
    assert torch.equal(counts[1].cpu().long(), 3 * fused_ref)
