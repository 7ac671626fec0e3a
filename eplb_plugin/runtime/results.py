"""A run's results as plain JSON-able values (rank 0), from a finished ``RankEngine``.

Every rebalance figure (counts, slots and bytes moved, stall) is computed here from the
manager's rebalance records, the same records its log lines print (``rebalance_line``) and
its Prometheus metrics export, so the table, the JSON, the log and ``/metrics`` agree.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

RSS_EVERY_PASSES = 250  # how often each rank samples its resident memory


def as_dict(record: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(record):
        return dataclasses.asdict(record)
    return dict(record) if isinstance(record, dict) else {"record": repr(record)}


def outcome(record: dict[str, Any]) -> str:
    """"done", "skipped", "failed", or "unfinished" (still planning or moving when the run ended)."""
    if record.get("error"):
        return "failed"
    if record.get("skipped"):
        return "skipped"
    return "done" if record.get("end_pass") is not None else "unfinished"


OUTCOMES = ("done", "skipped", "failed", "unfinished")


def rebalance_line(label: str, r: dict[str, Any]) -> str:
    """The log line of one rebalance record (printed once it ended, or at the end of the run)."""
    what = outcome(r)
    passes = f"passes {r['start_pass']}-{r['end_pass']}" if what != "unfinished" else f"from pass {r['start_pass']}"
    line = (f"[{label}] rebalance {r['index']} ({r['trigger']}) {what}: {passes}, slots moved {r['slots_moved']}, "
            f"stall {1e3 * r['stall_s']:.1f} ms, balancedness {r['balancedness_before']:.3f} -> "
            f"{r['balancedness_predicted']:.3f} (predicted)")
    if what == "skipped":
        line += f": {r['skipped']}"
    elif what == "failed":
        line += f": {r['error']}"
    elif what == "unfinished":
        line += ": the run ended before its new placement went live"
    return line


def rebalance_totals(rebalances: list[dict[str, Any]]) -> dict[str, Any]:
    """Run totals from the records: how many ended each way, and the slots, bytes (this rank's)
    and stall of every record (a skipped or failed rebalance paused serving too)."""
    outcomes = [outcome(r) for r in rebalances]
    stalls = [float(r["stall_s"]) for r in rebalances]
    return {
        "num_rebalances": outcomes.count("done"),
        **{f"num_rebalances_{o}": outcomes.count(o) for o in OUTCOMES[1:]},
        "slots_moved": int(sum(r["slots_moved"] for r in rebalances)),
        "bytes_moved": int(sum(r["bytes_moved"] for r in rebalances)),
        "stall_s_total": float(sum(stalls)),
        "stall_ms_max": 1e3 * max(stalls, default=0.0),
    }


def summarize(engine: Any, off_step_s: np.ndarray, wall_s: float, *, rss_mb: list[float], traced_mb: list[float],
              slots_checked: int, slots_failed: int, verified: bool) -> dict[str, Any]:
    """The run's results as plain JSON-able values (rank 0).

    off_step_s: [passes] seconds each pass spent outside the MoE step (the manager's work,
    graph captures), max over ranks. rss_mb, traced_mb: resident memory and the Python heap
    tracemalloc traces (0 when not tracing), max over ranks, every RSS_EVERY_PASSES passes.
    Rebalance figures come from the records alone.
    """
    series = engine.series
    n = engine.run_spec.num_passes
    warmup = min(5, n // 10)  # the first passes pay one-time costs (connections, allocator)
    window = max(1, n // 10)
    rebalances = [as_dict(r) for r in engine.history()]
    metrics = getattr(engine, "metrics", None)
    return {
        "label": engine.run_spec.label,
        "workload": dataclasses.asdict(engine.run_spec.workload),
        "enable_eplb": engine.run_spec.eplb.enable_eplb,
        "num_passes": n,
        "warmup_passes": warmup,
        "batch_tokens": engine.cfg.batch_tokens,
        "ep_size": engine.world_size,
        "num_physical_experts": engine.location.num_physical_experts,
        "balancedness_per_pass": series.balancedness.round(5).tolist(),
        "moe_step_s_per_pass": series.step_s.round(7).tolist(),
        "expert_compute_s_per_pass": series.compute_s.round(7).tolist(),
        "off_step_s_per_pass": off_step_s.round(7).tolist(),
        "exchange": engine.exchange,  # "gather" or "alltoall": the one the passes ran
        "cuda_graph": engine._graph_wanted,
        "graph_captures": engine.graph_captures,  # capture attempts (1: captured once, kept across rebalances)
        "balancedness_mean": float(series.balancedness[warmup:].mean()),
        "moe_step_ms_mean": float(1e3 * series.step_s[warmup:].mean()),
        "expert_compute_ms_mean": float(1e3 * series.compute_s[warmup:].mean()),
        "wall_s": wall_s,
        "gpu_load_share_first": _share(series.gpu_load[:window]),
        "gpu_load_share_last": _share(series.gpu_load[-window:]),
        "rebalances": rebalances,
        **rebalance_totals(rebalances),
        "rebalance_failures": list(engine.rebalance_failures),  # the newest (runtime/serving.py's FAILURES_KEPT)
        "rebalance_failures_total": engine.rebalance_failures_total,
        "metrics_at_end": metrics.render().decode() if metrics is not None else None,  # /metrics' text
        "rss_mb_every_passes": RSS_EVERY_PASSES,
        "rss_mb_max_over_ranks": [round(x, 2) for x in rss_mb],
        "traced_mb_max_over_ranks": [round(x, 4) for x in traced_mb],
        "weights_verified": verified,
        "slots_checked": slots_checked,
        "slots_failed": slots_failed,
        "initial_physical_to_logical_map": engine.initial_map.tolist(),
        "final_physical_to_logical_map": engine.location.physical_to_logical_map.tolist(),
    }


def resident_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _share(loads: np.ndarray) -> list[list[float]]:
    """[passes, L, W] -> [L, W] each GPU's share of its layer's pairs over those passes."""
    total = loads.sum(0)
    return (total / np.maximum(total.sum(-1, keepdims=True), 1)).round(5).tolist()
