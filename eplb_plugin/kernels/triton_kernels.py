"""Triton kernels for expert counting. Imported lazily: this module needs triton.

Both kernels build a private histogram per program (``tl.histogram`` over a block of ids,
accumulated over ``iters`` blocks) and then issue one atomic add per non-empty slot per
program, so hot slots do not serialize on one address the way one-atomic-per-id does.
Invalid ids (``-1`` padding, or anything outside ``[0, num_slots)``) land in the last bin,
``NUM_BINS - 1 >= num_slots``, which is never written back.

Set ``TRITON_INTERPRET=1`` before this module is first imported to run them on CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def count_topk_kernel(
    topk_ids_ptr,  # [num_ids] int32/int64, physical slot ids; -1 = padding
    counts_ptr,  # [L, P] int32, row `row_offset` is this layer's row
    row_offset,  # layer * counts.stride(0), in elements
    num_ids,  # T * k
    num_slots,  # P
    iters,  # blocks of BLOCK ids each program reads
    BLOCK: tl.constexpr,
    NUM_BINS: tl.constexpr,  # power of two > num_slots (the last bin is the trash bin)
):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    hist = tl.zeros([NUM_BINS], dtype=tl.int32)
    for i in range(0, iters):
        offs = (pid * iters + i) * BLOCK + lanes
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_ids, other=-1).to(tl.int32)
        ids = tl.where((ids >= 0) & (ids < num_slots), ids, NUM_BINS - 1)
        hist += tl.histogram(ids, NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    tl.atomic_add(counts_ptr + row_offset + bins, hist, mask=(bins < num_slots) & (hist > 0), sem="relaxed")


@triton.jit
def map_and_count_kernel(
    logical_ids_ptr,  # [num_ids] int32/int64, logical expert ids; -1 = padding
    table_ptr,  # [L, E] int32/int64 dispatch table: physical slot of each logical expert
    table_offset,  # layer * table.stride(0), in elements
    physical_ids_ptr,  # [num_ids] output, same dtype as the input ids; -1 stays -1
    counts_ptr,  # [L, P] int32
    row_offset,  # layer * counts.stride(0)
    num_ids,
    num_logical,  # E
    num_slots,  # P
    iters,
    BLOCK: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    hist = tl.zeros([NUM_BINS], dtype=tl.int32)
    for i in range(0, iters):
        offs = (pid * iters + i) * BLOCK + lanes
        in_range = offs < num_ids
        logical = tl.load(logical_ids_ptr + offs, mask=in_range, other=-1)
        valid = (logical >= 0) & (logical < num_logical)
        physical = tl.load(table_ptr + table_offset + logical, mask=valid, other=-1)
        tl.store(physical_ids_ptr + offs, physical, mask=in_range)
        slot = physical.to(tl.int32)
        slot = tl.where((slot >= 0) & (slot < num_slots), slot, NUM_BINS - 1)
        hist += tl.histogram(slot, NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    tl.atomic_add(counts_ptr + row_offset + bins, hist, mask=(bins < num_slots) & (hist > 0), sem="relaxed")
