"""How much a plan being computed slows the serving thread: planning in a thread vs a process.

The serving side is a loop whose every iteration does a pass's worth of small host work
(torch ops on small CPU tensors, as a runtime's host side between kernel launches). While
the loop runs, rank 0's planner computes DeepSeek-V3-sized placements (58 layers, 256
experts, 288 slots on 32 GPUs, ``eplb_plugin_equal``) back to back, either in a Python thread
of the serving process (the manager's default) or in a ``PlannerProcess``. Reported:
iteration time (median, p99, max) over the undisturbed loop's median, and plans per second.

    python benchmarks/bench_planner_isolation.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from eplb_plugin.algorithms import plan
from eplb_plugin.planner_process import PlannerProcess

LAYERS, EXPERTS, SLOTS, GPUS = 58, 256, 288, 32


def host_work(x: torch.Tensor, ops: int) -> None:
    for _ in range(ops):
        x = (x * 1.0001 + 0.5).relu_()


def serve(seconds: float, ops: int, stop_when=None) -> list[float]:
    x = torch.ones(64)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and not (stop_when and stop_when()):
        t0 = time.perf_counter()
        host_work(x, ops)
        times.append(time.perf_counter() - t0)
    return times


def stats(times: list[float], base: float) -> dict:
    s = sorted(times)
    return dict(iterations=len(s), median_ratio=statistics.median(s) / base,
                p99_ratio=s[int(0.99 * (len(s) - 1))] / base, max_ratio=s[-1] / base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", type=int, default=6, help="plans computed while the loop serves")
    ap.add_argument("--ops", type=int, default=100, help="small torch ops per serving iteration")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    ns = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    counts = torch.from_numpy(rng.zipf(1.3, (LAYERS, EXPERTS)).astype(np.float64))
    previous = torch.arange(SLOTS).remainder(EXPERTS).repeat(LAYERS, 1)
    kwargs = dict(num_physical_experts=SLOTS, num_gpus=GPUS, algorithm="eplb_plugin_equal", previous=previous)
    plan(counts, **kwargs)  # imports and first-call costs, outside every measurement
    base_times = serve(3.0, ns.ops)
    base = statistics.median(base_times)
    report = {"benchmark": "planner_isolation", "device": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "problem": dict(layers=LAYERS, experts=EXPERTS, slots=SLOTS, gpus=GPUS, algorithm="eplb_plugin_equal"),
              "ops_per_iteration": ns.ops, "undisturbed_iteration_ms": 1e3 * base,
              "undisturbed": stats(base_times, base), "runs": {}}
    process = PlannerProcess()
    process(counts, **kwargs)  # the worker is up and warm
    for name, planner in (("thread", lambda: plan(counts, **kwargs)), ("process", lambda: process(counts, **kwargs))):
        done = threading.Event()
        solver = []

        def plan_all(planner=planner, done=done, solver=solver):
            for _ in range(ns.plans):
                t0 = time.perf_counter()
                planner()
                solver.append(time.perf_counter() - t0)
            done.set()

        worker = threading.Thread(target=plan_all)
        worker.start()
        times = serve(600.0, ns.ops, stop_when=done.is_set)
        worker.join()
        report["runs"][name] = dict(stats(times, base), plan_seconds_median=statistics.median(solver))
        print(f"{name:>8}: iteration median {report['runs'][name]['median_ratio']:.2f}x, p99 "
              f"{report['runs'][name]['p99_ratio']:.2f}x, max {report['runs'][name]['max_ratio']:.2f}x of "
              f"{1e3 * base:.3f} ms; plan {statistics.median(solver):.3f} s")
    process.close()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "planner_isolation_cpu.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
