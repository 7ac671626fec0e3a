"""Map logical ids to physical slots and count them, in one pass.

``map_and_count(logical_ids, table, counts, layer)`` computes
``physical = table[layer, logical]`` for each id (``-1`` stays ``-1``), writes it to an
output of the ids' shape and dtype, and adds the slot histogram of ``physical`` into
``counts[layer]`` (as :func:`eplb_plugin.kernels.count.count_topk`). ``table`` is the static
dispatch table ``logical_to_rank_dispatch_physical_map [L, E]``: the physical slot each
logical expert goes to from this rank.
"""

from __future__ import annotations

import torch

from eplb_plugin.errors import CountsError
from eplb_plugin.kernels._launch import (
    Backend,
    check_counts,
    check_ids,
    launch_geometry,
    use_triton,
)
from eplb_plugin.kernels.count import count_reference, count_topk_torch


def map_reference(logical_ids: torch.Tensor, table_row: torch.Tensor) -> torch.Tensor:
    """Physical ids by definition. table_row: [E]; ids outside [0, E) (e.g. -1) give -1."""
    ids = logical_ids.long()
    valid = (ids >= 0) & (ids < table_row.shape[0])
    physical = table_row.long()[ids.clamp(0, table_row.shape[0] - 1)]
    return torch.where(valid, physical, -1).to(logical_ids.dtype)


def map_and_count_reference(
    logical_ids: torch.Tensor, table_row: torch.Tensor, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of the fused op: (physical ids like logical_ids, [P] int64 counts)."""
    physical = map_reference(logical_ids, table_row)
    return physical, count_reference(physical, num_slots)


def map_and_count(
    logical_ids: torch.Tensor,
    table: torch.Tensor,
    counts: torch.Tensor,
    layer: int,
    *,
    out: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Dispatch ``logical_ids`` through ``table[layer]`` and count the result into ``counts[layer]``.

    logical_ids: [T, k] int32/int64 logical expert ids; -1 = padding (stays -1).
    table: [L, E] int32/int64, physical slot of each logical expert for this rank.
    counts: [L, P] int32; row ``layer`` is incremented in place.
    out: optional preallocated [T, k] output (same dtype as logical_ids, contiguous);
        pass one under CUDA-graph capture to keep the hook allocation-free.
    Returns the physical ids, [T, k], dtype of ``logical_ids``.
    """
    check_ids("logical_ids", logical_ids)
    check_ids("table", table)
    check_counts(counts)
    if out is None:
        out = torch.empty_like(logical_ids, memory_format=torch.contiguous_format)
    elif out.shape != logical_ids.shape or out.dtype != logical_ids.dtype or not out.is_contiguous():
        raise CountsError(
            f"out must be contiguous {tuple(logical_ids.shape)} {logical_ids.dtype} "
            f"(got {tuple(out.shape)} {out.dtype})"
        )
    num_ids = logical_ids.numel()
    if num_ids == 0:
        return out
    if not use_triton(backend, logical_ids):
        physical = map_reference(logical_ids, table[layer])
        out.copy_(physical)
        count_topk_torch(physical, counts, layer)
        return out
    from eplb_plugin.kernels import triton_kernels

    ids = logical_ids if logical_ids.is_contiguous() else logical_ids.contiguous()
    tab = table if table.stride(1) == 1 else table.contiguous()
    geo = launch_geometry(num_ids, counts.shape[1])
    triton_kernels.map_and_count_kernel[(geo.programs,)](
        ids, tab, layer * tab.stride(0), out, counts, layer * counts.stride(0),
        num_ids, tab.shape[1], counts.shape[1], geo.iters,
        BLOCK=geo.block, NUM_BINS=geo.num_bins,
    )
    return out
