"""The manager's collaborators as typed protocols: what it asks of the load window it plans
on, of the observers it reports to, and the shapes of the injectable planner and layer mover.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from eplb_plugin.manager.records import RebalanceRecord

Planner = Callable[..., Any]
"""``algorithms.plan``'s signature: ``planner(counts, *, num_physical_experts, num_gpus, ...)``
-> a Placement (``physical_to_logical_map`` [L, P], ``replica_weights`` [L, P] or None)."""

LayersMover = Callable[..., Any]
"""``executor.move_layers``'s signature: one collective call moves a chunk of layers and
returns one ``MoveResult`` per layer (``LayerMoveError`` names the failed one)."""


class LoadWindow(Protocol):
    """The recorder's window EPLB plans on (``ExpertDistributionRecorder`` in ``stat`` or
    ``stat_approx`` mode). Counts are this rank's; the manager sums them over ranks."""

    physical_to_logical_map: torch.Tensor  # [L, P] the map the recorder counts with

    def logical_count_window(self) -> torch.Tensor:
        """[L, E] tokens per logical expert over the window."""
        ...

    def logical_count_passes(self) -> torch.Tensor:
        """[B, L, E] tokens per logical expert, one row per pass of the window."""
        ...

    def physical_count_window(self) -> torch.Tensor:
        """[L, P] tokens per physical slot over the window."""
        ...

    def keep_window_for_eplb(self) -> None:
        """Record every pass from now on, whatever a user's dump session does."""
        ...

    def eplb_window_gathered(self) -> None:
        """A rebalance read the window (a window without bound starts again empty)."""
        ...

    def set_physical_to_logical_map(self, new_map: torch.Tensor) -> None:
        """A new live map ([L, P], on the recorder's device): a new map epoch."""
        ...


class RebalanceObserver(Protocol):
    """Told of every rebalance once it ended (done, skipped or failed), e.g. ``metrics.EPLBMetrics``."""

    def observe_rebalance(self, record: RebalanceRecord) -> None: ...
