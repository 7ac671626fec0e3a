"""Placement quality and solver time: the project's policy beside DeepSeek's recipe.

Usage: python benchmarks/bench_placement.py   (writes benchmarks/results/placement_cpu.json)
Traces from ../shared/traces (or $EPLB_TRACES_DIR). CPU only; one thread for solver timings.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from eplb_plugin.algorithms import plan  # noqa: E402
from eplb_plugin.algorithms.evaluate import pass_counts, simulate  # noqa: E402
from eplb_plugin.balance import placement_balancedness  # noqa: E402

TRACES = Path(os.environ.get("EPLB_TRACES_DIR", ROOT.parent / "shared" / "traces"))
QWEN_SHAPES = [(8, 0), (16, 16), (32, 32), (64, 64)]
TIMING_REPEATS = 5


def in_sample() -> list[dict]:
    counts = torch.tensor(json.loads((TRACES / "sglang_qwen3_235b_a22b_L512_counts.json").read_text())["counts"])
    rows = []
    for gpus, redundant in QWEN_SHAPES:
        p = 128 + redundant
        ds = plan(counts, num_physical_experts=p, num_gpus=gpus, algorithm="deepseek")
        ours = plan(counts, num_physical_experts=p, num_gpus=gpus)
        naive = torch.arange(p).remainder(128).expand(counts.shape[0], -1)
        rows.append({
            "ep": gpus, "redundant": redundant,
            "naive": placement_balancedness(counts, naive, gpus),
            "deepseek": placement_balancedness(counts, ds.physical_to_logical_map, gpus),
            "ours_equal": placement_balancedness(counts, ours.physical_to_logical_map, gpus),
            "ours_weighted": placement_balancedness(counts, ours.physical_to_logical_map, gpus, ours.replica_weights),
        })
    return rows


def realized() -> list[dict]:
    ids = np.concatenate([np.load(TRACES / f"esft_dsv2lite_{d}_top6.npz")["topk_ids"] for d in ("intent", "law")])
    counts = pass_counts(ids, num_logical=64, pass_tokens=256)
    rows = []
    for gpus, slots in [(8, 72), (16, 80)]:
        runs = {"deepseek": dict(algorithm="deepseek"), "ours": dict(algorithm="auto"),
                "ours_decay0.8": dict(algorithm="auto", decay=0.8),
                "oracle_same_pass_deepseek": dict(algorithm="deepseek", oracle=True)}
        for name, kw in runs.items():
            res = simulate(counts, num_physical=slots, num_gpus=gpus, interval=8, window=8, **kw)
            rows.append({"ep": gpus, "slots": slots, "policy": name, **res.summary()})
        naive = simulate(counts, num_physical=slots, num_gpus=gpus, interval=10**9, dispatches=("random",))
        rows.append({"ep": gpus, "slots": slots, "policy": "naive", **naive.summary()})
    return rows


def solver_time() -> dict:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    counts = torch.from_numpy(rng.zipf(1.6, size=(58, 256)).astype(np.float64).clip(max=1e5))
    out = {}
    for name in ("deepseek", "auto", "eplb_plugin_equal"):
        plan(counts, num_physical_experts=288, num_gpus=32, algorithm=name)
        times = []
        for _ in range(TIMING_REPEATS):
            t = time.perf_counter()
            plan(counts, num_physical_experts=288, num_gpus=32, algorithm=name)
            times.append(time.perf_counter() - t)
        out[name] = 1e3 * float(np.median(times))
    return out


def main() -> None:
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "numpy": np.__version__, "cpu_count": os.cpu_count()},
              "command": "python benchmarks/bench_placement.py"}
    report["in_sample_qwen3"] = in_sample()
    print("in-sample Qwen3-235B (balancedness)\n ep  red  naive   deepseek ours_eq  ours_w")
    for r in report["in_sample_qwen3"]:
        print(f" {r['ep']:<3} {r['redundant']:<4} {r['naive']:.4f}  {r['deepseek']:.5f} {r['ours_equal']:.5f} {r['ours_weighted']:.5f}")
    report["realized_esft_intent_then_law_256tok"] = realized()
    print("realized per pass, ESFT intent->law, re-plan every 8 passes on the last 8")
    for r in report["realized_esft_intent_then_law_256tok"]:
        b = r["balancedness_mean"]
        print(f" EP{r['ep']:<3} {r['policy']:<26} " + " ".join(f"{d}={v:.3f}" for d, v in b.items())
              + f"  moved {r['slots_moved_share_mean']:.1%} (max {r['slots_moved_share_max']:.1%})")
    report["solver_ms_58x256_to_288_on_32gpus_1thread"] = solver_time()
    print("solver ms (58x256 -> 288 on 32 GPUs, 1 thread):", {k: round(v, 1) for k, v in report["solver_ms_58x256_to_288_on_32gpus_1thread"].items()})
    out = ROOT / "benchmarks" / "results" / "placement_cpu.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
