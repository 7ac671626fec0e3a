"""One expert-parallel MoE layer forward: dispatch, all-to-all, expert FFNs, all-to-all back, combine.

Steps of ``ep_moe_forward`` on each rank (every rank of the group calls it for the same
layer in the same order: it is collective):

1. Dispatch: the router's logical ``topk_ids [T, k]`` become physical slots
   (``ExpertDispatcher``); the recorder's hook sees them.
2. Sort the (token, choice) pairs by destination rank; exchange the per-rank pair counts
   (``all_to_all_single`` on a [W] counts tensor), then the pairs' hidden states and
   destination local slots (``all_to_all_single`` with those split sizes).
3. Each local slot runs its SiLU-gated FFN over the pairs it received.
4. Results go back by the reverse all-to-all; each token sums its choices' outputs
   weighted by ``topk_weights``.

With one rank no communication happens (step 2 and 4 return early).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from eplb_plugin.dispatch import ExpertDispatcher

# dtypes that hold every local slot index exactly (< 2**24 slots per rank).
_EXACT_INT_DTYPES = (torch.float32, torch.float64)


@dataclass
class MoEOutput:
    """out: [T, H] this rank's tokens' MoE output. recv_counts: [S] int64 pairs each local
    slot computed (the dispatcher's receive counts, for stat_approx and per-GPU load).
    compute_s: seconds of expert FFN work on this rank (thread CPU time on CPU devices, 0 on GPU)."""

    out: torch.Tensor
    recv_counts: torch.Tensor
    compute_s: float


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SiLU-gated FFN. x: [n, H]; w13: [2I, H] (gate rows, then up rows); w2: [H, I] -> [n, H]."""
    gate, up = (x @ w13.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.t()


def rms_normalize(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim (the input of each MoE layer)."""
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


_GROUPED_MM_DTYPES = (torch.bfloat16,)
_grouped_mm_broken: str | None = None  # why the grouped GEMM was given up, once it failed


def _grouped_ffn(grouped: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor | None:
    """All slots' FFNs as two grouped GEMMs (``torch._grouped_mm``, CUDA bf16 on Hopper), the
    way fused-MoE kernels run them: the cost follows the rows, not a launch per slot, and the
    per-slot counts stay on the GPU. Returns None where unavailable (then the loop runs)."""
    global _grouped_mm_broken
    if (_grouped_mm_broken or not grouped.is_cuda or grouped.dtype not in _GROUPED_MM_DTYPES
            or not hasattr(torch, "_grouped_mm")):
        return None
    offsets = torch.cumsum(counts, 0).to(torch.int32)  # end row of each slot's group
    try:
        gate, up = torch._grouped_mm(grouped, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        return torch._grouped_mm((F.silu(gate) * up).contiguous(), w2.transpose(1, 2), offs=offsets)
    except RuntimeError as exc:  # an unsupported shape or GPU: fall back for the rest of the run
        _grouped_mm_broken = str(exc)
        return None


def run_local_experts(
    x: torch.Tensor, local_slot: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run each local slot's FFN on its rows.

    x: [M, H] received rows; local_slot: [M] int64 in [0, S); w13: [S, 2I, H]; w2: [S, H, I].
    Returns (out [M, H] in the order of x, counts [S] int64 rows per slot).
    """
    num_slots = w13.shape[0]
    counts = torch.bincount(local_slot, minlength=num_slots)
    if x.shape[0] == 0:
        return torch.empty_like(x), counts
    order = torch.argsort(local_slot, stable=True)
    # Rows go back to x's order by a gather (inverse permutation), cheaper than a row scatter.
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    grouped = x[order]
    result = _grouped_ffn(grouped, counts, w13, w2)
    if result is not None:
        return result.index_select(0, inverse), counts
    # One host read of the per-slot counts to cut the rows into slices (needed by the loop).
    bounds = torch.cumsum(counts, 0).tolist()
    result = torch.empty_like(grouped)
    start = 0
    for slot, end in enumerate(bounds):
        if end > start:
            result[start:end] = expert_ffn(grouped[start:end], w13[slot], w2[slot])
        start = end
    return result.index_select(0, inverse), counts


def _exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Any) -> torch.Tensor:
    """all_to_all_single of rows with uneven splits. x: [N, ...] -> [sum(recv_splits), ...]."""
    import torch.distributed as dist

    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


def ep_moe_forward(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    layer: int,
    dispatcher: ExpertDispatcher,
    weights: list[torch.Tensor],
    recorder: Any,
    group: Any = None,
    world_size: int = 1,
) -> MoEOutput:
    """This rank's tokens through one EP MoE layer. Collective over ``group`` when world_size > 1.

    hidden: [T, H] this rank's tokens (already normalized); topk_ids: [T, k] int64 logical
    ids, -1 = padding (the choice is skipped); topk_weights: [T, k] combine weights.
    weights: ``[w13 [S, 2I, H], w2 [S, H, I]]`` of this rank's slots for ``layer``.
    recorder: the expert distribution recorder (or its no-op); the caller has entered
    ``with_current_layer(layer)``.
    """
    w13, w2 = weights
    num_slots = w13.shape[0]
    num_tokens, top_k = topk_ids.shape
    if dispatcher.algorithm == "static":
        # Static dispatch is a table lookup: map and count in one fused kernel.
        physical = recorder.record_logical(layer, topk_ids, dispatcher.static_table).long()
    else:
        physical = dispatcher.dispatch(layer, topk_ids)  # [T, k] int64, -1 kept
        recorder.on_select_experts(physical)
    flat = physical.reshape(-1)
    valid = (flat >= 0).nonzero().squeeze(1)  # pair index t * k + j of every real choice
    slots = flat[valid]
    token_of_pair = valid // top_k
    dest = slots // num_slots
    cpu_clock = hidden.device.type == "cpu"

    if world_size == 1:
        start = time.thread_time()
        pair_out, recv_counts = run_local_experts(hidden[token_of_pair], slots % num_slots, w13, w2)
        compute_s = time.thread_time() - start if cpu_clock else 0.0
    else:
        import torch.distributed as dist

        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=world_size)
        recv_counts_by_rank = torch.empty_like(send_counts)
        # Counts first: every rank must know how many rows it receives from each peer.
        dist.all_to_all_single(recv_counts_by_rank, send_counts, group=group)
        # The split sizes must be host ints for all_to_all_single: one host read per layer.
        send_splits, recv_splits = send_counts.tolist(), recv_counts_by_rank.tolist()
        local_slot = slots[order] % num_slots
        if hidden.dtype in _EXACT_INT_DTYPES:
            # One exchange instead of two: the local slot rides as an extra column (exact in fp32/fp64).
            packed = torch.cat([hidden[token_of_pair[order]], local_slot.to(hidden.dtype).unsqueeze(1)], 1)
            recv_packed = _exchange(packed, send_splits, recv_splits, group)
            recv_x, recv_slot = recv_packed[:, :-1], recv_packed[:, -1].to(torch.int64)
        else:
            recv_x = _exchange(hidden[token_of_pair[order]], send_splits, recv_splits, group)
            recv_slot = _exchange(local_slot, send_splits, recv_splits, group)
        start = time.thread_time()
        recv_out, recv_counts = run_local_experts(recv_x, recv_slot, w13, w2)
        compute_s = time.thread_time() - start if cpu_clock else 0.0
        sorted_out = _exchange(recv_out, recv_splits, send_splits, group)
        pair_out = torch.empty_like(sorted_out)
        pair_out[order] = sorted_out
    recorder.on_dispatch_receive_counts(recv_counts)
    # Combine in pair order (token-major), the same order as the dense reference.
    pair_weights = topk_weights.reshape(-1)[valid].to(pair_out.dtype).unsqueeze(1)
    # Each pair lands in its own row of a [T * k, H] buffer (no atomics; padded choices stay
    # zero), then each token sums its k rows in choice order.
    per_choice = hidden.new_zeros(num_tokens * top_k, hidden.shape[1])
    per_choice.index_copy_(0, valid, pair_out * pair_weights)
    out = per_choice.view(num_tokens, top_k, -1).sum(1)
    return MoEOutput(out=out, recv_counts=recv_counts, compute_s=compute_s)
