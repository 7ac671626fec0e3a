"""The ``minmax`` dispatch of one layer as two Triton kernels (three with counts exchanged
between ranks), CUDA-graph safe.

1. ``minmax_totals_kernel`` (one program per tile of ``TOTALS_TILE`` pairs):
   each tile's tokens per expert added atomically to the layer's scratch totals. The
   program that finishes last (a counter in the scratch) solves the small ``[M, G]`` split
   of ``kernels/minmax.py`` on the totals (the same diffusion steps, in float32) and
   writes each replicated expert's cumulative GPU quotas (past ``ENTRIES_MIN_GPUS`` GPUs
   the steps run on the list of replicas, ``MinmaxTables.entries``, not the dense table:
   ``_entry_shares``). With an ``exchange`` (several
   ranks, ``--ep-dispatch-counts global``) the totals go through it instead and
   ``minmax_split_kernel`` (one program, shared with the kernels of large passes) solves
   the split on the pass's counts.
2. ``minmax_assign_kernel`` (up to ``MAX_PROGRAMS`` programs over tiles): a pair of a
   replicated expert takes a ticket from its expert's counter (atomic: one expert's tickets
   are 0 .. n - 1 in some order) and goes to the first GPU whose cumulative quota exceeds
   it (plus the expert's pairs on lower ranks), at the expert's first slot there, as
   ``minmax_choose``; a pair of an expert on one GPU goes to its ``home_slot``. It adds the chosen slots to the recorder's ``[L, P]`` counts in the
   same launch (one atomic per slot per program).

With ``fused`` (``FUSED``; small passes without an exchange) both are one launch,
``minmax_fused_kernel``: at most one program per SM counts its tiles, the last to finish
solves the split and moves the layer's epoch on, the others wait for it and then place
their tiles' pairs. It saves a launch; its programs must all be resident at once.

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
one layer must not overlap (one stream per dispatcher). It also keeps each layer's launch
arguments (the tables' and its own rows, the widths), and the grids are cached per pass size
(``_geometry``), so a call does little Python work beyond the launches.

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

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from eplb_plugin.kernels._launch import MAX_PROGRAMS, _next_pow2, check_ids, check_out_dtype
from eplb_plugin.kernels.minmax import (
    MINMAX_MOMENTUM,
    MINMAX_STOP_TOKENS,
    MinmaxTables,
    minmax_iterations,
)

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
NUM_WARPS = 4  # the ticket assign (and fused) kernels' warps (2: 10.3-10.5 against 9.5 us at 512 tokens, EP8)
BASES_ASSIGN_WARPS = 2  # the large passes' assign kernel's warps (a program per chunk of 64 pairs), and...
BASES_SEARCH = True  # ...a binary search of the quotas there (H100, 16,384 tokens, 8 steps at EP8: 18.2 us against
# 20.4 with 4 warps and the full comparison, 20.5 with 4 warps and the search; EP16 23.1 / 25.7, EP32 27.0 / 29.5,
# EP48 24.0 / 27.0, EP72 27.7 / 30.7: profile_minmax_kernels.py --warps-sweep)
SPLIT_WARPS = 4  # the totals / split kernels' warps (1: 2x slower split; 2 and 8: slower too; at 72 GPUs,
# where the [32, 128] table in 4 warps spills, 16 warps were slower still: 63 against 46 us at 512 tokens)
CHUNK = 64  # large passes: pairs of one assign program (128: 23.3 us at 16,384 tokens, 64: 22.8)
FUSED = True  # small passes without an exchange: totals, split and assign in one launch (H100, in a graph:
# 9.28 us against 9.55 / 9.81 at 512 tokens, 10.46 against 10.78 at 1,024; eager calls 42.5 against 62-67 us)
SEARCH_MIN_GPUS = 33  # tables of this many GPUs or more: the ticket kernels (small passes) search the quotas too
# (H100, 512 tokens: the same at EP8 to EP72; the large passes' assign always searches, BASES_SEARCH; before it took
# 2 warps, searching at 16,384 tokens and 16 steps gave EP72 65 against 95 us, EP48 40 against 47, EP16/32 the same)
ENTRIES_MIN_GPUS = 33  # tables of this many GPUs or more: the split on the list of replicas (``entries=``; H100,
# 8 steps, 512 / 16,384 tokens: EP72 14.5 against 26.9 us / 30.8 against 47.2, EP48 13.4 against 14.7 / 26.6 against
# 30.0; slower up to 32 GPUs, its step ~0.6 us whatever the GPUs: EP32 12.8 against 11.7, EP8 12.1 against 9.4)
FUSED_MAX_PROGRAMS = 128  # the fused kernel's programs, at most (and at most one per SM: they wait for each other)

class _LayerArgs(NamedTuple):
    """One layer's kernel arguments, made once per (tables, layer) and kept in its scratch:
    the rows of the tables and of the scratch (views: tables copied in place stay valid),
    and the widths the kernels take."""

    tables: MinmaxTables  # whose rows these are (a call with other tables makes its own)
    counters: torch.Tensor
    quotas: torch.Tensor
    totals: torch.Tensor  # counters[:num_experts], what an exchange gathers
    split: tuple[torch.Tensor, ...]  # multi_experts, multi_gpus, single_slots, entries, multi_entry rows
    place: tuple[torch.Tensor, ...]  # multi_row, slot_on_gpu, home_slot rows
    num_experts: int
    num_multi: int
    num_gpus: int
    slots_per_gpu: int
    nb: int
    bm: int
    bg: int
    bs: int
    be: int  # the entries' width
    iterations: int  # the split's default steps (``minmax_iterations`` of the tables' GPUs)
    search: bool  # the ticket kernels' default: a binary search of the quotas (``SEARCH_MIN_GPUS``)
    entries: bool  # the split's default: on the list of replicas (``ENTRIES_MIN_GPUS``)


class MinmaxScratch:
    """Per-layer state of the kernels: ``counters`` [L, 2 NB + 2] int32 (totals, tickets,
    programs done, the fused kernel's epoch; see ``triton_kernels_minmax``), ``quotas``
    [L, BM * BG] float32 (written by the split, read by the assign); plus each layer's
    launch arguments, made on its first call (``layer_args``), so a call (eager, or one a
    CUDA graph captures) does little Python work."""

    __slots__ = ("counters", "quotas", "_layers")

    def __init__(self, counters: torch.Tensor, quotas: torch.Tensor) -> None:
        self.counters = counters
        self.quotas = quotas
        self._layers: dict[int, _LayerArgs] = {}

    def layer_args(self, tables: MinmaxTables, layer: int) -> _LayerArgs:
        """The kernel arguments of ``layer`` of ``tables`` (cached per layer for these tables)."""
        args = self._layers.get(layer)
        if args is None or args.tables is not tables:
            args = self._layers[layer] = _make_layer_args(tables, layer, self)
        return args


def _sizes(tables: MinmaxTables) -> tuple[int, int, int]:
    """(NB, BM, BG): the kernels' padded widths for ``tables``."""
    num_experts = tables.multi_row.shape[1]
    num_multi, num_gpus = tables.multi_gpus.shape[1:]
    return _next_pow2(num_experts + 1), _next_pow2(num_multi), _next_pow2(num_gpus)


def _make_layer_args(tables: MinmaxTables, layer: int, scratch: MinmaxScratch) -> _LayerArgs:
    if tables.entries.shape[2] == 0:
        raise ValueError("minmax tables built with entries=False (for the torch split alone) cannot run the "
                         "kernels: build them with build_minmax_tables(..., entries=True)")
    nb, bm, bg = _sizes(tables)
    num_multi, num_gpus = tables.multi_gpus.shape[1:]
    slots_per_gpu = tables.single_slots.shape[2]
    return _LayerArgs(
        tables, scratch.counters[layer], scratch.quotas[layer], scratch.counters[layer, :tables.multi_row.shape[1]],
        (tables.multi_experts[layer], tables.multi_gpus[layer], tables.single_slots[layer], tables.entries[layer],
         tables.multi_entry[layer]),
        (tables.multi_row[layer], tables.slot_on_gpu[layer], tables.home_slot[layer]),
        tables.multi_row.shape[1], num_multi, num_gpus, slots_per_gpu, nb, bm, bg, _next_pow2(slots_per_gpu),
        tables.entries.shape[2], minmax_iterations(num_gpus), num_gpus >= SEARCH_MIN_GPUS,
        num_gpus >= ENTRIES_MIN_GPUS,
    )


def minmax_scratch(tables: MinmaxTables) -> MinmaxScratch:
    """Zeroed scratch for ``tables`` (on their device); keep it with the tables (its shape
    depends only on their widths, so it outlives placements copied in place)."""
    nb, bm, bg = _sizes(tables)
    num_layers = tables.multi_row.shape[0]
    device = tables.multi_row.device
    return MinmaxScratch(torch.zeros(num_layers, 2 * nb + 2, dtype=torch.int32, device=device),
                         torch.zeros(num_layers, bm * bg, dtype=torch.float32, device=device))


class _Geometry(NamedTuple):
    """The grids and tiles of one call's launches (``_geometry``)."""

    bases: bool  # the kernels of large passes
    fused: bool  # the ticket kernels as one launch (minmax_fused_kernel)
    totals_grid: tuple[int]
    totals_tile: int
    assign_grid: tuple[int]
    tile: int  # the ticket assign (or fused) kernel's pairs per loop step
    iters: int  # its loop steps per program
    chunk: int  # the bases assign kernel's pairs per program
    bases_numel: int  # its per-chunk bases buffer


@functools.lru_cache(maxsize=4096)
def _geometry(num_ids: int, bm: int, bg: int, bases: bool | None, totals_tile: int | None, chunk: int,
              assign_tile_elements: int, fused_programs: int) -> _Geometry:
    """Launch geometry for ``num_ids`` pairs (cached: a server sees few batch sizes).
    fused_programs: the fused kernel's most programs (0: the ticket kernels as two launches)."""
    use_bases = bases if bases is not None else num_ids > SMALL_PASS_IDS
    if totals_tile is None:
        totals_tile = SMALL_TOTALS_TILE if num_ids <= SMALL_PASS_IDS else TOTALS_TILE
    num_tiles = max(1, -(-num_ids // totals_tile))
    if use_bases:
        chunk = min(chunk, totals_tile)
        return _Geometry(True, False, (num_tiles,), totals_tile, (max(1, -(-num_ids // chunk)),), 0, 0, chunk,
                         num_tiles * (totals_tile // chunk) * bm)
    tile = max(MIN_TILE, min(MAX_TILE, assign_tile_elements // bg))  # [tile, G] per-pair tables stay small
    assign_tiles = max(1, -(-num_ids // tile))
    iters = -(-assign_tiles // (fused_programs or MAX_PROGRAMS))
    return _Geometry(False, fused_programs > 0, (num_tiles,), totals_tile, (-(-assign_tiles // iters),), tile, iters,
                     chunk, 0)


@functools.cache
def _resident_programs(device: torch.device) -> int:
    """How many programs of the fused kernel may run at once on ``device`` for sure: one
    per SM on CUDA (its programs wait for each other), one in the interpreter (which runs
    programs one after another)."""
    if device.type != "cuda":
        return 1
    return min(FUSED_MAX_PROGRAMS, torch.cuda.get_device_properties(device).multi_processor_count)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The kernel modules (imported on first use: they need triton)."""
    from eplb_plugin.kernels import triton_kernels_minmax, triton_kernels_minmax_bases

    return triton_kernels_minmax, triton_kernels_minmax_bases


def minmax_dispatch_triton(
    topk_ids: torch.Tensor, tables: MinmaxTables, *, layer: int, num_slots: int,
    scratch: MinmaxScratch | None = None, exchange: CountExchange | None = None,
    counts_out: torch.Tensor | None = None, num_warps: int | None = None, split_warps: int = SPLIT_WARPS,
    iterations: int | None = None, assign_tile_elements: int = ASSIGN_TILE_ELEMENTS,
    totals_tile: int | None = None, chunk: int = CHUNK, bases: bool | None = None,
    num_valid_rows: torch.Tensor | None = None, out_dtype: torch.dtype = torch.int64, fused: bool | None = None,
    search: bool | None = None, entries: bool | None = None, whole_pass: bool = False,
) -> torch.Tensor:
    """topk_ids: [T, k] int32/int64 logical ids (-1 = padding) of this rank's tokens.
    tables: the dispatcher's ``MinmaxTables`` (all layers); num_slots: P. Returns [T, k]
    physical slots (-1 kept) of ``out_dtype`` (int64 or int32, written by the kernels).
    scratch: from ``minmax_scratch(tables)``, kept by the caller across calls (None: a fresh
    one, for one-off calls). exchange: with several ranks, how this rank's [E] int32 counts
    become the pass's counts and its offsets, int32 (``ExpertDispatcher.pass_counts``,
    collective); None = this rank's tokens only. counts_out: optional [L, P] int32 recorder
    buffer; this call's slots are added to its row ``layer``. num_warps / split_warps /
    iterations / assign_tile_elements / totals_tile (None: by the pass's size) / chunk:
    launch and split settings (the benchmarks vary them; the defaults are the measured
    best; iterations None: ``minmax_iterations`` of the tables' GPUs). bases: the kernels
    of large passes (True), the ticket kernels (False), or by the pass's size (None).
    num_valid_rows: optional one-element int tensor on the ids' device, read by the
    kernels: rows at or past it pad the batch (a CUDA graph's fixed size), left out of the
    split, the exchange's counts and ``counts_out``; their pairs get their
    expert's home slot (``tables.home_slot``; -1 stays -1). fused: the ticket kernels as
    one launch (``minmax_fused_kernel``; None: ``FUSED``), for passes they take without an
    exchange. search: the assign's binary search of the quotas; entries: the split on the
    list of replicas (``MinmaxTables.entries``) instead of the dense table (None: by the
    tables' GPUs, ``SEARCH_MIN_GPUS`` / ``ENTRIES_MIN_GPUS``; the large passes' assign
    searches whatever the GPUs, ``BASES_SEARCH``). num_warps None: ``NUM_WARPS`` for the
    ticket kernels, ``BASES_ASSIGN_WARPS`` for the large passes' assign. whole_pass: without
    an exchange, this rank's tokens are the whole pass (every rank routes every token): the
    split then stops once no step can lower the peak (``MINMAX_STOP_TOKENS``), as it always
    does on exchanged counts; on a rank's share of the pass it takes every step."""
    check_ids("topk_ids", topk_ids)
    check_out_dtype(out_dtype)
    if scratch is None:
        scratch = minmax_scratch(tables)
    a = scratch.layer_args(tables, layer)
    if iterations is None:
        iterations = a.iterations
    if entries is None:
        entries = a.entries
    flat = topk_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    num_ids = flat.numel()
    glob = exchange is not None
    stop_tokens = MINMAX_STOP_TOKENS if glob or whole_pass else float("-inf")
    fused_programs = _resident_programs(flat.device) if (FUSED if fused is None else fused) and not glob else 0
    geo = _geometry(num_ids, a.bm, a.bg, bases, totals_tile, chunk, assign_tile_elements, fused_programs)
    top_k = topk_ids.shape[-1] if topk_ids.dim() > 1 else 1
    bounded = num_valid_rows is not None
    bound = num_valid_rows if num_valid_rows is not None else flat  # unused pointer without a bound
    count = counts_out is not None
    counts = counts_out if counts_out is not None else a.counters  # unused pointer when not counting
    counts_offset = layer * counts_out.stride(0) if counts_out is not None else 0
    out = torch.empty(topk_ids.shape, dtype=out_dtype, device=flat.device)
    k, kb = _kernels()
    if geo.bases:
        bases_buf = torch.empty(geo.bases_numel, dtype=torch.int32, device=flat.device)
        kb.bases_totals_kernel[geo.totals_grid](
            flat, bound, a.counters, bases_buf, a.quotas, counts, counts_offset, *a.split, *a.place, num_ids, top_k,
            a.num_experts, a.num_multi, a.num_gpus, a.slots_per_gpu, MINMAX_MOMENTUM, stop_tokens, SPLIT=not glob,
            COUNT=count and not glob, BOUND=bounded, ITERATIONS=iterations, TILE=geo.totals_tile, SUB=geo.chunk,
            NB=a.nb, BM=a.bm, BG=a.bg, BS=a.bs, ENTRIES=entries, BE=a.be, num_warps=split_warps,
        )
        offsets = _split_on_exchange(k, a, exchange, counts, counts_offset, count=count, iterations=iterations,
                                     entries=entries, split_warps=split_warps,
                                     stop_tokens=stop_tokens) if glob else a.counters  # (unused)
        kb.bases_assign_kernel[geo.assign_grid](
            flat, bound, bases_buf, a.quotas, offsets, out, *a.place, num_ids, top_k, a.num_experts, a.num_gpus,
            GLOBAL=glob, BOUND=bounded, SUB=geo.chunk, BM=a.bm, BG=a.bg, SEARCH=BASES_SEARCH if search is None else search,
            num_warps=BASES_ASSIGN_WARPS if num_warps is None else num_warps,
        )
        return out
    if search is None:
        search = a.search
    if num_warps is None:
        num_warps = NUM_WARPS
    if geo.fused:
        k.minmax_fused_kernel[geo.assign_grid](
            flat, bound, a.counters, a.quotas, out, counts, counts_offset, *a.split, *a.place, num_ids, top_k,
            geo.iters, a.num_experts, a.num_multi, a.num_gpus, a.slots_per_gpu, num_slots, MINMAX_MOMENTUM, stop_tokens,
            COUNT=count, BOUND=bounded, ITERATIONS=iterations, TILE=geo.tile, NB=a.nb, BM=a.bm, BG=a.bg, BS=a.bs,
            NPB=_next_pow2(num_slots + 1), SEARCH=search, ENTRIES=entries, BE=a.be, num_warps=num_warps,
        )
        return out
    k.minmax_totals_kernel[geo.totals_grid](
        flat, bound, a.counters, a.quotas, *a.split, num_ids, top_k, a.num_experts, a.num_multi, a.num_gpus,
        a.slots_per_gpu, MINMAX_MOMENTUM, stop_tokens, SPLIT=not glob, BOUND=bounded, ITERATIONS=iterations,
        TILE=geo.totals_tile, NB=a.nb, BM=a.bm, BG=a.bg, BS=a.bs, ENTRIES=entries, BE=a.be, num_warps=split_warps,
    )
    # the ticket kernels count in their assign kernel, so the split (with an exchange) does not
    offsets = _split_on_exchange(k, a, exchange, counts, counts_offset, count=False, iterations=iterations,
                                 entries=entries, split_warps=split_warps,
                                 stop_tokens=stop_tokens) if glob else a.counters  # (unused pointer)
    k.minmax_assign_kernel[geo.assign_grid](
        flat, bound, a.counters, a.quotas, offsets, out, counts, counts_offset, *a.place, num_ids, top_k, geo.iters,
        a.num_experts, a.num_gpus, num_slots, GLOBAL=glob, COUNT=count, BOUND=bounded, TILE=geo.tile, NB=a.nb,
        BG=a.bg, NPB=_next_pow2(num_slots + 1), SEARCH=search, num_warps=num_warps,
    )
    return out


def _split_on_exchange(k: Any, a: _LayerArgs, exchange: CountExchange, counts: torch.Tensor, counts_offset: int, *,
                       count: bool, iterations: int, entries: bool, split_warps: int,
                       stop_tokens: float) -> torch.Tensor:
    """This rank's totals (the scratch's, int32) through ``exchange``, then the split on the
    pass's counts (``minmax_split_kernel``, counting this rank's slots with ``count``).
    Returns the [E] int32 offsets the assign kernels read."""
    total, offsets = exchange(a.totals)  # int32 in and out: no conversion
    k.minmax_split_kernel[(1,)](
        total, offsets, a.counters, a.quotas, counts, counts_offset, *a.split, *a.place,
        a.num_experts, a.num_multi, a.num_gpus, a.slots_per_gpu, MINMAX_MOMENTUM, stop_tokens, COUNT=count,
        ITERATIONS=iterations, NB=a.nb, BM=a.bm, BG=a.bg, BS=a.bs, ENTRIES=entries, BE=a.be, num_warps=split_warps,
    )
    return offsets
