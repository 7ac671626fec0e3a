"""The equal-split plan's search (steps 1-4 of ``balanced.py``) compiled with numba, one
layer at a time.

The numpy form in ``balanced.py`` / ``packing.py`` spends its time on per-call overhead:
about 500 dependent steps (re-packs of the replica-count search, each with up to 40 swap
iterations) of small array operations. Here each layer runs the same steps as plain loops.
The plan is the numpy form's, float for float: the same divisions, GPU loads summed the way
numpy sums (``pairwise_sum``), the same stable sorts and first maxima. The swap step orders
GPUs with numpy's unstable ``np.argsort``, whose order among equal loads no rule here
reproduces: where that order could change the swap (``_settled``), numpy's sort itself is
called (``objmode``, about 2 us). The tests compare the two forms on many cases. Imported only
where numba is installed (``compiled.py``; the numpy form plans otherwise); compiled on first
use and cached on disk.
"""

from __future__ import annotations

import numba
import numpy as np

NUMPY_BLOCK = 128  # numpy's pairwise summation: blocks of up to 128 values, 8 partial sums each


@numba.njit(cache=True)
def pairwise_sum(a, start, n):  # pragma: no cover - compiled
    """numpy's sum of a[start:start + n] (``np.add.reduce`` of a contiguous float64 run), bit for bit."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[start + i]
        return res
    if n > NUMPY_BLOCK:
        half = n // 2
        half -= half % 8
        return pairwise_sum(a, start, half) + pairwise_sum(a, start + half, n - half)
    r0, r1, r2, r3 = a[start], a[start + 1], a[start + 2], a[start + 3]
    r4, r5, r6, r7 = a[start + 4], a[start + 5], a[start + 6], a[start + 7]
    i = 8
    while i < n - n % 8:
        j = start + i
        r0, r1, r2, r3 = r0 + a[j], r1 + a[j + 1], r2 + a[j + 2], r3 + a[j + 3]
        r4, r5, r6, r7 = r4 + a[j + 4], r5 + a[j + 5], r6 + a[j + 6], r7 + a[j + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[start + i]
        i += 1
    return res


@numba.njit(cache=True)
def _gpu_loads(slot_load, num_gpus, out):  # pragma: no cover - compiled
    per_gpu = slot_load.shape[0] // num_gpus
    for g in range(num_gpus):
        out[g] = pairwise_sum(slot_load, g * per_gpu, per_gpu)


@numba.njit(cache=True)
def _before(values, i, j):  # pragma: no cover - compiled
    """Item i sorts before item j in a stable ascending sort of values."""
    return values[i] < values[j] or (values[i] == values[j] and i < j)


@numba.njit(cache=True)
def _sort_in_place(values, order):  # pragma: no cover - compiled
    """Insertion-sort the index list ``order`` by (value, index): a stable argsort of
    ``values``, fast when ``order`` is nearly sorted already."""
    for i in range(1, order.shape[0]):
        item = order[i]
        k = i
        while k > 0 and _before(values, item, order[k - 1]):
            order[k] = order[k - 1]
            k -= 1
        order[k] = item


@numba.njit(cache=True)
def _smallest(values, count, out):  # pragma: no cover - compiled
    """The ``count`` first items of a stable ascending argsort of values, into out[:count]."""
    n = 0
    for i in range(values.shape[0]):
        if n == count and not _before(values, i, out[n - 1]):
            continue
        k = min(n, count - 1)
        while k > 0 and _before(values, i, out[k - 1]):
            out[k] = out[k - 1]
            k -= 1
        out[k] = i
        n = min(n + 1, count)


@numba.njit(cache=True)
def _first_max(values, n):  # pragma: no cover - compiled
    """np.argmax(values[:n]) (the first maximum; no NaN): the maximum over 4 lanes, then its first index."""
    m0, m1, m2, m3 = values[0], values[0], values[0], values[0]
    for i in range(0, n - n % 4, 4):
        m0, m1 = max(m0, values[i]), max(m1, values[i + 1])
        m2, m3 = max(m2, values[i + 2]), max(m3, values[i + 3])
    m = max(max(m0, m1), max(m2, m3))
    for i in range(n - n % 4, n):
        m = max(m, values[i])
    first = 0
    while values[first] != m:
        first += 1
    return first


@numba.njit(cache=True)
def _gains(slot_load, g, heavy, gpus, n, per_gpu, xb, gl, gain):  # pragma: no cover - compiled
    """Gains of swapping each slot of ``heavy`` with each slot of gpus[:n], in (heavy slot,
    GPU, slot) order into gain[:S * n * S] (``packing.refine_swaps``'s formula, float for
    float). Returns the index of the first maximum."""
    width = n * per_gpu
    gh = g[heavy]
    for p in range(n):  # the light GPUs' slots side by side, for a loop that vectorizes
        for s in range(per_gpu):
            xb[p * per_gpu + s] = slot_load[gpus[p] * per_gpu + s]
            gl[p * per_gpu + s] = g[gpus[p]]
    for a in range(per_gpu):
        xa = slot_load[heavy * per_gpu + a]
        for j in range(width):
            delta = xa - xb[j]
            own, other = gh - (gh - delta), gh - (gl[j] + delta)
            gain[a * width + j] = own if own < other else other
    return _first_max(gain, per_gpu * width)


@numba.njit(cache=True)
def _settled(g, gain, best, cand, n, m, need, per_gpu):  # pragma: no cover - compiled
    """Whether the first best swap over the candidate light GPUs cand[:n] (cand[:m] below
    the boundary load, the rest at it, ``need`` of which numpy's sort takes) is the one
    numpy's order would pick, whatever that order does with equal loads."""
    width = n * per_gpu
    row, c = best // width, (best % width) // per_gpu
    v = g[cand[c]]
    if c >= m and n - m > need:  # at the boundary, and numpy may leave it out
        return False
    for c2 in range(n):  # another GPU of the same load holding an equal gain: order decides
        if c2 != c and g[cand[c2]] == v:
            for s in range(per_gpu):
                if gain[row * width + c2 * per_gpu + s] == gain[best]:
                    return False
    return True


@numba.njit(cache=True)
def _numpy_order(g):  # pragma: no cover - compiled
    """``np.argsort(g)``: numpy's own (unstable) order, by a call back into Python."""
    with numba.objmode(order="int64[:]"):
        order = np.argsort(g)
    return order


@numba.njit(cache=True)
def _refine_swaps(phy2log, slot_load, g, num_gpus, iters, partners, work):  # pragma: no cover - compiled
    """``packing.refine_swaps`` for one layer, in place; g [G]: its GPU loads, kept current.

    The swap is numpy's: the first maximum of the gains in (heavy slot, light GPU, light
    slot) order, the heavy and light GPUs in ``np.argsort`` order. That sort is not stable,
    so where loads tie the candidates are every GPU that order could take; numpy's own sort
    is asked (``objmode``) only when the heavy GPU ties or the choice hangs on the tie.
    work: ``_scratch``.
    """
    per_gpu = slot_load.shape[0] // num_gpus
    if partners < 1 or per_gpu < 1:
        return
    cand, xb, gl, gain = work[3], work[4], work[5], work[6]
    for _ in range(iters):
        heavy, tied = 0, False
        for j in range(1, num_gpus):
            if g[j] >= g[heavy]:
                tied = g[j] == g[heavy]
                heavy = j
        settled = False
        if not tied:
            _smallest(g, partners, cand)  # the stable order's light GPUs
            bound = g[cand[partners - 1]]
            m = 0
            while g[cand[m]] < bound:
                m += 1
            n = m
            for j in range(num_gpus):  # every GPU at the boundary load
                if g[j] == bound:
                    cand[n] = j
                    n += 1
            best = _gains(slot_load, g, heavy, cand, n, per_gpu, xb, gl, gain)
            if not gain[best] > 1e-9 * (g[heavy] + 1e-30):
                return
            settled = _settled(g, gain, best, cand, n, m, partners - m, per_gpu)
        if not settled:
            order = _numpy_order(g)
            heavy = order[num_gpus - 1]
            cand[:partners] = order[:partners]
            n = partners
            best = _gains(slot_load, g, heavy, cand, n, per_gpu, xb, gl, gain)
            if not gain[best] > 1e-9 * (g[heavy] + 1e-30):
                return
        width = n * per_gpu
        a = heavy * per_gpu + best // width
        to = cand[(best % width) // per_gpu]
        b = to * per_gpu + best % per_gpu
        phy2log[a], phy2log[b] = phy2log[b], phy2log[a]
        slot_load[a], slot_load[b] = slot_load[b], slot_load[a]
        g[heavy] = pairwise_sum(slot_load, heavy * per_gpu, per_gpu)  # only these two GPUs changed
        g[to] = pairwise_sum(slot_load, to * per_gpu, per_gpu)


@numba.njit(cache=True)
def _pack(w, count, num_gpus, swap_iters, partners, phy2log, slot_load, g, work, fresh):  # pragma: no cover - compiled
    """``balanced.pack_counts`` for one layer (round-robin packing, then swaps) into
    phy2log, slot_load [P] and their GPU loads g [G]. work: ``_scratch``; fresh: a new layer."""
    per, order, lightest = work[0], work[1], work[2]
    num_logical = w.shape[0]
    per_gpu = phy2log.shape[0] // num_gpus
    # Slots heaviest first, ties in slot order: experts by (-load per replica, id), each
    # expert's replicas together (the stable sort of the expanded slot list).
    for e in range(num_logical):
        per[e] = -(w[e] / count[e])
    if fresh:  # a new layer: a full sort (a trial changes two experts: insertion from the last order)
        order[:] = np.argsort(per, kind="mergesort")
    else:
        _sort_in_place(per, order)
    lightest[:] = np.arange(num_gpus)
    g[:] = 0.0
    e, left = order[0], count[order[0]]
    q = 1
    for k in range(per_gpu):
        lightest[:] = lightest[::-1].copy()  # the lightest took the heaviest slots: about the reverse order now
        _sort_in_place(g, lightest)
        for j in range(num_gpus):
            while left == 0:
                e, left = order[q], count[order[q]]
                q += 1
            left -= 1
            dest = lightest[j] * per_gpu + k
            phy2log[dest] = e
            slot_load[dest] = -per[e]
            g[lightest[j]] += slot_load[dest]
    _gpu_loads(slot_load, num_gpus, g)  # the round-robin sums were taken in another order
    _refine_swaps(phy2log, slot_load, g, num_gpus, swap_iters, partners, work)


@numba.njit(cache=True)
def _scratch(num_logical, num_gpus, per_gpu):  # pragma: no cover - compiled
    """Work arrays of ``_pack`` and ``_refine_swaps``: (experts' loads per replica, their
    order, GPUs by load, light candidates, their slot loads side by side, their GPU loads, gains)."""
    width = num_gpus * per_gpu  # room for every GPU as a light candidate
    return (np.empty(num_logical), np.arange(num_logical), np.empty(num_gpus, dtype=np.int64),
            np.empty(num_gpus, dtype=np.int64), np.empty(width), np.empty(width), np.empty(per_gpu * width))


@numba.njit(cache=True)
def search_rows(weight, count, mean_gpu, num_gpus, rounds, patience, good_enough, swap_iters,
                partners, phy2log):  # pragma: no cover - compiled
    """Steps 2-4 of ``balanced.py`` for every layer, into phy2log [L, P] int64.

    weight: [L, E] float64; count: [L, E] int64 (step 1's counts, updated in place);
    mean_gpu: [L] float64, the layer's mean GPU load. Step 4 per layer as ``balanced_plan``
    does it: move one replica to the taker (the largest slot of the heaviest GPU) from the
    next donor by loss, re-pack, keep it if the peak drops; stop after ``patience`` misses
    in a row, ``rounds`` tries, or once the peak is within ``good_enough`` of the mean.
    """
    num_layers, num_logical = weight.shape
    num_slots = phy2log.shape[1]
    per_gpu = num_slots // num_gpus
    slot_load, g = np.empty(num_slots), np.empty(num_gpus)
    trial, trial_load, trial_g = np.empty(num_slots, dtype=np.int64), np.empty(num_slots), np.empty(num_gpus)
    trial_count = np.empty(num_logical, dtype=np.int64)
    loss = np.empty(num_logical)
    donors = np.empty(patience + 1, dtype=np.int64)
    work = _scratch(num_logical, num_gpus, per_gpu)
    for r in range(num_layers):
        w, cnt, cur = weight[r], count[r], phy2log[r]
        _pack(w, cnt, num_gpus, swap_iters, partners, cur, slot_load, g, work, True)
        if num_slots == num_logical:
            continue
        peak = g.max()
        fails, tries = 0, 0
        while fails < patience and tries < rounds and peak > mean_gpu[r] * (1 + good_enough):
            tries += 1
            heavy = np.argmax(g)
            top = heavy * per_gpu + np.argmax(slot_load[heavy * per_gpu:(heavy + 1) * per_gpu])
            taker = cur[top]
            for e in range(num_logical):
                loss[e] = w[e] / max(cnt[e] - 1, 1) if cnt[e] >= 2 else np.inf
            loss[taker] = np.inf
            k = min(fails, num_logical - 1)
            _smallest(loss, k + 1, donors)
            donor = donors[k]
            if not np.isfinite(loss[donor]):  # no donor left: the re-pack would be the same plan
                fails += 1
                continue
            trial_count[:] = cnt
            trial_count[taker] += 1
            trial_count[donor] -= 1
            _pack(w, trial_count, num_gpus, swap_iters, partners, trial, trial_load, trial_g, work, False)
            trial_peak = trial_g.max()
            if trial_peak < peak * (1 - 1e-12):
                cur[:] = trial
                slot_load[:] = trial_load
                g[:] = trial_g
                cnt[:] = trial_count
                peak, fails = trial_peak, 0
            else:
                fails += 1


@numba.njit(cache=True)
def divisor_rows(w, num_physical, bisect_iters):  # pragma: no cover - compiled
    """``balanced.divisor_counts`` (minimum 1) after its step 1: w [L, E] float64, floored
    weights. Returns [L, E] int64 replica counts."""
    num_layers, num_logical = w.shape
    count = np.empty((num_layers, num_logical), dtype=np.int64)
    for r in range(num_layers):
        lo, hi = 0.0, w[r].max()
        for _ in range(bisect_iters):  # the totals are sums of integers: exact in any order
            mid = 0.5 * (lo + hi)
            total = 0.0
            for e in range(num_logical):
                total += max(1.0, np.ceil(w[r, e] / mid))
            if total > num_physical:
                lo = mid
            else:
                hi = mid
        for e in range(num_logical):
            count[r, e] = int(max(1.0, np.ceil(w[r, e] / hi)))
        left = num_physical - count[r].sum()
        while left > 0:  # ties: one more each to the highest load per replica
            order = np.argsort(-(w[r] / count[r]), kind="mergesort")
            for k in range(min(left, num_logical)):
                count[r, order[k]] += 1
            left = num_physical - count[r].sum()
    return count
