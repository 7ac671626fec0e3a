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
from eplb_plugin.flagspec import add_flags, config_kwargs
from eplb_plugin.runtime.config import ModelShape, RunSpec, RuntimeConfig, WorkloadSpec


def build_parser() -> argparse.ArgumentParser:
    """EPLBArgs' flags, then the runtime's: the model preset and its overrides, and every flag
    field of RuntimeConfig, WorkloadSpec and RunSpec (defaults and help from the fields)."""
    parser = argparse.ArgumentParser(
        prog="python -m eplb_plugin.launch_server",
        description="Serve a workload on the reference expert-parallel MoE runtime with EPLB.",
    )
    add_eplb_args(parser)
    g = parser.add_argument_group("runtime")
    g.add_argument("--model-preset", default="tiny", choices=PRESET_NAMES, help="MoE shape (eplb_plugin/configs).")
    g.add_argument("--num-layers", type=int, default=None, help="Override the preset's MoE layer count (>= 1).")
    g.add_argument("--hidden-size", type=int, default=None, help="Override the preset's hidden size.")
    g.add_argument("--moe-intermediate-size", type=int, default=None, help="Override the preset's expert FFN size.")
    add_flags(g, RuntimeConfig, WorkloadSpec, RunSpec)
    g.add_argument("--compare", action="store_true",
                   help="Serve the workload twice, without EPLB then with it, and report side by side.")
    g.add_argument("--report-dir", default="eplb_report", help="Where report.txt/.json/.png go.")
    return parser


def build_runs(ns: argparse.Namespace) -> tuple[RuntimeConfig, list[RunSpec], EPLBArgs]:
    """Parsed flags -> (shared config, the runs, the resolved flags of the process layout)."""
    raw = EPLBArgs.from_namespace(ns)
    model = ModelShape.from_preset(ns.model_preset, num_layers=ns.num_layers, hidden_size=ns.hidden_size,
                                   intermediate_size=ns.moe_intermediate_size)
    workload = WorkloadSpec(**config_kwargs(WorkloadSpec, ns))
    cfg = RuntimeConfig(model=model, **config_kwargs(RuntimeConfig, ns))
    num_passes = config_kwargs(RunSpec, ns)["num_passes"]
    if ns.compare:
        off = dataclasses.replace(raw, enable_eplb=False, eplb_non_blocking=False).resolve()
        on = dataclasses.replace(raw, enable_eplb=True).resolve()
        runs = [RunSpec("no_eplb", off, workload, num_passes), RunSpec("eplb", on, workload, num_passes)]
        return cfg, runs, on
    args = raw.resolve()
    return cfg, [RunSpec("eplb" if args.enable_eplb else "no_eplb", args, workload, num_passes)], args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        cfg, runs, layout = build_runs(ns)
    except EPLBError as exc:  # a bad flag or combination: one line, no usage block, before any rank
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
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
