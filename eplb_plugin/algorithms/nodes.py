"""Node-level views of a placement."""

from __future__ import annotations

import numpy as np


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
