"""DeepSeek's published EPLB recipe (github.com/deepseek-ai/EPLB), vectorized over layers.

Greedy replication (each redundant slot goes to the expert with the highest load per
replica), then balanced packing (heaviest item first into the lightest pack with room). The
hierarchical form first packs expert groups onto nodes, replicates within each node, then
packs onto the node's GPUs. The Python loop over layers of the original is replaced by one
loop over items, vectorized over layers, so the output is the same (up to tie order) and the
cost no longer grows with the number of layers.
"""

from __future__ import annotations

import numpy as np

from .compiled import recipe_kernels, wanted


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``n`` weighted items into ``num_packs`` packs of ``n / num_packs`` items each.

    weight: [L, n] float; n divisible by num_packs.
    Returns (pack_index [L, n] int64, rank_in_pack [L, n] int64).
    """
    num_layers, num_items = weight.shape
    items_per_pack = num_items // num_packs
    if items_per_pack == 1:
        pack_index = np.broadcast_to(np.arange(num_items), weight.shape).copy()
        return pack_index, np.zeros_like(pack_index)
    # Step 1: heaviest item first (stable, so ties keep index order like the reference).
    order = np.argsort(-weight, axis=1, kind="stable")
    rows = np.arange(num_layers)
    pack_weight = np.zeros((num_layers, num_packs))
    pack_items = np.zeros((num_layers, num_packs), dtype=np.int64)
    pack_index = np.empty((num_layers, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_layers, num_items), dtype=np.int64)
    # Step 2: each item into the lightest pack that still has room (first one on ties).
    for t in range(num_items):
        item = order[:, t]
        pack = np.where(pack_items < items_per_pack, pack_weight, np.inf).argmin(axis=1)
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_items[rows, pack]
        pack_weight[rows, pack] += weight[rows, item]
        pack_items[rows, pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy replication: each extra slot to the expert with the highest load per replica.

    weight: [L, E] float. Returns (phy2log [L, P], replica_rank [L, P], replica_count [L, E]).
    """
    num_layers, num_logical = weight.shape
    rows = np.arange(num_layers)
    phy2log = np.broadcast_to(np.arange(num_physical) % num_logical, (num_layers, num_physical)).copy()
    rank = np.zeros((num_layers, num_physical), dtype=np.int64)
    count = np.ones((num_layers, num_logical), dtype=np.int64)
    for slot in range(num_logical, num_physical):
        best = (weight / count).argmax(axis=1)
        phy2log[:, slot] = best
        rank[:, slot] = count[rows, best]
        count[rows, best] += 1
    return phy2log, rank, count


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_hierarchical(
    weight: np.ndarray, num_physical: int, *, num_groups: int, num_nodes: int, num_gpus: int,
    compiled: bool | None = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek's hierarchical recipe; with num_groups = num_nodes = 1 it is the global one.

    weight: [L, E] float; E divisible by num_groups, num_groups by num_nodes, num_gpus by
    num_nodes, num_physical by num_gpus. compiled: run the two loops compiled where numba is
    installed (the same output); None = by size (``compiled.worth_compiling``).
    Returns (phy2log [L, P] int64, replica_rank [L, P] int64, replica_count [L, E] int64).
    """
    kernels = recipe_kernels() if wanted(compiled, weight.shape[0], num_physical) else None
    packing, replicate = (balanced_packing, replicate_experts) if kernels is None else (
        kernels.balanced_packing_rows, kernels.replicate_experts_rows)
    if kernels is not None:
        weight = np.ascontiguousarray(weight, dtype=np.float64)
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_physical // num_gpus
    # Step 1: pack expert groups onto nodes; mlog = the node-major order of logical experts.
    tokens_per_group = weight.reshape(num_layers, num_groups, group_size).sum(-1)
    group_pack, group_rank = packing(tokens_per_group, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None] + np.arange(group_size)
    ).reshape(num_layers, num_logical)
    mlog2log = _inverse(log2mlog)
    # Step 2: replicate within each node (nodes stacked as extra rows).
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, num_logical // num_nodes)
    phy2mlog, phy_rank, mlog_count = replicate(np.ascontiguousarray(tokens_per_mlog), num_physical // num_nodes)
    # Step 3: pack each node's slots onto its GPUs.
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlog_count, phy2mlog, axis=1)
    pack_index, rank_in_pack = packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack_index * slots_per_gpu + rank_in_pack)
    # Step 4: back to global slot and logical ids.
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    node_offset = np.arange(0, num_logical, num_logical // num_nodes).reshape(1, -1, 1)
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1) + node_offset).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphy_rank = np.take_along_axis(phy_rank, pphy2phy, axis=1).reshape(num_layers, -1)
    count = np.take_along_axis(mlog_count.reshape(num_layers, -1), log2mlog, axis=1)
    return pphy2log, pphy_rank, count


def deepseek(
    weight: np.ndarray, num_physical: int, *, num_gpus: int, num_nodes: int = 1,
    num_groups: int | None = None, hierarchical: bool = False, compiled: bool | None = False,
) -> np.ndarray:
    """DeepSeek's recipe. weight: [L, E] float. Returns phy2log [L, P] int64.

    ``hierarchical`` applies only when groups divide over nodes and nodes divide the GPUs
    (as in the reference); otherwise the global recipe runs. ``compiled``: see
    ``rebalance_hierarchical`` (the project's policy runs the recipe as a candidate this way).
    """
    use_groups = (
        hierarchical and num_groups is not None and num_groups % num_nodes == 0
        and num_gpus % num_nodes == 0
    )
    if use_groups:
        phy2log, _, _ = rebalance_hierarchical(
            weight, num_physical, num_groups=num_groups, num_nodes=num_nodes, num_gpus=num_gpus, compiled=compiled
        )
    else:
        phy2log, _, _ = rebalance_hierarchical(weight, num_physical, num_groups=1, num_nodes=1, num_gpus=num_gpus,
                                               compiled=compiled)
    return phy2log
