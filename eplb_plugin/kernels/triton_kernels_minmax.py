"""Triton kernels of the ``minmax`` dispatch (host side: ``minmax_triton.py``). Imported
lazily: this module needs triton. Set ``TRITON_INTERPRET=1`` before it is first imported
to run them on CPU.

Scratch of one layer (int32): ``[0, NB)`` the pass's tokens per expert and ``2 NB`` the
programs done, both zero between calls (the split zeroes them after reading); ``[NB, 2 NB)``
each expert's ticket counter (its pairs placed so far), zeroed by the split before the
assign kernel draws from it; ``2 NB + 1`` the layer's epoch, moved on by each call of the
fused kernel when its split is solved."""

from __future__ import annotations

import triton
import triton.language as tl

from eplb_plugin.kernels.triton_kernels_minmax_split import _split


@triton.jit
def _solve(
    total,  # [NB] int32, the pass's tokens per expert (0 past the experts)
    local,  # [NB] int32, this rank's tokens per expert (COUNT only)
    first,  # [NB] int32, each expert's tokens on lower ranks (COUNT only)
    scratch_ptr, quotas_ptr, counts_ptr, counts_offset,
    multi_experts_ptr, multi_gpus_ptr, single_slots_ptr, entries_ptr, multi_entry_ptr, multi_row_ptr,
    slot_on_gpu_ptr, home_slot_ptr,
    num_experts, num_multi, num_gpus, slots_per_gpu, momentum, stop_tokens,
    COUNT: tl.constexpr, ITERATIONS: tl.constexpr, NB: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr,
    BS: tl.constexpr, ENTRIES: tl.constexpr, BE: tl.constexpr,
):
    """The split on ``total`` (``_split``: its quotas written, the scratch zeroed); with
    COUNT, the slots this rank's pairs will take (what the assign kernel chooses for
    positions ``first .. first + local - 1`` of each expert) added to the recorder's counts."""
    m_idx = tl.arange(0, BM)
    g_idx = tl.arange(0, BG)
    bins = tl.arange(0, NB)
    if COUNT:  # the tables the counts need, loaded before the split (their latency hidden by it)
        in_range = bins < num_experts
        row_of = tl.load(multi_row_ptr + bins, mask=in_range, other=0)
        home = tl.load(home_slot_ptr + bins, mask=in_range, other=0)
        multi = tl.load(multi_experts_ptr + m_idx, mask=m_idx < num_multi, other=-1)
        used = multi >= 0
        mi = tl.where(used, multi, 0).to(tl.int32)
        hosted = used[:, None] & (g_idx[None, :] < num_gpus)
        slot = tl.load(slot_on_gpu_ptr + mi[:, None] * num_gpus + g_idx[None, :], mask=hosted, other=-1)
        fallback = tl.load(home_slot_ptr + mi, mask=used, other=0)
        slot = tl.where(slot >= 0, slot, fallback[:, None]).to(tl.int32)
    _split(total.to(tl.float32), quotas_ptr, scratch_ptr, multi_experts_ptr, multi_gpus_ptr, single_slots_ptr,
           entries_ptr, multi_entry_ptr, num_multi, num_gpus, slots_per_gpu, momentum, stop_tokens,
           ITERATIONS=ITERATIONS, NB=NB, BM=BM, BG=BG, BS=BS, ENTRIES=ENTRIES, BE=BE)
    if COUNT:
        tl.debug_barrier()  # the quotas this program stored, read back as the assign kernel reads them
        quota_at = quotas_ptr + m_idx[:, None] * BG + g_idx[None, :]
        # An expert on one GPU: all its pairs at its home slot.
        tl.atomic_add(counts_ptr + counts_offset + home, local,
                      mask=in_range & (row_of < 0) & (local > 0), sem="relaxed")
        # A replicated one: position j goes to the first GPU g with quota[g] <= j + 0.5 false,
        # i.e. j < t[g] = ceil(quota[g] - 0.5) (exact in float32 below 2^22 pairs), the last
        # GPU taking the rest; count positions lo .. hi - 1 below t[g] and not below t[g - 1]
        # (the quotas read again one GPU to the left: a shift in registers would take a
        # [BM, BG, BG] select, 46 KB of stack per thread at 72 GPUs).
        lo = tl.gather(first, mi, 0)[:, None]
        hi = lo + tl.gather(local, mi, 0)[:, None]
        last = g_idx[None, :] == num_gpus - 1
        n = (_positions_below(tl.load(quota_at), last, lo, hi)
             - _positions_below(tl.load(quota_at - 1, mask=g_idx[None, :] > 0, other=0.0), False, lo, hi))
        tl.atomic_add(counts_ptr + counts_offset + slot, n, mask=hosted & (n > 0), sem="relaxed")


@triton.jit
def _positions_below(cum, last, lo, hi):
    """Of positions ``lo .. hi - 1`` of a replicated expert (``[BM, 1]``), how many go to a GPU
    up to each one (``[BM, BG]``): those below ``ceil(cum - 0.5)``, all of them at the ``last``
    GPU. A cumulative quota of 0 (left of the first GPU) gives 0."""
    y = cum - 0.5
    t = y.to(tl.int32)
    t = t + (t.to(tl.float32) < y).to(tl.int32)  # ceil
    t = tl.where(last, hi, t)
    return tl.minimum(tl.maximum(t, lo), hi) - lo


@triton.jit
def _real_pairs(bound_ptr, top_k, num_ids, BOUND: tl.constexpr):
    """The pairs of the batch's real rows: the first ``bound * top_k`` of the ``num_ids``
    (``bound_ptr``: a one-element int tensor, the rows that do not pad the batch, read on
    the device; clamped to ``[0, num_ids]``); all ``num_ids`` without BOUND. Shared by
    every kernel that reads the ids."""
    num_real = num_ids
    if BOUND:
        num_real = tl.minimum(tl.maximum(tl.load(bound_ptr).to(tl.int64) * top_k, 0), num_ids).to(tl.int32)
    return num_real


@triton.jit
def _counted_experts(ids_ptr, offs, num_real, num_experts, NB: tl.constexpr):
    """The experts of the pairs ``offs`` as the totals count them: (each pair's expert, NB - 1
    for one that is not counted (past ``num_real``, or not an expert id) [TILE] int32, and
    whether it is counted). Shared by every kernel that adds totals."""
    ids = tl.load(ids_ptr + offs, mask=offs < num_real, other=-1).to(tl.int32)
    counted = (ids >= 0) & (ids < num_experts)
    return tl.where(counted, ids, NB - 1), counted


@triton.jit
def _add_to_totals(ids, scratch_ptr, num_experts, NB: tl.constexpr):
    """A tile's pairs added to the scratch totals by one vector atomic. ids: [TILE] int32,
    each pair's expert (NB - 1 for padding). Returns (the tile's tokens per expert [NB], the
    totals before the add [NB]: the tile's base per expert, its pairs in tiles whose atomics
    landed earlier). Shared by both totals kernels."""
    bins = tl.arange(0, NB)
    h = tl.histogram(ids, NB)  # (one atomic per pair instead: 27 us more per layer at 16,384 tokens on H100)
    before = tl.atomic_add(scratch_ptr + bins, h, mask=(bins < num_experts) & (h > 0), sem="relaxed")
    return h, before


@triton.jit
def _last_to_finish(scratch_ptr, NB: tl.constexpr):
    """Whether this program is the last of its launch to add its totals (the done count at
    ``2 NB``): that one solves the split. Shared by both totals kernels."""
    tl.debug_barrier()  # every thread's totals are in before this program counts itself done
    done = tl.atomic_add(scratch_ptr + 2 * NB, 1, sem="acq_rel")
    return done == tl.num_programs(0) - 1


@triton.jit
def minmax_totals_kernel(
    ids_ptr,  # [num_ids] int32/int64 logical ids of one layer's (token, choice) pairs; -1 = padding
    bound_ptr,  # BOUND only: [1] int, the batch's real rows (pairs past bound * top_k pad it: not counted)
    scratch_ptr,  # [2 * NB + 2] int32, this layer's scratch (see the module docstring)
    quotas_ptr,  # SPLIT only: [BM * BG] float32 output
    multi_experts_ptr, multi_gpus_ptr, single_slots_ptr, entries_ptr, multi_entry_ptr,
    num_ids, top_k, num_experts, num_multi, num_gpus, slots_per_gpu, momentum, stop_tokens,
    SPLIT: tl.constexpr, BOUND: tl.constexpr, ITERATIONS: tl.constexpr, TILE: tl.constexpr, NB: tl.constexpr,
    BM: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr, ENTRIES: tl.constexpr, BE: tl.constexpr,
):
    """One program per tile: the tile's tokens per expert added to the scratch totals. With
    SPLIT, the program that finishes last solves the split on the totals, writes the quotas
    and zeroes totals and counters for the assign kernel and the next call."""
    pid = tl.program_id(0)
    offs = pid * TILE + tl.arange(0, TILE)
    ids, _ = _counted_experts(ids_ptr, offs, _real_pairs(bound_ptr, top_k, num_ids, BOUND), num_experts, NB)
    _add_to_totals(ids, scratch_ptr, num_experts, NB)
    if SPLIT:
        if _last_to_finish(scratch_ptr, NB):
            total = tl.load(scratch_ptr + tl.arange(0, NB), volatile=True)
            _split(total.to(tl.float32), quotas_ptr, scratch_ptr, multi_experts_ptr, multi_gpus_ptr,
                   single_slots_ptr, entries_ptr, multi_entry_ptr, num_multi, num_gpus, slots_per_gpu, momentum,
                   stop_tokens, ITERATIONS=ITERATIONS, NB=NB, BM=BM, BG=BG, BS=BS, ENTRIES=ENTRIES, BE=BE)


@triton.jit
def minmax_split_kernel(
    totals_ptr,  # [num_experts] int32, the pass's tokens per expert over all ranks
    offsets_ptr,  # COUNT only: [num_experts] int32, each expert's tokens on lower ranks
    scratch_ptr,  # [2 * NB + 2] int32, this layer's scratch (this rank's totals): zeroed here
    quotas_ptr,  # [BM * BG] float32 output
    counts_ptr, counts_offset,  # COUNT only: [L, P] int32 recorder counts, layer * stride
    multi_experts_ptr, multi_gpus_ptr, single_slots_ptr, entries_ptr, multi_entry_ptr, multi_row_ptr,
    slot_on_gpu_ptr, home_slot_ptr,
    num_experts, num_multi, num_gpus, slots_per_gpu, momentum, stop_tokens,
    COUNT: tl.constexpr, ITERATIONS: tl.constexpr, NB: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr,
    BS: tl.constexpr, ENTRIES: tl.constexpr, BE: tl.constexpr,
):
    """One program: the split on counts exchanged between ranks (a totals kernel without
    SPLIT ran first), with COUNT this rank's slots counted (``_solve``), then the scratch
    zeroed. Shared by both kernel sets (the ticket kernels count in their assign kernel)."""
    bins = tl.arange(0, NB)
    in_range = bins < num_experts
    total = tl.load(totals_ptr + bins, mask=in_range, other=0)
    if COUNT:
        local = tl.load(scratch_ptr + bins, mask=in_range, other=0)
        first = tl.load(offsets_ptr + bins, mask=in_range, other=0)
    else:  # not read by _solve
        local = total
        first = total
    _solve(total, local, first, scratch_ptr, quotas_ptr, counts_ptr, counts_offset, multi_experts_ptr,
           multi_gpus_ptr, single_slots_ptr, entries_ptr, multi_entry_ptr, multi_row_ptr, slot_on_gpu_ptr,
           home_slot_ptr, num_experts, num_multi, num_gpus, slots_per_gpu, momentum, stop_tokens, COUNT=COUNT,
           ITERATIONS=ITERATIONS, NB=NB, BM=BM, BG=BG, BS=BS, ENTRIES=ENTRIES, BE=BE)


@triton.jit
def _place_pairs(e, valid, split, row, position, g_idx, quotas_ptr, slot_on_gpu_ptr, home_slot_ptr, out_ptr, offs,
                 num_ids, num_gpus, BG: tl.constexpr, SEARCH: tl.constexpr):
    """Stores and returns the slot of each pair, given its expert ``e`` and, for a pair of a
    replicated expert (``split``, its row ``row``), its ``position`` among the expert's
    pairs of the pass: an expert on one GPU takes its home slot; a replicated one the first
    GPU whose cumulative quota exceeds the position, at the expert's first slot there;
    an id that is not an expert (-1) gives -1; a valid pair that is not ``split`` (a
    padding row's, too) its home slot. That GPU is found by comparing the position with the
    whole row of quotas ([pairs, BG] loaded), or with SEARCH by a binary search of the row
    (log2 BG loads a pair: for wide tables). Shared by both assign kernels."""
    home = tl.load(home_slot_ptr + e, mask=valid, other=-1)
    value = position.to(tl.float32) + 0.5
    row_at = quotas_ptr + tl.maximum(row, 0) * BG
    if SEARCH:
        # The quotas of a row do not decrease along it, so the GPUs whose quota is at most
        # the value come first: halve the range each step (past the last GPU: infinite).
        pick = tl.zeros_like(row)
        for i in tl.static_range(BG.bit_length() - 1):
            probe = pick + ((BG >> (i + 1)) - 1)
            quota = tl.load(row_at + probe, mask=split & (probe < num_gpus), other=float("inf"))
            pick = tl.where(quota <= value, probe + 1, pick)
    else:
        quota = tl.load(row_at[:, None] + g_idx[None, :], mask=split[:, None] & (g_idx[None, :] < num_gpus),
                        other=float("inf"))
        pick = tl.sum((quota <= value[:, None]).to(tl.int32), axis=1)
    chosen = tl.load(slot_on_gpu_ptr + e * num_gpus + tl.minimum(pick, num_gpus - 1), mask=split, other=-1)
    physical = tl.where(split & (chosen >= 0), chosen, home)  # (a float tie past the last quota: home)
    physical = tl.where(valid, physical, -1)
    tl.store(out_ptr + offs, physical.to(out_ptr.dtype.element_ty), mask=offs < num_ids)
    return physical


@triton.jit
def _assign_tile(ids_ptr, offs, num_real, scratch_ptr, quotas_ptr, offsets_ptr, out_ptr, multi_row_ptr,
                 slot_on_gpu_ptr, home_slot_ptr, g_idx, num_ids, num_experts, num_gpus, GLOBAL: tl.constexpr,
                 COUNT: tl.constexpr, NB: tl.constexpr, BG: tl.constexpr, NPB: tl.constexpr, SEARCH: tl.constexpr):
    """The tile ``offs`` of pairs placed (a ticket each for a replicated expert's pair, as
    ``minmax_assign_kernel`` says) and stored. Returns those real pairs' slots as an [NPB]
    histogram with COUNT (zeros without). A pair at or past ``num_real`` pads the batch: it
    takes no ticket and is not counted. Shared by both ticket assign kernels."""
    ids = tl.load(ids_ptr + offs, mask=offs < num_ids, other=-1)
    valid = (ids >= 0) & (ids < num_experts)
    e = tl.where(valid, ids, 0).to(tl.int32)
    real = valid & (offs < num_real)
    row = tl.load(multi_row_ptr + e, mask=real, other=-1).to(tl.int32)
    split = real & (row >= 0)
    # One ticket per pair (measured slower on H100 at 512 and 16,384 tokens: a ticket per
    # expert per tile, ranked by a sort of the tile or by a scan of its [tile, M] one-hot).
    position = tl.atomic_add(scratch_ptr + NB + e, 1, mask=split, sem="relaxed")
    if GLOBAL:
        position += tl.load(offsets_ptr + e, mask=split, other=0)
    physical = _place_pairs(e, valid, split, row, position, g_idx, quotas_ptr, slot_on_gpu_ptr, home_slot_ptr,
                            out_ptr, offs, num_ids, num_gpus, BG, SEARCH)
    if COUNT:
        return tl.histogram(tl.where(real, physical, NPB - 1).to(tl.int32), NPB)
    return tl.zeros([NPB], dtype=tl.int32)


@triton.jit
def _add_slot_counts(slot_hist, counts_ptr, counts_offset, num_slots, COUNT: tl.constexpr, NPB: tl.constexpr):
    """With COUNT, a program's slot histogram added to the recorder's counts (one vector
    atomic). Shared by both ticket assign kernels."""
    if COUNT:
        slot_bins = tl.arange(0, NPB)
        tl.atomic_add(counts_ptr + counts_offset + slot_bins, slot_hist,
                      mask=(slot_bins < num_slots) & (slot_hist > 0), sem="relaxed")


@triton.jit
def minmax_assign_kernel(
    ids_ptr,  # [num_ids] logical ids (as above)
    bound_ptr,  # BOUND only: [1] int, the batch's real rows (a padding row's pair: its home slot, not counted)
    scratch_ptr,  # [2 * NB + 2] int32, this layer's scratch: the ticket counters at NB
    quotas_ptr,  # [BM * BG] float32 from the split
    offsets_ptr,  # GLOBAL only: [num_experts] int32, each expert's pairs on lower ranks
    out_ptr,  # [num_ids] int32/int64 output: the physical slot of each pair (-1 for padding)
    counts_ptr,  # COUNT only: [L, P] int32 recorder counts
    counts_offset,  # layer * counts.stride(0)
    multi_row_ptr,  # [E] int64, each expert's row in multi_experts (-1: not replicated)
    slot_on_gpu_ptr,  # [E, G] int64, the expert's first slot on each GPU (-1: none)
    home_slot_ptr,  # [E] int64, a slot of each expert (its only GPU's first, when on one GPU)
    num_ids, top_k, iters, num_experts, num_gpus, num_slots,
    GLOBAL: tl.constexpr, COUNT: tl.constexpr, BOUND: tl.constexpr, TILE: tl.constexpr, NB: tl.constexpr,
    BG: tl.constexpr, NPB: tl.constexpr, SEARCH: tl.constexpr,
):
    """Each program over tiles ``[pid * iters, (pid + 1) * iters)``: a pair of a replicated
    expert draws a ticket (its expert's counter, atomically: the tickets of one expert are
    0 .. n - 1 in some order), plus the expert's pairs on lower ranks with GLOBAL, and goes
    to the first GPU whose cumulative quota exceeds that position, at the expert's first
    slot there; a pair of an expert held on one GPU goes to its first slot there."""
    pid = tl.program_id(0)
    g_idx = tl.arange(0, BG)
    lanes = tl.arange(0, TILE)
    slot_hist = tl.zeros([NPB], dtype=tl.int32)
    num_real = _real_pairs(bound_ptr, top_k, num_ids, BOUND)
    for i in range(0, iters):
        slot_hist += _assign_tile(ids_ptr, (pid * iters + i) * TILE + lanes, num_real, scratch_ptr, quotas_ptr,
                                  offsets_ptr, out_ptr, multi_row_ptr, slot_on_gpu_ptr, home_slot_ptr, g_idx, num_ids,
                                  num_experts, num_gpus, GLOBAL=GLOBAL, COUNT=COUNT, NB=NB, BG=BG, NPB=NPB,
                                  SEARCH=SEARCH)
    _add_slot_counts(slot_hist, counts_ptr, counts_offset, num_slots, COUNT=COUNT, NPB=NPB)


@triton.jit
def minmax_fused_kernel(
    ids_ptr,  # [num_ids] logical ids (as above)
    bound_ptr,  # BOUND only: [1] int, the batch's real rows
    scratch_ptr,  # [2 * NB + 2] int32, this layer's scratch (see the module docstring)
    quotas_ptr,  # [BM * BG] float32, written by the split and read back in this launch
    out_ptr,  # [num_ids] int32/int64 output (as the assign kernel's)
    counts_ptr, counts_offset,  # COUNT only: [L, P] int32 recorder counts, layer * stride
    multi_experts_ptr, multi_gpus_ptr, single_slots_ptr, entries_ptr, multi_entry_ptr, multi_row_ptr,
    slot_on_gpu_ptr, home_slot_ptr,
    num_ids, top_k, iters, num_experts, num_multi, num_gpus, slots_per_gpu, num_slots, momentum, stop_tokens,
    COUNT: tl.constexpr, BOUND: tl.constexpr, ITERATIONS: tl.constexpr, TILE: tl.constexpr, NB: tl.constexpr,
    BM: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr, NPB: tl.constexpr, SEARCH: tl.constexpr,
    ENTRIES: tl.constexpr, BE: tl.constexpr,
):
    """The totals, the split and the assign in one launch (passes seen whole: no exchange).
    Each program counts its tiles ``[pid * iters, (pid + 1) * iters)`` into the totals;
    the last to finish solves the split (``_split``: quotas written, totals, tickets and the
    done count zeroed) and moves the layer's epoch on; the others wait for the epoch to
    move (so every program of the grid must be resident at once: the host keeps the grid
    at most one program per SM), then each places its tiles' pairs as the assign kernel
    does. The epoch is read before the program counts itself done, so it is the one the
    last program moves on; no reset is needed between calls."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, TILE)
    bins = tl.arange(0, NB)
    epoch_ptr = scratch_ptr + 2 * NB + 1
    epoch = tl.load(epoch_ptr, volatile=True)
    num_real = _real_pairs(bound_ptr, top_k, num_ids, BOUND)
    h = tl.zeros([NB], dtype=tl.int32)
    for i in range(0, iters):
        ids, _ = _counted_experts(ids_ptr, (pid * iters + i) * TILE + lanes, num_real, num_experts, NB)
        h += tl.histogram(ids, NB)
    tl.atomic_add(scratch_ptr + bins, h, mask=(bins < num_experts) & (h > 0), sem="relaxed")
    if _last_to_finish(scratch_ptr, NB):
        total = tl.load(scratch_ptr + bins, volatile=True)
        _split(total.to(tl.float32), quotas_ptr, scratch_ptr, multi_experts_ptr, multi_gpus_ptr, single_slots_ptr,
               entries_ptr, multi_entry_ptr, num_multi, num_gpus, slots_per_gpu, momentum, stop_tokens,
               ITERATIONS=ITERATIONS, NB=NB, BM=BM, BG=BG, BS=BS, ENTRIES=ENTRIES, BE=BE)
        tl.debug_barrier()  # every thread's quotas and zeroed tickets are in before the epoch moves
        tl.atomic_xchg(epoch_ptr, epoch + 1, sem="release")
    else:
        while tl.load(epoch_ptr, volatile=True) == epoch:
            pass
        tl.atomic_add(epoch_ptr, 0, sem="acquire")  # the split's writes are seen from here on
    tl.debug_barrier()
    g_idx = tl.arange(0, BG)
    slot_hist = tl.zeros([NPB], dtype=tl.int32)
    for i in range(0, iters):
        slot_hist += _assign_tile(ids_ptr, (pid * iters + i) * TILE + lanes, num_real, scratch_ptr, quotas_ptr,
                                  scratch_ptr, out_ptr, multi_row_ptr, slot_on_gpu_ptr, home_slot_ptr, g_idx, num_ids,
                                  num_experts, num_gpus, GLOBAL=False, COUNT=COUNT, NB=NB, BG=BG, NPB=NPB,
                                  SEARCH=SEARCH)
    _add_slot_counts(slot_hist, counts_ptr, counts_offset, num_slots, COUNT=COUNT, NPB=NPB)
