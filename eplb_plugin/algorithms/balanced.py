"""The project's placement policy (``auto`` / ``eplb_plugin``): replicate, pack, refine.

Fresh plan, vectorized over layers (numpy):

1. Replica counts by the divisor method (the same counts DeepSeek's greedy reaches,
   computed by bisection on the per-replica load instead of one step per slot).
2. Round-robin longest-processing-time packing: slots heaviest first, in rounds of one
   slot per GPU, each round's heaviest slot to the currently lightest GPU. Every GPU gets
   exactly ``P / G`` slots and no GPU fills up early.
3. Swap refinement: repeatedly swap one slot of the heaviest GPU with one slot of a light
   GPU when that lowers the heavier of the two (steps 2-3 live in ``packing.py``, shared
   with the chain plan). Equal loads are ordered by GPU index, so the plan is defined
   everywhere (not by the tie order of the machine's sort).
4. Replica-move refinement: move one replica from an expert that has spare replicas to the
   expert whose slot is the heaviest, when the layer's max GPU load drops; a layer stops
   after ``COUNT_PATIENCE`` misses in a row (``FAR_PATIENCE`` while its peak is more than
   ``FAR_FROM_MEAN`` above the mean GPU load, where one more try pays most often).
5. Per layer, keep the better of this plan and DeepSeek's recipe (never worse).
6. Replica weights: water-fill each expert's tokens over its replicas on the planning counts.

With replica weights and at least one redundant slot per GPU, ``plan_balanced`` uses the
chain plan of ``chain.py`` instead (perfect in-sample), keeping steps 1-6 per layer where
they are better.

Steps 1-4 and the recipe of step 5 run compiled (``balanced_jit.py``, ``deepseek_jit.py``)
for large plans where numba is installed (``compiled.py``): the same plan, several times faster.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..balance import gpu_loads
from ..maps import replica_count
from .chain import chain_plan, shares_from_loads
from .compiled import balanced_kernels, wanted
from .deepseek import deepseek
from .packing import SWAP_ITERS, SWAP_PARTNERS, counts_to_slots, refine_swaps, round_robin_pack
from .split import peak_load, waterfill_slot_loads

BISECT_ITERS = 30
COUNT_ROUNDS = 40
COUNT_PATIENCE = 3
FAR_PATIENCE = 4  # COUNT_PATIENCE of a layer whose peak is more than FAR_FROM_MEAN above the mean GPU load
FAR_FROM_MEAN = 0.01
SPECULATE_ROWS = 16  # rows left at which a row's remaining donors are tried at once (step 4)
GOOD_ENOUGH = 5e-4  # a layer within 0.05% of the mean GPU load is not searched further
CHAIN_EXACT = 1e-9  # a chain layer this close to the mean reached it (else compare with the equal plan)


def divisor_counts(weight: np.ndarray, num_physical: int, *, compiled: bool | None = None) -> np.ndarray:
    """Replicas per expert, each >= 1, summing to num_physical, minimizing the max load per
    replica.

    weight: [L, E] float >= 0.
    compiled: steps 2-3 compiled where numba is installed (the same counts);
        None = by size (``compiled.worth_compiling``).
    Returns [L, E] int64.
    """
    num_layers, num_logical = weight.shape
    # Step 1: a tiny floor keeps all-zero layers well posed (extra replicas go to index order).
    w = weight + 1e-9 * (weight.mean(1, keepdims=True) + 1.0)
    kernels = balanced_kernels() if wanted(compiled, num_layers, num_physical) else None
    if kernels is not None:  # steps 2-3 compiled, the same counts
        return kernels.divisor_rows(np.ascontiguousarray(w, dtype=np.float64), num_physical, BISECT_ITERS)
    floor = np.ones_like(w)
    lo = np.zeros((num_layers, 1))
    hi = w.max(1, keepdims=True)
    # Step 2: bisection on tau: count(tau) = max(1, ceil(w / tau)) is non-increasing in tau.
    for _ in range(BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        total = np.maximum(floor, np.ceil(w / mid)).sum(1, keepdims=True)
        over = total > num_physical
        lo = np.where(over, mid, lo)
        hi = np.where(over, hi, mid)
    count = np.maximum(floor, np.ceil(w / hi)).astype(np.int64)
    # Step 3: hand out what is left (ties) to the highest load per replica, one each.
    left = num_physical - count.sum(1)
    while (left > 0).any():
        per = w / count
        order = np.argsort(-per, axis=1, kind="stable")
        take = np.arange(num_logical)[None, :] < np.minimum(left, num_logical)[:, None]
        np.put_along_axis(count, order, np.take_along_axis(count, order, axis=1) + take, axis=1)
        left = num_physical - count.sum(1)
    return count


def pack_counts(weight: np.ndarray, count: np.ndarray, num_gpus: int) -> np.ndarray:
    """Steps 2-3 for given replica counts. weight, count: [L, E]. Returns phy2log [L, P]."""
    num_physical = int(count[0].sum())
    slots = counts_to_slots(count, num_physical)
    slot_load = np.take_along_axis(weight / count, slots, axis=1)
    perm = round_robin_pack(slot_load, num_gpus)
    phy2log = np.take_along_axis(slots, perm, axis=1)
    slot_load = np.take_along_axis(slot_load, perm, axis=1)
    refine_swaps(phy2log, slot_load, num_gpus)
    return phy2log


def balanced_plan(
    weight: np.ndarray, num_physical: int, *, num_gpus: int, rounds: int = COUNT_ROUNDS,
    compiled: bool | None = None,
) -> np.ndarray:
    """Steps 1-4 of the module docstring for one flat set of GPUs. weight: [L, E] -> [L, P] int64.

    Compiled (``balanced_jit``) where numba is installed and ``compiled`` asks for it (None: by
    size, ``compiled.worth_compiling``), else ``balanced_plan_numpy``: the same plan.
    """
    return balanced_plan_and_peak(weight, num_physical, num_gpus=num_gpus, rounds=rounds, compiled=compiled)[0]


def balanced_plan_and_peak(
    weight: np.ndarray, num_physical: int, *, num_gpus: int, rounds: int = COUNT_ROUNDS,
    compiled: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``balanced_plan`` and its max GPU load per layer (``split.peak_load``): ([L, P] int64, [L] float64)."""
    kernels = balanced_kernels() if wanted(compiled, weight.shape[0], num_physical) else None
    if kernels is None:
        phy2log = balanced_plan_numpy(weight, num_physical, num_gpus=num_gpus, rounds=rounds)
        return phy2log, peak_load(weight, phy2log, num_gpus)
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    count = divisor_counts(weight, num_physical, compiled=True)
    phy2log = np.empty((weight.shape[0], num_physical), dtype=np.int64)
    peak = np.empty(weight.shape[0])
    kernels.search_rows(weight, count, weight.sum(1) / num_gpus, num_gpus, rounds, COUNT_PATIENCE, FAR_PATIENCE,
                        FAR_FROM_MEAN, GOOD_ENOUGH, SWAP_ITERS, min(SWAP_PARTNERS, num_gpus - 1), phy2log, peak)
    return phy2log, peak


def balanced_plan_numpy(
    weight: np.ndarray, num_physical: int, *, num_gpus: int, rounds: int = COUNT_ROUNDS
) -> np.ndarray:
    """``balanced_plan`` in numpy, vectorized over layers (the reference of the compiled form)."""
    num_layers, num_logical = weight.shape
    per_gpu = num_physical // num_gpus
    mean_gpu = weight.sum(1) / num_gpus
    count = divisor_counts(weight, num_physical, compiled=False)
    phy2log = pack_counts(weight, count, num_gpus)
    peak = peak_load(weight, phy2log, num_gpus)
    if num_physical == num_logical:
        return phy2log
    # Step 4: move one replica to the largest slot of the heaviest GPU from the expert that
    # loses least by giving one up; re-pack; keep if the peak drops. A row that fails
    # COUNT_PATIENCE times in a row (FAR_PATIENCE while its peak is more than FAR_FROM_MEAN
    # above the mean; trying the next donor each time) stops; a row takes part in at most
    # ``rounds`` tries. Rows are independent, and a rejected try leaves its row as it was
    # (its peak, hence its patience, too), so once few rows are left (the time then goes to
    # per-step overhead, not to data) a row's remaining donors are tried at once and the
    # first that helps is kept: the same plan as trying them one per round, in fewer rounds.
    fails = np.zeros(num_layers, dtype=np.int64)
    tries_made = np.zeros(num_layers, dtype=np.int64)
    while True:
        patience = np.where(peak > mean_gpu * (1 + FAR_FROM_MEAN), FAR_PATIENCE, COUNT_PATIENCE)
        rows = np.nonzero((fails < patience) & (tries_made < rounds)
                          & (peak > mean_gpu * (1 + GOOD_ENOUGH)))[0]
        if rows.size == 0:
            break
        tries = np.minimum(patience[rows] - fails[rows], rounds - tries_made[rows]) \
            if rows.size <= SPECULATE_ROWS else np.ones(rows.size, dtype=np.int64)
        ar = np.arange(rows.size)
        w, cnt, cur = weight[rows], count[rows], phy2log[rows]
        x = np.take_along_axis(w / cnt, cur, axis=1)
        heavy = x.reshape(rows.size, num_gpus, per_gpu).sum(-1).argmax(1)
        heavy_slots = heavy[:, None] * per_gpu + np.arange(per_gpu)
        taker = cur[ar, heavy_slots[ar, np.take_along_axis(x, heavy_slots, axis=1).argmax(1)]]
        loss = np.where(cnt >= 2, w / np.maximum(cnt - 1, 1), np.inf)
        loss[ar, taker] = np.inf
        by_loss = np.argsort(loss, axis=1, kind="stable")
        # One candidate per (row, try): try k of a row offers its (fails + k)-th donor.
        of = np.repeat(ar, tries)
        first_of_row = np.cumsum(tries) - tries
        k = np.arange(of.size) - first_of_row[of]
        cand = np.arange(of.size)
        donor = by_loss[of, np.minimum(fails[rows][of] + k, num_logical - 1)]
        valid = np.isfinite(loss[of, donor])
        trial_count = cnt[of]
        trial_count[cand, taker[of]] += valid
        trial_count[cand, donor] -= valid
        trial = pack_counts(w[of], trial_count, num_gpus)
        trial_peak = peak_load(w[of], trial, num_gpus)
        better = trial_peak < peak[rows][of] * (1 - 1e-12)
        # The first try that helps wins (later ones would have run against a new plan).
        first = np.minimum.reduceat(np.where(better, k, tries[of]), first_of_row)
        won = first < tries
        tries_made[rows] += np.where(won, first + 1, tries)
        fails[rows] = np.where(won, 0, fails[rows] + tries)
        pick = first_of_row[won] + first[won]
        keep = rows[won]
        phy2log[keep], count[keep], peak[keep] = trial[pick], trial_count[pick], trial_peak[pick]
    return phy2log


def best_of(candidates: list[np.ndarray], peaks: list[np.ndarray]) -> np.ndarray:
    """Per layer, the candidate map [L, P] with the lowest max GPU load peaks[i] [L] (first wins ties)."""
    pick = np.stack(peaks).argmin(0)
    stacked = np.stack(candidates)
    return stacked[pick, np.arange(stacked.shape[1])]


class FreshPlan(NamedTuple):
    """A fresh plan: phy2log [L, P] int64; weights [L, P] float32 replica weights (None =
    equal split); peak [L] float64, its max GPU load under an equal split where weights is
    None (``split.peak_load``'s floats), else None."""

    phy2log: np.ndarray
    weights: np.ndarray | None
    peak: np.ndarray | None


def plan_balanced(
    weight: np.ndarray, num_physical: int, *, num_gpus: int, with_weights: bool = True,
    rounds: int = COUNT_ROUNDS,
) -> FreshPlan:
    """Fresh plan. weight: [L, E] float. Returns ``FreshPlan`` (phy2log, weights | None, peak | None).

    with_weights and P - E >= G: the chain plan (``chain.py``: every GPU at the mean load
    under its replica weights); layers where the chain misses the mean fall back to the
    equal-split plan below with water-filled weights, per layer whichever is better.
    Otherwise: steps 1-5 of the module docstring (``rounds`` bounds step 4's search).
    """
    num_layers, num_logical = weight.shape
    if with_weights and num_physical - num_logical >= num_gpus and num_physical // num_gpus >= 2:
        phy2log, slot_load = chain_plan(weight, num_physical, num_gpus=num_gpus)
        weights = shares_from_loads(weight, phy2log, slot_load)
        mean = weight.sum(1) / num_gpus
        peak = gpu_loads(slot_load, num_gpus).max(1)
        miss = peak > mean * (1 + CHAIN_EXACT)
        if miss.any():
            rows = np.nonzero(miss)[0]
            eq, eq_w, _ = equal_plan(weight[rows], num_physical, num_gpus=num_gpus, rounds=rounds)
            eq_peak = gpu_loads(np.take_along_axis(weight[rows], eq, axis=1) * eq_w, num_gpus).max(1)
            better = eq_peak < peak[rows]
            phy2log[rows[better]] = eq[better]
            weights[rows[better]] = eq_w[better]
        return FreshPlan(phy2log, weights, None)
    return equal_plan(weight, num_physical, num_gpus=num_gpus, rounds=rounds, with_weights=with_weights)


def equal_plan(
    weight: np.ndarray, num_physical: int, *, num_gpus: int, rounds: int = COUNT_ROUNDS, with_weights: bool = True,
) -> FreshPlan:
    """Steps 1-6: the plan for equal split, per layer the better of ours and DeepSeek's.
    weight: [L, E]. Returns ``FreshPlan`` (phy2log [L, P] int64, water-filled weights [L, P] | None,
    peak [L] only without weights)."""
    ours, ours_peak = balanced_plan_and_peak(weight, num_physical, num_gpus=num_gpus, rounds=rounds)
    reference = deepseek(weight, num_physical, num_gpus=num_gpus, compiled=None)
    reference_peak = peak_load(weight, reference, num_gpus)
    phy2log = best_of([ours, reference], [ours_peak, reference_peak])
    if with_weights:
        return FreshPlan(phy2log, replica_weights(weight, phy2log, num_gpus), None)
    # The peak of the map best_of picked: the lower one (the same float either way).
    return FreshPlan(phy2log, None, np.minimum(ours_peak, reference_peak))


def replica_weights(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """Water-filled share of its expert's tokens per slot. Returns [L, P] float32, per-expert sums 1."""
    num_logical = weight.shape[1]
    x = waterfill_slot_loads(weight, phy2log, num_gpus)
    own = np.take_along_axis(weight.astype(np.float64), phy2log, axis=1)
    count = np.take_along_axis(replica_count(phy2log, num_logical), phy2log, axis=1)
    share = np.where(own > 0, x / np.where(own > 0, own, 1.0), 1.0 / count)
    return share.astype(np.float32)
