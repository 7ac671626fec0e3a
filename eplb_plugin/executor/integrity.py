"""Per-slot fingerprints: a cheap proof that each slot holds its logical expert's weights.

A fingerprint is an int64 per slot, a position-weighted sum of the raw bytes of every tensor's
slice for that slot (so a swapped or shifted slice changes it, and so do NaN payloads and
-0.0), combined over tensors in order. Replicas of one logical expert hold identical bytes,
so they share one fingerprint. Deterministic on CPU and GPU (integer arithmetic only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from eplb_plugin.errors import TransferError, UsageError

_MODULUS = (1 << 40) - 87  # keeps the combined value below 2**52 before each reduction
_COMBINE = 4099
_CHUNK_BYTES = 1 << 24  # bounds the int64 temporary to 8 x 16 MiB per slot


def _position_weights(start: int, n: int, device: torch.device) -> torch.Tensor:
    """[n] int64 in [1, 65521]: a fixed pseudo-random weight per byte position."""
    pos = torch.arange(start, start + n, dtype=torch.int64, device=device)
    return (pos * 2654435761 + 97) % 65521 + 1


def fingerprint(
    tensors: Sequence[torch.Tensor], slots: Sequence[int] | None = None
) -> torch.Tensor:
    """Fingerprint slots of per-slot tensors.

    tensors: each [num_local_slots, ...] (any dtype, any trailing shape), dim 0 the slot.
    slots: local slots to fingerprint (default all).
    Returns [len(slots)] int64 on the tensors' device, values in [0, 2**40).
    """
    if not tensors:
        raise UsageError("fingerprint needs at least one tensor")
    device = tensors[0].device
    idx = list(range(tensors[0].shape[0])) if slots is None else list(slots)
    acc = torch.zeros(len(idx), dtype=torch.int64, device=device)
    if not idx:
        return acc
    for t in tensors:
        rows = t[idx].contiguous()
        raw = rows.reshape(len(idx), -1).view(torch.uint8)  # [n, bytes per slot]
        total = torch.zeros(len(idx), dtype=torch.int64, device=device)
        for start in range(0, raw.shape[1], _CHUNK_BYTES):
            part = raw[:, start : start + _CHUNK_BYTES].to(torch.int64)
            total += (part * _position_weights(start, part.shape[1], device)).sum(1)
        acc = (acc * _COMBINE + total % _MODULUS) % _MODULUS
    return acc


def verify_slots(
    weights: Sequence[torch.Tensor],
    physical_to_logical_map: torch.Tensor,
    expected_fingerprints: Mapping[int, int] | torch.Tensor,
    *,
    slots: Sequence[int] | None = None,
    rank: int = 0,
    layer: int | None = None,
) -> None:
    """Raise TransferError if a slot's fingerprint is not its logical expert's.

    weights: this rank's per-slot tensors [num_local_slots, ...].
    physical_to_logical_map: [num_local_slots] this rank's slice of the layer's map.
    expected_fingerprints: logical expert -> fingerprint (a dict, or an [E] int64 tensor).
    slots: local slots to check (default all).
    """
    idx = list(range(physical_to_logical_map.numel())) if slots is None else list(slots)
    if not idx:
        return
    got = fingerprint(weights, idx).tolist()
    logical = physical_to_logical_map.reshape(-1).tolist()
    bad = []
    for s, fp in zip(idx, got):
        e = logical[s]
        want = int(expected_fingerprints[e])
        if fp != want:
            bad.append(f"slot {s} (logical {e}): {fp} != {want}")
    if bad:
        where = f"rank {rank}" + (f", layer {layer}" if layer is not None else "")
        raise TransferError(f"{where}: {len(bad)} slot(s) fail the fingerprint check: {bad[:4]}")
