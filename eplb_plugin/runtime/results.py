"""A run's results as plain JSON-able values (rank 0), from a finished ``RankEngine``."""

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


def summarize(engine: Any, stall_s: np.ndarray, wall_s: float, *, rss_mb: list[float], slots_checked: int,
              slots_failed: int, verified: bool) -> dict[str, Any]:
    """The run's results as plain JSON-able values (rank 0)."""
    n = engine.run_spec.num_passes
    warmup = min(5, n // 10)  # the first passes pay one-time costs (connections, allocator)
    window = max(1, n // 10)
    rebalances = [as_dict(r) for r in engine._history()]
    done = [r for r in rebalances if not r.get("skipped") and not r.get("error")]
    return {
        "label": engine.run_spec.label,
        "workload": dataclasses.asdict(engine.run_spec.workload),
        "enable_eplb": engine.run_spec.eplb.enable_eplb,
        "num_passes": n,
        "warmup_passes": warmup,
        "batch_tokens": engine.cfg.batch_tokens,
        "ep_size": engine.world_size,
        "num_physical_experts": engine.location.num_physical_experts,
        "balancedness_per_pass": engine.balancedness.round(5).tolist(),
        "moe_step_s_per_pass": engine.step_s.round(7).tolist(),
        "expert_compute_s_per_pass": engine.compute_s.round(7).tolist(),
        "stall_s_per_pass": stall_s.round(7).tolist(),
        "exchange": engine.exchange,  # "gather" or "alltoall": the one the passes ran
        "cuda_graph": engine._graph_wanted,
        "graph_captures": engine.graph_captures,  # capture attempts (1: captured once, kept across rebalances)
        "balancedness_mean": float(engine.balancedness[warmup:].mean()),
        "moe_step_ms_mean": float(1e3 * engine.step_s[warmup:].mean()),
        "expert_compute_ms_mean": float(1e3 * engine.compute_s[warmup:].mean()),
        "stall_s_total": float(stall_s.sum()),
        "stall_ms_max": float(1e3 * stall_s.max()),
        "wall_s": wall_s,
        "gpu_load_share_first": _share(engine.gpu_load[:window]),
        "gpu_load_share_last": _share(engine.gpu_load[-window:]),
        "rebalances": rebalances,
        "num_rebalances": len(done),
        "slots_moved": int(sum(int(r.get("slots_moved") or 0) for r in done)),
        "bytes_moved": int(sum(int(r.get("bytes_moved") or 0) for r in done)),
        "rebalance_failures": engine.rebalance_failures,
        "rss_mb_every_passes": RSS_EVERY_PASSES,
        "rss_mb_max_over_ranks": [round(x, 2) for x in rss_mb],
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
