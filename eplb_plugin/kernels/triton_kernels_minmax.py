"""Triton kernels of the ``minmax`` dispatch (host side: ``minmax_triton.py``). Imported
lazily: this module needs triton. Set ``TRITON_INTERPRET=1`` before it is first imported
to run them on CPU."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def minmax_histogram_kernel(
    ids_ptr,  # [num_ids] int32/int64 logical ids of one layer's (token, choice) pairs; -1 = padding
    hist_ptr,  # [num_tiles, NB] int32 output: pairs per expert in each tile (bin NB - 1: padding)
    num_ids,
    num_experts,
    TILE: tl.constexpr,
    NB: tl.constexpr,  # power of two > num_experts
):
    pid = tl.program_id(0)
    offs = pid * TILE + tl.arange(0, TILE)
    ids = tl.load(ids_ptr + offs, mask=offs < num_ids, other=-1).to(tl.int32)
    ids = tl.where((ids >= 0) & (ids < num_experts), ids, NB - 1)
    tl.store(hist_ptr + pid * NB + tl.arange(0, NB), tl.histogram(ids, NB))


@triton.jit
def minmax_assign_kernel(
    ids_ptr,  # [num_ids] logical ids (as above)
    hist_ptr,  # [num_tiles, NB] int32 from minmax_histogram_kernel
    totals_ptr,  # GLOBAL only: [2 * num_experts] int32, the pass's tokens per expert, then this rank's offsets
    out_ptr,  # [num_ids] int64 output: the physical slot of each pair (-1 for padding)
    counts_ptr,  # COUNT only: [L, P] int32 recorder counts
    counts_offset,  # layer * counts.stride(0)
    multi_experts_ptr,  # [M] int64, replicated experts (-1 = unused)
    multi_gpus_ptr,  # [M, G] float32, 1 where the expert has a replica on the GPU
    single_slots_ptr,  # [G, S] int64, experts on one GPU only (-1 = none)
    multi_row_ptr,  # [E] int64, each expert's row in multi_experts (-1: not replicated)
    slot_on_gpu_ptr,  # [E, G] int64, the expert's first slot on each GPU (-1: none)
    num_ids, num_tiles, iters, num_experts, num_multi, num_gpus, slots_per_gpu, num_slots,
    momentum,
    GLOBAL: tl.constexpr, COUNT: tl.constexpr, ITERATIONS: tl.constexpr, TILE: tl.constexpr,
    NB: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr, NPB: tl.constexpr,
):
    """Every program: the split of the whole pass (the same in all programs), then the slots
    of its tiles ``[pid * iters, (pid + 1) * iters)``. See ``minmax_triton.py``."""
    pid = tl.program_id(0)
    first = pid * iters
    bins = tl.arange(0, NB)
    is_expert = bins < num_experts
    # Step 1: the pass's tokens per expert, and the tokens before this program's first tile.
    total = tl.zeros([NB], dtype=tl.int32)
    before = tl.zeros([NB], dtype=tl.int32)
    for t in range(0, num_tiles):  # (a torch scan over tiles instead was slower: 150 vs 85 us at 16,384 tokens)
        h = tl.load(hist_ptr + t * NB + bins)
        total += h
        before += tl.where(t < first, h, 0)
    if GLOBAL:
        total = tl.load(totals_ptr + bins, mask=is_expert, other=0)
        before += tl.load(totals_ptr + num_experts + bins, mask=is_expert, other=0)
    total = tl.where(is_expert, total, 0)
    c = total.to(tl.float32)
    # Step 2: base load of each GPU (experts on one GPU only) and the replicated experts' demand.
    g_idx = tl.arange(0, BG)
    s_idx = tl.arange(0, BS)
    gs_mask = (g_idx[:, None] < num_gpus) & (s_idx[None, :] < slots_per_gpu)
    single = tl.load(single_slots_ptr + g_idx[:, None] * slots_per_gpu + s_idx[None, :], mask=gs_mask, other=-1)
    single_c = tl.reshape(tl.gather(c, tl.reshape(tl.where(single >= 0, single, 0).to(tl.int32), [BG * BS]), 0),
                          [BG, BS])
    base = tl.sum(tl.where(single >= 0, single_c, 0.0), axis=1)
    m_idx = tl.arange(0, BM)
    multi = tl.load(multi_experts_ptr + m_idx, mask=m_idx < num_multi, other=-1)
    demand = tl.where(multi >= 0, tl.gather(c, tl.where(multi >= 0, multi, 0).to(tl.int32), 0), 0.0)
    inc = tl.load(multi_gpus_ptr + m_idx[:, None] * num_gpus + g_idx[None, :],
                  mask=(m_idx[:, None] < num_multi) & (g_idx[None, :] < num_gpus), other=0.0)
    # Step 3: diffusion with momentum, keeping the iterate with the lowest peak (as minmax_gpu_shares).
    degree = tl.maximum(tl.sum(inc, axis=1), 1.0)
    step = inc / tl.maximum(tl.sum(inc, axis=0), 1.0)[None, :]
    equal = inc * (demand / degree)[:, None]
    x = equal
    prev = equal
    best = equal
    load = base + tl.sum(equal, axis=0)
    best_peak = tl.max(load, axis=0)
    for _ in tl.static_range(ITERATIONS):
        level = tl.sum(inc * load[None, :], axis=1) / degree
        y = tl.maximum(x + step * (level[:, None] - load[None, :]), 0.0) * inc
        y_sum = tl.sum(y, axis=1)
        y = tl.where(y_sum[:, None] > 0, y * (demand / tl.maximum(y_sum, 1e-30))[:, None], equal)
        z = tl.maximum(y + momentum * (y - prev), 0.0) * inc
        z_sum = tl.sum(z, axis=1)
        x = tl.where(z_sum[:, None] > 0, z * (demand / tl.maximum(z_sum, 1e-30))[:, None], y)
        prev = y
        load = base + tl.sum(x, axis=0)
        peak = tl.max(load, axis=0)
        best = tl.where(peak < best_peak, x, best)
        best_peak = tl.minimum(peak, best_peak)
    cumulative = tl.reshape(tl.cumsum(best, axis=1), [BM * BG])  # each expert's GPU quotas, in GPU order
    multi_row = tl.load(multi_row_ptr + bins, mask=is_expert, other=-1).to(tl.int32)
    # Step 4: each pair's rank among its expert's pairs (a sort of the tile), then its GPU and slot.
    lanes = tl.arange(0, TILE)
    running = before
    slot_hist = tl.zeros([NPB], dtype=tl.int32)
    for i in range(0, iters):
        tile_start = (first + i) * TILE
        offs = tile_start + lanes
        ids = tl.load(ids_ptr + offs, mask=offs < num_ids, other=-1).to(tl.int32)
        expert = tl.where((ids >= 0) & (ids < num_experts), ids, NB - 1)
        keys = tl.sort(expert * TILE + lanes)
        s_expert = keys // TILE
        s_lane = keys % TILE
        h = tl.histogram(expert, NB)
        run_start = tl.cumsum(h, 0) - h
        position = (tl.gather(running, s_expert, 0) + lanes - tl.gather(run_start, s_expert, 0)).to(tl.float32)
        running += h
        valid = s_expert < num_experts
        e = tl.where(valid, s_expert, 0)
        row = tl.gather(multi_row, e, 0)
        gpu_mask = valid[:, None] & (g_idx[None, :] < num_gpus)
        gpus = tl.load(slot_on_gpu_ptr + e[:, None] * num_gpus + g_idx[None, :], mask=gpu_mask, other=-1)
        hosted = gpus >= 0
        last = tl.max(tl.where(hosted, g_idx[None, :], -1), axis=1)
        first_gpu = tl.min(tl.where(hosted, g_idx[None, :], BG), axis=1)
        quota = tl.reshape(tl.gather(cumulative, tl.reshape(tl.maximum(row, 0)[:, None] * BG + g_idx[None, :],
                                                            [TILE * BG]), 0), [TILE, BG])
        pick = tl.sum(((quota <= position[:, None] + 0.5) & gpu_mask).to(tl.int32), axis=1)
        pick = tl.where(row >= 0, tl.minimum(pick, last), first_gpu)
        physical = tl.sum(tl.where(g_idx[None, :] == pick[:, None], gpus, 0), axis=1)
        physical = tl.where(valid, physical, -1)
        tl.store(out_ptr + tile_start + s_lane, physical.to(tl.int64), mask=tile_start + s_lane < num_ids)
        if COUNT:
            slot_hist += tl.histogram(tl.where(valid, physical, NPB - 1).to(tl.int32), NPB)
    if COUNT:
        slot_bins = tl.arange(0, NPB)
        tl.atomic_add(counts_ptr + counts_offset + slot_bins, slot_hist,
                      mask=(slot_bins < num_slots) & (slot_hist > 0), sem="relaxed")
