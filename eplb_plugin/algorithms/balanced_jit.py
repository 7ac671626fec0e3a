"""The equal-split plan's search (steps 1-4 of ``balanced.py``) compiled with numba, one
layer at a time.

The numpy form in ``balanced.py`` / ``packing.py`` spends its time on per-call overhead:
about 500 dependent steps (re-packs of the replica-count search, each with up to 40 swap
iterations) of small array operations. Here each layer runs the same steps as plain loops.
The plan is the numpy form's, float for float: the same divisions, GPU loads summed the way
numpy sums (``pairwise_sum``), the same stable orders (ties by index) and first maxima; the
tests compare the two forms on many cases. Most of the time goes to the swap step: there
the GPUs stay sorted by load across swaps (a swap moves two of them), and the first best
swap is found from per-light-slot maxima in loops that vectorize. Imported only where numba
is installed (``compiled.py``; the numpy form plans otherwise); compiled on first use and
cached on disk.
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


@numba.njit(cache=True, inline="always")
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
def _resort(values, order, at):  # pragma: no cover - compiled
    """Move order[at] to its place in ``order``, sorted by (value, index) but for it; returns
    that place."""
    item = order[at]
    while at > 0 and _before(values, item, order[at - 1]):
        order[at] = order[at - 1]
        at -= 1
    while at < order.shape[0] - 1 and _before(values, order[at + 1], item):
        order[at] = order[at + 1]
        at += 1
    order[at] = item
    return at


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


@numba.njit(cache=True, inline="always")
def _gain(gh, gl, delta):  # pragma: no cover - compiled
    """What moving ``delta`` from a GPU of load gh to one of load gl gains: min(gh - (gh - delta),
    gh - (gl + delta)), ``packing.refine_swaps``'s floats."""
    own, other = gh - (gh - delta), gh - (gl + delta)
    return own if own < other else other


@numba.njit(cache=True)
def _best_swap(slot_load, g, heavy, gpus, n, per_gpu, xb, gl, top):  # pragma: no cover - compiled
    """The first maximum of the swap gains of GPU ``heavy`` with the light GPUs gpus[:n], in
    (heavy slot, light GPU, light slot) order (``packing.refine_swaps``'s formula, float for
    float): returns (its flat index, the gain).

    Loops that vectorize: the gains with, per light slot, their maximum over the heavy
    slots; then the largest of those and, among the light slots that reach it, the first
    heavy slot. xb, gl, top [n * S]: work arrays.
    """
    width = n * per_gpu
    gh = g[heavy]
    for p in range(n):  # the light GPUs' slots side by side
        for s in range(per_gpu):
            xb[p * per_gpu + s] = slot_load[gpus[p] * per_gpu + s]
            gl[p * per_gpu + s] = g[gpus[p]]
    xa = slot_load[heavy * per_gpu]
    for j in range(width):
        top[j] = _gain(gh, gl[j], xa - xb[j])
    for a in range(1, per_gpu):
        xa = slot_load[heavy * per_gpu + a]
        for j in range(width):
            value = _gain(gh, gl[j], xa - xb[j])
            top[j] = value if value > top[j] else top[j]
    m0, m1, m2, m3 = top[0], top[0], top[0], top[0]  # the largest, in 4 lanes (exact: no rounding)
    for j in range(0, width - width % 4, 4):
        m0, m1 = (top[j] if top[j] > m0 else m0), (top[j + 1] if top[j + 1] > m1 else m1)
        m2, m3 = (top[j + 2] if top[j + 2] > m2 else m2), (top[j + 3] if top[j + 3] > m3 else m3)
    best = max(max(m0, m1), max(m2, m3))
    for j in range(width - width % 4, width):
        best = top[j] if top[j] > best else best
    best_at = per_gpu * width
    for j in range(width):  # the light slots that reach it: their first heavy slot (scored again)
        if top[j] == best:
            a = 0
            while _gain(gh, gl[j], slot_load[heavy * per_gpu + a] - xb[j]) != best:
                a += 1
            best_at = min(best_at, a * width + j)
    return best_at, best


@numba.njit(cache=True)
def _refine_swaps(phy2log, slot_load, g, num_gpus, iters, partners, work):  # pragma: no cover - compiled
    """``packing.refine_swaps`` for one layer, in place; g [G]: its GPU loads, kept current.

    GPUs in a stable order by load (kept sorted by insertion: a swap changes two loads);
    the heavy GPU is the last, the light candidates every GPU up to and including the
    ``partners``-th lightest load (all GPUs at that load). The swap is the first maximum of
    the gains in (heavy slot, light GPU, light slot) order. work: ``_scratch``.
    """
    per_gpu = slot_load.shape[0] // num_gpus
    if partners < 1 or per_gpu < 1:
        return
    by_load, xb, gl, top = work[3], work[4], work[5], work[6]
    by_load[:] = work[2]  # the packing's last order: the GPUs about by load already
    _sort_in_place(g, by_load)
    for _ in range(iters):
        heavy = by_load[num_gpus - 1]
        edge = g[by_load[partners - 1]]
        n = partners
        while n < num_gpus - 1 and g[by_load[n]] == edge:
            n += 1
        best, gain = _best_swap(slot_load, g, heavy, by_load, n, per_gpu, xb, gl, top)
        if not gain > 1e-9 * (g[heavy] + 1e-30):
            return
        width = n * per_gpu
        a = heavy * per_gpu + best // width
        at = (best % width) // per_gpu
        to = by_load[at]
        b = to * per_gpu + best % per_gpu
        phy2log[a], phy2log[b] = phy2log[b], phy2log[a]
        slot_load[a], slot_load[b] = slot_load[b], slot_load[a]
        g[heavy] = pairwise_sum(slot_load, heavy * per_gpu, per_gpu)  # only these two GPUs changed
        g[to] = pairwise_sum(slot_load, to * per_gpu, per_gpu)
        # The heavy GPU lost load, the light one gained: both to their places (the light one
        # one further up where the heavy one went below it).
        _resort(g, by_load, at + (_resort(g, by_load, num_gpus - 1) <= at))


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
    for j in range(num_gpus):
        lightest[j] = j
        g[j] = 0.0
    e, left = order[0], count[order[0]]
    q = 1
    for k in range(per_gpu):
        for j in range(num_gpus // 2):  # the lightest took the heaviest slots: about the reverse order now
            lightest[j], lightest[num_gpus - 1 - j] = lightest[num_gpus - 1 - j], lightest[j]
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
    order, GPUs by load in the packing, GPUs by load in the swaps, the light slots' loads
    side by side, their GPU loads, their best gains)."""
    width = num_gpus * per_gpu  # room for every GPU as a light candidate
    return (np.empty(num_logical), np.arange(num_logical), np.empty(num_gpus, dtype=np.int64),
            np.empty(num_gpus, dtype=np.int64), np.empty(width), np.empty(width), np.empty(width))


@numba.njit(cache=True)
def search_rows(weight, count, mean_gpu, num_gpus, rounds, patience, far_patience, far, good_enough,
                swap_iters, partners, phy2log, peak_out):  # pragma: no cover - compiled
    """Steps 2-4 of ``balanced.py`` for every layer, into phy2log [L, P] int64 and its max
    GPU load per layer into peak_out [L] float64 (``split.peak_load``'s floats).

    weight: [L, E] float64; count: [L, E] int64 (step 1's counts, updated in place);
    mean_gpu: [L] float64, the layer's mean GPU load. Step 4 per layer as ``balanced_plan``
    does it: move one replica to the taker (the largest slot of the heaviest GPU) from the
    next donor by loss, re-pack, keep it if the peak drops; stop after ``patience`` misses
    in a row (``far_patience`` while the peak is more than ``far`` above the mean),
    ``rounds`` tries, or once the peak is within ``good_enough`` of the mean.
    """
    num_layers, num_logical = weight.shape
    num_slots = phy2log.shape[1]
    per_gpu = num_slots // num_gpus
    slot_load, g = np.empty(num_slots), np.empty(num_gpus)
    trial, trial_load, trial_g = np.empty(num_slots, dtype=np.int64), np.empty(num_slots), np.empty(num_gpus)
    trial_count = np.empty(num_logical, dtype=np.int64)
    loss = np.empty(num_logical)
    donors = np.empty(max(patience, far_patience) + 1, dtype=np.int64)
    work = _scratch(num_logical, num_gpus, per_gpu)
    for r in range(num_layers):
        w, cnt, cur = weight[r], count[r], phy2log[r]
        _pack(w, cnt, num_gpus, swap_iters, partners, cur, slot_load, g, work, True)
        peak = g.max()
        peak_out[r] = peak
        if num_slots == num_logical:
            continue
        fails, tries = 0, 0
        taker = -1  # the taker and its donors by loss: the same until a try is kept
        while (fails < (far_patience if peak > mean_gpu[r] * (1 + far) else patience) and tries < rounds
               and peak > mean_gpu[r] * (1 + good_enough)):
            tries += 1
            if taker < 0:
                heavy = np.argmax(g)
                top = heavy * per_gpu + np.argmax(slot_load[heavy * per_gpu:(heavy + 1) * per_gpu])
                taker = cur[top]
                for e in range(num_logical):
                    loss[e] = w[e] / max(cnt[e] - 1, 1) if cnt[e] >= 2 else np.inf
                loss[taker] = np.inf
                _smallest(loss, min(donors.shape[0], num_logical), donors)
            k = min(fails, num_logical - 1)
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
                peak, fails, taker = trial_peak, 0, -1
                peak_out[r] = peak
            else:
                fails += 1


@numba.njit(cache=True, fastmath={"reassoc"})
def _replicas_at(w, tau):  # pragma: no cover - compiled
    """sum(max(1, ceil(w / tau))): a sum of integers, exact in any order (so ``reassoc``
    lets it vectorize; the divisions stay exact)."""
    total = 0.0
    for e in range(w.shape[0]):
        total += max(1.0, np.ceil(w[e] / tau))
    return total


@numba.njit(cache=True)
def divisor_rows(w, num_physical, bisect_iters):  # pragma: no cover - compiled
    """``balanced.divisor_counts`` (minimum 1) after its step 1: w [L, E] float64, floored
    weights. Returns [L, E] int64 replica counts."""
    num_layers, num_logical = w.shape
    count = np.empty((num_layers, num_logical), dtype=np.int64)
    for r in range(num_layers):
        lo, hi = 0.0, w[r].max()
        for _ in range(bisect_iters):
            mid = 0.5 * (lo + hi)
            if _replicas_at(w[r], mid) > num_physical:
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
