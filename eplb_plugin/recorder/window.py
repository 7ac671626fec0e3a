"""The stat modes' window: a ring buffer of per-pass physical counts, each row tagged with
the map epoch it was recorded under, so conversion to logical experts uses the right map.

Rows live on the recorder's device; the epoch of each row is a host list (pass boundaries
are host code, so tagging costs no device work and no sync).
"""

from __future__ import annotations

import torch

UNBOUNDED = -1  # buffer_size value: grow without bound (doubling, at pass boundaries)
INITIAL_UNBOUNDED_ROWS = 128  # rows first allocated by an unbounded window


def physical_to_logical(
    physical_count: torch.Tensor, physical_to_logical_map: torch.Tensor, num_logical_experts: int
) -> torch.Tensor:
    """Sum slot counts into their logical experts.

    physical_count: [..., L, P] counts per slot. physical_to_logical_map: [L, P] int, logical
    expert of each slot. Returns [..., L, E] with physical_count's dtype.
    """
    index = physical_to_logical_map.to(device=physical_count.device, dtype=torch.long)
    index = index.expand(physical_count.shape)
    out = torch.zeros(
        (*physical_count.shape[:-1], num_logical_experts), dtype=physical_count.dtype, device=physical_count.device
    )
    return out.scatter_add_(-1, index, physical_count)


class CountWindow:
    """Ring buffer ``[buffer_size, L, P]`` int32 of per-pass counts with a map epoch per row.

    buffer_size: passes kept (>= 1), or ``-1`` to keep every pass (memory grows by
    ``L * P * 4`` bytes per pass, allocated by doubling at pass boundaries).
    """

    def __init__(self, buffer_size: int, num_layers: int, num_physical_experts: int, device: torch.device):
        self._unbounded = buffer_size == UNBOUNDED
        rows = INITIAL_UNBOUNDED_ROWS if self._unbounded else buffer_size
        self._rows = torch.zeros((rows, num_layers, num_physical_experts), dtype=torch.int32, device=device)
        self._epoch_of_row: list[int] = [-1] * rows
        self._next = 0  # row the next pass goes to
        self._filled = 0  # rows holding a recorded pass

    @property
    def num_passes(self) -> int:
        """Passes currently held (at most buffer_size)."""
        return self._filled

    def referenced_epochs(self) -> set[int]:
        """Map epochs some held row was recorded under."""
        return {e for e in self._epoch_of_row if e >= 0}

    def append(self, pass_counts: torch.Tensor, epoch: int) -> None:
        """Copy one pass's ``[L, P]`` counts into the next row (device copy, no sync)."""
        if self._unbounded and self._filled == len(self._epoch_of_row):
            grown = torch.zeros((2 * self._filled, *self._rows.shape[1:]), dtype=self._rows.dtype, device=self._rows.device)
            grown[: self._filled].copy_(self._rows)
            self._rows = grown
            self._epoch_of_row += [-1] * self._filled
        self._rows[self._next].copy_(pass_counts)
        self._epoch_of_row[self._next] = epoch
        # An unbounded window never wraps: it grows before it would.
        self._next = self._next + 1 if self._unbounded else (self._next + 1) % len(self._epoch_of_row)
        self._filled = min(self._filled + 1, len(self._epoch_of_row))

    def reset(self) -> None:
        """Forget every pass (device memset; the buffer keeps its size and address)."""
        self._rows.zero_()
        self._epoch_of_row = [-1] * len(self._epoch_of_row)
        self._next = 0
        self._filled = 0

    def _chronological_rows(self) -> list[int]:
        if self._filled < len(self._epoch_of_row):
            return list(range(self._filled))
        return list(range(self._next, len(self._epoch_of_row))) + list(range(self._next))

    def physical_rows(self) -> torch.Tensor:
        """Held passes, oldest first: ``[n, L, P]`` int32 on the device (a copy)."""
        order = self._chronological_rows()
        if order == list(range(len(order))):
            return self._rows[: len(order)].clone()
        return self._rows[torch.tensor(order, device=self._rows.device)]

    def physical_sum(self) -> torch.Tensor:
        """Sum over held passes, ``[L, P]`` int64 on the device."""
        return self._rows.sum(0, dtype=torch.int64)  # unfilled rows are zero

    def _rows_by_epoch(self) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for position, row in enumerate(self._chronological_rows()):
            groups.setdefault(self._epoch_of_row[row], []).append(position)
        return groups

    def logical_rows(self, maps: dict[int, torch.Tensor], num_logical_experts: int) -> torch.Tensor:
        """Held passes as ``[n, L, E]`` int32, oldest first, each mapped by its own epoch's map."""
        physical = self.physical_rows()
        groups = self._rows_by_epoch()
        if len(groups) == 1:
            ((epoch, _),) = groups.items()
            return physical_to_logical(physical, maps[epoch], num_logical_experts)
        out = torch.zeros((*physical.shape[:-1], num_logical_experts), dtype=physical.dtype, device=physical.device)
        for epoch, positions in groups.items():
            index = torch.tensor(positions, device=physical.device)
            out.index_copy_(0, index, physical_to_logical(physical[index], maps[epoch], num_logical_experts))
        return out

    def logical_sum(self, maps: dict[int, torch.Tensor], num_logical_experts: int) -> torch.Tensor:
        """Sum over held passes, ``[L, E]`` int64 on the device, each pass mapped by its own map."""
        groups: dict[int, list[int]] = {}
        for row in range(len(self._epoch_of_row)):
            if self._epoch_of_row[row] >= 0:
                groups.setdefault(self._epoch_of_row[row], []).append(row)
        num_layers = self._rows.shape[1]
        out = torch.zeros((num_layers, num_logical_experts), dtype=torch.int64, device=self._rows.device)
        if len(groups) == 1:
            ((epoch, _),) = groups.items()
            return out.add_(physical_to_logical(self.physical_sum(), maps[epoch], num_logical_experts))
        for epoch, rows in groups.items():
            summed = self._rows[torch.tensor(rows, device=self._rows.device)].sum(0, dtype=torch.int64)
            out.add_(physical_to_logical(summed, maps[epoch], num_logical_experts))
        return out
