"""One expert-parallel MoE layer forward: dispatch, exchange, expert FFNs, combine.

Every rank of the group calls ``ep_moe_forward`` for the same layer in the same order (it
is collective). Dispatch first: the router's logical ``topk_ids [T, k]`` become physical
slots (``ExpertDispatcher``) and the recorder's hook sees them. Then one of two exchanges:

- ``"gather"`` (CUDA default): every rank's tokens (hidden states, slots and combine
  weights) are all-gathered, each rank padded to ``tokens_per_rank`` rows. Each rank
  sorts the gathered (token, choice) pairs by its own local slot (other ranks' pairs sort
  last), cuts them at each slot's end (``searchsorted``, on the device), runs its slots'
  FFNs (two grouped GEMMs on CUDA bf16), sums each token's weighted outputs, and the
  partial sums go back to the tokens' ranks (one ``all_to_all_single``), which add them
  in rank order. Every shape follows the batch, not the routing: no host reads, so the
  host runs ahead and a pass can be captured as a CUDA graph (``runtime/graphs.py``).
  Per token and direction it moves ``W - 1`` rows (W ranks).
- ``"alltoall"`` (CPU default): the pairs go to their slots' ranks by
  ``all_to_all_single`` with exact split sizes and come back the same way. It moves
  ``k * (W - 1) / W`` rows per token and direction, but the split sizes must be read on
  the host (a synchronization per layer, free on CPU).

For ``W < k`` (EP2, EP4 at top-6/8) the gather moves fewer bytes. With one rank
nothing is exchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from eplb_plugin.dispatch import ExpertDispatcher
from eplb_plugin.errors import UsageError

# dtypes that hold every local slot index exactly (< 2**24 slots per rank).
_EXACT_INT_DTYPES = (torch.float32, torch.float64)
EXCHANGES = ("gather", "alltoall")

# Gathered pairs whose rows would exceed this are compacted to this rank's pairs first,
# which costs one host read of their number (large batches and hidden sizes only).
MAX_PAIR_ROWS_BYTES = 1 << 30


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


def grouped_mm_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``_sorted_ffn`` of ``dtype`` rows on ``device`` takes the grouped GEMMs (the slot
    ends stay on the GPU), rather than the per-slot loop that reads them on the host."""
    return (not _grouped_mm_broken and device.type == "cuda" and dtype in _GROUPED_MM_DTYPES
            and hasattr(torch, "_grouped_mm"))


def _grouped_ffn(grouped: torch.Tensor, ends: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor | None:
    """All slots' FFNs as two grouped GEMMs (``torch._grouped_mm``, CUDA bf16 on Hopper), the
    way fused-MoE kernels run them: the cost follows the rows, not a launch per slot, and the
    group ends stay on the GPU. ends: [S] int end row of each slot's group; rows past the
    last end are not computed (their output rows are undefined). None where unavailable."""
    global _grouped_mm_broken
    if not grouped_mm_available(grouped.dtype, grouped.device):
        return None
    offsets = ends.to(torch.int32)
    try:
        gate, up = torch._grouped_mm(grouped, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        return torch._grouped_mm((F.silu(gate) * up).contiguous(), w2.transpose(1, 2), offs=offsets)
    except RuntimeError as exc:  # an unsupported shape or GPU: fall back for the rest of the run
        _grouped_mm_broken = str(exc)
        return None


def _sorted_ffn(grouped: torch.Tensor, ends: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Rows sorted by slot, slot s on rows [ends[s-1], ends[s]) -> outputs in the same order.
    Rows past ends[-1] are left undefined."""
    result = _grouped_ffn(grouped, ends, w13, w2)
    if result is not None:
        return result
    # One host read of the group ends to cut the rows into slices (needed by the loop).
    bounds = ends.tolist()
    result = torch.empty_like(grouped)
    start = 0
    for slot, end in enumerate(bounds):
        if end > start:
            result[start:end] = expert_ffn(grouped[start:end], w13[slot], w2[slot])
        start = end
    return result


def run_local_experts(
    x: torch.Tensor, local_slot: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run each local slot's FFN on its rows.

    x: [M, H] rows; local_slot: [M] int64 in [0, S); w13: [S, 2I, H]; w2: [S, H, I].
    Returns (out [M, H] in the order of x, counts [S] int64 rows per slot).
    """
    sorted_slot, order = torch.sort(local_slot, stable=True)
    ends, counts = _group_ends(sorted_slot, w13.shape[0])
    if x.shape[0] == 0:
        return torch.empty_like(x), counts
    result = _sorted_ffn(x.index_select(0, order), ends, w13, w2)
    return result.index_select(0, _inverse(order)), counts


def _group_ends(sorted_keys: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys sorted ascending (slots 0..S-1, anything larger last) -> (ends [S]: end row of each
    slot's group, counts [S] int64 rows per slot), on the device, without a host read."""
    ends = torch.searchsorted(sorted_keys, torch.arange(1, num_slots + 1, device=sorted_keys.device))
    return ends, torch.diff(ends, prepend=ends.new_zeros(1))


def default_exchange(device: torch.device) -> str:
    """The exchange a device runs by default: gather on CUDA (graph-capturable), alltoall elsewhere."""
    return "gather" if device.type == "cuda" else "alltoall"


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: rows go back by a gather, cheaper than a row scatter."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def _all_gather(x: torch.Tensor, world_size: int, group: Any) -> torch.Tensor:
    """[n, ...] from every rank -> [world_size * n, ...] in rank order."""
    import torch.distributed as dist

    out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous(), group=group)
    return out


def _exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Any) -> torch.Tensor:
    """all_to_all_single of rows with uneven splits. x: [N, ...] -> [sum(recv_splits), ...]."""
    import torch.distributed as dist

    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


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
    rank: int = 0,
    tokens_per_rank: int | None = None,
    exchange: str | None = None,
) -> MoEOutput:
    """This rank's tokens through one EP MoE layer. Collective over ``group`` when world_size > 1.

    hidden: [T, H] this rank's tokens (already normalized); topk_ids: [T, k] int64 logical
    ids, -1 = padding (the choice is skipped); topk_weights: [T, k] combine weights.
    weights: ``[w13 [S, 2I, H], w2 [S, H, I]]`` of this rank's slots for ``layer``.
    recorder: the expert distribution recorder (or its no-op); the caller has entered
    ``with_current_layer(layer)``. rank: this rank in group. exchange: "gather" or
    "alltoall" (None: gather on CUDA, alltoall elsewhere; the same on every rank).
    tokens_per_rank: the rows every rank pads to under "gather" (the same on every rank,
    >= T; None: T, which every rank must then share).
    """
    exchange = exchange or default_exchange(hidden.device)
    if exchange not in EXCHANGES:
        raise UsageError(f"exchange={exchange!r} must be one of {EXCHANGES}")
    # A dispatch that counts the slots it picks as it maps them (static: the fused map+count
    # kernel; minmax: its own) adds them to the recorder's buffer, which notes the layer.
    counts = recorder.select_counts_buffer() if dispatcher.info.counts_slots else None
    physical = dispatcher.dispatch(layer, topk_ids, counts_out=counts)  # [T, k] int64, -1 kept
    recorder.on_select_experts(physical)
    if exchange == "gather":
        result = _forward_gather(hidden, physical, topk_weights, weights, group=group, world_size=world_size,
                                 rank=rank, tokens_per_rank=tokens_per_rank)
    else:
        result = _forward_alltoall(hidden, physical, topk_weights, weights, group=group, world_size=world_size)
    recorder.on_dispatch_receive_counts(result.recv_counts)
    return result


def _forward_gather(hidden: torch.Tensor, physical: torch.Tensor, topk_weights: torch.Tensor,
                    weights: list[torch.Tensor], *, group: Any, world_size: int, rank: int,
                    tokens_per_rank: int | None) -> MoEOutput:
    """All-gather dispatch, reduce-back combine (see the module docstring)."""
    w13, w2 = weights
    num_slots = w13.shape[0]
    num_tokens, top_k = physical.shape
    hidden_size = hidden.shape[1]
    rows = tokens_per_rank if tokens_per_rank is not None else num_tokens
    if rows < num_tokens:
        raise UsageError(f"tokens_per_rank={rows} is below this rank's {num_tokens} tokens")
    # Slots and combine weights travel together as int32 words (weights as float32 bits).
    meta = torch.cat([physical.to(torch.int32), topk_weights.to(torch.float32).view(torch.int32)], 1)
    x = hidden
    if rows > num_tokens:  # padding rows: no choice (-1), zero weight
        x = torch.cat([hidden, hidden.new_zeros(rows - num_tokens, hidden_size)])
        pad = meta.new_zeros(rows - num_tokens, 2 * top_k)
        pad[:, :top_k] = -1
        meta = torch.cat([meta, pad])
    if world_size > 1:
        x, meta = _all_gather(x, world_size, group), _all_gather(meta, world_size, group)

    # This rank's pairs, sorted by local slot; every other pair gets the key num_slots (last).
    local = meta[:, :top_k].to(torch.int64) - rank * num_slots
    mine = (local >= 0) & (local < num_slots)
    key = torch.where(mine, local, num_slots).reshape(-1)
    sorted_key, order = torch.sort(key, stable=True)
    ends, recv_counts = _group_ends(sorted_key, num_slots)
    num_pairs = order.numel()
    if num_pairs * hidden_size * x.element_size() > MAX_PAIR_ROWS_BYTES or not x.is_cuda:
        # Only this rank's pairs (a host read of their number; free on CPU).
        order = order[: int(ends[-1])]
    cpu_clock = x.device.type == "cpu"
    start = time.thread_time()
    pair_out = _sorted_ffn(x.index_select(0, order // top_k), ends, w13, w2)
    compute_s = time.thread_time() - start if cpu_clock else 0.0
    pair_weights = meta[:, top_k:].view(torch.float32).reshape(-1).index_select(0, order)
    keep = sorted_key[: order.numel()] < num_slots
    # Rows past the last slot's end are undefined (maybe NaN): selected away, not multiplied.
    weighted = torch.where(keep.unsqueeze(1), pair_out * pair_weights.to(pair_out.dtype).unsqueeze(1), 0)
    # Each pair back to its (token, choice) row, then each token sums its k rows in choice order.
    if order.numel() == num_pairs:  # every pair was computed (or masked to 0): a gather
        per_choice = weighted.index_select(0, _inverse(order))
    else:
        per_choice = weighted.new_zeros(num_pairs, hidden_size)
        per_choice.index_copy_(0, order, weighted)
    acc = _accumulate_dtype(hidden.dtype)
    partial = per_choice.view(-1, top_k, hidden_size).sum(1, dtype=acc)
    if world_size > 1:
        import torch.distributed as dist

        # Rank r's tokens' partial sums go back to rank r; each rank adds its W parts in rank order.
        send = partial.to(hidden.dtype)
        back = torch.empty_like(send)
        dist.all_to_all_single(back, send, group=group)
        partial = back.view(world_size, rows, hidden_size).sum(0, dtype=acc)
    return MoEOutput(out=partial[:num_tokens].to(hidden.dtype), recv_counts=recv_counts, compute_s=compute_s)


def _forward_alltoall(hidden: torch.Tensor, physical: torch.Tensor, topk_weights: torch.Tensor,
                      weights: list[torch.Tensor], *, group: Any, world_size: int) -> MoEOutput:
    """Pairs to their slots' ranks and back with exact splits (see the module docstring)."""
    w13, w2 = weights
    num_slots = w13.shape[0]
    num_tokens, top_k = physical.shape
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
        rows = valid  # pair_out[i] is pair valid[i]'s output
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
        pair_out = _exchange(recv_out, recv_splits, send_splits, group)  # in send order
        rows = valid[order]  # pair_out[i] is pair valid[order[i]]'s output: scattered there once
    # Combine in pair order (token-major), the same order as the dense reference: each pair
    # lands in its own (token, choice) row of a [T * k, H] buffer (padded choices stay zero),
    # then each token sums its k rows in choice order.
    pair_weights = topk_weights.reshape(-1)[rows].to(pair_out.dtype).unsqueeze(1)
    per_choice = hidden.new_zeros(num_tokens * top_k, hidden.shape[1])
    per_choice.index_copy_(0, rows, pair_out * pair_weights)
    out = per_choice.view(num_tokens, top_k, -1).sum(1)
    return MoEOutput(out=out, recv_counts=recv_counts, compute_s=compute_s)
