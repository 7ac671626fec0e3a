"""Soak: a long run of the reference runtime with frequent rebalances; does memory stay flat?

Serves ``--num-passes`` passes on ``--ep-size`` gloo ranks (the tiny preset), rebalancing
every ``--rebalance-every`` passes, and reads each rank's resident memory every
``RSS_EVERY_PASSES`` passes (the max over ranks). After the warm-up share of the run, it
fits RSS against the pass index: the slope (bytes per pass) and the growth over the
measured span are the verdict's figures (memory is measured, nothing is timed). Weights
are verified at the end. Writes the series and the figures as JSON.

    python benchmarks/soak_runtime.py --num-passes 20000 --out benchmarks/results/soak_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from eplb_plugin.args import EPLBArgs
from eplb_plugin.runtime.config import ModelShape, RunSpec, RuntimeConfig, WorkloadSpec
from eplb_plugin.runtime.launch import launch
from eplb_plugin.runtime.results import RSS_EVERY_PASSES

WARMUP_SHARE = 0.25  # the first quarter of the run is warm-up (allocator, caches, first plans)
FLAT_BYTES_PER_PASS = 16.0  # the verdict: a slope below this after warm-up is flat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-passes", type=int, default=20_000)
    parser.add_argument("--rebalance-every", type=int, default=20)
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=32)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/soak_cpu.json")
    ns = parser.parse_args()
    args = EPLBArgs(ep_size=ns.ep_size, enable_eplb=True, ep_num_redundant_experts=ns.ep_size,
                    eplb_rebalance_num_iterations=ns.rebalance_every, eplb_verify_weights=True).resolve()
    model = ModelShape.from_preset("tiny", num_layers=ns.num_layers)
    cfg = RuntimeConfig(model=model, batch_tokens=ns.batch_tokens, progress=False, threads_per_rank=1)
    start = time.perf_counter()
    result = launch(cfg, [RunSpec("soak", args, WorkloadSpec(), ns.num_passes)], args)[0]
    wall_s = time.perf_counter() - start
    rss = np.array(result["rss_mb_max_over_ranks"])
    passes = np.arange(len(rss)) * RSS_EVERY_PASSES
    measured = passes >= WARMUP_SHARE * ns.num_passes
    slope_mb, _ = np.polyfit(passes[measured], rss[measured], 1)
    slope_bytes = float(slope_mb * 2**20)
    growth_mb = float(rss[measured][-1] - rss[measured][0])
    done = result["num_rebalances"]  # every rebalance done (the records kept are the newest)
    report = {
        "what": "RSS of the reference runtime over a long run with frequent rebalances (max over ranks)",
        "command": "python " + " ".join(sys.argv),
        "device": f"cpu ({platform.processor() or platform.machine()}), gloo, {ns.ep_size} ranks",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "num_passes": ns.num_passes,
        "rebalance_every_passes": ns.rebalance_every,
        "rebalances_started": result["rebalances"][-1]["index"] + 1 if result["rebalances"] else 0,
        "rebalance_records_kept": len(result["rebalances"]),
        "rebalances_done": done,
        "rebalance_failures": len(result["rebalance_failures"]),
        "slots_checked": result["slots_checked"],
        "slots_failed": result["slots_failed"],
        "rss_every_passes": RSS_EVERY_PASSES,
        "rss_mb_max_over_ranks": rss.round(3).tolist(),
        "warmup_passes": int(WARMUP_SHARE * ns.num_passes),
        "rss_slope_bytes_per_pass_after_warmup": round(slope_bytes, 2),
        "rss_growth_mb_after_warmup": round(growth_mb, 3),
        "flat": bool(abs(slope_bytes) < FLAT_BYTES_PER_PASS),
        "flat_threshold_bytes_per_pass": FLAT_BYTES_PER_PASS,
        "wall_s": round(wall_s, 1),
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(report, indent=1))
    print(f"{ns.num_passes} passes, {done} rebalances done, slots failed {result['slots_failed']}; "
          f"RSS after warm-up: {slope_bytes:+.1f} bytes/pass, {growth_mb:+.2f} MB "
          f"({'flat' if report['flat'] else 'GROWING'}); wrote {ns.out}")
    return 0 if report["flat"] and result["slots_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
