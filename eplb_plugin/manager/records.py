"""What a rebalance did, as logged and exported: ``RebalanceRecord`` per rebalance and
``RebalanceTotals`` over all of them (a leaf module: metrics and the runtime's report read
it without importing the manager's machinery)."""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1 << 20  # bytes in a MiB, the unit of the byte flags (--eplb-*-budget-mb) and log lines


@dataclass
class RebalanceRecord:
    """One rebalance, as logged and exported: the one source of every rebalance figure (log
    lines, Prometheus metrics, the runtime's report). Balancedness is mean/max GPU load.

    slots_moved counts slots of the whole EP group whose expert changed; bytes_moved is this
    rank's traffic (sent + received); transport: how same-host ranks moved it, "ipc"
    (copy-engine pulls) or the P2P backend ("nccl", "gloo"), None before a move.
    stall_s: seconds this rank's serving thread spent on the rebalance, from the pass that
    started it (trigger check and gather) to its end (plan polls and broadcast, moves,
    commits). wall_s: seconds from its start to its end (the last layer live, the skip or
    the failure); None while it runs. end_pass: the pass it ended at; None while it runs.
    balancedness_before: realized on the window it planned from (its GPU loads summed);
    balancedness_predicted: its plan's on that window, measured the same way under the dispatch
    that runs (``planning.predicted_balancedness``; NaN: not scored).
    """

    index: int
    trigger: str
    start_pass: int
    layers: list[int] = field(default_factory=list)
    solver_s: float = 0.0
    slots_moved: int = 0
    bytes_moved: int = 0
    stall_s: float = 0.0
    balancedness_before: float = float("nan")
    balancedness_predicted: float = float("nan")
    balancedness_achieved: float | None = None
    end_pass: int | None = None
    skipped: str | None = None
    error: str | None = None
    transport: str | None = None
    wall_s: float | None = None


@dataclass
class RebalanceTotals:
    """Every rebalance's figures summed (exact whatever ``history`` kept): done, skipped and
    failed counts, slots and this rank's bytes moved, serving-thread stall."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    slots_moved: int = 0
    bytes_moved: int = 0
    stall_s: float = 0.0

    def add(self, record: RebalanceRecord) -> None:
        if record.skipped is not None:
            self.skipped += 1
        elif record.error is not None:
            self.failed += 1
        else:
            self.done += 1
        self.slots_moved += record.slots_moved
        self.bytes_moved += record.bytes_moved
        self.stall_s += record.stall_s


class RebalanceHistory:
    """The newest ``limit`` rebalance records (None: all) and exact totals over every one
    that ended: ``dropped`` older records were dropped, their figures kept in ``totals``, so
    a server's memory does not grow with passes."""

    def __init__(self, limit: int | None):
        self.records: list[RebalanceRecord] = []
        self.limit = limit
        self.dropped = 0
        self.totals = RebalanceTotals()

    def open(self, trigger: str, start_pass: int) -> RebalanceRecord:
        """A new record, the newest (its index counts the dropped ones); the oldest beyond
        ``limit`` are dropped."""
        record = RebalanceRecord(index=self.dropped + len(self.records), trigger=trigger, start_pass=start_pass)
        self.records.append(record)
        if self.limit is not None and len(self.records) > self.limit:
            drop = len(self.records) - self.limit  # the oldest (finished long ago)
            del self.records[:drop]
            self.dropped += drop
        return record

    def fill_achieved(self, window_balancedness: float) -> None:
        """The window just gathered (for the newest record) ran (mostly) on the placement of
        the last rebalance done before it: that one's achieved balancedness, if not yet set."""
        done = [r for r in self.records[:-1] if r.skipped is None and r.error is None and r.end_pass is not None]
        if done and done[-1].balancedness_achieved is None:
            done[-1].balancedness_achieved = window_balancedness
