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

from .balanced import peak_load, replica_weights
from .deepseek import deepseek
from .split import replica_counts

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
        count = replica_counts(phy2log, num_logical)
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


def align_to_previous(new: np.ndarray, previous: np.ndarray, *, num_gpus: int) -> np.ndarray:
    """Relabel GPUs and reorder slots inside each GPU of ``new`` so that as many slots as
    possible keep the expert they hold in ``previous`` (same GPU-level sets, fewer moves).

    new, previous: [L, P] int64. Returns [L, P] int64.
    """
    from scipy.optimize import linear_sum_assignment

    num_layers, num_slots = new.shape
    per_gpu = num_slots // num_gpus
    num_logical = int(max(new.max(), previous.max())) + 1
    out = np.empty_like(new)
    for layer in range(num_layers):
        # Step 1: match new GPUs to old GPUs by the multiset overlap of their experts.
        occ_new = np.zeros((num_gpus, num_logical), dtype=np.int64)
        occ_old = np.zeros((num_gpus, num_logical), dtype=np.int64)
        np.add.at(occ_new, (np.arange(num_slots) // per_gpu, new[layer]), 1)
        np.add.at(occ_old, (np.arange(num_slots) // per_gpu, previous[layer]), 1)
        overlap = np.minimum(occ_new[:, None, :], occ_old[None, :, :]).sum(-1)
        src, dst = linear_sum_assignment(-overlap)
        # Step 2: inside each GPU, experts already there keep their slot.
        for g_new, g_old in zip(src, dst):
            old = list(previous[layer, g_old * per_gpu:(g_old + 1) * per_gpu])
            todo = list(new[layer, g_new * per_gpu:(g_new + 1) * per_gpu])
            slot = [-1] * per_gpu
            for i, e in enumerate(old):
                if e in todo:
                    slot[i] = e
                    todo.remove(e)
            for i in range(per_gpu):
                if slot[i] < 0:
                    slot[i] = todo.pop()
            out[layer, g_old * per_gpu:(g_old + 1) * per_gpu] = slot
    return out


def plan_migration_aware(
    weight: np.ndarray, previous: np.ndarray, *, num_gpus: int, gain_per_slot: float = GAIN_PER_SLOT,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-plan per layer only where it pays for its moves.

    Step 1: a fresh plan (DeepSeek's recipe: under per-pass dynamic dispatch it realizes as
    well as any equal-split plan we tried, and costs little), aligned to ``previous``
    (GPU relabelling and slot order that keep the most slots unchanged).
    Step 2: a layer takes it when the drop of its max GPU load (equal split, on ``weight``,
    as a share of the mean GPU load) exceeds ``gain_per_slot`` times the share of the
    layer's slots that would move; other layers keep their placement.
    Returns (phy2log [L, P], water-filled replica weights [L, P]).
    """
    num_physical = previous.shape[1]
    fresh = align_to_previous(deepseek(weight, num_physical, num_gpus=num_gpus), previous, num_gpus=num_gpus)
    mean_gpu = np.maximum(weight.sum(1) / num_gpus, 1e-30)
    gain = (peak_load(weight, previous, num_gpus) - peak_load(weight, fresh, num_gpus)) / mean_gpu
    moved = (fresh != previous).mean(1)
    take = (moved > 0) & (gain > gain_per_slot * moved)
    phy2log = previous.copy()
    phy2log[take] = fresh[take]
    return phy2log, replica_weights(weight, phy2log, num_gpus)
