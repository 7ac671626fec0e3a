"""Placement quality and solver time: the project's policy beside DeepSeek's recipe.

Usage: python benchmarks/bench_placement.py   (writes benchmarks/results/placement_cpu.json)
       python benchmarks/bench_placement.py --speed-only [repeats]   (solver timings only,
           side by side with DeepSeek's recipe; writes benchmarks/results/placement_speed_cpu.json)
       --out DIR writes there instead.
Traces from ../shared/traces (or $EPLB_TRACES_DIR). CPU only; one thread for solver timings.
"""

from __future__ import annotations

import argparse
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
from _traces import esft_topk_ids, traces_dir  # noqa: E402  (benchmarks/_traces.py)

from eplb_plugin.algorithms import plan  # noqa: E402
from eplb_plugin.algorithms.evaluate import pass_counts, simulate  # noqa: E402
from eplb_plugin.algorithms.nodes import group_locality  # noqa: E402
from eplb_plugin.balance import placement_balancedness  # noqa: E402

TRACES = traces_dir()
QWEN_SHAPES = [(8, 0), (16, 16), (32, 32), (64, 64)]
TIMING_REPEATS = 5


def in_sample() -> list[dict]:
    counts = torch.tensor(json.loads((TRACES / "sglang_qwen3_235b_a22b_L512_counts.json").read_text())["counts"])
    rows = []
    for gpus, redundant in QWEN_SHAPES:
        p = 128 + redundant
        ds = plan(counts, num_physical_experts=p, num_gpus=gpus, algorithm="deepseek")
        equal = plan(counts, num_physical_experts=p, num_gpus=gpus, algorithm="eplb_plugin_equal")
        ours = plan(counts, num_physical_experts=p, num_gpus=gpus, split="weighted")
        naive = torch.arange(p).remainder(128).expand(counts.shape[0], -1)
        rows.append({
            "ep": gpus, "redundant": redundant,
            "naive": placement_balancedness(counts, naive, gpus),
            "deepseek": placement_balancedness(counts, ds.physical_to_logical_map, gpus),
            "ours_equal": placement_balancedness(counts, equal.physical_to_logical_map, gpus),
            "ours_weighted": placement_balancedness(counts, ours.physical_to_logical_map, gpus, ours.replica_weights),
            "ours_weighted_map_under_equal_split": placement_balancedness(counts, ours.physical_to_logical_map, gpus),
        })
    return rows


def realized() -> list[dict]:
    ids = esft_topk_ids(TRACES)
    counts = pass_counts(ids, num_logical=64, pass_tokens=256)
    rows = []
    for gpus, slots in [(8, 72), (16, 80)]:
        runs = {"deepseek": dict(algorithm="deepseek"), "ours": dict(algorithm="eplb_plugin"),
                "ours_window16": dict(algorithm="eplb_plugin", window=16),
                "oracle_same_pass_deepseek": dict(algorithm="deepseek", oracle=True)}
        for name, kw in runs.items():
            kw = {"window": 8, **kw}
            res = simulate(counts, num_physical=slots, num_gpus=gpus, interval=8, **kw)
            rows.append({"ep": gpus, "slots": slots, "policy": name, **res.summary()})
        naive = simulate(counts, num_physical=slots, num_gpus=gpus, interval=10**9, dispatches=("random",))
        rows.append({"ep": gpus, "slots": slots, "policy": "naive", **naive.summary()})
    return rows


def deepseek_like(num_layers: int = 58, seed: int = 0) -> np.ndarray:
    """DeepSeek-V3-like counts [L, 256]: 8 groups of 32 with skewed group popularity, zipf experts."""
    rng = np.random.default_rng(seed)
    group_share = rng.dirichlet(np.full(8, 2.0), size=num_layers)
    return rng.zipf(1.8, size=(num_layers, 256)).clip(max=200) * np.repeat(group_share, 32, axis=1) * 100


SPEED_SHAPES = {"flat": dict(num_gpus=32), "4_nodes_8_groups": dict(num_gpus=32, num_nodes=4, num_groups=8)}
SPEED_POLICIES = ("deepseek", "deepseek_hierarchical", "eplb_plugin")


def solver_time(repeats: int = TIMING_REPEATS) -> dict:
    """Planner wall time, 58 layers x 256 experts -> 288 slots on 32 GPUs, one thread.

    Every policy runs once per repeat, interleaved, so a load spike on the machine hits all
    of them alike; medians are reported with each policy's ratio to DeepSeek's recipe
    measured in the same run, and each plan's balancedness under the split it is made for.
    ``cpu_ms`` is the process CPU time of the same calls: on a shared machine it moves far less
    with other people's load than wall time does (the planners use one thread).
    ``eplb_plugin`` is the default (equal split); ``eplb_plugin+previous`` its migration-aware
    re-plan (previous placement: DeepSeek's on counts from another seed);
    ``eplb_plugin_weighted`` the plan for a weighted split.
    """
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    cases = {"zipf1.6": rng.zipf(1.6, size=(58, 256)).astype(np.float64).clip(max=1e5),
             "deepseek_v3_like": deepseek_like()}
    out: dict = {"repeats": repeats, "ms": {}, "ratio_to_deepseek": {}, "cpu_ms": {}, "cpu_ratio_to_deepseek": {},
                 "balancedness": {}}
    for case, w in cases.items():
        counts = torch.from_numpy(w)
        previous = plan(torch.from_numpy(deepseek_like(seed=1)), num_physical_experts=288, num_gpus=32,
                        algorithm="deepseek")
        for shape, kw in SPEED_SHAPES.items():
            runs = {name: dict(algorithm=name, **kw) for name in SPEED_POLICIES}
            runs["eplb_plugin+previous"] = dict(algorithm="eplb_plugin", previous=previous, **kw)
            runs["eplb_plugin_weighted"] = dict(algorithm="eplb_plugin", split="weighted", **kw)
            times: dict[str, list[float]] = {name: [] for name in runs}
            cpu: dict[str, list[float]] = {name: [] for name in runs}
            quality: dict[str, float] = {}
            for rep in range(repeats + 1):  # the first round warms up and is not counted
                for name, run in runs.items():
                    start, start_cpu = time.perf_counter(), time.process_time()
                    p = plan(counts, num_physical_experts=288, **run)
                    if rep:
                        times[name].append(time.perf_counter() - start)
                        cpu[name].append(time.process_time() - start_cpu)
                    else:
                        quality[name] = placement_balancedness(counts, p.physical_to_logical_map, 32,
                                                               p.replica_weights)
            ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
            out["ms"][f"{case}/{shape}"] = ms
            out["ratio_to_deepseek"][f"{case}/{shape}"] = {name: v / ms["deepseek"] for name, v in ms.items()}
            cpu_ms = {name: 1e3 * float(np.median(t)) for name, t in cpu.items()}
            out["cpu_ms"][f"{case}/{shape}"] = cpu_ms
            out["cpu_ratio_to_deepseek"][f"{case}/{shape}"] = {name: v / cpu_ms["deepseek"] for name, v in cpu_ms.items()}
            out["balancedness"][f"{case}/{shape}"] = quality
    return out


NODE_CASES = [("qwen3", 16, 2, 16), ("qwen3", 32, 4, 32), ("qwen3", 64, 8, 64),
              ("deepseek_v3_like", 32, 4, 32), ("deepseek_v3_like", 64, 8, 64)]


def node_aware() -> list[dict]:
    """8 groups (Qwen3: synthetic, 16 consecutive experts each); nodes of 8 GPUs."""
    qwen = np.array(json.loads((TRACES / "sglang_qwen3_235b_a22b_L512_counts.json").read_text())["counts"], float)
    sources = {"qwen3": qwen, "deepseek_v3_like": deepseek_like()}
    rows = []
    for src, gpus, nodes, redundant in NODE_CASES:
        w = sources[src]
        for name in ("deepseek", "deepseek_hierarchical", "eplb_plugin_equal", "eplb_plugin"):
            p = plan(torch.from_numpy(w), num_physical_experts=w.shape[1] + redundant, num_gpus=gpus,
                     num_nodes=nodes, num_groups=8, algorithm=name, split="equal" if name == "eplb_plugin_equal" else "weighted")
            m = p.physical_to_logical_map
            rows.append({"counts": src, "ep": gpus, "nodes": nodes, "redundant": redundant, "policy": name,
                         "balancedness": placement_balancedness(torch.from_numpy(w), m, gpus, p.replica_weights),
                         "cross_node_share": p.cross_node_share,
                         "group_locality": group_locality(w, m.numpy(), num_nodes=nodes, num_groups=8)})
    return rows


def print_solver_time(res: dict) -> None:
    print(f"solver ms, 58x256 -> 288 on 32 GPUs, 1 thread, median of {res['repeats']} "
          "(x DeepSeek's recipe, same run; balancedness)")
    for key, ms in res["ms"].items():
        ratio, quality = res["ratio_to_deepseek"][key], res["balancedness"][key]
        cpu_ratio = res["cpu_ratio_to_deepseek"][key]
        print(f" {key:<34} " + "  ".join(f"{name} {v:.1f} ({ratio[name]:.1f}x, CPU {cpu_ratio[name]:.1f}x; "
                                          f"{quality[name]:.4f})" for name, v in ms.items()))


def speed_only(repeats: int, out_dir: Path) -> None:
    """``--speed-only``: just the side-by-side solver timings, to placement_speed_cpu.json."""
    report = {"machine": machine(), "command": f"python benchmarks/bench_placement.py --speed-only {repeats}",
              "solver_ms_58x256_to_288_on_32gpus_1thread": solver_time(repeats)}
    print_solver_time(report["solver_ms_58x256_to_288_on_32gpus_1thread"])
    out = out_dir / "placement_speed_cpu.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "cpu_count": os.cpu_count()}


def main(out_dir: Path) -> None:
    report = {"machine": machine(), "command": "python benchmarks/bench_placement.py"}
    report["in_sample_qwen3"] = in_sample()
    print("in-sample Qwen3-235B (balancedness)\n ep  red  naive   deepseek ours_eq  ours_w   (ours_w map, equal split)")
    for r in report["in_sample_qwen3"]:
        print(f" {r['ep']:<3} {r['redundant']:<4} {r['naive']:.4f}  {r['deepseek']:.5f} {r['ours_equal']:.5f} "
              f"{r['ours_weighted']:.5f}  ({r['ours_weighted_map_under_equal_split']:.4f})")
    report["realized_esft_intent_then_law_256tok"] = realized()
    print("realized per pass, ESFT intent->law, re-plan every 8 passes on the last 8 "
          "(all passes / after the first plan)")
    for r in report["realized_esft_intent_then_law_256tok"]:
        b, a = r["balancedness_mean"], r.get("balancedness_mean_after_first_plan", {})
        print(f" EP{r['ep']:<3} {r['policy']:<26} " + " ".join(f"{d}={v:.3f}/{a.get(d, v):.3f}" for d, v in b.items())
              + f"  moved {r['slots_moved_share_mean']:.1%} (excl. first {r.get('slots_moved_share_mean_excl_first', 0):.1%},"
              f" max {r['slots_moved_share_max']:.1%}); solver {r['solver_ms_mean']:.1f} ms")
    report["solver_ms_58x256_to_288_on_32gpus_1thread"] = solver_time()
    print_solver_time(report["solver_ms_58x256_to_288_on_32gpus_1thread"])
    report["node_aware_8_groups"] = node_aware()
    print("node-aware (8 groups): balancedness / cross-node share / group locality")
    for r in report["node_aware_8_groups"]:
        print(f" {r['counts']:<17} EP{r['ep']:<3} {r['nodes']} nodes {r['policy']:<22} {r['balancedness']:.4f} "
              f"{r['cross_node_share']:.3f} {r['group_locality']:.3f}")
    out = out_dir / "placement_cpu.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed-only", nargs="?", type=int, const=TIMING_REPEATS, default=None, metavar="REPEATS",
                    help=f"only the solver timings beside DeepSeek's recipe (default repeats: {TIMING_REPEATS})")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the JSON")
    ns = ap.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    if ns.speed_only is not None:
        speed_only(ns.speed_only, ns.out)
    else:
        main(ns.out)
