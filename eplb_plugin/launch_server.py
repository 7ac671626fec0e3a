"""``python -m eplb_plugin.launch_server``: the reference EP runtime with SGLang's EPLB flags.

Starts ``--ep-size`` ranks (local spawn, ``torchrun``, or ``--nnodes/--node-rank/
--dist-init-addr``), serves ``--num-passes`` forward passes of the workload, and writes a
report (text, JSON, PNG) to ``--report-dir``. ``--compare`` serves the same workload twice,
without EPLB and then with it, and reports them side by side. ``--port`` starts the HTTP
endpoints on rank 0 (``/health``, ``/metrics``, ``/start|stop|dump_expert_distribution_record``).

Example (the README's main job, a few minutes on a 2-core CPU)::

    python -m eplb_plugin.launch_server --compare --ep-size 4 --ep-num-redundant-experts 4 \\
        --eplb-rebalance-num-iterations 50 --num-passes 300
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import time
from collections.abc import Sequence

from eplb_plugin.args import EPLBArgs, add_eplb_args
from eplb_plugin.configs import PRESET_NAMES
from eplb_plugin.errors import EPLBError
from eplb_plugin.kernels import BACKENDS
from eplb_plugin.runtime.config import (
    DISPATCH_COUNTS,
    DTYPES,
    ModelShape,
    RunSpec,
    RuntimeConfig,
    WorkloadSpec,
)
from eplb_plugin.runtime.moe import EXCHANGES
from eplb_plugin.runtime.workload import DEFAULT_DRIFT_EVERY_PASSES, DEFAULT_ZIPF_S, WORKLOAD_KINDS

DEFAULT_NUM_PASSES = 300
DEFAULT_BATCH_TOKENS = 512


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eplb_plugin.launch_server",
        description="Serve a workload on the reference expert-parallel MoE runtime with EPLB.",
    )
    add_eplb_args(parser)
    g = parser.add_argument_group("runtime")
    g.add_argument("--model-preset", default="tiny", choices=PRESET_NAMES, help="MoE shape (eplb_plugin/configs).")
    g.add_argument("--num-layers", type=int, default=None, help="Override the preset's MoE layer count.")
    g.add_argument("--hidden-size", type=int, default=None, help="Override the preset's hidden size.")
    g.add_argument("--moe-intermediate-size", type=int, default=None, help="Override the preset's expert FFN size.")
    g.add_argument("--workload", default="synthetic", choices=WORKLOAD_KINDS,
                   help="synthetic (skewed, drifting), trace (replay --trace files), uniform (perfect balance).")
    g.add_argument("--trace", action="append", default=[], metavar="PATH",
                   help="Per-token .npz (topk_ids [T, L, k]) or SGLang per_token dump .pt; repeatable, concatenated.")
    g.add_argument("--seed", type=int, default=0, help="Seed of the synthetic workload, activations and weights.")
    g.add_argument("--zipf-s", type=float, default=DEFAULT_ZIPF_S, help="Synthetic skew: expert popularity ~ 1/rank^s.")
    g.add_argument("--drift-every-passes", type=int, default=DEFAULT_DRIFT_EVERY_PASSES,
                   help="Synthetic drift: the hot experts change every this many passes.")
    g.add_argument("--num-passes", type=int, default=DEFAULT_NUM_PASSES, help="Forward passes per run.")
    g.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS, help="Global tokens per forward pass.")
    g.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (gloo) or cuda (NCCL, a GPU per rank).")
    g.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="Weight dtype (default: float32 on cpu, bfloat16 on cuda).")
    g.add_argument("--compare", action="store_true",
                   help="Serve the workload twice, without EPLB then with it, and report side by side.")
    g.add_argument("--host", default="127.0.0.1", help="HTTP host (localhost unless told otherwise).")
    g.add_argument("--port", type=int, default=None, help="HTTP port on rank 0 (0: a free port; default: no HTTP).")
    g.add_argument("--report-dir", default="eplb_report", help="Where report.txt/.json/.png go.")
    g.add_argument("--verify-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="At the end, check every slot's weights against its expert's fingerprint.")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="Show the progress bar.")
    g.add_argument("--disable-cuda-graph", action="store_true",
                   help="On CUDA, run passes eagerly (default: one CUDA graph per pass where the dispatch and exchange allow it).")
    g.add_argument("--moe-exchange", default=None, choices=EXCHANGES,
                   help="How tokens reach their experts' ranks (default: gather on cuda, alltoall on cpu).")
    g.add_argument("--ep-dispatch-backend", default="auto", choices=BACKENDS,
                   help="minmax dispatch as Triton kernels (auto: on CUDA), or as torch ops.")
    g.add_argument("--ep-dispatch-counts", default="global", choices=DISPATCH_COUNTS,
                   help="minmax dispatch: split on the whole pass's per-expert counts (global: one small "
                        "all-gather per layer) or on each rank's own tokens (local).")
    g.add_argument("--threads-per-rank", type=int, default=None, help="CPU threads per rank (default: cores / ranks).")
    g.add_argument("--dist-timeout-s", type=float, default=RuntimeConfig.timeout_s,
                   help="How long a pass's collectives wait for a peer before the ranks stop, naming the rank "
                        "that stopped answering (a rebalance's waits: --eplb-rebalance-timeout-s).")
    g.add_argument("--health-stall-s", type=float, default=RuntimeConfig.stall_s,
                   help="/health answers 503 'stalled' when no pass finished for this many seconds.")
    g.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)  # tests: URL and rank pids land here
    return parser


def build_runs(ns: argparse.Namespace) -> tuple[RuntimeConfig, list[RunSpec], EPLBArgs]:
    """Parsed flags -> (shared config, the runs, the resolved flags of the process layout)."""
    raw = EPLBArgs.from_namespace(ns)
    model = ModelShape.from_preset(ns.model_preset, num_layers=ns.num_layers, hidden_size=ns.hidden_size,
                                   intermediate_size=ns.moe_intermediate_size)
    workload = WorkloadSpec(kind=ns.workload, traces=tuple(ns.trace), seed=ns.seed, zipf_s=ns.zipf_s,
                            drift_every_passes=ns.drift_every_passes)
    cfg = RuntimeConfig(
        model=model, batch_tokens=ns.batch_tokens, device=ns.device,
        dtype=ns.dtype or ("bfloat16" if ns.device == "cuda" else "float32"), seed=ns.seed,
        verify_weights=ns.verify_weights, http_host=ns.host, http_port=ns.port, progress=ns.progress,
        threads_per_rank=ns.threads_per_rank, cuda_graph=not ns.disable_cuda_graph,
        exchange=ns.moe_exchange, dispatch_backend=ns.ep_dispatch_backend,
        dispatch_counts=ns.ep_dispatch_counts,
        timeout_s=ns.dist_timeout_s, stall_s=ns.health_stall_s, ready_file=ns.ready_file,
    )
    if ns.compare:
        off = dataclasses.replace(raw, enable_eplb=False, eplb_non_blocking=False).resolve()
        on = dataclasses.replace(raw, enable_eplb=True).resolve()
        runs = [RunSpec("no_eplb", off, workload, ns.num_passes), RunSpec("eplb", on, workload, ns.num_passes)]
        return cfg, runs, on
    args = raw.resolve()
    return cfg, [RunSpec("eplb" if args.enable_eplb else "no_eplb", args, workload, ns.num_passes)], args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        cfg, runs, layout = build_runs(ns)
    except EPLBError as exc:
        parser.error(str(exc))
    from eplb_plugin.runtime.launch import launch
    from eplb_plugin.runtime.report import text_report, write_report
    from eplb_plugin.runtime.supervise import LaunchError

    start = time.perf_counter()
    failure: LaunchError | None = None
    try:
        results = launch(cfg, runs, layout)
    except LaunchError as exc:  # stopped by a signal, or a rank was lost: report what ran
        failure, results = exc, exc.results
    except EPLBError as exc:  # a bad input found before the ranks started (or on this rank)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if results is None:  # not rank 0 / not node 0
        return 0
    wall_s = time.perf_counter() - start
    command = "python -m eplb_plugin.launch_server " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    if results:
        paths = write_report(results, ns.report_dir, meta={"command": command, "total_wall_s": wall_s,
                                                            "config": dataclasses.asdict(cfg),
                                                            "failure": str(failure) if failure else None})
        print(text_report(results))
        print(f"total wall time {wall_s:.1f} s; report: " + ", ".join(str(p) for p in paths.values()))
    if failure is not None:
        print(f"{parser.prog}: {failure}" + ("" if results else " (no results from rank 0: no report)"), file=sys.stderr)
        return failure.exit_code
    failed = sum(r["slots_failed"] for r in results)
    if failed:
        print(f"ERROR: {failed} slot(s) hold weights that do not match their expert", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
