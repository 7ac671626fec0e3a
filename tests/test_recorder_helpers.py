"""Shared builders for the recorder tests (no tests here): random maps, padded ids, numpy references."""

from __future__ import annotations

import numpy as np
import torch

PAD_SHARE = 0.1  # share of ids that are -1 padding


def random_map(gen: torch.Generator, num_layers: int, num_logical: int, num_physical: int) -> torch.Tensor:
    """[L, P] int64 map where every logical expert has at least one slot."""
    rows = []
    for _ in range(num_layers):
        extra = torch.randint(0, num_logical, (num_physical - num_logical,), generator=gen)
        row = torch.cat([torch.arange(num_logical), extra])
        rows.append(row[torch.randperm(num_physical, generator=gen)])
    return torch.stack(rows)


def padded_ids(gen: torch.Generator, tokens: int, top_k: int, high: int) -> torch.Tensor:
    """[T, k] int32 ids in [0, high) with about PAD_SHARE of them -1."""
    ids = torch.randint(0, high, (tokens, top_k), generator=gen, dtype=torch.int32)
    return ids.masked_fill(torch.rand((tokens, top_k), generator=gen) < PAD_SHARE, -1)


def np_slot_count(ids: torch.Tensor, num_slots: int) -> np.ndarray:
    flat = ids.numpy().reshape(-1)
    out = np.zeros(num_slots, dtype=np.int64)
    np.add.at(out, flat[(flat >= 0) & (flat < num_slots)], 1)
    return out


def np_logical(physical: np.ndarray, phy2log: np.ndarray, num_logical: int) -> np.ndarray:
    """[..., L, P] slot counts -> [..., L, E] with the map [L, P]."""
    out = np.zeros((*physical.shape[:-1], num_logical), dtype=np.int64)
    for layer in range(phy2log.shape[0]):
        for slot in range(phy2log.shape[1]):
            out[..., layer, phy2log[layer, slot]] += physical[..., layer, slot]
    return out
