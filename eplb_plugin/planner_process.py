"""Plan placements in a separate process, so the solver never holds the serving process's GIL.

The manager plans in a background thread, but the policies are Python and NumPy: while one
runs (0.05-0.25 s for DeepSeek-V3 sizes), the serving thread waits for the GIL at every
switch interval (5 ms), and a step that needs the host during planning grows by that. A
``PlannerProcess`` runs ``algorithms.plan`` in one worker process, spawned (and warmed up:
it imports the policies) when the manager is built; the manager's planning thread then
waits on the worker's result without holding the GIL.

Inputs and outputs cross the process boundary as NumPy arrays (pickled by value). A worker
that dies fails the attempt (the manager keeps the old placement) and is replaced for the
next one.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from typing import Any

import numpy as np
import torch

from eplb_plugin.errors import RebalanceError


def _warm_up() -> int:
    import scipy.optimize  # noqa: F401

    import eplb_plugin.algorithms  # noqa: F401

    return 0


def _plan_arrays(counts: np.ndarray, previous: np.ndarray | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    from eplb_plugin.algorithms import plan

    placement = plan(counts, previous=previous, **kwargs)
    weights = placement.replica_weights
    return {
        "physical_to_logical_map": placement.physical_to_logical_map.numpy(),
        "replica_weights": None if weights is None else weights.numpy(),
        "slots_moved": placement.slots_moved,
        "solver_seconds": placement.solver_seconds,
        "cross_node_share": placement.cross_node_share,
    }


class PlannerProcess:
    """A callable with ``algorithms.plan``'s signature that plans in a worker process."""

    def __init__(self) -> None:
        self._pool = self._start()

    @staticmethod
    def _start() -> concurrent.futures.ProcessPoolExecutor:
        pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(_warm_up)  # the worker starts and imports now, not at the first rebalance
        return pool

    def __call__(self, logical_count: Any, *, previous: Any = None, **kwargs: Any) -> Any:
        from eplb_plugin.algorithms import Placement

        counts = torch.as_tensor(logical_count).detach().cpu().numpy()
        prev = None
        if previous is not None:
            prev = (previous.physical_to_logical_map if hasattr(previous, "physical_to_logical_map") else previous)
            prev = torch.as_tensor(prev).detach().cpu().numpy()
        try:
            out = self._pool.submit(_plan_arrays, counts, prev, kwargs).result()
        except concurrent.futures.process.BrokenProcessPool as exc:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._start()  # a fresh worker for the next attempt
            raise RebalanceError(f"the planner process died ({exc}); a new one is starting") from exc
        weights = out["replica_weights"]
        return Placement(
            physical_to_logical_map=torch.from_numpy(out["physical_to_logical_map"]),
            replica_weights=None if weights is None else torch.from_numpy(weights),
            slots_moved=out["slots_moved"], solver_seconds=out["solver_seconds"],
            cross_node_share=out["cross_node_share"],
        )

    def close(self) -> None:
        """Stop the worker (a plan still running is abandoned)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
