"""Planning in a thread vs a process, measured on the SGLang adapter next to a busy serving loop.

One process stands in for SGLang's rank 0 with DeepSeek-V3's shape (61 layers, 256 experts,
288 slots over EP 32; the layers have no routed-weight tensors here, so a plan goes live
without a move and the run measures planning alone). Each loop iteration is one forward
pass: a pass's worth of small host work (torch ops on small CPU tensors), random skewed
counts into the plugin's recorder, then ``SGLangEPLBManager.on_forward_pass_end()``. A
rebalance triggers every ``--interval`` passes. Reported per mode: the iteration time while a
plan is being computed over the undisturbed median (median, p99), the plan's wall time
(request to plan received) and the passes it spanned.

    python benchmarks/bench_sglang_planning.py   # writes results/sglang_planning_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from _sglang_cpu import use_sglang_stubs  # benchmarks/_sglang_cpu.py

NUM_LAYERS, NUM_LOGICAL, NUM_REDUNDANT, EP_SIZE = 61, 256, 32, 32
RESULTS = Path(__file__).resolve().parent / "results" / "sglang_planning_cpu.json"


def _sglang_runtime(interval: int) -> None:
    from sglang.srt import runtime_context as rc
    from sglang.srt.eplb.expert_location import ModelConfigForExpertLocation

    moe = SimpleNamespace(
        enable_eplb=True, eplb_algorithm="auto", eplb_rebalance_num_iterations=interval,
        eplb_rebalance_layers_per_chunk=None, eplb_min_rebalancing_utilization_threshold=1.0,
        expert_distribution_recorder_mode="stat", expert_distribution_recorder_buffer_size=interval,
        expert_balancedness_report_mode="off", ep_num_redundant_experts=NUM_REDUNDANT,
        ep_dispatch_algorithm="static", init_expert_location="trivial", ep_join_mode=None,
        moe_a2a_backend="deepep", deepep_mode="normal", elastic_ep_backend=None,
    )
    rc._CONTEXT._config_bags = {
        "exec": SimpleNamespace(moe=moe, overlap=SimpleNamespace(enable_two_batch_overlap=False)),
        "device": SimpleNamespace(device="cpu"), "schedule": SimpleNamespace(chunked_prefill_size=8192),
    }
    rc._CONTEXT.resources.expert_location_metadata = None
    rc._CONTEXT.resources.expert_distribution_recorder = None
    rc._PARALLEL._stamp.update(ep_size=EP_SIZE, nnodes=1, tp_size=EP_SIZE, tp_rank=0, pp_size=1,
                               elastic_ep_initial_size=None, ep_join_rank_offset=0)
    layout = ModelConfigForExpertLocation(num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL)
    ModelConfigForExpertLocation.from_model_config = staticmethod(lambda _cfg: layout)


def _host_work(x: torch.Tensor, ops: int) -> None:
    for _ in range(ops):
        x = (x * 1.0001 + 0.5).relu_()


def run(mode: str, *, passes: int, interval: int, ops: int) -> dict:
    from sglang.srt.eplb import expert_distribution, expert_location

    from eplb_plugin.integrations.sglang import CONFIG_ENV, _recorder_init_new
    from eplb_plugin.integrations.sglang_manager import SGLangEPLBManager
    from eplb_plugin.manager import Phase

    os.environ[CONFIG_ENV] = json.dumps({"eplb_plan_in_process": mode == "process"})
    _sglang_runtime(interval)
    metadata = expert_location.ExpertLocationMetadata.init_trivial(None, moe_ep_rank=0)
    expert_location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
    recorder = _recorder_init_new(expert_distribution.ExpertDistributionRecorder.init_new, metadata, 0)
    expert_distribution.set_global_expert_distribution_recorder(recorder)
    model = SimpleNamespace(routed_experts_weights_of_layer={})
    adapter = SGLangEPLBManager(model_config=None, get_model=lambda: model)
    gen = torch.Generator().manual_seed(0)
    skew = torch.rand(NUM_LAYERS, metadata.num_physical_experts, generator=gen) ** 4
    x = torch.ones(64)
    laps, planning = [], []
    adapter.on_forward_pass_end()  # builds the manager (and the planner process) before timing
    for _ in range(passes):
        start = time.perf_counter()
        with recorder.with_forward_pass(0):
            _host_work(x, ops)
            recorder.pass_counts.add_((skew * 64).to(torch.int32))
        adapter.on_forward_pass_end()
        laps.append(time.perf_counter() - start)
        planning.append(adapter.manager.phase is Phase.PLANNING)
    history = [r for r in adapter.manager.history if r.end_pass is not None and r.skipped is None]
    adapter.manager.close()
    if adapter._planner is not None:
        adapter._planner.close()
    base = statistics.median(lap for lap, busy in zip(laps, planning) if not busy)
    busy = sorted(lap / base for lap, p in zip(laps, planning) if p)
    return {
        "undisturbed_lap_ms": base * 1e3,
        "laps_while_planning": len(busy),
        "lap_ratio_while_planning_median": statistics.median(busy) if busy else None,
        "lap_ratio_while_planning_p99": busy[int(0.99 * (len(busy) - 1))] if busy else None,
        "plan_wall_s_median": statistics.median(r.solver_s for r in history) if history else None,
        "passes_per_plan_median": statistics.median(r.end_pass - r.start_pass for r in history) if history else None,
        "rebalances": len(history),
    }


def main() -> None:
    use_sglang_stubs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=600)
    parser.add_argument("--interval", type=int, default=100, help="passes between rebalances")
    parser.add_argument("--ops", type=int, default=100, help="host ops per pass")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {mode: run(mode, passes=args.passes, interval=args.interval, ops=args.ops) for mode in ("thread", "process")}
    print(json.dumps(results, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "bench_sglang_planning", "command": "python benchmarks/bench_sglang_planning.py",
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "problem": {"layers": NUM_LAYERS, "experts": NUM_LOGICAL, "slots": NUM_LOGICAL + NUM_REDUNDANT,
                    "ep_size": EP_SIZE, "algorithm": "auto (eplb_plugin_equal under static dispatch)"},
        "passes": args.passes, "interval": args.interval, "ops_per_pass": args.ops, "results": results,
    }, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
