"""The node step of the node-aware policy (``nodes.assign_gpus_to_nodes``) compiled with
numba, one layer at a time.

The numpy form builds each GPU's load per home node for all layers at once, then calls
SciPy's ``linear_sum_assignment`` once per layer. Here each layer runs as plain loops: the
same affinities (each slot's load added in slot order, as ``np.bincount`` adds them) and the
same assignment: ``min_cost_assignment`` is the shortest augmenting path method that SciPy
implements (Crouse 2016) with SciPy's tie rules, so it returns SciPy's assignment, ties
included; the tests compare it with SciPy on matrices full of ties. Imported only where
numba is installed (``compiled.py``; the numpy form plans otherwise); compiled on first
use and cached on disk.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def min_cost_assignment(cost, col_of_row):  # pragma: no cover - compiled
    """A minimum-cost assignment of the rows of a square cost matrix [n, n] float64 (finite)
    to its columns, into col_of_row [n] int64: ``scipy.optimize.linear_sum_assignment(cost)[1]``.
    (``_assign`` with its own work arrays.)"""
    _assign(cost, col_of_row, _scratch(cost.shape[0]))


@numba.njit(cache=True)
def _scratch(n):  # pragma: no cover - compiled
    """Work arrays of ``_assign`` for n rows: prices, the reached columns' distances and
    rows, the row of each column, the rows seen, the reached columns, and the columns not
    reached yet in list order (id, distance, price, row reached from, free)."""
    return (np.empty(n), np.empty(n), np.empty(n), np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64),
            np.empty(n, dtype=np.bool_), np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64), np.empty(n),
            np.empty(n), np.empty(n, dtype=np.int64), np.empty(n, dtype=np.bool_))


@numba.njit(cache=True)
def _assign(cost, col_of_row, work):  # pragma: no cover - compiled
    """``min_cost_assignment`` into col_of_row, with the work arrays of ``_scratch``.

    Rows join one at a time; each by the shortest augmenting path from it (Dijkstra on the
    reduced costs over the columns not reached yet, kept in a list that starts from the last
    column down and fills a reached column's place with the list's last one; the nearest
    column is the first in that list, or the last free one at the same distance), then the
    dual prices move and the path flips. The floats are SciPy's: the same sums in the same
    order. The columns' distances and prices sit in list order, so the scans read memory in
    order and keep their comparisons out of branches.
    """
    n = cost.shape[0]
    row_price, col_price, dist, came_from, row_of_col, row_seen, reached = work[:7]
    todo, todo_dist, todo_price, todo_from, todo_free = work[7:]
    row_price[:] = 0.0
    col_price[:] = 0.0
    row_of_col[:] = -1
    col_of_row[:] = -1
    for start in range(n):
        # Step 1: the shortest augmenting path from row ``start`` to a free column.
        for k in range(n):
            todo[k] = n - 1 - k
            todo_dist[k] = np.inf
            todo_price[k] = col_price[n - 1 - k]
            todo_free[k] = row_of_col[n - 1 - k] < 0
        left, num_reached = n, 0
        row_seen[:] = False
        reach = 0.0  # the distance of the column reached last
        row, sink = start, -1
        while sink < 0:
            row_seen[row] = True
            price = row_price[row]
            for k in range(left):
                d = reach + cost[row, todo[k]] - price - todo_price[k]
                closer = d < todo_dist[k]
                todo_dist[k] = d if closer else todo_dist[k]
                todo_from[k] = row if closer else todo_from[k]
            nearest, at = np.inf, -1
            for k in range(left):
                take = todo_dist[k] < nearest or (todo_dist[k] == nearest and todo_free[k])
                nearest = todo_dist[k] if take else nearest
                at = k if take else at
            reach = nearest
            col = todo[at]
            dist[col], came_from[col] = todo_dist[at], todo_from[at]
            reached[num_reached] = col
            num_reached += 1
            left -= 1
            todo[at], todo_dist[at], todo_price[at] = todo[left], todo_dist[left], todo_price[left]
            todo_from[at], todo_free[at] = todo_from[left], todo_free[left]
            if row_of_col[col] < 0:
                sink = col
            else:
                row = row_of_col[col]
        # Step 2: dual prices of the rows and columns the search reached.
        row_price[start] += reach
        for r in range(n):
            if row_seen[r] and r != start:
                row_price[r] += reach - dist[col_of_row[r]]
        for k in range(num_reached):
            col_price[reached[k]] -= reach - dist[reached[k]]
        # Step 3: flip the path: each of its rows takes the column it reached.
        col = sink
        while True:
            r = came_from[col]
            row_of_col[col] = r
            col, col_of_row[r] = col_of_row[r], col
            if r == start:
                break


@numba.njit(cache=True)
def assign_rows(weight, phy2log, home, num_gpus, num_nodes):  # pragma: no cover - compiled
    """``nodes.assign_gpus_to_nodes`` after step 1, for every layer.

    weight: [L, E] float64; phy2log: [L, P] int64 rank-major; home: [L, groups] int64, the
    node each group is homed on (groups of E / groups consecutive experts). Returns perm
    [L, P] int64: new slot q holds old slot perm[:, q].
    """
    num_layers, num_logical = weight.shape
    num_slots = phy2log.shape[1]
    per_gpu = num_slots // num_gpus
    gpus_per_node = num_gpus // num_nodes
    group_size = num_logical // home.shape[1]
    perm = np.empty((num_layers, num_slots), dtype=np.int64)
    count = np.empty(num_logical, dtype=np.int64)
    share = np.empty(num_logical)
    group_of = np.arange(num_logical) // group_size
    affinity = np.empty((num_gpus, num_nodes))
    cost = np.empty((num_gpus, num_gpus))
    pos = np.empty(num_gpus, dtype=np.int64)
    work = _scratch(num_gpus)
    for r in range(num_layers):
        count[:] = 0
        for s in range(num_slots):
            count[phy2log[r, s]] += 1
        for e in range(num_logical):  # each replica's load (equal split)
            share[e] = weight[r, e] / max(count[e], 1)
        # Each GPU's load per home node: its slots' loads added in slot order.
        affinity[:] = 0.0
        for g in range(num_gpus):
            for s in range(g * per_gpu, (g + 1) * per_gpu):
                e = phy2log[r, s]
                affinity[g, home[r, group_of[e]]] += share[e]
        for g in range(num_gpus):  # column = node position
            for node in range(num_nodes):
                for q in range(node * gpus_per_node, (node + 1) * gpus_per_node):
                    cost[g, q] = -affinity[g, node]
        _assign(cost, pos, work)
        for g in range(num_gpus):  # GPU g goes to position pos[g]
            for s in range(per_gpu):
                perm[r, pos[g] * per_gpu + s] = g * per_gpu + s
    return perm
