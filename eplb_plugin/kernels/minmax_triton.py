"""The ``minmax`` dispatch of one layer as two Triton kernels (three with counts exchanged
between ranks), CUDA-graph safe.

1. ``minmax_totals_kernel`` (one program per tile of ``TOTALS_TILE`` pairs):
   each tile's tokens per expert added atomically to the layer's scratch totals. The
   program that finishes last (a counter in the scratch) solves the small ``[M, G]`` split
   of ``kernels/minmax.py`` on the totals (the same diffusion steps, in float32) and
   writes each replicated expert's cumulative GPU quotas. With an ``exchange`` (several
   ranks, ``--ep-dispatch-counts global``) the totals go through it instead and
   ``minmax_split_kernel`` (one program, shared with the kernels of large passes) solves
   the split on the pass's counts.
2. ``minmax_assign_kernel`` (up to ``MAX_PROGRAMS`` programs over tiles): a pair of a
   replicated expert takes a ticket from its expert's counter (atomic: one expert's tickets
   are 0 .. n - 1 in some order) and goes to the first GPU whose cumulative quota exceeds
   it (plus the expert's pairs on lower ranks), at the expert's first slot there, as
   ``minmax_choose``; a pair of an expert on one GPU goes to its ``home_slot``. It adds the chosen slots to the recorder's ``[L, P]`` counts in the
   same launch (one atomic per slot per program).

The split is solved once per layer (not again in every program), and tickets replace
ranking each tile's pairs by a sort (a ticket per expert per tile, ranked by a sort or by a
scan, measured slower on an H100; see ``minmax_assign_kernel``). Which pair of
an expert gets which ticket depends on the order the atomics land, so two runs may send
different pairs of one expert to different replicas, but the tokens each slot serves (and
the recorder's counts) are the same every run and on every rank. The torch path of
``ExpertDispatcher`` is the reference; float32 sums in another order may move a pair that
sits exactly on a quota boundary to the neighbouring replica.

The scratch (``MinmaxScratch``, per layer) carries counters from kernel to kernel: the split
zeroes the totals after reading them and resets the tickets before the assign, so calls of
one layer must not overlap (one stream per dispatcher).

Passes of more than ``SMALL_PASS_IDS`` pairs take the kernels of
``triton_kernels_minmax_bases`` instead (H100, per layer in a CUDA graph: 16,384 tokens
x top-8, the bases 22.7-23.0 us, the tickets 31-35 us; 512 tokens, the tickets 9.5-10.0 us,
the bases 10.9-11.9 us): no atomic per pair. The totals
kernel's atomic on the totals returns each tile's base per expert, and a histogram keyed by
(chunk, replicated expert) gives each chunk of ``CHUNK`` pairs its bases, stored per call;
the assign kernel (one program per chunk, no loop, no atomics) ranks a chunk's pairs of
one expert by a scan of the chunk's one-hot; the split's program adds the recorder's counts
from the quotas (the pairs each slot gets follow from the totals and the quotas alone).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from eplb_plugin.kernels._launch import MAX_PROGRAMS, _next_pow2, check_ids, check_out_dtype
from eplb_plugin.kernels.minmax import MINMAX_ITERATIONS, MINMAX_MOMENTUM, MinmaxTables

# this rank's [E] int32 counts -> (the pass's [E] counts, tokens on lower ranks [E]), int32 (the
# dtype the kernels read: another is converted, one more op); collective
CountExchange = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]

# Launch settings, the fastest measured on an H100 inside a CUDA graph (58 layers; 512 and
# 16,384 tokens x top-8 onto 288 slots at EP8): benchmarks/profile_minmax_kernels.py,
# results in benchmarks/results/NVIDIA_H100_80GB_HBM3/minmax_kernel_settings_*.json.
ASSIGN_TILE_ELEMENTS = 1024  # elements of the assign kernel's [tile, G] per-pair tables
MIN_TILE = 32
MAX_TILE = 1024
TOTALS_TILE = 1024  # pairs one program of the totals kernel counts...
SMALL_TOTALS_TILE = 256  # ...and in passes of up to SMALL_PASS_IDS pairs (more programs, shorter)
SMALL_PASS_IDS = 8192
NUM_WARPS = 4  # the assign kernel's warps
SPLIT_WARPS = 4  # the totals / split kernels' warps (1: 2x slower split; 2 and 8: slower too)
CHUNK = 64  # large passes: pairs of one assign program (128: 23.3 us at 16,384 tokens, 64: 22.8)

class MinmaxScratch(NamedTuple):
    """Per-layer state of the kernels: ``counters`` [L, 2 NB + 1] int32 (totals, tickets,
    programs done; see ``triton_kernels_minmax``), ``quotas`` [L, BM * BG] float32 (written
    by the split, read by the assign)."""

    counters: torch.Tensor
    quotas: torch.Tensor


def _sizes(tables: MinmaxTables) -> tuple[int, int, int]:
    """(NB, BM, BG): the kernels' padded widths for ``tables``."""
    num_experts = tables.multi_row.shape[1]
    num_multi, num_gpus = tables.multi_gpus.shape[1:]
    return _next_pow2(num_experts + 1), _next_pow2(num_multi), _next_pow2(num_gpus)


def minmax_scratch(tables: MinmaxTables) -> MinmaxScratch:
    """Zeroed scratch for ``tables`` (on their device); keep it with the tables (its shape
    depends only on their widths, so it outlives placements copied in place)."""
    nb, bm, bg = _sizes(tables)
    num_layers = tables.multi_row.shape[0]
    device = tables.multi_row.device
    return MinmaxScratch(torch.zeros(num_layers, 2 * nb + 1, dtype=torch.int32, device=device),
                         torch.zeros(num_layers, bm * bg, dtype=torch.float32, device=device))


def minmax_dispatch_triton(
    topk_ids: torch.Tensor, tables: MinmaxTables, *, layer: int, num_slots: int,
    scratch: MinmaxScratch | None = None, exchange: CountExchange | None = None,
    counts_out: torch.Tensor | None = None, num_warps: int = NUM_WARPS, split_warps: int = SPLIT_WARPS,
    iterations: int = MINMAX_ITERATIONS, assign_tile_elements: int = ASSIGN_TILE_ELEMENTS,
    totals_tile: int | None = None, chunk: int = CHUNK, bases: bool | None = None,
    num_valid_rows: torch.Tensor | None = None, out_dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """topk_ids: [T, k] int32/int64 logical ids (-1 = padding) of this rank's tokens.
    tables: the dispatcher's ``MinmaxTables`` (all layers); num_slots: P. Returns [T, k]
    physical slots (-1 kept) of ``out_dtype`` (int64 or int32, written by the kernels). scratch: from ``minmax_scratch(tables)``, kept by the
    caller across calls (None: a fresh one, for one-off calls). exchange: with several
    ranks, how this rank's [E] int32 counts become the pass's counts and its offsets, int32
    (``ExpertDispatcher.pass_counts``, collective); None = this rank's tokens only.
    counts_out: optional [L, P] int32 recorder buffer; this call's slots are added to its
    row ``layer``. num_warps / split_warps / iterations / assign_tile_elements /
    totals_tile (None: by the pass's size) / chunk: launch and split settings (the
    benchmarks vary them; the defaults are the measured best). bases: the kernels of large
    passes (True), the ticket kernels (False), or by the pass's size (None).
    num_valid_rows: optional one-element int tensor on the ids' device, read by the kernels:
    rows at or past it pad the batch (a CUDA graph's fixed size), left out of the split, the
    exchange's counts and ``counts_out``; their pairs get their expert's home slot
    (``tables.home_slot``; -1 stays -1)."""
    from eplb_plugin.kernels import triton_kernels_minmax as k

    check_ids("topk_ids", topk_ids)
    check_out_dtype(out_dtype)
    if scratch is None:
        scratch = minmax_scratch(tables)
    num_experts = tables.multi_row.shape[1]
    num_multi, num_gpus = tables.multi_gpus.shape[1:]
    slots_per_gpu = tables.single_slots.shape[2]
    nb, bm, bg = _sizes(tables)
    bs = _next_pow2(slots_per_gpu)
    flat = topk_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    num_ids = flat.numel()
    top_k = num_ids // topk_ids.shape[0] if topk_ids.dim() > 1 and topk_ids.shape[0] else 1
    bounded = num_valid_rows is not None
    bound = num_valid_rows if num_valid_rows is not None else flat  # unused pointer without a bound
    counters, quotas = scratch.counters[layer], scratch.quotas[layer]
    split_tables = (tables.multi_experts[layer], tables.multi_gpus[layer], tables.single_slots[layer])
    glob = exchange is not None
    if totals_tile is None:
        totals_tile = SMALL_TOTALS_TILE if num_ids <= SMALL_PASS_IDS else TOTALS_TILE
    if bases if bases is not None else num_ids > SMALL_PASS_IDS:
        return _dispatch_bases(flat, tables, layer=layer, counters=counters, quotas=quotas, exchange=exchange,
                               bound=bound, bounded=bounded, top_k=top_k, counts_out=counts_out, num_warps=num_warps, split_warps=split_warps,
                               iterations=iterations, totals_tile=totals_tile, chunk=chunk,
                               out_dtype=out_dtype).view(topk_ids.shape)
    k.minmax_totals_kernel[(max(1, -(-num_ids // totals_tile)),)](
        flat, bound, counters, quotas, *split_tables, num_ids, top_k, num_experts, num_multi, num_gpus, slots_per_gpu,
        MINMAX_MOMENTUM, SPLIT=not glob, BOUND=bounded, ITERATIONS=iterations, TILE=totals_tile, NB=nb, BM=bm, BG=bg, BS=bs,
        num_warps=split_warps,
    )
    offsets = counters  # unused pointer without an exchange
    if glob:
        total, offset = exchange(counters[:num_experts])  # int32 in and out: no conversion
        offsets = offset.to(torch.int32)
        k.minmax_split_kernel[(1,)](
            total.to(torch.int32), offsets, counters, quotas, counters, 0, *split_tables, tables.multi_row[layer],
            tables.slot_on_gpu[layer], tables.home_slot[layer], num_experts, num_multi, num_gpus, slots_per_gpu,
            MINMAX_MOMENTUM, COUNT=False, ITERATIONS=iterations, NB=nb, BM=bm, BG=bg, BS=bs, num_warps=split_warps,
        )
    tile = max(MIN_TILE, min(MAX_TILE, assign_tile_elements // bg))  # [tile, G] per-pair tables stay small
    num_tiles = max(1, -(-num_ids // tile))
    iters = -(-num_tiles // MAX_PROGRAMS)
    programs = -(-num_tiles // iters)
    out = torch.empty(num_ids, dtype=out_dtype, device=flat.device)
    counts = counts_out if counts_out is not None else out  # unused pointer when not counting
    k.minmax_assign_kernel[(programs,)](
        flat, bound, counters, quotas, offsets, out, counts,
        layer * (counts_out.stride(0) if counts_out is not None else 0),
        tables.multi_row[layer], tables.slot_on_gpu[layer], tables.home_slot[layer],
        num_ids, top_k, iters, num_experts, num_gpus, num_slots,
        GLOBAL=glob, COUNT=counts_out is not None, BOUND=bounded, TILE=tile, NB=nb, BG=bg, NPB=_next_pow2(num_slots + 1),
        num_warps=num_warps,
    )
    return out.view(topk_ids.shape)


def _dispatch_bases(
    flat: torch.Tensor, tables: MinmaxTables, *, layer: int, counters: torch.Tensor, quotas: torch.Tensor,
    exchange: CountExchange | None, bound: torch.Tensor, bounded: bool, top_k: int,
    counts_out: torch.Tensor | None, num_warps: int, split_warps: int,
    iterations: int, totals_tile: int, chunk: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """``minmax_dispatch_triton`` by the kernels of ``triton_kernels_minmax_bases`` (flat
    ids, this layer's scratch); returns the flat slots."""
    from eplb_plugin.kernels import triton_kernels_minmax as shared
    from eplb_plugin.kernels import triton_kernels_minmax_bases as k

    num_experts = tables.multi_row.shape[1]
    num_multi, num_gpus = tables.multi_gpus.shape[1:]
    slots_per_gpu = tables.single_slots.shape[2]
    nb, bm, bg = _sizes(tables)
    bs = _next_pow2(slots_per_gpu)
    num_ids = flat.numel()
    place_tables = (tables.multi_experts[layer], tables.multi_gpus[layer], tables.single_slots[layer],
                    tables.multi_row[layer], tables.slot_on_gpu[layer], tables.home_slot[layer])
    glob = exchange is not None
    count = counts_out is not None
    counts = counts_out if counts_out is not None else counters  # unused pointer when not counting
    counts_offset = layer * counts_out.stride(0) if counts_out is not None else 0
    chunk = min(chunk, totals_tile)
    num_tiles = max(1, -(-num_ids // totals_tile))
    bases = torch.empty(num_tiles * (totals_tile // chunk) * bm, dtype=torch.int32, device=flat.device)
    k.bases_totals_kernel[(num_tiles,)](
        flat, bound, counters, bases, quotas, counts, counts_offset, *place_tables, num_ids, top_k, num_experts,
        num_multi, num_gpus, slots_per_gpu, MINMAX_MOMENTUM, SPLIT=not glob, COUNT=count and not glob, BOUND=bounded,
        ITERATIONS=iterations,
        TILE=totals_tile, SUB=chunk, NB=nb, BM=bm, BG=bg, BS=bs, num_warps=split_warps,
    )
    offsets = counters  # unused pointer without an exchange
    if glob:
        assert exchange is not None
        total, offset = exchange(counters[:num_experts])  # int32 in and out: no conversion
        offsets = offset.to(torch.int32)
        shared.minmax_split_kernel[(1,)](
            total.to(torch.int32), offsets, counters, quotas, counts, counts_offset, *place_tables, num_experts,
            num_multi, num_gpus, slots_per_gpu, MINMAX_MOMENTUM, COUNT=count, ITERATIONS=iterations, NB=nb, BM=bm,
            BG=bg, BS=bs, num_warps=split_warps,
        )
    out = torch.empty(num_ids, dtype=out_dtype, device=flat.device)
    k.bases_assign_kernel[(max(1, -(-num_ids // chunk)),)](
        flat, bound, bases, quotas, offsets, out, tables.multi_row[layer], tables.slot_on_gpu[layer],
        tables.home_slot[layer], num_ids, top_k, num_experts, num_gpus,
        GLOBAL=glob, BOUND=bounded, SUB=chunk, BM=bm, BG=bg, num_warps=num_warps,
    )
    return out
