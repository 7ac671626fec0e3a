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


def test_the_report_after_a_lost_peer_counts_the_rebalances_the_history_dropped(monkeypatch):
    """A lost peer's partial report sums every rebalance (the manager's totals, as /metrics
    does), not only the newest records its history kept."""
    import dataclasses

    import numpy as np

    from eplb_plugin.manager.records import RebalanceTotals
    from eplb_plugin.runtime import serving
    from eplb_plugin.runtime.supervise import PeerLostError

    @dataclasses.dataclass
    class Spec:
        label: str
        num_passes: int

    kept = {"num_rebalances": 60, "num_rebalances_skipped": 3, "num_rebalances_failed": 1,
            "slots_moved": 240, "bytes_moved": 2400, "stall_s_total": 1.0}
    monkeypatch.setattr(serving, "summarize", lambda engine, *args, **kwargs: dict(kept))
    monkeypatch.setattr(serving, "name_unanswering",
                        lambda store, **kw: PeerLostError("rank 1 stopped answering", lost=[1], pass_id=kw["pass_id"]))
    totals = RebalanceTotals(done=150, skipped=8, failed=2, slots_moved=600, bytes_moved=6000, stall_s=2.5)
    engine = SimpleNamespace(
        run_spec=Spec("soak", 10_000), cfg=SimpleNamespace(progress=False, verify_weights=False), rank=0, world_size=2,
        store=object(), manager=SimpleNamespace(history_dropped=96, totals=totals), stopped=None,
        series=SimpleNamespace(truncate=lambda done: None, stall_s=np.zeros(3), rss_mb=np.zeros(0), traced_mb=np.zeros(0)),
    )
    error = RunLoop(engine)._peer_lost(3000, RuntimeError("gloo: connection closed"), 1.0)  # type: ignore[arg-type]
    assert error.partial is not None
    assert {k: error.partial[k] for k in kept} == {
        "num_rebalances": 150, "num_rebalances_skipped": 8, "num_rebalances_failed": 2,
        "slots_moved": 600, "bytes_moved": 6000, "stall_s_total": 2.5}
    assert error.partial["rebalances_dropped"] == 96
