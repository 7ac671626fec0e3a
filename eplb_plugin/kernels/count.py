"""Count physical ``topk_ids`` into one layer's row of an on-device ``[L, P]`` buffer.

``count_topk(topk_ids, counts, layer)`` adds, for every id ``p`` in ``topk_ids`` with
``0 <= p < P``, one to ``counts[layer, p]``; ``-1`` (padding) and other out-of-range ids are
skipped. No host synchronization, no allocation on the Triton path, so it can be captured
in a CUDA graph and keeps counting on replay.

Paths: a Triton kernel (``triton_kernels.count_topk_kernel``, a histogram per program and
one atomic per slot per program), a pure-torch path (``scatter_add_`` with a 0/1 weight, for
CPU), and ``count_reference`` (the plain definition, for tests).
"""

from __future__ import annotations

import torch

from eplb_plugin.kernels._launch import (
    Backend,
    check_counts,
    check_ids,
    launch_geometry,
    use_triton,
)


def count_reference(topk_ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Slot histogram by definition. topk_ids: [...] int, -1 = padding. Returns [P] int64."""
    ids = topk_ids.reshape(-1).long().cpu()
    ids = ids[(ids >= 0) & (ids < num_slots)]
    return torch.bincount(ids, minlength=num_slots)


def count_topk_torch(topk_ids: torch.Tensor, counts: torch.Tensor, layer: int) -> None:
    """Torch path of :func:`count_topk` (temporaries only; no host sync)."""
    row = counts[layer]
    ids = topk_ids.reshape(-1).long()
    valid = (ids >= 0) & (ids < row.shape[0])
    row.scatter_add_(0, ids.masked_fill(~valid, 0), valid.to(row.dtype))


def count_topk(
    topk_ids: torch.Tensor,
    counts: torch.Tensor,
    layer: int,
    *,
    backend: Backend = "auto",
) -> None:
    """Add the slot histogram of ``topk_ids`` into ``counts[layer]`` in place.

    topk_ids: [T, k] (any shape) int32/int64 physical slot ids; -1 = padding, skipped.
    counts: [L, P] int32 on the same device; row ``layer`` is incremented.
    backend: "auto" (Triton on CUDA if installed, else torch), "triton" (CPU needs
        TRITON_INTERPRET=1), "torch".
    """
    check_ids("topk_ids", topk_ids)
    check_counts(counts)
    num_ids = topk_ids.numel()
    if num_ids == 0:
        return
    if not use_triton(backend, topk_ids):
        count_topk_torch(topk_ids, counts, layer)
        return
    from eplb_plugin.kernels import triton_kernels

    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    num_slots = counts.shape[1]
    geo = launch_geometry(num_ids, num_slots)
    triton_kernels.count_topk_kernel[(geo.programs,)](
        ids, counts, layer * counts.stride(0), num_ids, num_slots, geo.iters,
        BLOCK=geo.block, NUM_BINS=geo.num_bins,
    )
