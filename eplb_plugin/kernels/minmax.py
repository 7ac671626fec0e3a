"""The ``minmax`` split: each expert's tokens of one pass over its replicas, minimizing the
pass's maximum GPU load, as torch ops (the reference) and as Triton kernels.

The problem, for one layer of one pass: expert ``e`` has ``c_e`` tokens and replicas on a
set of GPUs; choose how many of them each GPU serves so that the largest GPU load is as
small as possible. Experts with one replica have no choice: they make each GPU's base
load. Only replicated experts (at most ``P - E`` of them) are split, so the work is on a
small ``[M, G]`` table (M = ``max(1, P - E)``, G GPUs) whatever the token count.

The split minimizes the sum of squared GPU loads, whose minimizer on this (polymatroid)
set of reachable load vectors also minimizes the maximum load. It is found by diffusion
with momentum: every step each replica's share moves toward its expert's mean GPU level
(the step divided by the replicated experts on that GPU, so concurrent moves do not
overshoot), then each expert's shares are renormalized to its tokens; the iterate with the
lowest maximum is kept. ``MINMAX_ITERATIONS`` steps land within 0.2% of the exact optimum
on average over the project's traces (worst pass about 3%; an LP solves it exactly, see
``benchmarks/bench_minmax_dispatch.py``).

Shares then become token choices by occurrence order: the j-th token of expert e in the
pass goes to the replica whose cumulative quota first exceeds j, so each replica gets its
share to within one token and every rank computing the same pass computes the same choice.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

MINMAX_ITERATIONS = 16  # diffusion steps (see the module docstring for the quality they reach)
MINMAX_MOMENTUM = 0.5  # heavy-ball weight of the previous step


class MinmaxTables(NamedTuple):
    """Placement-only tables of the ``minmax`` split, one row per layer (fixed widths, so a
    CUDA graph that captured the split keeps reading them when a new placement is copied in).

    multi_experts: [L, M] int64, the replicated experts of each layer; -1 = unused row.
    multi_gpus: [L, M, G] float32, 1.0 where that expert has a replica on that GPU.
    single_slots: [L, G, S] int64, the expert held by each GPU's slot when all its
        replicas are on that GPU (at its first slot only); -1 elsewhere (S = slots per GPU).
    share_index: [L, E, X] int64, for each listed replica of a replicated expert its
        ``m * G + gpu`` entry of the flattened [M, G] GPU shares; -1 otherwise.
    replicas_on_gpu: [L, E, X] float32, how many of the expert's replicas sit on that
        replica's GPU (its GPU share is split equally among them); 1 on padding.
    """

    multi_experts: torch.Tensor
    multi_gpus: torch.Tensor
    single_slots: torch.Tensor
    share_index: torch.Tensor
    replicas_on_gpu: torch.Tensor


def build_minmax_tables(
    physical_to_logical_map: torch.Tensor, logical_to_physical_map: torch.Tensor, *, num_gpus: int
) -> MinmaxTables:
    """physical_to_logical_map: [L, P] int; logical_to_physical_map: [L, E, X] int (-1 pad).
    Returns the tables on the maps' device."""
    phy2log = physical_to_logical_map.long()
    l2p = logical_to_physical_map.long()
    num_layers, num_slots = phy2log.shape
    num_logical = l2p.shape[1]
    slots_per_gpu = num_slots // num_gpus
    width = max(1, num_slots - num_logical)
    device = phy2log.device
    # Step 1: which GPUs hold each expert ([L, E, G] replica counts), and which experts split.
    slot_gpu = torch.arange(num_slots, device=device) // slots_per_gpu
    per_gpu = torch.zeros(num_layers, num_logical, num_gpus, device=device)
    per_gpu.index_put_((torch.arange(num_layers, device=device)[:, None], phy2log, slot_gpu.expand_as(phy2log)),
                       torch.ones_like(phy2log, dtype=torch.float32), accumulate=True)
    gpus_of_expert = (per_gpu > 0).sum(-1)
    replicated = gpus_of_expert > 1  # [L, E]
    # Step 2: the replicated experts in id order, padded to M rows (-1).
    order = torch.sort(torch.where(replicated, 0, 1), dim=1, stable=True).indices[:, :width]
    used = torch.gather(replicated, 1, order)
    multi_experts = torch.where(used, order, -1)
    multi_gpus = torch.where(used[..., None], torch.gather(per_gpu > 0, 1, order[..., None].expand(-1, -1, num_gpus)),
                             False).to(torch.float32)
    # Step 3: experts on one GPU only, listed at their first slot (a second copy on the same
    # GPU serves the same load).
    first_slot = torch.gather(l2p[..., 0], 1, phy2log) == torch.arange(num_slots, device=device)
    single = torch.gather(~replicated, 1, phy2log) & first_slot
    single_slots = torch.where(single, phy2log, -1).view(num_layers, num_gpus, slots_per_gpu)
    # Step 4: each listed replica's entry in the [M, G] shares and its GPU's replica count.
    row_of = torch.full((num_layers, num_logical + 1), -1, dtype=torch.int64, device=device)
    row_of.scatter_(1, torch.where(used, order, num_logical), torch.arange(width, device=device).expand(num_layers, -1))
    row_of = row_of[:, :num_logical]
    listed = l2p >= 0
    gpu = torch.where(listed, l2p, 0) // slots_per_gpu
    share_index = torch.where(listed & (row_of[..., None] >= 0), row_of[..., None] * num_gpus + gpu, -1)
    on_gpu = torch.gather(per_gpu, 2, gpu)
    replicas_on_gpu = torch.where(listed, on_gpu, 1.0).clamp_min(1.0)
    return MinmaxTables(multi_experts, multi_gpus, single_slots, share_index, replicas_on_gpu)


def minmax_gpu_shares(
    counts: torch.Tensor, multi_experts: torch.Tensor, multi_gpus: torch.Tensor, single_slots: torch.Tensor,
    *, iterations: int = MINMAX_ITERATIONS, momentum: float = MINMAX_MOMENTUM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched split of N independent rows (a row is one layer of one pass).

    counts: [N, E] tokens per logical expert (float or int); multi_experts [N, M],
    multi_gpus [N, M, G], single_slots [N, G, S]: rows of ``MinmaxTables``.
    Returns (shares [N, M, G] float32: tokens of each replicated expert each GPU serves,
    gpu_load [N, G] float32: the resulting GPU loads).
    """
    c = torch.cat([counts.to(torch.float32), counts.new_zeros(counts.shape[0], 1, dtype=torch.float32)], 1)
    num_logical = counts.shape[1]
    base = torch.gather(c, 1, torch.where(single_slots >= 0, single_slots, num_logical).flatten(1))
    base = base.view(single_slots.shape).sum(-1)  # [N, G] load of single-replica experts
    demand = torch.gather(c, 1, torch.where(multi_experts >= 0, multi_experts, num_logical))  # [N, M]
    inc = multi_gpus
    degree = inc.sum(-1).clamp_min(1.0)  # [N, M]
    step = inc / inc.sum(1, keepdim=True).clamp_min(1.0)  # [N, M, G]
    equal = inc * (demand / degree).unsqueeze(-1)

    def renormalize(x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        total = x.sum(-1, keepdim=True)
        return torch.where(total > 0, x * (demand.unsqueeze(-1) / total.clamp_min(1e-30)), fallback)

    x = prev = best = equal
    best_peak = (base + equal.sum(1)).amax(-1)
    for _ in range(iterations):
        load = base + x.sum(1)  # [N, G]
        level = (inc * load.unsqueeze(1)).sum(-1) / degree  # the mean load each expert's GPUs see
        y = renormalize(((x + step * (level.unsqueeze(-1) - load.unsqueeze(1))).clamp_min(0.0)) * inc, equal)
        x, prev = renormalize((y + momentum * (y - prev)).clamp_min(0.0) * inc, y), y
        peak = (base + x.sum(1)).amax(-1)
        better = peak < best_peak
        best = torch.where(better[:, None, None], x, best)
        best_peak = torch.minimum(peak, best_peak)
    return best, base + best.sum(1)


def minmax_replica_shares(shares: torch.Tensor, share_index: torch.Tensor, replicas_on_gpu: torch.Tensor,
                          counts: torch.Tensor, replica_count: torch.Tensor) -> torch.Tensor:
    """One row's GPU shares -> each listed replica's fraction of its expert's tokens.

    shares: [M, G] (``minmax_gpu_shares`` of one row); share_index, replicas_on_gpu: [E, X];
    counts: [E]; replica_count: [E]. Returns [E, X] float32 (rows of unreplicated experts
    hold an equal split; padding 0).
    """
    flat = torch.cat([shares.flatten(), shares.new_zeros(1)])
    tokens = flat[torch.where(share_index >= 0, share_index, flat.numel() - 1)] / replicas_on_gpu
    fraction = tokens / counts.to(torch.float32).clamp_min(1.0).unsqueeze(-1)
    listed = torch.arange(share_index.shape[1], device=share_index.device) < replica_count.unsqueeze(-1)
    equal = listed.to(torch.float32) / replica_count.clamp_min(1).unsqueeze(-1).to(torch.float32)
    replicated = (share_index >= 0).any(-1, keepdim=True) & (counts > 0).unsqueeze(-1)
    return torch.where(replicated, fraction, equal)
