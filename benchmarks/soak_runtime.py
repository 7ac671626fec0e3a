"""Soak: a long run of the reference runtime with frequent rebalances; does memory stay flat?

Serves ``--num-passes`` passes on ``--ep-size`` gloo ranks (the tiny preset), rebalancing
every ``--rebalance-every`` passes. Every ``RSS_EVERY_PASSES`` passes each rank notes four
figures (the max over ranks is kept):

- rss: its resident memory (what the issue asks to stay flat; it also moves when glibc keeps
  or returns freed pages, which is not growth);
- traced: the Python heap, as tracemalloc traces it (the soak starts the ranks with
  ``PYTHONTRACEMALLOC=1``: one frame per allocation, which slows passes, not memory);
- malloc in use: the bytes glibc's malloc has handed out and not had back (``mallinfo2``:
  every arena's in-use chunks and mmapped blocks), which covers torch's CPU tensors and
  gloo's buffers too, and no freed memory the allocator keeps;
- rss anon: resident anonymous memory (``RssAnon``: RSS less the file-backed pages, such as
  a library's code paged in the first time a rare path runs).

With ``--collect-before-samples`` (the default) each rank runs a full garbage collection
(``gc.collect()``) right before each sample, outside the timed pass, so the figures measure
what is live rather than when CPython last collected: its collector runs once the tracked
objects allocated, less those freed, pass a threshold, and in a steady serving loop that
count barely rises (a 1,600-pass probe of this run saw no automatic collection after
start-up), so unreachable cycles and the interpreter's free lists, which only a collection
frees, add a creep to every figure sampled without one (``--no-collect-before-samples``
measures it; ``benchmarks/results/soak_cpu_no_collect.json``).

After the warm-up (the first quarter), each figure's growth is the median of the last quarter
minus the median of the second quarter, per pass between the quarters' centres; a few noisy
samples cannot move a median. The least-squares slope is reported beside it. The verdict is
flat when every figure's quarter growth is below ``FLAT_BYTES_PER_PASS``. Each rank also
diffs a tracemalloc snapshot taken halfway through the warm-up with one taken after the last
pass (the lines whose allocations grew most, and the change in live objects by type), so
any growth left names its source. Memory is measured; nothing is timed. Weights are
verified at the end. Allocator tuning, in the soak only: once, right after that first
snapshot (a transient of tens of MB), each rank calls glibc's ``malloc_trim(0)``, so that the
pages the freed snapshot leaves in the heap are returned and cannot absorb (hide from RSS)
later growth; the rest of the warm-up lets RSS settle again before the second quarter.
``MALLOC_ARENA_MAX`` is not set. Tracing makes the ranks' RSS larger than a
run without it (tracemalloc's own tables); the question is whether it moves.

    nice python benchmarks/soak_runtime.py --num-passes 20000 --out benchmarks/results/soak_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import functools
import gc
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eplb_plugin.args import EPLBArgs
from eplb_plugin.manager import EPLBManager
from eplb_plugin.runtime.config import ModelShape, RunSpec, RuntimeConfig, WorkloadSpec
from eplb_plugin.runtime.launch import launch
from eplb_plugin.runtime.results import RSS_EVERY_PASSES

WARMUP_SHARE = 0.25  # the first quarter of the run is warm-up (allocator, caches, first plans)
FLAT_BYTES_PER_PASS = 16.0  # the verdict: every figure's quarter growth below this is flat
TOP_LINES = 12  # tracemalloc lines reported per rank
SOAK_DIR_ENV = "EPLB_SOAK_DIR"  # where each rank writes its figures (set by main for the ranks)
SOAK_SNAPSHOT_ENV = "EPLB_SOAK_SNAPSHOT_PASS"  # the pass after which the first snapshot is taken
SOAK_COLLECT_ENV = "EPLB_SOAK_COLLECT"  # "1": a full garbage collection before each sample


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _libc() -> Any:
    """glibc with ``mallinfo2``'s result type, or None off glibc (loaded once: each load builds
    ctypes classes, garbage the soak itself would add)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    return libc


def malloc_trim() -> None:
    """Return glibc's free pages to the system (``malloc_trim(0)``); nothing off glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def malloc_in_use_mb() -> float:
    """glibc malloc's bytes in use (all arenas' allocated chunks + mmapped blocks), MiB; 0 off glibc."""
    libc = _libc()
    if libc is None:
        return 0.0
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


class SoakManager(EPLBManager):
    """EPLBManager that also notes this rank's malloc in use every RSS_EVERY_PASSES passes
    (the same passes as the runtime's RSS samples) and diffs tracemalloc snapshots taken
    halfway through the warm-up and at close; it writes them to ``$EPLB_SOAK_DIR/rank<r>.json``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._soak_rank = kwargs["rank"]
        self._soak_passes = 0
        self._soak_snapshot_pass = int(os.environ[SOAK_SNAPSHOT_ENV])
        self._soak_samples: dict[str, list[float]] = {"malloc_in_use_mb": [], "rss_anon_mb": [],
                                                      "unreachable_objects_collected": []}
        self._soak_collect = os.environ[SOAK_COLLECT_ENV] == "1"
        self._soak_start: collections.Counter[str] | None = None  # live objects by type at the first snapshot
        self._soak_dir = Path(os.environ[SOAK_DIR_ENV])

    def on_forward_pass_end(self) -> None:
        super().on_forward_pass_end()
        pass_id = self._soak_passes  # the pass that just ended
        self._soak_passes += 1
        if pass_id % RSS_EVERY_PASSES == 0:
            # The runtime samples RSS and the traced heap right after this turn, at the same pass.
            self._soak_samples["unreachable_objects_collected"].append(gc.collect() if self._soak_collect else 0)
            self._soak_samples["malloc_in_use_mb"].append(malloc_in_use_mb())
            self._soak_samples["rss_anon_mb"].append(rss_anon_mb())
        if self._soak_passes == self._soak_snapshot_pass and tracemalloc.is_tracing():
            # Written out, not kept: a snapshot held in memory would be part of what is measured.
            snapshot, self._soak_start = _snapshot()
            snapshot.dump(str(self._snapshot_path))
            del snapshot
            gc.collect()
            malloc_trim()  # the snapshot's tens of MB, freed, must not hide later growth from RSS

    @property
    def _snapshot_path(self) -> Path:
        return self._soak_dir / f"rank{self._soak_rank}.first.tracemalloc"

    def close(self) -> None:
        super().close()
        report: dict[str, Any] = dict(self._soak_samples)
        if self._soak_start is not None:
            after, objects_after = _snapshot()
            before, objects_before = tracemalloc.Snapshot.load(str(self._snapshot_path)), self._soak_start
            report["tracemalloc_top_growth"] = [
                {"where": _short(stat.traceback[0].filename) + f":{stat.traceback[0].lineno}",
                 "bytes": stat.size_diff, "blocks": stat.count_diff}
                for stat in after.compare_to(before, "lineno")[:TOP_LINES]
            ]
            report["tracemalloc_growth_bytes"] = sum(s.size_diff for s in after.compare_to(before, "filename"))
            change = {k: objects_after[k] - objects_before[k] for k in objects_after.keys() | objects_before.keys()}
            report["live_objects_change"] = dict(
                sorted(((k, v) for k, v in change.items() if v), key=lambda kv: -abs(kv[1]))[:TOP_LINES])
        (self._soak_dir / f"rank{self._soak_rank}.json").write_text(json.dumps(report))


def rss_anon_mb() -> float:
    """This process's resident anonymous memory (``RssAnon`` of /proc/self/status), MiB; 0 off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return 0.0
    return 0.0


def _snapshot() -> tuple[tracemalloc.Snapshot, collections.Counter[str]]:
    """(a tracemalloc snapshot, live gc-tracked objects by type name), after a collection."""
    gc.collect()
    objects = collections.Counter(type(o).__name__ for o in gc.get_objects())
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
    return tracemalloc.take_snapshot().filter_traces(ignore), objects


def _short(path: str) -> str:
    """A source path without the machine's prefix: from the package, ``site-packages`` or the
    stdlib folder on (whichever comes last in the path)."""
    parts = Path(path).parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "site-packages":
            return "/".join(parts[i + 1:])
        if parts[i] in ("eplb_plugin", "benchmarks") or parts[i].startswith("python3"):
            return "/".join(parts[i:])
    return parts[-1] if parts else path


def growth(samples: np.ndarray, num_passes: int) -> dict[str, float]:
    """A sampled figure's growth after the warm-up: the last quarter's median minus the second
    quarter's, per pass between the quarters' centres (bytes/pass), and the least-squares slope
    over every sample after the warm-up (bytes/pass); samples in MiB, one per RSS_EVERY_PASSES."""
    passes = np.arange(len(samples)) * RSS_EVERY_PASSES
    second = (passes >= 0.25 * num_passes) & (passes < 0.5 * num_passes)
    last = passes >= 0.75 * num_passes
    measured = passes >= WARMUP_SHARE * num_passes
    quarter_mb = float(np.median(samples[last]) - np.median(samples[second]))
    slope_mb, _ = np.polyfit(passes[measured], samples[measured], 1)
    return {
        "second_quarter_median_mb": round(float(np.median(samples[second])), 4),
        "last_quarter_median_mb": round(float(np.median(samples[last])), 4),
        "quarter_growth_bytes_per_pass": round(quarter_mb * 2**20 / (0.5 * num_passes), 2),
        "slope_bytes_per_pass": round(float(slope_mb) * 2**20, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-passes", type=int, default=20_000)
    parser.add_argument("--rebalance-every", type=int, default=20)
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=32)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/soak_cpu.json")
    parser.add_argument("--collect-before-samples", action=argparse.BooleanOptionalAction, default=True,
                        help="A full garbage collection on each rank before each sample (see the docstring).")
    ns = parser.parse_args()
    if ns.num_passes < 4 * RSS_EVERY_PASSES:
        parser.error(f"--num-passes must be >= {4 * RSS_EVERY_PASSES} (a sample per quarter at least)")
    args = EPLBArgs(ep_size=ns.ep_size, enable_eplb=True, ep_num_redundant_experts=ns.ep_size,
                    eplb_rebalance_num_iterations=ns.rebalance_every, eplb_verify_weights=True).resolve()
    model = ModelShape.from_preset("tiny", num_layers=ns.num_layers)
    cfg = RuntimeConfig(model=model, batch_tokens=ns.batch_tokens, progress=False, threads_per_rank=1,
                        manager_factory=f"{Path(__file__).stem}:SoakManager")
    warmup = int(WARMUP_SHARE * ns.num_passes)
    snapshot_pass = warmup // 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eplb_soak_") as soak_dir:
        # The spawned ranks inherit these: they trace Python allocations from their start and
        # find where to write their figures.
        os.environ.update({"PYTHONTRACEMALLOC": "1", SOAK_DIR_ENV: soak_dir, SOAK_SNAPSHOT_ENV: str(snapshot_pass),
                           SOAK_COLLECT_ENV: "1" if ns.collect_before_samples else "0"})
        result = launch(cfg, [RunSpec("soak", args, WorkloadSpec(), ns.num_passes)], args)[0]
        ranks = [json.loads(Path(soak_dir, f"rank{r}.json").read_text()) for r in range(ns.ep_size)]
    wall_s = time.perf_counter() - start
    series = {
        "rss": np.array(result["rss_mb_max_over_ranks"]),
        "traced": np.array(result["traced_mb_max_over_ranks"]),
        "malloc_in_use": np.max([r["malloc_in_use_mb"] for r in ranks], axis=0),
        "rss_anon": np.max([r["rss_anon_mb"] for r in ranks], axis=0),
    }
    figures = {name: growth(values, ns.num_passes) for name, values in series.items()}
    flat = all(abs(f["quarter_growth_bytes_per_pass"]) < FLAT_BYTES_PER_PASS for f in figures.values())
    report = {
        "what": "memory of the reference runtime over a long run with frequent rebalances (max over ranks)",
        "command": "python " + " ".join(sys.argv),
        "device": f"cpu ({platform.processor() or platform.machine()}), gloo, {ns.ep_size} ranks",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "num_passes": ns.num_passes,
        "rebalance_every_passes": ns.rebalance_every,
        "rebalances_started": result["rebalances"][-1]["index"] + 1 if result["rebalances"] else 0,
        "rebalance_records_kept": len(result["rebalances"]),
        "rebalances_done": result["num_rebalances"],  # every rebalance done (the records kept are the newest)
        "rebalance_failures": result["rebalance_failures_total"],
        "slots_checked": result["slots_checked"],
        "slots_failed": result["slots_failed"],
        "samples_every_passes": RSS_EVERY_PASSES,
        "collect_before_samples": ns.collect_before_samples,
        "unreachable_objects_per_collection_median_by_rank": [
            float(np.median(r["unreachable_objects_collected"][1:])) for r in ranks
        ],
        "warmup_passes": warmup,
        "flat": flat,
        "flat_threshold_bytes_per_pass": FLAT_BYTES_PER_PASS,
        "growth_after_warmup": figures,
        "tracemalloc_snapshots_after_passes": [snapshot_pass, ns.num_passes],
        "tracemalloc_growth_bytes_per_pass_by_rank": [
            round(r["tracemalloc_growth_bytes"] / (ns.num_passes - snapshot_pass), 3) for r in ranks
        ],
        "tracemalloc_top_growth_by_rank": [r["tracemalloc_top_growth"] for r in ranks],
        "live_objects_change_by_rank": [r["live_objects_change"] for r in ranks],
        **{f"{name}_mb_max_over_ranks": values.round(4).tolist() for name, values in series.items()},
        "wall_s": round(wall_s, 1),
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(report, indent=1))
    print(f"{ns.num_passes} passes, {report['rebalances_done']} rebalances done, slots failed {result['slots_failed']}; "
          "after warm-up (last quarter's median - second quarter's, bytes/pass): "
          + ", ".join(f"{name} {f['quarter_growth_bytes_per_pass']:+.1f}" for name, f in figures.items())
          + f" ({'flat' if flat else 'GROWING'}); wrote {ns.out}")
    return 0 if flat and result["slots_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
