"""Triton kernels of the ``minmax`` dispatch for large passes (host side:
``minmax_triton.py``, which takes them above ``SMALL_PASS_IDS`` pairs): the per-pair
ticket atomics of ``triton_kernels_minmax`` replaced by per-chunk bases. Imported lazily:
this module needs triton. Set ``TRITON_INTERPRET=1`` before it is first imported to run
them on CPU.

The scratch of one layer is the one of ``triton_kernels_minmax`` (``[2 NB + 1]`` int32):
``[0, NB)`` the pass's tokens per expert and ``2 NB`` the programs done, zero between calls
(the split zeroes them); the ticket counters ``[NB, 2 NB)`` are not used here. The split,
the totals' atomic and the placement are ``triton_kernels_minmax``'s helpers, and with counts
exchanged between ranks its ``minmax_split_kernel`` (with COUNT) solves the split."""

from __future__ import annotations

import triton
import triton.language as tl

from eplb_plugin.kernels.triton_kernels_minmax import (
    _add_to_totals,
    _counted_experts,
    _last_to_finish,
    _place_pairs,
    _real_pairs,
    _solve,
)


@triton.jit
def bases_totals_kernel(
    ids_ptr,  # [num_ids] int32/int64 logical ids of one layer's (token, choice) pairs; -1 = padding
    bound_ptr,  # BOUND only: [1] int, the batch's real rows (pairs past bound * top_k pad it: not counted)
    scratch_ptr,  # [2 * NB + 2] int32, this layer's scratch (see the module docstring)
    bases_ptr,  # [num_tiles * TILE / SUB * BM] int32 output: each replicated expert's pairs before each chunk
    quotas_ptr,  # SPLIT only: [BM * BG] float32 output
    counts_ptr, counts_offset,  # SPLIT and COUNT only: [L, P] int32 recorder counts, layer * stride
    multi_experts_ptr, multi_gpus_ptr, single_slots_ptr, entries_ptr, multi_entry_ptr, multi_row_ptr,
    slot_on_gpu_ptr, home_slot_ptr,
    num_ids, top_k, num_experts, num_multi, num_gpus, slots_per_gpu, momentum, stop_tokens,
    SPLIT: tl.constexpr, COUNT: tl.constexpr, BOUND: tl.constexpr, ITERATIONS: tl.constexpr, TILE: tl.constexpr, SUB: tl.constexpr,
    NB: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr, ENTRIES: tl.constexpr, BE: tl.constexpr,
):
    """One program per tile: the tile's tokens per expert added to the scratch totals by one
    vector atomic, whose old values are the tile's base for each expert (its pairs in tiles
    whose atomics landed earlier); plus each replicated expert's pairs in the tile's chunks
    of SUB pairs before each chunk (a histogram keyed by chunk and expert, scanned over the
    chunks), stored as each chunk's bases for the assign kernel. With SPLIT, the program
    that finishes last solves the split on the totals (``_solve``)."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, TILE)
    offs = pid * TILE + lanes
    ids, valid = _counted_experts(ids_ptr, offs, _real_pairs(bound_ptr, top_k, num_ids, BOUND), num_experts, NB)
    row = tl.load(multi_row_ptr + ids, mask=valid, other=-1).to(tl.int32)
    h, before = _add_to_totals(ids, scratch_ptr, num_experts, NB)
    CHUNKS: tl.constexpr = TILE // SUB
    key = tl.where(row >= 0, (lanes // SUB) * BM + row, CHUNKS * BM)  # (chunk, row); the rest past the chunks
    per_chunk = tl.reshape(tl.histogram(key, 2 * CHUNKS * BM), [2 * CHUNKS, BM])
    m_idx = tl.arange(0, BM)
    multi = tl.load(multi_experts_ptr + m_idx, mask=m_idx < num_multi, other=-1)
    tile_base = tl.gather(tl.where(h > 0, before, 0), tl.where(multi >= 0, multi, 0).to(tl.int32), 0)
    chunk_base = tile_base[None, :] + tl.cumsum(per_chunk, axis=0) - per_chunk
    c_idx = tl.arange(0, 2 * CHUNKS)
    tl.store(bases_ptr + (pid * CHUNKS + c_idx[:, None]) * BM + m_idx[None, :], chunk_base,
             mask=(c_idx[:, None] < CHUNKS) & (m_idx[None, :] < BM))
    if SPLIT:
        if _last_to_finish(scratch_ptr, NB):
            total = tl.load(scratch_ptr + tl.arange(0, NB), volatile=True)
            _solve(total, total, tl.zeros([NB], dtype=tl.int32), scratch_ptr, quotas_ptr, counts_ptr, counts_offset,
                   multi_experts_ptr, multi_gpus_ptr, single_slots_ptr, entries_ptr, multi_entry_ptr, multi_row_ptr,
                   slot_on_gpu_ptr, home_slot_ptr, num_experts, num_multi, num_gpus, slots_per_gpu, momentum, stop_tokens,
                   COUNT=COUNT, ITERATIONS=ITERATIONS, NB=NB, BM=BM, BG=BG, BS=BS, ENTRIES=ENTRIES, BE=BE)


@triton.jit
def bases_assign_kernel(
    ids_ptr,  # [num_ids] logical ids (as above)
    bound_ptr,  # BOUND only: [1] int, the batch's real rows (a padding row's pair: its home slot)
    bases_ptr,  # [num_chunks * BM] int32 from the totals kernel
    quotas_ptr,  # [BM * BG] float32 from the split
    offsets_ptr,  # GLOBAL only: [num_experts] int32, each expert's pairs on lower ranks
    out_ptr,  # [num_ids] int32/int64 output: the physical slot of each pair (-1 for padding)
    multi_row_ptr,  # [E] int64, each expert's row in multi_experts (-1: not replicated)
    slot_on_gpu_ptr,  # [E, G] int64, the expert's first slot on each GPU (-1: none)
    home_slot_ptr,  # [E] int64, a slot of each expert (its only GPU's first, when on one GPU)
    num_ids, top_k, num_experts, num_gpus,
    GLOBAL: tl.constexpr, BOUND: tl.constexpr, SUB: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr,
    SEARCH: tl.constexpr,
):
    """One program per chunk of SUB pairs: the position of a pair of a replicated expert
    among its expert's pairs is the chunk's base (from the totals kernel) plus the expert's
    pairs before it in the chunk (a scan of the chunk's [SUB, M] one-hot), plus the
    expert's pairs on lower ranks with GLOBAL; it goes to the first GPU whose cumulative
    quota exceeds that position, at the expert's first slot there; a pair of an expert held
    on one GPU goes to its home slot. No atomics: every chunk is independent."""
    pid = tl.program_id(0)
    g_idx = tl.arange(0, BG)
    m_idx = tl.arange(0, BM)
    offs = pid * SUB + tl.arange(0, SUB)
    base = tl.load(bases_ptr + pid * BM + m_idx)  # each replicated expert's pairs before this chunk
    ids = tl.load(ids_ptr + offs, mask=offs < num_ids, other=-1)
    valid = (ids >= 0) & (ids < num_experts)
    e = tl.where(valid, ids, 0).to(tl.int32)
    real = valid
    if BOUND:  # a padding row's pair has no position
        real = valid & (offs < _real_pairs(bound_ptr, top_k, num_ids, BOUND))
    row = tl.load(multi_row_ptr + e, mask=real, other=-1).to(tl.int32)
    split = real & (row >= 0)
    hot = (row[:, None] == m_idx[None, :]).to(tl.int32)  # [SUB, BM]
    position = tl.sum(hot * (tl.cumsum(hot, axis=0) - 1 + base[None, :]), axis=1)
    if GLOBAL:
        position += tl.load(offsets_ptr + e, mask=split, other=0)
    _place_pairs(e, valid, split, row, position, g_idx, quotas_ptr, slot_on_gpu_ptr, home_slot_ptr, out_ptr, offs,
                 num_ids, num_gpus, BG, SEARCH)
