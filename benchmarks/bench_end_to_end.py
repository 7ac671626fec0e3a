"""End-to-end benchmark: MoE step time with EPLB, without, and with perfectly uniform routing.

Three runs of the reference runtime in one invocation (same processes, same token count):

- ``no_eplb``: the workload on the initial (trivial) placement;
- ``eplb``: the same workload with ``--enable-eplb`` (rebalancing every N passes);
- ``uniform``: every expert gets exactly the same number of tokens (the yardstick).

Reported per run: MoE step time (wall, slowest rank; on CUDA the only synchronizations are
at the start and end of each pass, the measurement points), realized per-pass balancedness
(from the GPUs' actual token counts), rebalance stalls, slots/bytes moved, weights verified.

Also the "EP8 compute part" (BENCHMARKS.md; ``benchmarks/ep8_compute.py`` says what it
times): on one device, each simulated EP8 rank's experts timed alone in CUDA graphs, the
slowest rank per layer plus one rank's dispatch, for naive, EPLB with static and ``minmax``
dispatch, the per-pass policy with ``minmax``, and uniform routing; each placement with its
busiest GPU's GEMM units beside the floor no placement goes under (``--ep8-units-only``:
those counts alone, nothing timed, on CPU).

CPU:  python benchmarks/bench_end_to_end.py --device cpu            (gloo, 4 ranks, tiny)
      python benchmarks/bench_end_to_end.py --ep8-only --ep8-units-only --traces-dir <dir>
      (the EP8 part's GEMM units at DeepSeek-V2-Lite sizes, nothing timed)
GPU:  python benchmarks/bench_end_to_end.py --device cuda --traces-dir <dir with the ESFT .npz>
      (2 GPUs, NCCL, DeepSeek-V2-Lite expert sizes, bf16, ESFT intent then law replayed)
"""

from __future__ import annotations

import os

# NVLink multicast off (see the device tool's KINDS.md); set before torch touches NCCL.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from _traces import ESFT_TRACES  # noqa: E402  (benchmarks/_traces.py)
from ep8_compute import ep8_compute_part, print_ep8  # noqa: E402  (benchmarks/ep8_compute.py)

from eplb_plugin.args import EPLBArgs  # noqa: E402
from eplb_plugin.kernels import BACKENDS  # noqa: E402
from eplb_plugin.runtime.config import ModelShape, RunSpec, RuntimeConfig, WorkloadSpec  # noqa: E402
from eplb_plugin.runtime.launch import launch  # noqa: E402

PER_PASS_KEYS = ("balancedness_per_pass", "moe_step_s_per_pass", "off_step_s_per_pass")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--ep-size", type=int, default=None, help="default: 4 on cpu, 2 on cuda")
    p.add_argument("--ep-num-redundant-experts", type=int, default=None, help="default: ep_size")
    p.add_argument("--num-passes", type=int, default=None, help="default: 200 on cpu, 300 on cuda")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="default: 256 on cpu, 2048 on cuda and with --ep8-units-only")
    p.add_argument("--rebalance-every", type=int, default=None,
                   help="default: 50 on cpu, 30 on cuda and with --ep8-units-only")
    p.add_argument("--num-layers", type=int, default=None, help="default: the preset's (26 for DeepSeek-V2-Lite)")
    p.add_argument("--traces-dir", default=None, help="folder with the ESFT .npz traces (cuda default workload)")
    p.add_argument("--workload", choices=("auto", "synthetic", "trace"), default="auto",
                   help="auto: trace when --traces-dir is given, else synthetic")
    p.add_argument("--skip-ep8", action="store_true", help="skip the EP8 compute part")
    p.add_argument("--ep8-only", action="store_true", help="only the EP8 compute part (one device, no ranks)")
    p.add_argument("--ep8-batch-tokens", type=int, default=None,
                   help="tokens per pass for the EP8 compute part (default: --batch-tokens)")
    p.add_argument("--dispatch", default="static,minmax",
                   help="comma-separated --ep-dispatch-algorithm values, one EPLB run each (static is named 'eplb')")
    p.add_argument("--disable-cuda-graph", action="store_true", help="run every pass eagerly on CUDA")
    p.add_argument("--dispatch-backend", default="auto", choices=BACKENDS,
                   help="ExpertDispatcher backend (triton: minmax dispatch as Triton kernels)")
    p.add_argument("--non-blocking", action="store_true", help="EPLB runs move weights with --eplb-non-blocking")
    p.add_argument("--plan-in-process", action="store_true", help="EPLB runs plan with --eplb-plan-in-process")
    p.add_argument("--profile-passes", default="",
                   help="comma-separated passes that rank 0 runs under torch.profiler (each run)")
    p.add_argument("--profile-dir", default=None, help="where the profiles go (default: --out/profiles)")
    p.add_argument("--minmax-two-launches", action="store_true",
                   help="EP8 compute part: time minmax dispatch of small passes as two launches (totals and split, "
                        "then assign) instead of the fused kernel (kernels/minmax_triton.py FUSED, on by default)")
    p.add_argument("--ep8-units-only", action="store_true",
                   help="EP8 compute part: only the balancedness and the busiest GPU's GEMM units per placement, "
                        "at DeepSeek-V2-Lite sizes on any device, nothing timed")
    p.add_argument("--out", default=str(Path(__file__).with_name("results")))
    return p.parse_args(argv)


def setup(ns: argparse.Namespace) -> tuple[RuntimeConfig, list[RunSpec], EPLBArgs, WorkloadSpec]:
    cuda = ns.device == "cuda"
    if cuda or ns.ep8_units_only:
        model = ModelShape.from_preset("deepseek-v2-lite", num_layers=ns.num_layers)
    else:
        model = ModelShape.from_preset("tiny", num_layers=ns.num_layers, hidden_size=128, intermediate_size=256)
    ep = ns.ep_size or (2 if cuda else 4)
    kind = ns.workload if ns.workload != "auto" else ("trace" if ns.traces_dir else "synthetic")
    traces = tuple(str(Path(ns.traces_dir) / name) for name in ESFT_TRACES) if kind == "trace" else ()
    workload = WorkloadSpec(kind=kind, traces=traces)
    args = EPLBArgs(
        ep_size=ep, ep_num_redundant_experts=ns.ep_num_redundant_experts if ns.ep_num_redundant_experts is not None else ep,
        eplb_rebalance_num_iterations=ns.rebalance_every or (30 if cuda or ns.ep8_units_only else 50),
    )
    passes = ns.num_passes or (300 if cuda else 200)
    off = args.resolve()
    on = dataclasses.replace(args, enable_eplb=True, eplb_non_blocking=ns.non_blocking,
                             eplb_plan_in_process=ns.plan_in_process).resolve()
    eplb_runs = [
        RunSpec("eplb" if d == "static" else f"eplb_{d}", dataclasses.replace(on, ep_dispatch_algorithm=d), workload, passes)
        for d in ns.dispatch.split(",")
    ]
    runs = [RunSpec("no_eplb", off, workload, passes), *eplb_runs,
            # Uniform routing on E slots (no redundancy): every GPU gets exactly the mean load.
            RunSpec("uniform", dataclasses.replace(args, ep_num_redundant_experts=0).resolve(),
                    WorkloadSpec(kind="uniform"), passes)]
    cfg = RuntimeConfig(model=model, batch_tokens=ns.batch_tokens or (2048 if cuda or ns.ep8_units_only else 256),
                        device=ns.device,
                        dtype="bfloat16" if cuda else "float32", progress=True,
                        cuda_graph=not ns.disable_cuda_graph, dispatch_backend=ns.dispatch_backend,
                        profile_passes=tuple(int(x) for x in ns.profile_passes.split(",") if x),
                        profile_dir=ns.profile_dir or str(Path(ns.out) / "profiles"))
    return cfg, runs, on, workload



def main(argv=None) -> int:
    ns = parse_args(argv)
    cfg, runs, layout, workload = setup(ns)
    if ns.minmax_two_launches:  # read at each call: the EP8 part's dispatchers (this process) take two launches
        from eplb_plugin.kernels import minmax_triton

        minmax_triton.FUSED = False
    t0 = time.perf_counter()
    ep8_cfg = dataclasses.replace(cfg, batch_tokens=ns.ep8_batch_tokens or cfg.batch_tokens)
    if ns.ep8_units_only and not ns.ep8_only:
        raise SystemExit("--ep8-units-only goes with --ep8-only")
    if ns.ep8_only:
        ep8 = ep8_compute_part(ep8_cfg, workload, runs[1].eplb.eplb_rebalance_num_iterations,
                               timed=not ns.ep8_units_only)
        return _write_ep8_only(ns, argv, ep8_cfg, workload, ep8, t0)
    results = launch(cfg, runs, layout)
    by = {r["label"]: r for r in results}
    ep8 = None if ns.skip_ep8 else ep8_compute_part(ep8_cfg, workload, runs[1].eplb.eplb_rebalance_num_iterations)
    device = torch.cuda.get_device_name(0) if cfg.device == "cuda" else platform.processor() or platform.machine()
    summary = {
        label: {k: r[k] for k in ("moe_step_ms_mean", "balancedness_mean", "expert_compute_ms_mean", "num_rebalances",
                                  "slots_moved", "bytes_moved", "stall_s_total", "stall_ms_max", "slots_checked",
                                  "slots_failed", "wall_s")}
        for label, r in by.items()
    }
    eplb_labels = [label for label in summary if label.startswith("eplb")]
    uni_ms, off_ms = summary["uniform"]["moe_step_ms_mean"], summary["no_eplb"]["moe_step_ms_mean"]
    best = min(eplb_labels, key=lambda label: summary[label]["moe_step_ms_mean"])
    eplb_ms = summary[best]["moe_step_ms_mean"]
    report = {
        "benchmark": "end_to_end",
        "command": "python " + shlex.join(sys.argv if argv is None else ["benchmarks/bench_end_to_end.py", *argv]),
        "device": device, "device_kind": cfg.device, "torch_version": torch.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "config": {"model": cfg.model.__dict__, "batch_tokens": cfg.batch_tokens, "dtype": cfg.dtype,
                   "ep_size": layout.ep_size, "ep_num_redundant_experts": layout.ep_num_redundant_experts,
                   "rebalance_every": layout.eplb_rebalance_num_iterations, "num_passes": runs[0].num_passes,
                   "dispatch_backend": cfg.dispatch_backend, "exchange": cfg.exchange, "cuda_graph": cfg.cuda_graph,
                   "eplb_transport": layout.eplb_transport, "eplb_non_blocking": ns.non_blocking,
                   "eplb_plan_in_process": ns.plan_in_process,
                   "workload": workload.__dict__},
        "summary": summary,
        "eplb_step_over_uniform": {label: summary[label]["moe_step_ms_mean"] / uni_ms for label in eplb_labels},
        "speedup_eplb_over_no_eplb": {label: off_ms / summary[label]["moe_step_ms_mean"] for label in eplb_labels},
        "best_eplb_run": best,
        "best_eplb_step_within_10pct_of_uniform": eplb_ms <= 1.10 * uni_ms,
        "measured_balancedness": {k: summary[k]["balancedness_mean"] for k in summary},
        "ep8_compute_part": ep8,
        "runs": [{k: r[k] for k in ("label", *PER_PASS_KEYS, "rebalances")} for r in results],
        "total_wall_s": time.perf_counter() - t0,
    }
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"end_to_end_{cfg.device}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    for label, s in summary.items():
        print(f"{label:>8}: MoE step {s['moe_step_ms_mean']:8.2f} ms  balancedness {s['balancedness_mean']:.3f}  "
              f"rebalances {s['num_rebalances']}  stall {1e3 * s['stall_s_total']:.0f} ms  "
              f"weights {s['slots_checked'] - s['slots_failed']}/{s['slots_checked']}")
    for label in eplb_labels:
        ms = summary[label]["moe_step_ms_mean"]
        print(f"{label} / uniform step: {ms / uni_ms:.3f}  no_eplb / {label}: {off_ms / ms:.3f}")
    if ep8:
        print_ep8(ep8)
    print(f"wrote {path}")
    return 0 if all(s["slots_failed"] == 0 for s in summary.values()) else 1


def _write_ep8_only(ns, argv, cfg: RuntimeConfig, workload: WorkloadSpec, ep8: dict, t0: float) -> int:
    device = torch.cuda.get_device_name(0) if cfg.device == "cuda" else platform.processor() or platform.machine()
    report = {
        "benchmark": "end_to_end_ep8_compute_part",
        "command": "python " + shlex.join(sys.argv if argv is None else ["benchmarks/bench_end_to_end.py", *argv]),
        "device": device, "torch_version": torch.__version__,
        "config": {"model": cfg.model.__dict__, "batch_tokens": cfg.batch_tokens, "dtype": cfg.dtype,
                   "workload": workload.__dict__},
        "ep8_compute_part": ep8, "total_wall_s": time.perf_counter() - t0,
    }
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"end_to_end_ep8_{cfg.device}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print_ep8(ep8)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
