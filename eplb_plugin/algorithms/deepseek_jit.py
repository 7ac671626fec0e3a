"""The two loops of DeepSeek's recipe (``deepseek.py``) compiled with numba, one layer at a
time: the same outputs as the numpy forms (the same divisions, first maximum / minimum on
ties, stable order), which the tests compare. Imported only where numba is installed
(``compiled.py``); the project's policy runs the recipe as one of its candidates through
these (``deepseek(..., compiled=None)``), the ``deepseek`` policy itself keeps the numpy form.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def _sift_down(heap_weight, heap_pack, size):  # pragma: no cover - compiled
    """Restore the min-heap order by (weight, pack index) from the top down."""
    i = 0
    while True:
        child = 2 * i + 1
        if child >= size:
            return
        if child + 1 < size and (heap_weight[child + 1] < heap_weight[child] or (
                heap_weight[child + 1] == heap_weight[child] and heap_pack[child + 1] < heap_pack[child])):
            child += 1
        if heap_weight[child] < heap_weight[i] or (heap_weight[child] == heap_weight[i] and heap_pack[child] < heap_pack[i]):
            heap_weight[i], heap_weight[child] = heap_weight[child], heap_weight[i]
            heap_pack[i], heap_pack[child] = heap_pack[child], heap_pack[i]
            i = child
        else:
            return


@numba.njit(cache=True)
def balanced_packing_rows(weight, num_packs):  # pragma: no cover - compiled
    """``deepseek.balanced_packing``: weight [L, n] float64 -> (pack_index, rank_in_pack) [L, n] int64."""
    num_layers, num_items = weight.shape
    items_per_pack = num_items // num_packs
    pack_index = np.empty((num_layers, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_layers, num_items), dtype=np.int64)
    if items_per_pack == 1:  # as the numpy form: item i in pack i
        for r in range(num_layers):
            pack_index[r] = np.arange(num_items)
        rank_in_pack[:] = 0
        return pack_index, rank_in_pack
    heap_weight, heap_pack = np.empty(num_packs), np.empty(num_packs, dtype=np.int64)
    pack_items = np.empty(num_packs, dtype=np.int64)
    for r in range(num_layers):
        order = np.argsort(-weight[r], kind="mergesort")
        # The packs with room in a min-heap by (weight, index): its top is the lightest pack
        # with room, the first on ties, the numpy form's argmin.
        heap_weight[:] = 0.0
        heap_pack[:] = np.arange(num_packs)
        size = num_packs
        pack_items[:] = 0
        for t in range(num_items):
            item = order[t]
            pack = heap_pack[0]
            pack_index[r, item] = pack
            rank_in_pack[r, item] = pack_items[pack]
            pack_items[pack] += 1
            if pack_items[pack] < items_per_pack:
                heap_weight[0] += weight[r, item]
            else:  # full: the last leaf takes the top
                size -= 1
                heap_weight[0], heap_pack[0] = heap_weight[size], heap_pack[size]
            _sift_down(heap_weight, heap_pack, size)
    return pack_index, rank_in_pack


@numba.njit(cache=True)
def replicate_experts_rows(weight, num_physical):  # pragma: no cover - compiled
    """``deepseek.replicate_experts``: weight [L, E] float64 -> (phy2log [L, P], replica_rank [L, P],
    replica_count [L, E]) int64.

    Only the R = P - E first experts by (load descending, id) can take a redundant slot: for
    any other, the R before it would all need a second replica first. So each slot's argmax
    (the highest load per replica, the first on ties) runs over those R alone.
    """
    num_layers, num_logical = weight.shape
    num_redundant = num_physical - num_logical
    phy2log = np.empty((num_layers, num_physical), dtype=np.int64)
    rank = np.zeros((num_layers, num_physical), dtype=np.int64)
    count = np.ones((num_layers, num_logical), dtype=np.int64)
    per = np.empty(num_logical)
    top = np.empty(max(num_redundant, 1), dtype=np.int64)
    for r in range(num_layers):
        for e in range(num_logical):
            phy2log[r, e] = e  # one replica each; the redundant slots are filled below
            per[e] = -weight[r, e]
        if num_redundant == 0:
            continue
        n = min(num_redundant, num_logical)
        _first_by_load(per, n, top)  # by (-load, id): sorted, so the lowest id first on ties
        for e in range(num_logical):
            per[e] = weight[r, e]  # load per replica: the numpy form's weight / count, kept current
        for slot in range(num_logical, num_physical):
            best = top[0]
            for k in range(1, n):  # the highest load per replica, the lowest id on ties
                c = top[k]
                if per[c] > per[best] or (per[c] == per[best] and c < best):
                    best = c
            phy2log[r, slot] = best
            rank[r, slot] = count[r, best]
            count[r, best] += 1
            per[best] = weight[r, best] / count[r, best]
    return phy2log, rank, count


@numba.njit(cache=True)
def _first_by_load(values, count, out):  # pragma: no cover - compiled
    """The ``count`` first items of a stable ascending argsort of values, into out[:count]."""
    n = 0
    for i in range(values.shape[0]):
        if n == count and not values[i] < values[out[n - 1]]:
            continue
        k = min(n, count - 1)
        while k > 0 and values[i] < values[out[k - 1]]:
            out[k] = out[k - 1]
            k -= 1
        out[k] = i
        n = min(n + 1, count)
