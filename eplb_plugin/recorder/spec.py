"""What a recorder mode reads of its recorder: the fixed shape and settings (``RecorderSpec``)
and the maps passes ran under (``MapEpochs``). A leaf of the recorder package: the modes
import it, never the recorder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RecorderSpec:
    """The recorder's shape and settings, fixed at construction (see
    ``ExpertDistributionRecorder`` for each one's meaning)."""

    num_layers: int
    num_physical_experts: int
    num_logical_experts: int
    buffer_size: int
    device: torch.device
    rank: int = 0
    ep_size: int = 1
    decay: float | None = None
    group: Any = None
    dump_dir: Any = None
    max_tokens_per_pass: int = 0
    top_k: int = 0


class MapEpochs:
    """The ``[L, P]`` maps passes were recorded under, by epoch; the last epoch's is live.

    initial: the first map (epoch 0), kept as given (the caller copies it to the device).
    """

    def __init__(self, initial: torch.Tensor):
        self.epoch = 0
        self.by_epoch: dict[int, torch.Tensor] = {0: initial}

    @property
    def live(self) -> torch.Tensor:
        """The live map, [L, P]."""
        return self.by_epoch[self.epoch]

    def advance(self, new_map: torch.Tensor) -> None:
        """Start a new epoch whose map is ``new_map`` (kept as given)."""
        self.epoch += 1
        self.by_epoch[self.epoch] = new_map

    def keep_only(self, epochs: set[int]) -> None:
        """Drop every map but the live one and those of ``epochs``."""
        keep = epochs | {self.epoch}
        self.by_epoch = {e: m for e, m in self.by_epoch.items() if e in keep}
