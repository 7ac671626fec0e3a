"""Migration-aware re-planning: keep the current placement unless moving pays.

``plan_migration_aware`` (the policy): per layer, a fresh plan aligned to the current one,
taken only where the predicted gain per moved slot is large. ``plan_incremental`` (kept as
an alternative): single-slot moves from the current placement, described below.

A move rewrites one slot: the slot gives up its expert ``a`` (which must keep another
replica) and takes expert ``b``; every GPU load changes through the equal split of ``a``
and ``b`` over their replicas. Each round, per layer, the move that lowers the heaviest
GPU's load the most is taken, if it gains at least ``min_gain`` of the mean GPU load; at
most ``max_move_share`` of a layer's slots move. Vectorized over layers and all
(slot, expert) candidates.
"""

from __future__ import annotations

import numpy as np

from ..maps import replica_count
from .balanced import replica_weights
from .deepseek import deepseek
from .split import peak_load

MAX_MOVE_SHARE = 0.15
MIN_GAIN = 0.002
GAIN_PER_SLOT = 0.3  # re-plan a layer when its peak drops by > 0.3 x (share of its slots moved) of the mean load


def plan_incremental(
    weight: np.ndarray, previous: np.ndarray, *, num_gpus: int,
    max_move_share: float = MAX_MOVE_SHARE, min_gain: float = MIN_GAIN, with_weights: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """weight: [L, E] float; previous: [L, P] int64. Returns (phy2log [L, P], weights [L, P] | None)."""
    num_layers, num_logical = weight.shape
    num_slots = previous.shape[1]
    per_gpu = num_slots // num_gpus
    phy2log = previous.copy()
    rows = np.arange(num_layers)
    slot_gpu = np.arange(num_slots) // per_gpu
    mean_gpu = weight.sum(1) / num_gpus
    budget = int(max_move_share * num_slots)
    moved = np.zeros((num_layers, num_slots), dtype=bool)
    active = np.ones(num_layers, dtype=bool)
    for _ in range(budget):
        # Step 1: current state: replicas, per-GPU occupancy, GPU loads under equal split.
        count = replica_count(phy2log, num_logical)
        occupancy = np.zeros((num_layers, num_logical, num_gpus))
        np.add.at(occupancy, (rows[:, None], phy2log, slot_gpu[None, :]), 1.0)
        per_replica = weight / np.maximum(count, 1)
        g = np.einsum("leg,le->lg", occupancy, per_replica)
        # Step 2: change of every GPU load for every (slot s, new expert b).
        a = phy2log
        a_count = np.take_along_axis(count, a, axis=1)
        a_weight = np.take_along_axis(weight, a, axis=1)
        delta_a = np.where(a_count > 1, a_weight / np.maximum(a_count - 1, 1) - a_weight / a_count, np.inf)
        occ_a = np.take_along_axis(occupancy, a[:, :, None].repeat(num_gpus, 2), axis=1)  # [L, P, G]
        occ_a[:, np.arange(num_slots), slot_gpu] -= 1.0
        term_a = occ_a * np.where(np.isinf(delta_a), 0.0, delta_a)[:, :, None]  # [L, P, G]
        new_b = weight / (count + 1)
        term_b = occupancy * (new_b - per_replica)[:, :, None]  # [L, E, G]
        own = new_b[:, None, :] - (a_weight / a_count)[:, :, None]  # [L, P, E]
        loads = g[:, None, None, :] + term_a[:, :, None, :] + term_b[:, None, :, :]
        loads[rows[:, None, None], np.arange(num_slots)[None, :, None], np.arange(num_logical)[None, None, :],
              slot_gpu[None, :, None]] += own
        peak = loads.max(-1)  # [L, P, E]
        peak[np.isinf(delta_a)] = np.inf  # slot holds an expert's last replica
        peak[rows[:, None], np.arange(num_slots)[None, :], a] = np.inf  # no-op
        peak[moved] = np.inf  # one move per slot per rebalance
        # Step 3: take the best move per layer if it gains enough.
        flat = peak.reshape(num_layers, -1).argmin(1)
        best = peak.reshape(num_layers, -1)[rows, flat]
        gain = (g.max(1) - best) / np.maximum(mean_gpu, 1e-30)
        active &= gain >= min_gain
        if not active.any():
            break
        r = rows[active]
        slot, expert = np.divmod(flat[active], num_logical)
        phy2log[r, slot] = expert
        moved[r, slot] = True
    weights = replica_weights(weight, phy2log, num_gpus) if with_weights else None
    return phy2log, weights


def _occurrence_rank(gpu_slots: np.ndarray) -> np.ndarray:
    """[..., S] experts of one GPU's slots -> [..., S] how many earlier slots of that GPU hold the same expert."""
    per_gpu = gpu_slots.shape[-1]
    same = gpu_slots[..., :, None] == gpu_slots[..., None, :]
    earlier = np.tri(per_gpu, k=-1, dtype=bool)
    return (same & earlier).sum(-1)


def _count_in(gpu_slots: np.ndarray, other: np.ndarray) -> np.ndarray:
    """[..., S], [..., S] -> [..., S]: copies of each slot's expert among ``other``'s slots."""
    return (gpu_slots[..., :, None] == other[..., None, :]).sum(-1)


def _shared_labels(new_gpus: np.ndarray, old_gpus: np.ndarray, rank_new: np.ndarray,
                   rank_old: np.ndarray) -> np.ndarray:
    """[L, G, S] experts and their ``_occurrence_rank``, new and old -> [L, G, G] int64: labels
    (expert, occurrence within the GPU) that new GPU a and old GPU b share, i.e. the multiset
    overlap of their experts."""
    num_layers, num_gpus, per_gpu = new_gpus.shape
    span = (int(max(new_gpus.max(), old_gpus.max())) + 1) * per_gpu
    layer = np.arange(num_layers)[:, None, None] * span
    key_new = (layer + new_gpus * per_gpu + rank_new).ravel()
    key_old = (layer + old_gpus * per_gpu + rank_old).ravel()
    gpu = np.broadcast_to(np.arange(num_gpus)[None, :, None], new_gpus.shape).ravel()
    count_old = np.bincount(key_old, minlength=num_layers * span)
    hits = count_old[key_new]  # old slots with this label
    # Step 1: a label held by one old slot (an expert's only copy, mostly): a direct lookup.
    owner = np.empty(num_layers * span, dtype=np.int64)  # read only where count_old == 1
    owner[key_old] = np.arange(key_old.size)
    pair_new = np.nonzero(hits == 1)[0]
    pair_old = owner[key_new[pair_new]]
    # Step 2: a label held by several old slots (a replicated expert's first copies): one
    # (new slot, old slot) pair each, enumerated through a sort of those old slots only.
    many = np.nonzero(hits > 1)[0]
    if many.size:
        shared = np.nonzero(count_old[key_old] > 1)[0]
        order = shared[np.argsort(key_old[shared], kind="stable")]
        lo = np.searchsorted(key_old[order], key_new[many], side="left")
        reps = hits[many]
        first = np.repeat(lo - np.cumsum(reps) + reps, reps)
        pair_new = np.concatenate([pair_new, np.repeat(many, reps)])
        pair_old = np.concatenate([pair_old, order[first + np.arange(int(reps.sum()))]])
    # Step 3: count the pairs per (layer, new GPU, old GPU).
    layer_of = pair_new // (num_gpus * per_gpu)
    cell = (layer_of * num_gpus + gpu[pair_new]) * num_gpus + gpu[pair_old]
    return np.bincount(cell, minlength=num_layers * num_gpus * num_gpus).reshape(num_layers, num_gpus, num_gpus)


def align_to_previous(new: np.ndarray, previous: np.ndarray, *, num_gpus: int) -> np.ndarray:
    """Relabel GPUs and reorder slots inside each GPU of ``new`` so that as many slots as
    possible keep the expert they hold in ``previous`` (same GPU-level sets, fewer moves).

    new, previous: [L, P] int64. Returns [L, P] int64. Vectorized over layers; only the
    GPU matching (scipy's linear assignment) runs once per layer.
    """
    from scipy.optimize import linear_sum_assignment

    num_layers, num_slots = new.shape
    per_gpu = num_slots // num_gpus
    new_gpus = new.reshape(num_layers, num_gpus, per_gpu)
    old_gpus = previous.reshape(num_layers, num_gpus, per_gpu)
    # Step 1: match new GPUs to old GPUs by the multiset overlap of their experts. A slot's
    # label (expert, occurrence within its GPU) is unique per GPU, so the overlap of two GPUs
    # is the number of labels they share.
    rank_new, rank_old = _occurrence_rank(new_gpus), _occurrence_rank(old_gpus)
    overlap = _shared_labels(new_gpus, old_gpus, rank_new, rank_old)  # [L, G new, G old]
    source = np.empty((num_layers, num_gpus), dtype=np.int64)  # new GPU placed on each old GPU
    for layer in range(num_layers):
        src, dst = linear_sum_assignment(-overlap[layer])
        source[layer, dst] = src
    todo = np.take_along_axis(new_gpus, source[:, :, None], axis=1)  # [L, G, S], in old GPU order
    # Step 2: inside each GPU, an old slot keeps its expert while the new GPU has a copy left
    # (the k-th copy in slot order stays if the new GPU holds more than k copies); new copies
    # matched that way are used up first in their own order.
    kept = _count_in(old_gpus, todo) > rank_old
    used = np.take_along_axis(rank_new, source[:, :, None], axis=1) < _count_in(todo, old_gpus)
    # Step 3: the remaining new experts, last first, fill the freed slots in slot order.
    position = np.arange(per_gpu)
    free_slots = np.argsort(kept, axis=-1, kind="stable")
    remaining = np.argsort(np.where(used, per_gpu, -position), axis=-1, kind="stable")
    fill = position < (~kept).sum(-1, keepdims=True)
    out = np.where(kept, old_gpus, -1)
    layer_idx, gpu_idx, k = np.nonzero(fill)
    source_slot = remaining[layer_idx, gpu_idx, k]
    out[layer_idx, gpu_idx, free_slots[layer_idx, gpu_idx, k]] = todo[layer_idx, gpu_idx, source_slot]
    return out.reshape(num_layers, num_slots)


def plan_migration_aware(
    weight: np.ndarray, previous: np.ndarray, *, num_gpus: int, gain_per_slot: float = GAIN_PER_SLOT,
    with_weights: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Re-plan per layer only where it pays for its moves.

    Step 1: a fresh plan (DeepSeek's recipe: under per-pass dynamic dispatch it realizes as
    well as any equal-split plan we tried, and costs little), aligned to ``previous``
    (GPU relabelling and slot order that keep the most slots unchanged).
    Step 2: a layer takes it when the drop of its max GPU load (equal split, on ``weight``,
    as a share of the mean GPU load) exceeds ``gain_per_slot`` times the share of the
    layer's slots that would move; other layers keep their placement (a layer whose drop
    could not pay for one moved slot is not aligned at all).
    Returns (phy2log [L, P], water-filled replica weights [L, P], or None without ``with_weights``).
    """
    num_physical = previous.shape[1]
    fresh = deepseek(weight, num_physical, num_gpus=num_gpus, compiled=None)
    mean_gpu = np.maximum(weight.sum(1) / num_gpus, 1e-30)
    old_peak = peak_load(weight, previous, num_gpus)
    # Alignment only reorders GPUs and slots, so the peak it will have is known now: a layer
    # whose gain cannot pay for even one moved slot keeps its placement and is not aligned
    # (the 1e-6 margin covers the rounding of a sum taken in another slot order).
    could_take = (old_peak - peak_load(weight, fresh, num_gpus)) / mean_gpu > gain_per_slot / num_physical * (1 - 1e-6)
    rows = np.nonzero(could_take)[0]
    phy2log = previous.copy()
    if rows.size:
        aligned = align_to_previous(fresh[rows], previous[rows], num_gpus=num_gpus)
        gain = (old_peak[rows] - peak_load(weight[rows], aligned, num_gpus)) / mean_gpu[rows]
        moved = (aligned != previous[rows]).mean(1)
        take = (moved > 0) & (gain > gain_per_slot * moved)
        phy2log[rows[take]] = aligned[take]
    return phy2log, replica_weights(weight, phy2log, num_gpus) if with_weights else None
