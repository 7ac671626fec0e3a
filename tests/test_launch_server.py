"""``python -m eplb_plugin.launch_server``: SGLang's flags, --compare, the report."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from eplb_plugin.args import EPLBArgs
from eplb_plugin.errors import ConfigError
from eplb_plugin.flagspec import config_kwargs, option_of
from eplb_plugin.launch_server import build_parser, build_runs, main
from eplb_plugin.runtime.config import ModelShape, RunSpec, RuntimeConfig, WorkloadSpec


def test_no_flags_give_the_dataclass_defaults():
    """Parsing nothing gives EPLBArgs() and the runtime's defaults (tiny preset, synthetic, CPU)."""
    ns = build_parser().parse_args([])
    assert EPLBArgs.from_namespace(ns) == EPLBArgs()
    assert (ns.model_preset, ns.workload, ns.device, ns.port) == ("tiny", "synthetic", "cpu", None)


def test_every_runtime_config_field_is_a_flag_and_parsing_nothing_builds_the_defaults():
    """Every field of RuntimeConfig (but the preset-built model), of WorkloadSpec, and RunSpec's
    pass count is an option of the launcher; parsing nothing builds the dataclasses' defaults
    (how a field becomes an option: test_flagspec.py)."""
    parser = build_parser()
    fields = [f for f in dataclasses.fields(RuntimeConfig) if f.name != "model"]
    fields += list(dataclasses.fields(WorkloadSpec))
    fields += [f for f in dataclasses.fields(RunSpec) if f.name == "num_passes"]
    assert {option_of(f) for f in fields} <= parser._option_string_actions.keys()
    ns = parser.parse_args([])
    for cls in (RuntimeConfig, WorkloadSpec):
        kwargs = config_kwargs(cls, ns)
        assert kwargs == {f.name: f.default for f in dataclasses.fields(cls) if f.name != "model"}, cls
    cfg, runs, _ = build_runs(parser.parse_args([]))
    assert cfg == RuntimeConfig(model=ModelShape.from_preset("tiny"))
    assert runs[0].workload == WorkloadSpec()
    assert runs[0].num_passes == RunSpec("x", runs[0].eplb).num_passes


def test_renamed_negated_and_repeated_runtime_flags_reach_their_fields():
    """--port/--host, --disable-cuda-graph, repeated --trace, several --profile-passes and
    --dist-timeout-s set http_port/http_host, cuda_graph, traces, profile_passes, timeout_s;
    the dtype defaults to the device's."""
    ns = build_parser().parse_args(["--port", "0", "--host", "0.0.0.0", "--disable-cuda-graph", "--workload", "trace",
                                    "--trace", "a.npz", "--trace", "b.npz", "--profile-passes", "3", "5",
                                    "--dist-timeout-s", "7"])
    cfg, runs, _ = build_runs(ns)
    assert (cfg.http_port, cfg.http_host, cfg.cuda_graph, cfg.profile_passes, cfg.timeout_s) == (
        0, "0.0.0.0", False, (3, 5), 7.0)
    assert runs[0].workload.traces == ("a.npz", "b.npz")
    assert (cfg.dtype, RuntimeConfig(model=cfg.model, device="cuda").dtype) == ("float32", "bfloat16")


def test_compare_runs_the_same_workload_without_then_with_eplb():
    """--compare gives two runs over one workload: EPLB off, then on (with the stat recorder)."""
    ns = build_parser().parse_args(["--compare", "--ep-size", "4", "--ep-num-redundant-experts", "4",
                                    "--eplb-rebalance-num-iterations", "50", "--hidden-size", "128"])
    cfg, runs, layout = build_runs(ns)
    assert [r.label for r in runs] == ["no_eplb", "eplb"]
    assert runs[0].workload == runs[1].workload
    assert not runs[0].eplb.enable_eplb and runs[1].eplb.enable_eplb
    assert runs[1].eplb.expert_distribution_recorder_mode == "stat"
    assert layout.ep_size == 4 and cfg.model.hidden_size == 128 and cfg.model.num_logical_experts == 16


def test_runtime_flags_reach_the_config():
    """--moe-exchange and --disable-cuda-graph set the runtime's exchange and graph mode;
    an exchange outside the two is refused."""
    cfg, _, _ = build_runs(build_parser().parse_args([]))
    assert (cfg.exchange, cfg.cuda_graph) == (None, True)
    cfg, _, _ = build_runs(build_parser().parse_args(["--moe-exchange", "gather", "--disable-cuda-graph"]))
    assert (cfg.exchange, cfg.cuda_graph) == ("gather", False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--moe-exchange", "ring"])
    with pytest.raises(ConfigError, match="--moe-exchange"):
        RuntimeConfig(model=cfg.model, exchange="ring")


def test_contradictory_flags_stop_with_a_message(capsys):
    """--enable-eplb with one rank is a usage error: one line naming both flags, exit 2."""
    assert main(["--enable-eplb", "--ep-size", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--enable-eplb needs --ep-size > 1" in err, err


def test_compare_run_prints_the_table_and_writes_text_json_png(tmp_path, capsys):
    """A short two-rank --compare run exits 0, prints both columns and writes the three reports."""
    code = main(["--compare", "--ep-size", "2", "--ep-num-redundant-experts", "2",
                 "--eplb-rebalance-num-iterations", "10", "--num-passes", "30", "--batch-tokens", "32",
                 "--num-layers", "2", "--no-progress", "--report-dir", str(tmp_path), "--threads-per-rank", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+no_eplb\s+eplb\s*$", out, re.M), out  # both columns of the table
    assert re.search(r"^weights verified \(slots\)\s+36/36\s+36/36\s*$", out, re.M), out
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["no_eplb", "eplb"]
    assert report["runs"][1]["num_rebalances"] >= 1
    assert all(r["slots_failed"] == 0 and r["slots_checked"] == 2 * 9 * 2 for r in report["runs"])
    assert (tmp_path / "report.txt").read_text().startswith(" ")
    assert (tmp_path / "report.png").stat().st_size > 10_000


_SMALL_RUN = ["--ep-num-redundant-experts", "4", "--enable-eplb", "--eplb-rebalance-num-iterations", "10",
              "--num-passes", "30", "--no-progress"]


def _report(report_dir) -> dict:
    run = json.loads((report_dir / "report.json").read_text())["runs"][0]
    assert run["num_rebalances"] >= 1 and run["slots_moved"] > 0
    assert run["slots_failed"] == 0 and run["slots_checked"] > 0
    return run


@pytest.mark.slow
def test_two_nodes_on_localhost_serve_one_ep_group_and_rebalance(tmp_path):
    """--nnodes 2 --node-rank 0/1 --dist-init-addr: two launchers (two ranks each) form one EP
    group of 4, rebalance, and every slot verifies."""
    import subprocess
    import sys

    from conftest import free_port

    addr = f"127.0.0.1:{free_port()}"
    common = [sys.executable, "-m", "eplb_plugin.launch_server", "--ep-size", "4", "--nnodes", "2",
              "--dist-init-addr", addr, *_SMALL_RUN]
    node1 = subprocess.Popen([*common, "--node-rank", "1", "--report-dir", str(tmp_path / "n1")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node0 = subprocess.run([*common, "--node-rank", "0", "--report-dir", str(tmp_path / "n0")],
                           capture_output=True, text=True, timeout=240)
    out1, _ = node1.communicate(timeout=60)
    assert node0.returncode == 0 and node1.returncode == 0, node0.stdout + node0.stderr + out1
    run = _report(tmp_path / "n0")
    assert run["ep_size"] == 4


@pytest.mark.slow
def test_torchrun_starts_the_ranks(tmp_path):
    """Under torchrun (RANK/WORLD_SIZE/MASTER_* in the environment) the ranks are not spawned again."""
    import subprocess
    import sys

    from conftest import free_port

    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "eplb_plugin.launch_server",
         "--ep-size", "2", *_SMALL_RUN, "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert _report(tmp_path)["ep_size"] == 2
    # One launch of 2 ranks: rank 0 prints the summary once (each torchrun worker spawning
    # its own ranks would print it twice).
    assert done.stdout.count("weights verified (slots)") == 1, done.stdout


def test_a_bad_init_expert_location_stops_the_launcher_with_one_line(tmp_path, capsys):
    """The launcher loads --init-expert-location before starting ranks: a bad file is one
    line naming the file, the key and the problem, exit 2, no multiprocessing traceback."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"physical_to_logical_map": [[0] * 18] * 2}))
    code = main(["--ep-size", "2", "--ep-num-redundant-experts", "2", "--num-layers", "2",
                 "--init-expert-location", str(bad), "--no-progress", "--report-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--init-expert-location {bad}, key 'physical_to_logical_map': logical expert 1 has no replica" in err


def test_an_unknown_placement_policy_stops_the_parser_naming_the_flag_and_the_policies(capsys):
    """--eplb-algorithm is checked against the policy registry before any rank starts."""
    from eplb_plugin.algorithms import POLICIES

    assert main(["--enable-eplb", "--ep-size", "2", "--eplb-algorithm", "bogus"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"--eplb-algorithm 'bogus' is not a known policy; known: auto, {', '.join(POLICIES)}" in err


def test_slots_that_do_not_split_over_the_ranks_stop_the_launcher_before_any_rank_starts(tmp_path, capsys,
                                                                                        monkeypatch):
    """The tiny preset's 16 experts + 3 redundant = 19 slots over 2 ranks: one line naming
    both flags and the nearest redundant count that splits, exit 2, no rank spawned."""
    import torch.multiprocessing as mp

    monkeypatch.setattr(mp, "get_context", lambda *a: pytest.fail("a rank was spawned"))
    code = main(["--ep-size", "2", "--ep-num-redundant-experts", "3", "--no-progress",
                 "--report-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("--ep-num-redundant-experts 3: 16 experts + 3 redundant = 19 slots, not divisible by --ep-size 2 "
            "(use --ep-num-redundant-experts 4)") in err


def test_a_port_in_use_or_a_bad_host_stops_the_launcher_with_one_line_before_any_rank_starts(tmp_path, capsys,
                                                                                             monkeypatch):
    """--port taken by another listener, or a --host that does not resolve: one line naming
    the flag, exit 2, no rank spawned."""
    import socket

    import torch.multiprocessing as mp

    monkeypatch.setattr(mp, "get_context", lambda *a: pytest.fail("a rank was spawned"))
    common = ["--ep-size", "2", "--ep-num-redundant-experts", "2", "--no-progress", "--report-dir", str(tmp_path / "r")]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main([*common, "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in err
    code = main([*common, "--port", "0", "--host", "no-such-host.invalid"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--host 'no-such-host.invalid'" in err


_TINY = ["--ep-size", "2", "--hidden-size", "64", "--moe-intermediate-size", "64", "--batch-tokens", "32",
         "--num-passes", "20", "--no-progress"]


def _refusal(argv, tmp_path, capsys, monkeypatch) -> str:
    """Run the launcher in-process on ``argv``; assert it stopped before spawning a rank with
    exit 2 and exactly one line on stderr (no usage, no traceback); return that line."""
    import torch.multiprocessing as mp

    monkeypatch.setattr(mp, "get_context", lambda *a: pytest.fail("a rank was spawned"))
    try:
        code = main([*_TINY, "--report-dir", str(tmp_path / "r"), *argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, (code, err)
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("workload", ["synthetic", "uniform"])
def test_a_trace_given_with_a_workload_that_does_not_replay_it_is_refused(tmp_path, capsys, monkeypatch, workload):
    """--trace with --workload synthetic (the default) or uniform would be ignored: the
    launcher refuses the combination, naming both flags."""
    line = _refusal(["--trace", str(tmp_path / "t.npz"), "--workload", workload], tmp_path, capsys, monkeypatch)
    assert f"--trace is given but --workload is {workload}" in line, line
    line = _refusal(["--trace", str(tmp_path / "t.npz")], tmp_path, capsys, monkeypatch)
    assert "--trace is given but --workload is synthetic" in line, line


@pytest.mark.parametrize(("flag", "value"), [("--num-layers", "0"), ("--hidden-size", "0"),
                                             ("--moe-intermediate-size", "0"), ("--moe-intermediate-size", "-5"),
                                             ("--num-layers", "-1")])
def test_a_model_size_below_one_is_refused_naming_the_flag_not_replaced_by_the_preset(
        tmp_path, capsys, monkeypatch, flag, value):
    """A size override of 0 or less is refused with the flag's own name (0 used to fall back
    to the preset's size; the intermediate size was named --intermediate-size)."""
    line = _refusal([flag, value], tmp_path, capsys, monkeypatch)
    assert f"{flag} must be >= 1 (got {value})" in line, line


@pytest.mark.parametrize("argv", [["--port", "70000"], ["--port", "-1"],
                                  ["--nnodes", "2", "--dist-init-addr", "127.0.0.1:99999"],
                                  ["--nnodes", "2", "--dist-init-addr", "127.0.0.1:0"],
                                  ["--nnodes", "2", "--dist-init-addr", "127.0.0.1"]])
def test_an_out_of_range_port_is_refused_naming_the_flag(tmp_path, capsys, monkeypatch, argv):
    """--port outside [0, 65535] and a --dist-init-addr port outside [1, 65535] (or none)
    stop the launcher with one line naming the flag, not a bind() traceback."""
    line = _refusal(argv, tmp_path, capsys, monkeypatch)
    flag = argv[-2]
    assert f"{flag} {argv[-1]!r}" in line or f"{flag} {argv[-1]}" in line, line


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_threads_per_rank_below_one_is_refused_naming_the_flag(tmp_path, capsys, monkeypatch, threads):
    """--threads-per-rank 0 or less: one line naming the flag, exit 2 (was a traceback on
    every rank for -1, and silently the default for 0)."""
    line = _refusal(["--threads-per-rank", threads], tmp_path, capsys, monkeypatch)
    assert f"--threads-per-rank must be >= 1 (got {threads})" in line, line


def test_flags_the_ranks_would_refuse_are_refused_by_the_launcher_before_they_start(tmp_path, capsys, monkeypatch):
    """--eplb-transport ipc on CPU, --ep-dispatch-backend triton on CPU without
    TRITON_INTERPRET=1, --workload trace without --trace, and a trace with fewer layers
    than the model: one line from the launcher naming the flag, exit 2, no rank spawned."""
    import numpy as np

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    line = _refusal(["--enable-eplb", "--ep-num-redundant-experts", "2", "--eplb-transport", "ipc"],
                    tmp_path, capsys, monkeypatch)
    assert "--eplb-transport ipc" in line and "--device cpu" in line, line
    line = _refusal(["--ep-dispatch-backend", "triton"], tmp_path, capsys, monkeypatch)
    assert "--ep-dispatch-backend triton" in line and "--device cpu" in line, line
    line = _refusal(["--workload", "trace"], tmp_path, capsys, monkeypatch)
    assert "--workload trace needs at least one --trace PATH" in line, line
    trace = tmp_path / "one_layer.npz"
    np.savez(trace, topk_ids=np.zeros((64, 1, 4), dtype=np.int64))
    line = _refusal(["--workload", "trace", "--trace", str(trace)], tmp_path, capsys, monkeypatch)
    assert f"--trace {trace}: the trace has 1 layers, the model 4" in line, line
