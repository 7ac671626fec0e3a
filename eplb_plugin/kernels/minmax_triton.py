"""The ``minmax`` dispatch of one layer as two multi-program Triton kernels.

1. ``minmax_histogram_kernel`` (one program per tile of up to ``MAX_TILE`` pairs): each tile's
   per-expert counts into a ``[num_tiles, NB]`` scratch.
2. ``minmax_assign_kernel`` (up to ``MAX_PROGRAMS`` programs, each over consecutive tiles):
   every program sums the tile counts (the pass's per-expert tokens, and the tokens before
   its first tile), solves the same small ``[M, G]`` split as ``kernels/minmax.py`` (the
   same diffusion steps, in float32), then ranks each pair among its expert's pairs by a
   sort of its tile and picks the GPU whose cumulative quota first exceeds that rank (and
   the expert's first slot there), as ``minmax_choose``.
   It adds the chosen slots to the recorder's ``[L, P]`` counts in the same launch (one
   atomic per slot per program).

Both are CUDA-graph safe (no host reads; the scratch and output come from the caching
allocator, which a capture serves from its private pool) and deterministic: every program
runs the same arithmetic in the same order, so all programs (and all ranks) agree. The
torch path of ``ExpertDispatcher`` is the reference; float32 sums in another order may move
a pair that sits exactly on a quota boundary to the neighbouring replica.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from eplb_plugin.kernels._launch import MAX_PROGRAMS, _next_pow2, check_ids
from eplb_plugin.kernels.minmax import MINMAX_ITERATIONS, MINMAX_MOMENTUM, MinmaxTables

# this rank's [E] counts -> (the pass's [E] counts, tokens on lower ranks [E]); collective
CountExchange = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]

MAX_TILE = 256  # pairs ranked together by one sort
MIN_TILE = 32
TILE_ELEMENTS = 2048  # elements of the [tile, G] per-pair tables of one step
NUM_WARPS = 8  # H100, 512 tokens: 8 warps 17.8 us a layer, 4 warps 22.2, 2 warps 37.3, 1 warp 80


def minmax_dispatch_triton(
    topk_ids: torch.Tensor, tables: MinmaxTables, *, layer: int, num_slots: int,
    exchange: CountExchange | None = None, counts_out: torch.Tensor | None = None,
    num_warps: int = NUM_WARPS, iterations: int = MINMAX_ITERATIONS,
) -> torch.Tensor:
    """topk_ids: [T, k] int32/int64 logical ids (-1 = padding) of this rank's tokens.
    tables: the dispatcher's ``MinmaxTables`` (all layers); num_slots: P. Returns [T, k]
    int64 physical slots (-1 kept). exchange: with several ranks, how this rank's [E] counts
    become the pass's counts and its offsets (``ExpertDispatcher.pass_counts``, collective);
    None = this rank's tokens only. counts_out: optional [L, P] int32 recorder buffer; this
    call's slots are added to its row ``layer``.
    num_warps / iterations: launch and split settings (the benchmark varies them; the
    defaults are the measured best)."""
    from eplb_plugin.kernels import triton_kernels_minmax as k

    check_ids("topk_ids", topk_ids)
    num_experts = tables.multi_row.shape[1]
    num_multi, num_gpus = tables.multi_gpus.shape[1:]
    slots_per_gpu = tables.single_slots.shape[2]
    bg = _next_pow2(num_gpus)
    tile = max(MIN_TILE, min(MAX_TILE, TILE_ELEMENTS // bg))  # [tile, G] per-pair tables stay small
    flat = topk_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    num_ids = flat.numel()
    num_tiles = max(1, -(-num_ids // tile))
    nb = _next_pow2(num_experts + 1)  # one bin past the experts for padding
    hist = torch.empty(num_tiles * nb, dtype=torch.int32, device=flat.device)
    k.minmax_histogram_kernel[(num_tiles,)](flat, hist, num_ids, num_experts, TILE=tile, NB=nb)
    glob = exchange is not None
    totals = hist
    if glob:
        local = hist.view(num_tiles, nb).sum(0, dtype=torch.int32)[:num_experts].long()
        total, offset = exchange(local)
        totals = torch.cat([total, offset]).to(torch.int32)
    iters = -(-num_tiles // MAX_PROGRAMS)
    programs = -(-num_tiles // iters)
    out = torch.empty(num_ids, dtype=torch.int64, device=flat.device)
    counts = counts_out if counts_out is not None else out  # unused pointer when not counting
    k.minmax_assign_kernel[(programs,)](
        flat, hist, totals, out, counts, layer * (counts_out.stride(0) if counts_out is not None else 0),
        tables.multi_experts[layer], tables.multi_gpus[layer], tables.single_slots[layer],
        tables.multi_row[layer], tables.slot_on_gpu[layer],
        num_ids, num_tiles, iters, num_experts, num_multi, num_gpus, slots_per_gpu, num_slots, MINMAX_MOMENTUM,
        GLOBAL=glob, COUNT=counts_out is not None, ITERATIONS=iterations, TILE=tile, NB=nb,
        BM=_next_pow2(num_multi), BG=bg, BS=_next_pow2(slots_per_gpu), NPB=_next_pow2(num_slots + 1), num_warps=num_warps,
    )
    return out.view(topk_ids.shape)
