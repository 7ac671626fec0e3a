"""Plan placements in a separate process, so the solver never holds the serving process's GIL.

The manager plans in a background thread, but the policies are Python and NumPy: while one
runs (0.05-0.25 s for DeepSeek-V3 sizes), the serving thread waits for the GIL at every
switch interval (5 ms), and a step that needs the host during planning grows by that. A
``PlannerProcess`` runs ``algorithms.plan`` in one worker process, spawned and warmed up
(it imports the policies and plans a tiny placement) before the constructor returns, that
is when the manager is built: a worker still starting (seconds where torch loads its CUDA
libraries: about 4.8 s on a 2 x H200 machine) would otherwise delay the first rebalance by
that much (measured there: it landed 30-40 passes late).
The manager's planning thread then waits on the worker's result without holding the GIL.

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

from eplb_plugin.algorithms.names import DEFAULT_ALGORITHM
from eplb_plugin.errors import RebalanceError


def _warm_up(algorithm: str) -> str | None:
    """Import the policies and plan a tiny placement (first-call costs paid now); returns
    why that plan failed, if it did (the worker is warm either way)."""
    import scipy.optimize  # noqa: F401

    from eplb_plugin.algorithms import plan

    counts = np.arange(1, 17, dtype=np.float64).reshape(2, 8)
    try:
        plan(counts, num_physical_experts=10, num_gpus=2, algorithm=algorithm,
             previous=np.tile(np.arange(10) % 8, (2, 1)))
    except Exception as exc:  # e.g. a policy that needs more layers or groups: imports are done
        return f"{type(exc).__name__}: {exc}"
    return None


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
    """A callable with ``algorithms.plan``'s signature that plans in a worker process.

    algorithm: the policy the warm-up plans with; start_timeout_s: how long the constructor
    waits for the worker to start (RebalanceError past it, or if it dies). ``warm_up_error``:
    why the warm-up's tiny plan failed (None: it planned), for the logs."""

    def __init__(self, algorithm: str = DEFAULT_ALGORITHM, start_timeout_s: float = 300.0) -> None:
        self.algorithm, self.start_timeout_s = algorithm, start_timeout_s
        self.warm_up_error: str | None = None
        self._pool = self._start()

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            self.warm_up_error = pool.submit(_warm_up, self.algorithm).result(timeout=self.start_timeout_s)
        except Exception as exc:  # died, or still starting after start_timeout_s
            pool.shutdown(wait=False, cancel_futures=True)
            raise RebalanceError(f"the planner process could not start (waited at most {self.start_timeout_s} s): "
                                 f"{type(exc).__name__}: {exc}") from exc
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
