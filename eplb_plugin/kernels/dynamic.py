"""The earlier water-filling dispatch of one layer as one Triton program, kept as the baseline
that ``benchmarks/bench_minmax_dispatch.py`` times ``minmax`` against (the dispatcher runs
``minmax``, ``kernels/minmax_triton.py``, instead).

The torch path of ``ExpertDispatcher.dispatch(algorithm="dynamic")`` runs about 70 small
kernels per layer (six water-filling steps, then a sort-based split); inside a CUDA graph
that cost about 8 ms per 26-layer pass on 2 x H200, more than the balance it buys at EP2.
This kernel does the same arithmetic in one single-program launch per layer. Its cost
grows with ``num_ids`` (two passes over the pairs) and with ``ITERATIONS x num_gpus``
passes over the ``[E, X]`` replica table.
"""

from __future__ import annotations

import torch

from eplb_plugin.kernels._launch import _next_pow2, check_ids

PAIRS_TILE = 8192  # elements of the [BLOCK, BE] tiles the kernel builds per step


def scratch_numel(num_experts: int, width: int) -> int:
    """Float32 elements of the kernel's quota scratch for an [E, X] replica table."""
    return _next_pow2(num_experts) * _next_pow2(width)


def dynamic_dispatch_triton(
    ids: torch.Tensor, l2p: torch.Tensor, *, num_local: int, num_gpus: int, iterations: int,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """ids: [T, k] logical ids (-1 = padding); l2p: [E, X] int64 replicas of each expert
    (-1 = none). Returns [T, k] int64 physical slots (-1 kept). scratch: optional float32
    buffer of at least ``next_pow2(E) * next_pow2(X)`` elements (preallocated: no
    allocation under CUDA-graph capture)."""
    from eplb_plugin.kernels import triton_kernels

    check_ids("ids", ids)
    num_experts, width = l2p.shape
    be, bx = _next_pow2(num_experts), _next_pow2(width)
    if scratch is None or scratch.numel() < scratch_numel(num_experts, width):
        scratch = torch.empty(scratch_numel(num_experts, width), dtype=torch.float32, device=ids.device)
    flat = ids.reshape(-1).contiguous()
    out = torch.empty(flat.shape, dtype=torch.int64, device=ids.device)
    block = max(16, min(1024, PAIRS_TILE // be))
    triton_kernels.dynamic_dispatch_kernel[(1,)](
        flat, l2p.contiguous(), out, scratch, flat.numel(), num_experts, width, num_local, num_gpus,
        ITERATIONS=iterations, BLOCK=block, BE=be, BX=bx, num_warps=8,
    )
    return out.view(ids.shape)
