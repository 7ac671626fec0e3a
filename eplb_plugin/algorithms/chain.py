"""Weighted placement by "cutting the load line": every GPU at exactly the mean load.

When replicas may take unequal shares of their expert's tokens (replica weights), a layer
can be balanced perfectly with ``R >= G`` redundant slots: the GPUs form a chain, and
between neighbours one expert is split so that each GPU carries exactly the mean load
``M = sum(load) / G``. Vectorized over layers (numpy), one loop step per GPU:

1. Partition the ``E`` experts into ``G`` bins of ``S - 1`` items (``S = P / G`` slots per
   GPU; padded with empty items), balanced heaviest-first (round-robin LPT). The spare slot
   of each GPU is kept for the piece of the expert that the chain carries in.
2. Order the bins along the chain, carrying the running surplus ``D`` (load that the GPUs
   so far hold beyond ``g * M``). At each step take the bin that keeps the new surplus
   ``D' = D + sum(bin) - M`` smallest but >= 0, among feasible bins: either the carried
   expert keeps carrying (``D' <= D``: it leaves ``D - D'`` here) or the bin's heaviest item
   takes over (``D' <= its load``: the carried expert ends here with all of ``D``).
3. Slots left empty (the first GPU, chain restarts, padding) take a zero-weight replica of
   the layer's hottest expert; the shares follow from the piece loads.

Where no feasible bin exists (this needs extreme loads), the least-violating one is taken
and the layer misses the mean; ``plan_balanced`` then keeps whichever plan is better.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from .packing import round_robin_pack

FEASIBLE_TOL = 1e-12


def chain_plan(weight: np.ndarray, num_physical: int, *, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """weight: [L, E] float >= 0 with P - E >= G (else ValueError).

    Returns (phy2log [L, P] int64 rank-major, slot_load [L, P] float64): the tokens each
    slot should take; per expert the slot loads sum to its load.
    """
    num_layers, num_logical = weight.shape
    slots_per_gpu = num_physical // num_gpus
    per_bin = slots_per_gpu - 1
    if num_physical - num_logical < num_gpus or per_bin < 1:
        raise UsageError(f"chain_plan needs P - E >= G; got P={num_physical}, E={num_logical}, G={num_gpus}")
    rows = np.arange(num_layers)
    w = weight.astype(np.float64)
    mean = w.sum(1) / num_gpus
    tol = FEASIBLE_TOL * (mean + 1.0)
    # Step 1: bins of S - 1 items (empty items carry id -1 and load 0).
    pad = num_gpus * per_bin - num_logical
    items = np.concatenate([np.broadcast_to(np.arange(num_logical), w.shape), np.full((num_layers, pad), -1)], 1)
    item_load = np.concatenate([w, np.zeros((num_layers, pad))], 1)
    perm = round_robin_pack(item_load, num_gpus)
    items = np.take_along_axis(items, perm, 1)
    item_load = np.take_along_axis(item_load, perm, 1)
    bins = items.reshape(num_layers, num_gpus, per_bin)
    bin_load = item_load.reshape(num_layers, num_gpus, per_bin)
    surplus = bin_load.sum(-1) - mean[:, None]
    top = bin_load.argmax(-1)
    top_load = bin_load.max(-1)
    # Step 2: walk the chain.
    used = np.zeros((num_layers, num_gpus), dtype=bool)
    carried = np.zeros(num_layers)
    carrier = np.full(num_layers, -1)
    phy2log = np.full((num_layers, num_gpus, slots_per_gpu), -1, dtype=np.int64)
    slot_load = np.zeros((num_layers, num_gpus, slots_per_gpu))
    for g in range(num_gpus):
        after = carried[:, None] + surplus
        keep = after <= carried[:, None] + tol[:, None]
        feasible = (after >= -tol[:, None]) & (keep | (after <= top_load + tol[:, None])) & ~used
        violation = np.maximum(-after, 0) + np.maximum(after - np.maximum(carried[:, None], top_load), 0)
        score = np.where(used, np.inf, np.where(feasible, after, 1e6 * (mean[:, None] + 1.0) + violation))
        b = score.argmin(1)
        used[rows, b] = True
        nxt = np.clip(after[rows, b], 0.0, None)
        keeps = keep[rows, b]
        phy2log[:, g, 1:] = bins[rows, b]
        slot_load[:, g, 1:] = bin_load[rows, b]
        phy2log[:, g, 0] = carrier
        slot_load[:, g, 0] = np.where(keeps, np.maximum(carried - nxt, 0.0), carried)
        switch = np.nonzero(~keeps)[0]
        top_slot = 1 + top[switch, b[switch]]
        handed = np.minimum(nxt[switch], slot_load[switch, g, top_slot])
        slot_load[switch, g, top_slot] -= handed
        nxt[switch] = handed
        carrier[switch] = bins[switch, b[switch], top[switch, b[switch]]]
        carried = nxt
    # Step 3: empty slots hold a zero-weight replica of the hottest expert.
    phy2log = phy2log.reshape(num_layers, num_physical)
    slot_load = slot_load.reshape(num_layers, num_physical)
    empty = phy2log < 0
    phy2log = np.where(empty, w.argmax(1)[:, None], phy2log)
    slot_load = np.where(empty, 0.0, slot_load)
    return phy2log, slot_load


def shares_from_loads(weight: np.ndarray, phy2log: np.ndarray, slot_load: np.ndarray) -> np.ndarray:
    """Slot loads -> replica weights. [L, E], [L, P], [L, P] -> [L, P] float32, per-expert sums 1
    (an expert with no tokens splits equally)."""
    num_layers, num_logical = weight.shape
    own = np.take_along_axis(weight.astype(np.float64), phy2log, axis=1)
    flat = (phy2log + num_logical * np.arange(num_layers)[:, None]).ravel()
    count = np.bincount(flat, minlength=num_layers * num_logical).reshape(num_layers, num_logical)
    slot_count = np.take_along_axis(count, phy2log, axis=1)
    share = np.where(own > 0, slot_load / np.where(own > 0, own, 1.0), 1.0 / slot_count)
    return share.astype(np.float32)
