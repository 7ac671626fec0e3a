"""The serving loop (runtime/serving.py): what it keeps over a long run."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from eplb_plugin.errors import RebalanceError
from eplb_plugin.runtime.serving import FAILURES_KEPT, RunLoop


class FailingManager:
    """A manager whose every rebalance fails (the old placement keeps serving)."""

    def on_forward_pass_end(self) -> None:
        raise RebalanceError("the plan could not be agreed")


def test_a_run_whose_rebalances_all_fail_keeps_a_bounded_list_of_failures():
    """Every pass's failed rebalance is counted, but only the newest FAILURES_KEPT messages are
    kept (a long run must not keep one string per failure)."""
    engine = SimpleNamespace(
        run_spec=SimpleNamespace(label="soak", num_passes=10_000), cfg=SimpleNamespace(progress=False), rank=0,
        manager=FailingManager(), device=torch.device("cpu"), rebalance_failures=[], rebalance_failures_total=0,
    )
    loop = RunLoop(engine)  # type: ignore[arg-type]
    num_passes = 3 * FAILURES_KEPT + 5
    for p in range(num_passes):
        loop._manager_turn(p)
    assert len(engine.rebalance_failures) == FAILURES_KEPT
    assert engine.rebalance_failures_total == num_passes
    assert engine.rebalance_failures[-1].startswith(f"pass {num_passes}: ")
    assert engine.rebalance_failures[0].startswith(f"pass {num_passes - FAILURES_KEPT + 1}: ")
