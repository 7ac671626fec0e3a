"""The split of the ``minmax`` kernels (host side: ``minmax_triton.py``): each replicated
expert's tokens of a pass over its GPUs, solved by one program per layer (the program of
the totals kernel that finishes last, or the split kernel after an exchange) and written
as cumulative quotas. On the dense ``[M, G]`` table, or on the list of replicas
(``MinmaxTables.entries``) for wide tables. Imported lazily: this module needs triton."""

from __future__ import annotations

import triton
import triton.language as tl

from eplb_plugin.kernels import minmax as _tables

# the fields of MinmaxTables.entries, as the kernels read them
ENTRY_ROW: tl.constexpr = tl.constexpr(_tables.ENTRY_ROW)
ENTRY_GPU: tl.constexpr = tl.constexpr(_tables.ENTRY_GPU)
ENTRY_BY_GPU: tl.constexpr = tl.constexpr(_tables.ENTRY_BY_GPU)
ENTRY_GPU_FIRST: tl.constexpr = tl.constexpr(_tables.ENTRY_GPU_FIRST)
ENTRY_GPU_LAST: tl.constexpr = tl.constexpr(_tables.ENTRY_GPU_LAST)
ENTRY_ROW_FIRST: tl.constexpr = tl.constexpr(_tables.ENTRY_ROW_FIRST)
ENTRY_ROW_LAST: tl.constexpr = tl.constexpr(_tables.ENTRY_ROW_LAST)


@triton.jit
def _split(
    c,  # [NB] float32, the pass's tokens per expert (0 past the experts)
    quotas_ptr,  # [BM * BG] float32 output: each replicated expert's cumulative GPU quotas
    scratch_ptr,  # [2 * NB + 2] int32, the layer's scratch: reset once the split is solved
    multi_experts_ptr, multi_gpus_ptr, single_slots_ptr, entries_ptr, multi_entry_ptr,
    num_multi, num_gpus, slots_per_gpu, momentum,
    stop_tokens,  # float: steps stop once the peak is within this of the largest base (-inf: never)
    ITERATIONS: tl.constexpr, NB: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr,
    ENTRIES: tl.constexpr, BE: tl.constexpr,
):
    """The split of ``kernels/minmax.py`` (``minmax_gpu_shares``) in float32: diffusion with
    momentum on the ``[M, G]`` table (with ENTRIES on its list of replicas instead,
    ``_entry_shares``), each step skipped once the peak is within ``stop_tokens`` of the
    largest base (no split goes under it; the host passes -inf where the counts are this
    rank's share of the pass: there the remaining steps still even out the other GPUs, which
    the ranks' sum needs), the last iterate kept unless its peak is above the
    equal split's;
    then the scratch's totals, tickets and done count zeroed (for the assign kernel and the
    next call)."""
    g_idx = tl.arange(0, BG)
    s_idx = tl.arange(0, BS)
    gs_mask = (g_idx[:, None] < num_gpus) & (s_idx[None, :] < slots_per_gpu)
    single = tl.load(single_slots_ptr + g_idx[:, None] * slots_per_gpu + s_idx[None, :], mask=gs_mask, other=-1)
    single_c = tl.reshape(tl.gather(c, tl.reshape(tl.where(single >= 0, single, 0).to(tl.int32), [BG * BS]), 0),
                          [BG, BS])
    base = tl.sum(tl.where(single >= 0, single_c, 0.0), axis=1)
    m_idx = tl.arange(0, BM)
    if ENTRIES:
        shares = _entry_shares(c, base, multi_experts_ptr, entries_ptr, multi_entry_ptr, num_multi, num_gpus,
                               momentum, stop_tokens, ITERATIONS=ITERATIONS, BM=BM, BG=BG, BE=BE)
    else:
        multi = tl.load(multi_experts_ptr + m_idx, mask=m_idx < num_multi, other=-1)
        demand = tl.where(multi >= 0, tl.gather(c, tl.where(multi >= 0, multi, 0).to(tl.int32), 0), 0.0)
        inc = tl.load(multi_gpus_ptr + m_idx[:, None] * num_gpus + g_idx[None, :],
                      mask=(m_idx[:, None] < num_multi) & (g_idx[None, :] < num_gpus), other=0.0)
        degree = tl.maximum(tl.sum(inc, axis=1), 1.0)
        step = inc / tl.maximum(tl.sum(inc, axis=0), 1.0)[None, :]
        equal = inc * (demand / degree)[:, None]
        x = equal
        prev = equal
        load = base + tl.sum(equal, axis=0)
        equal_peak = tl.max(load, axis=0)
        peak = equal_peak
        stop_at = tl.max(base, axis=0) + stop_tokens
        for _ in tl.static_range(ITERATIONS):
            if peak > stop_at:
                level = tl.sum(inc * load[None, :], axis=1) / degree
                y = tl.maximum(x + step * (level[:, None] - load[None, :]), 0.0) * inc
                z = tl.maximum(y + momentum * (y - prev), 0.0) * inc
                z_sum = tl.sum(z, axis=1)
                x = tl.where(z_sum[:, None] > 0, z * (demand / tl.maximum(z_sum, 1e-30))[:, None], equal)
                prev = y
                load = base + tl.sum(x, axis=0)
                peak = tl.max(load, axis=0)
        shares = tl.where(peak <= equal_peak, x, equal)  # never worse than the equal split (peak: load's max)
    tl.store(quotas_ptr + m_idx[:, None] * BG + g_idx[None, :], tl.cumsum(shares, axis=1))
    bins = tl.arange(0, NB)
    tl.store(scratch_ptr + bins, tl.zeros([NB], dtype=tl.int32))
    tl.store(scratch_ptr + NB + bins, tl.zeros([NB], dtype=tl.int32))
    tl.store(scratch_ptr + 2 * NB, 0)


@triton.jit
def _group_sums(v, first, last):
    """Each entry's sum of ``v`` over its group: the entries ``first .. last``, contiguous in
    ``v``'s order ([BE] each)."""
    upto = tl.cumsum(v, axis=0)
    return tl.gather(upto, last, 0) - tl.gather(upto - v, first, 0)


@triton.jit
def _entry_loads(x, base_e, by_gpu, gpu_first, gpu_last):
    """Each entry's GPU load: its GPU's base plus the shares of the entries on that GPU
    (summed in GPU order: ``by_gpu`` lists the entries by GPU)."""
    return base_e + _group_sums(tl.gather(x, by_gpu, 0), gpu_first, gpu_last)


@triton.jit
def _entry_shares(c, base, multi_experts_ptr, entries_ptr, multi_entry_ptr, num_multi, num_gpus, momentum,
                  stop_tokens, ITERATIONS: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr, BE: tl.constexpr):
    """``_split``'s diffusion on the list of replicas (``MinmaxTables.entries``: a
    (replicated expert, GPU) pair per entry) instead of the dense ``[BM, BG]`` table: the
    same steps, with an expert's sums over its entries and a GPU's over its entries taken as
    differences of prefix sums (in the two orders), so a step's work is ``O(BE)``, not
    ``O(BM BG)`` (wide tables: at 72 GPUs the table is ``[32, 128]``, the list 64 entries).
    Returns the shares as the dense ``[BM, BG]`` table (0 where an expert has no replica)."""
    n_idx = tl.arange(0, BE)
    row = tl.load(entries_ptr + ENTRY_ROW * BE + n_idx)
    valid = row >= 0
    gpu = tl.load(entries_ptr + ENTRY_GPU * BE + n_idx).to(tl.int32)
    by_gpu = tl.load(entries_ptr + ENTRY_BY_GPU * BE + n_idx).to(tl.int32)
    gpu_first = tl.load(entries_ptr + ENTRY_GPU_FIRST * BE + n_idx).to(tl.int32)
    gpu_last = tl.load(entries_ptr + ENTRY_GPU_LAST * BE + n_idx).to(tl.int32)
    row_first = tl.load(entries_ptr + ENTRY_ROW_FIRST * BE + n_idx).to(tl.int32)
    row_last = tl.load(entries_ptr + ENTRY_ROW_LAST * BE + n_idx).to(tl.int32)
    expert = tl.load(multi_experts_ptr + tl.where(valid, row, 0), mask=valid, other=0).to(tl.int32)
    demand = tl.where(valid, tl.gather(c, expert, 0), 0.0)
    base_e = tl.gather(base, gpu, 0)
    degree = (row_last - row_first + 1).to(tl.float32)
    step = 1.0 / (gpu_last - gpu_first + 1).to(tl.float32)
    equal = demand / degree
    floor = tl.max(base, axis=0)  # the peak of the GPUs without replicas is their base
    x = equal
    prev = equal
    load = _entry_loads(x, base_e, by_gpu, gpu_first, gpu_last)
    equal_peak = tl.maximum(tl.max(tl.where(valid, load, 0.0), axis=0), floor)
    peak = equal_peak
    for _ in tl.static_range(ITERATIONS):
        if peak > floor + stop_tokens:  # else no step can lower the peak: skip the rest
            level = _group_sums(load, row_first, row_last) / degree
            y = tl.where(valid, tl.maximum(x + step * (level - load), 0.0), 0.0)
            z = tl.maximum(y + momentum * (y - prev), 0.0)
            z_sum = _group_sums(z, row_first, row_last)
            x = tl.where(z_sum > 0, z * (demand / tl.maximum(z_sum, 1e-30)), equal)
            prev = y
            load = _entry_loads(x, base_e, by_gpu, gpu_first, gpu_last)
            peak = tl.maximum(tl.max(tl.where(valid, load, 0.0), axis=0), floor)
    kept = tl.where(peak <= equal_peak, x, equal)  # never worse than the equal split
    m_idx = tl.arange(0, BM)
    g_idx = tl.arange(0, BG)
    entry = tl.load(multi_entry_ptr + m_idx[:, None] * num_gpus + g_idx[None, :],
                    mask=(m_idx[:, None] < num_multi) & (g_idx[None, :] < num_gpus), other=-1)
    picked = tl.reshape(tl.gather(kept, tl.reshape(tl.where(entry >= 0, entry, 0).to(tl.int32), [BM * BG]), 0),
                        [BM, BG])
    return tl.where(entry >= 0, picked, 0.0)
