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


@triton.jit
def dynamic_dispatch_kernel(
    ids_ptr,  # [num_ids] int32/int64 logical ids of one layer's (token, choice) pairs; -1 = padding
    l2p_ptr,  # [num_experts, width] int64: this layer's replicas of each expert (-1 = none)
    out_ptr,  # [num_ids] int64 output: the physical slot of each pair (-1 for padding)
    quota_ptr,  # [BE * BX] float32 scratch: cumulative replica quotas of each expert
    num_ids,
    num_experts,
    width,  # X, replicas listed per expert
    num_local,  # slots per GPU (slot // num_local = its GPU)
    num_gpus,
    ITERATIONS: tl.constexpr,  # water-filling steps
    BLOCK: tl.constexpr,  # pairs per loop step
    BE: tl.constexpr,  # power of two >= num_experts
    BX: tl.constexpr,  # power of two >= width
):
    """``ExpertDispatcher``'s ``dynamic`` algorithm for one layer in one program: count each
    expert's pairs, water-fill its replicas' shares so that this pass's GPU loads even out,
    then send the j-th pair of expert e (in pair order) to the replica whose cumulative
    quota (shares x e's pairs) first exceeds j. The same arithmetic as the torch path, in
    float32; sums run in another order, so a pair sitting exactly on a quota boundary may
    land on the neighbouring replica."""
    e_idx = tl.arange(0, BE)
    x_idx = tl.arange(0, BX)
    lanes = tl.arange(0, BLOCK)
    # 1. Pairs per expert.
    tokens = tl.zeros([BE], dtype=tl.float32)
    for start in range(0, num_ids, BLOCK):
        offs = start + lanes
        ids = tl.load(ids_ptr + offs, mask=offs < num_ids, other=-1).to(tl.int32)
        hit = ids[:, None] == e_idx[None, :]
        tokens += tl.sum(hit.to(tl.float32), axis=0)
    # 2. The replica table and equal shares.
    xmask = x_idx < width
    l2p = tl.load(l2p_ptr + e_idx[:, None] * width + x_idx[None, :],
                  mask=(e_idx < num_experts)[:, None] & xmask[None, :], other=-1).to(tl.int32)  # int32 tiles: fewer registers
    listed = l2p >= 0
    count = tl.sum(listed.to(tl.float32), axis=1)
    shares = tl.where(listed, 1.0 / tl.maximum(count, 1.0)[:, None], 0.0)
    slot_gpu = tl.where(listed, l2p // num_local, -1)
    # 3. Water-filling: scale each replica's share by how far its GPU sits below the mean
    #    load its expert sees, then renormalize.
    for _ in tl.static_range(ITERATIONS):
        contrib = shares * tokens[:, None]
        load_at = tl.zeros([BE, BX], dtype=tl.float32)
        for gpu in range(0, num_gpus):
            on_gpu = slot_gpu == gpu
            gpu_load = tl.sum(tl.sum(tl.where(on_gpu, contrib, 0.0), axis=1), axis=0)
            load_at = tl.where(on_gpu, gpu_load, load_at)
        load_at = tl.maximum(load_at, 1.0)
        mean_at = tl.sum(shares * load_at, axis=1)
        shares = tl.where(listed, shares * (mean_at[:, None] / load_at), 0.0)
        shares = shares / tl.maximum(tl.sum(shares, axis=1), 1e-12)[:, None]
    quota = tl.cumsum(shares, axis=1) * tokens[:, None]
    tl.store(quota_ptr + e_idx[:, None] * BX + x_idx[None, :], quota)
    tl.debug_barrier()  # the loads below read other threads' stores
    # 4. Each pair's rank among its expert's pairs, then its replica.
    running = tl.zeros([BE], dtype=tl.int32)
    for start in range(0, num_ids, BLOCK):
        offs = start + lanes
        inside = offs < num_ids
        ids = tl.load(ids_ptr + offs, mask=inside, other=-1).to(tl.int32)
        valid = (ids >= 0) & (ids < num_experts)
        hit = (ids[:, None] == e_idx[None, :]).to(tl.int32)
        before = tl.cumsum(hit, axis=0) - hit + running[None, :]  # earlier pairs of the same expert
        position = tl.sum(hit * before, axis=1).to(tl.float32)
        running += tl.sum(hit, axis=0)
        expert = tl.where(valid, ids, 0)
        q = tl.load(quota_ptr + expert[:, None] * BX + x_idx[None, :])
        row = tl.load(l2p_ptr + expert[:, None] * width + x_idx[None, :], mask=xmask[None, :], other=-1).to(tl.int32)
        replicas = tl.sum((row >= 0).to(tl.int32), axis=1)
        pick = tl.sum(((q <= position[:, None] + 0.5) & xmask[None, :]).to(tl.int32), axis=1)
        pick = tl.minimum(pick, replicas - 1)
        physical = tl.sum(tl.where(x_idx[None, :] == pick[:, None], row, 0), axis=1)
        tl.store(out_ptr + offs, tl.where(valid, physical, -1).to(tl.int64), mask=inside)
