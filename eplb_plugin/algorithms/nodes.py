"""Node-level views of a placement, and the node-aware policy.

``plan_node_aware`` (used by ``eplb_plugin`` when num_nodes > 1), per layer the better of:

1. Hierarchical: DeepSeek's recipe with groups packed onto nodes (a group's experts and
   their replicas stay on one node, so group-limited routing stays node-local).
2. Flat, node-assigned: the flat plan (GPUs balanced, so nodes are too), with its GPUs
   assigned to nodes to keep each group's load on the node its group is homed on (groups
   homed by balanced packing of group loads; GPUs to node positions by linear assignment).

The hierarchical plan is kept where its max GPU load is within ``NODE_TOLERANCE`` of the
flat one; where groups are as many as nodes (or a hot group overloads its node) it is not,
and the flat plan takes over, so the policy does not collapse there. The recipe is run only
for layers where ``hierarchical_peak_bound`` leaves it a chance (same plan, less work). The
GPU-to-node assignment runs compiled (``nodes_jit.py``) for large plans where numba is
installed: SciPy's assignment, tie for tie, without a call per layer.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .compiled import node_kernels, recipe_kernels, wanted
from .deepseek import balanced_packing, deepseek
from .split import peak_load

NODE_TOLERANCE = 0.01  # accept 1% more peak GPU load (share of the mean) for node-local groups


def cross_node_share(weight: np.ndarray, phy2log: np.ndarray, *, num_nodes: int) -> float:
    """Share of token traffic that leaves its node.

    Tokens originate uniformly over nodes; a token for expert e stays on its node when the
    node holds a replica of e (local-first dispatch), else it crosses. weight: [L, E];
    phy2log: [L, P] rank-major, nodes own equal contiguous slot ranges. Returns a float in [0, 1].
    """
    num_layers, num_logical = weight.shape
    per_node = phy2log.shape[1] // num_nodes
    node = np.arange(phy2log.shape[1]) // per_node
    present = np.zeros((num_layers, num_logical, num_nodes), dtype=bool)
    present[np.arange(num_layers)[:, None], phy2log, node[None, :]] = True
    local = present.mean(-1)  # share of nodes that hold a replica
    total = weight.sum()
    return 0.0 if total <= 0 else float((weight * (1.0 - local)).sum() / total)


def group_locality(weight: np.ndarray, phy2log: np.ndarray, *, num_nodes: int, num_groups: int) -> float:
    """Share of each group's tokens (equal split over replicas) served on the node that serves
    most of that group, load-weighted over groups and layers: 1.0 = every group node-local,
    so group-limited routing sends each token to at most ``topk_groups`` nodes.

    weight: [L, E]; phy2log: [L, P]. Returns a float in [0, 1].
    """
    num_layers, num_logical = weight.shape
    num_slots = phy2log.shape[1]
    flat = (phy2log + num_logical * np.arange(num_layers)[:, None]).ravel()
    count = np.bincount(flat, minlength=num_layers * num_logical).reshape(num_layers, num_logical)
    slot_load = np.take_along_axis(weight / np.maximum(count, 1), phy2log, axis=1)
    group = phy2log // (num_logical // num_groups)
    node = np.broadcast_to(np.arange(num_slots) // (num_slots // num_nodes), phy2log.shape)
    per = np.zeros((num_layers, num_groups, num_nodes))
    np.add.at(per, (np.arange(num_layers)[:, None], group, node), slot_load)
    total = per.sum()
    return 1.0 if total <= 0 else float(per.max(-1).sum() / total)


def _pack_groups(group_load: np.ndarray, num_nodes: int, *, compiled: bool) -> tuple[np.ndarray, np.ndarray]:
    """``deepseek.balanced_packing`` of the group loads [L, groups] onto nodes; compiled where
    numba is installed and ``compiled`` asks for it (the same packing)."""
    kernels = recipe_kernels() if compiled else None
    if kernels is None:
        return balanced_packing(group_load, num_nodes)
    return kernels.balanced_packing_rows(np.ascontiguousarray(group_load, dtype=np.float64), num_nodes)


class GroupHomes(NamedTuple):
    """Where each expert group is homed: load [L, groups] float64 (the group's tokens) and
    node [L, groups] int64 (its node)."""

    load: np.ndarray
    node: np.ndarray


def home_groups(weight: np.ndarray, *, num_nodes: int, num_groups: int, compiled: bool = False) -> GroupHomes:
    """Home groups on nodes: balanced packing of group loads (``balanced_packing``, the
    recipe's step 1); with groups not a multiple of nodes, round robin. weight: [L, E].
    compiled: pack compiled where numba is installed (the same packing)."""
    num_layers = weight.shape[0]
    group_load = weight.reshape(num_layers, num_groups, -1).sum(-1)
    if num_groups % num_nodes == 0:
        node, _ = _pack_groups(group_load, num_nodes, compiled=compiled)
    else:
        node = np.broadcast_to(np.arange(num_groups) % num_nodes, group_load.shape)
    return GroupHomes(group_load, node)


def assign_gpus_to_nodes(weight: np.ndarray, phy2log: np.ndarray, *, num_gpus: int, num_nodes: int,
                         num_groups: int, homes: GroupHomes | None = None,
                         compiled: bool | None = None) -> np.ndarray:
    """Reorder the GPUs of a flat plan so that each node holds the groups homed on it.

    weight: [L, E]; phy2log: [L, P] rank-major; homes: ``home_groups``'s answer if known.
    compiled: step 2 compiled (``nodes_jit``) where numba is installed (the same order);
    None = by size (``compiled.worth_compiling``). Returns perm [L, P] int64: new slot q
    holds old slot perm[:, q] (GPU sets unchanged).
    """
    num_layers, num_logical = weight.shape
    num_slots = phy2log.shape[1]
    per_gpu = num_slots // num_gpus
    gpus_per_node = num_gpus // num_nodes
    use_kernels = wanted(compiled, num_layers, num_slots)
    # Step 1: home groups on nodes (balanced by group load; with fewer groups than nodes, round robin).
    if homes is None:
        homes = home_groups(weight, num_nodes=num_nodes, num_groups=num_groups, compiled=use_kernels)
    kernels = node_kernels() if use_kernels else None
    if kernels is not None:  # step 2 compiled, the same order
        return kernels.assign_rows(np.ascontiguousarray(weight, dtype=np.float64),
                                   np.ascontiguousarray(phy2log, dtype=np.int64),
                                   np.ascontiguousarray(homes.node, dtype=np.int64), num_gpus, num_nodes)
    from scipy.optimize import linear_sum_assignment

    # Step 2: each GPU's load per home node (all layers at once), then GPUs to node positions
    # by linear assignment (scipy solves one layer per call).
    flat = (phy2log + num_logical * np.arange(num_layers)[:, None]).ravel()
    count = np.bincount(flat, minlength=num_layers * num_logical).reshape(num_layers, num_logical)
    slot_load = np.take_along_axis(weight / np.maximum(count, 1), phy2log, axis=1)
    slot_node = np.take_along_axis(homes.node, phy2log // (num_logical // num_groups), axis=1)
    cell = (np.arange(num_layers)[:, None] * num_gpus + np.arange(num_slots) // per_gpu) * num_nodes + slot_node
    affinity = np.bincount(cell.ravel(), weights=slot_load.ravel(),
                           minlength=num_layers * num_gpus * num_nodes)
    # column = node position
    cost = -np.repeat(affinity.reshape(num_layers, num_gpus, num_nodes), gpus_per_node, axis=2)
    pos = np.empty((num_layers, num_gpus), dtype=np.int64)
    for layer in range(num_layers):  # square: the rows (GPUs) come back in order
        pos[layer] = linear_sum_assignment(cost[layer])[1]
    gpu_at = np.argsort(pos, axis=1)  # the GPU placed at each position
    return (gpu_at[:, :, None] * per_gpu + np.arange(per_gpu)).reshape(num_layers, num_slots)


def hierarchical_peak_bound(weight: np.ndarray, *, num_gpus: int, num_nodes: int, num_groups: int,
                            compiled: bool = False, homes: GroupHomes | None = None) -> np.ndarray:
    """A lower bound on the max GPU load of DeepSeek's hierarchical recipe, per layer.

    The recipe packs groups onto nodes first (``balanced_packing`` of the group loads) and
    keeps every replica of a node's experts on that node, so some GPU of the most loaded
    node carries at least that node's load over its GPUs. weight: [L, E]. Returns [L].
    compiled: pack the groups compiled where numba is installed (the same packing).
    homes: ``home_groups``'s answer if known (groups a multiple of nodes).
    """
    num_layers = weight.shape[0]
    if homes is None:
        homes = home_groups(weight, num_nodes=num_nodes, num_groups=num_groups, compiled=compiled)
    node_load = np.zeros((num_layers, num_nodes))
    np.add.at(node_load, (np.arange(num_layers)[:, None], homes.node), homes.load)
    return node_load.max(1) / (num_gpus // num_nodes)


def plan_node_aware(weight: np.ndarray, flat: np.ndarray, flat_peak: np.ndarray, num_physical: int, *,
                    num_gpus: int, num_nodes: int, num_groups: int | None,
                    tolerance: float = NODE_TOLERANCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight: [L, E]; flat: [L, P] the flat plan; flat_peak: [L] its max GPU load.

    Returns (phy2log [L, P], perm [L, P] applied to the flat plan's slots, took_hierarchical [L] bool).
    """
    num_layers, num_logical = weight.shape
    groups = num_groups if num_groups else num_nodes
    if num_logical % groups:
        groups = num_nodes if num_logical % num_nodes == 0 else 1
    compiled = wanted(None, num_layers, num_physical)
    homes = home_groups(weight, num_nodes=num_nodes, num_groups=groups, compiled=compiled) if groups > 1 else None
    perm = assign_gpus_to_nodes(weight, flat, num_gpus=num_gpus, num_nodes=num_nodes, num_groups=groups,
                                homes=homes, compiled=compiled) \
        if groups > 1 else np.broadcast_to(np.arange(num_physical), flat.shape).copy()
    placed = np.take_along_axis(flat, perm, axis=1)
    take = np.zeros(num_layers, dtype=bool)
    if groups % num_nodes:
        return placed, perm, take
    # The recipe is row-independent: run it only on layers whose bound leaves it a chance
    # (a 1e-9 margin keeps rounding in the bound from ruling out a layer that would take it).
    limit = flat_peak + tolerance * (weight.sum(1) / num_gpus)
    bound = hierarchical_peak_bound(weight, num_gpus=num_gpus, num_nodes=num_nodes, num_groups=groups,
                                    compiled=compiled, homes=homes)
    rows = np.nonzero(bound <= limit * (1 + 1e-9))[0]
    if rows.size == 0:
        return placed, perm, take
    w = weight[rows]
    hier = deepseek(w, num_physical, num_gpus=num_gpus, num_nodes=num_nodes, num_groups=groups, hierarchical=True,
                    compiled=None)
    take[rows] = peak_load(w, hier, num_gpus) <= limit[rows]
    out = placed.copy()
    out[rows] = np.where(take[rows, None], hier, placed[rows])
    return out, perm, take

