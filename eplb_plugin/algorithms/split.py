"""How an expert's tokens split over its replicas: equal, and water-filled.

Both work on numpy arrays, vectorized over rows (a row is one layer, or one layer of one
pass). Rows are independent.
"""

from __future__ import annotations

import numpy as np

WATERFILL_ITERS = 60


def replica_counts(phy2log: np.ndarray, num_logical: int) -> np.ndarray:
    """Replicas per logical expert. phy2log: [N, P] int. Returns [N, E] int64."""
    rows = phy2log.shape[0]
    flat = (phy2log + num_logical * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * num_logical).reshape(rows, num_logical)


def equal_slot_loads(load: np.ndarray, phy2log: np.ndarray) -> np.ndarray:
    """Each expert's load split equally over its replicas. load: [N, E]; returns [N, P]."""
    count = replica_counts(phy2log, load.shape[1])
    return np.take_along_axis(load / np.maximum(count, 1), phy2log, axis=1)


def gpu_sum(slot_load: np.ndarray, num_gpus: int) -> np.ndarray:
    """[N, P] slot loads -> [N, G] GPU loads (rank-major slots)."""
    return slot_load.reshape(slot_load.shape[0], num_gpus, -1).sum(-1)


def waterfill_slot_loads(
    load: np.ndarray, phy2log: np.ndarray, num_gpus: int, *, iters: int = WATERFILL_ITERS
) -> np.ndarray:
    """Split each expert's load over its replicas to (approximately) minimize the max GPU load.

    load: [N, E] float tokens per logical expert; phy2log: [N, P] int.
    Returns slot loads [N, P] float64 (rows sum per expert to ``load``).

    Diffusion: every iteration, each slot of a replicated expert takes load from its
    expert's slots on heavier GPUs and gives to those on lighter ones (the step is divided
    by the number of replicated slots on the GPU so concurrent moves do not overshoot).
    Single-replica experts never move. Exact optimum is a max-flow; 60 iterations get
    within ~0.1% of it on the project's traces.
    """
    rows, num_slots = phy2log.shape
    num_logical = load.shape[1]
    slots_per_gpu = num_slots // num_gpus
    load = load.astype(np.float64)
    # Step 1: equal split to start; find the slots that may move (expert has >= 2 replicas).
    count = replica_counts(phy2log, num_logical)
    slot_count = np.take_along_axis(count, phy2log, axis=1)
    x = np.take_along_axis(load, phy2log, axis=1) / slot_count
    movable = slot_count > 1
    if not movable.any():
        return x
    slot_gpu = np.arange(num_slots) // slots_per_gpu
    flat_expert = (phy2log + num_logical * np.arange(rows)[:, None]).ravel()
    movable_per_gpu = movable.reshape(rows, num_gpus, slots_per_gpu).sum(-1)
    step = np.where(movable, 1.0 / np.maximum(movable_per_gpu[:, slot_gpu], 1), 0.0)
    expert_load = np.take_along_axis(load, phy2log, axis=1)
    # Step 2: diffuse: move each slot toward its expert's mean GPU load.
    for _ in range(iters):
        g = x.reshape(rows, num_gpus, slots_per_gpu).sum(-1)[:, slot_gpu]
        mean_g = np.bincount(flat_expert, weights=g.ravel(), minlength=rows * num_logical)
        mean_g = mean_g.reshape(rows, num_logical) / np.maximum(count, 1)
        x = x + step * (np.take_along_axis(mean_g, phy2log, axis=1) - g)
        np.maximum(x, 0.0, out=x)
        # Step 3: renormalize so each expert's slots carry exactly its load.
        total = np.bincount(flat_expert, weights=x.ravel(), minlength=rows * num_logical).reshape(rows, num_logical)
        scale = np.take_along_axis(total, phy2log, axis=1)
        x = np.where(scale > 0, x * expert_load / np.where(scale > 0, scale, 1.0), expert_load / slot_count)
    return x
