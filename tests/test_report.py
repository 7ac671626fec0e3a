"""The runtime's report: the table, the JSON, the log lines and /metrics give one run's rebalance
figures from the same records, and agree."""

from __future__ import annotations

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from eplb_plugin.args import EPLBArgs
from eplb_plugin.manager import EPLBManager
from eplb_plugin.manager.planning import default_planner
from eplb_plugin.runtime.config import ModelShape, RunSpec, RuntimeConfig, WorkloadSpec
from eplb_plugin.runtime.launch import launch
from eplb_plugin.runtime.report import text_report
from eplb_plugin.runtime.results import rebalance_line, rebalance_totals

MODEL = ModelShape(num_layers=2, num_logical_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
FAILING_PLAN = 1  # the planner raises for this rebalance
HELD_PLAN = 3  # the planner holds this rebalance's plan until the run closes the manager


class ScriptedPlanManager(EPLBManager):
    """EPLBManager whose (rank 0) planner fails rebalance FAILING_PLAN and holds rebalance
    HELD_PLAN until ``close()``: a run ends with rebalances done, failed and unfinished."""

    def __init__(self, *args, **kwargs):
        self._release = threading.Event()
        super().__init__(*args, planner=self._plan, **kwargs)

    def _plan(self, counts, **kwargs):
        index = len(self.history) - 1
        if index == FAILING_PLAN:
            raise ValueError("scripted planner failure")
        if index == HELD_PLAN:
            self._release.wait()
        return default_planner(counts, **kwargs)

    def close(self) -> None:
        self._release.set()
        super().close()


def _samples(text: str) -> dict[str, float]:
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


def test_table_json_log_lines_and_metrics_agree_on_one_run(capfd):
    """Two gloo ranks, a rebalance every 5 passes: two done, one failed, one still planning at
    the last pass. The table, the JSON totals, the printed lines and /metrics' text at the end
    all come from the same four records; the unfinished one is not counted as done, and the
    moves record the backend they ran on (gloo)."""
    args = EPLBArgs(ep_size=2, ep_num_redundant_experts=4, enable_eplb=True, eplb_rebalance_num_iterations=5,
                    enable_expert_distribution_metrics=True).resolve()
    run = RunSpec("eplb", args, WorkloadSpec(seed=3, drift_every_passes=7), num_passes=80,
                  manager_factory="test_report:ScriptedPlanManager")
    cfg = RuntimeConfig(model=MODEL, batch_tokens=32, progress=False, threads_per_rank=1)
    (result,) = launch(cfg, [run], args)
    printed = capfd.readouterr().out

    records = result["rebalances"]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["end_pass"] is not None for r in records] == [True, True, True, False]
    assert records[FAILING_PLAN]["error"] and "scripted planner failure" in records[FAILING_PLAN]["error"]
    done = [records[0], records[2]]
    assert all(r["transport"] == "gloo" and r["wall_s"] > 0 for r in done)

    totals = rebalance_totals(records)
    assert {k: result[k] for k in totals} == totals
    assert (result["num_rebalances"], result["num_rebalances_skipped"], result["num_rebalances_failed"],
            result["num_rebalances_unfinished"]) == (2, 0, 1, 1)
    assert result["stall_s_total"] == sum(r["stall_s"] for r in records)
    assert result["slots_moved"] == sum(r["slots_moved"] for r in records)

    rows = {line[:48].strip(): line[48:].strip() for line in text_report([result]).splitlines()}
    assert rows["rebalances done / skipped / failed / unfinished"] == "2 / 0 / 1 / 1"
    assert rows["slots moved"] == str(result["slots_moved"])
    stall_ms = 1e3 * result["stall_s_total"]
    assert rows["rebalance stall, total / max (ms)"] == f"{stall_ms:.1f} / {result['stall_ms_max']:.1f}"

    lines = [line for line in printed.splitlines() if line.startswith("[eplb] rebalance ")]
    assert lines == [rebalance_line("eplb", r) for r in records]
    assert [line.split(")")[1].split(":")[0].strip() for line in lines] == ["done", "failed", "done", "unfinished"]
    logged_ms = [float(line.split("stall ")[1].split(" ms")[0]) for line in lines]
    assert sum(logged_ms) == pytest.approx(stall_ms, abs=0.05 * len(lines))

    metrics = _samples(result["metrics_at_end"])
    ended = records[:3]
    assert metrics["eplb_rebalances_total"] == metrics["eplb_rebalance_seconds_count"] == 2
    assert metrics["eplb_rebalance_errors_total"] == 1 and metrics["eplb_rebalances_skipped_total"] == 0
    assert metrics["eplb_rebalance_seconds_sum"] == pytest.approx(sum(r["wall_s"] for r in done))
    assert metrics["eplb_stall_seconds_count"] == 3
    assert metrics["eplb_stall_seconds_sum"] == pytest.approx(sum(r["stall_s"] for r in ended))
    assert metrics["eplb_slots_moved_total"] == sum(r["slots_moved"] for r in ended)
    assert metrics["eplb_bytes_moved_total"] == sum(r["bytes_moved"] for r in ended)


def test_progress_in_a_redirected_log_is_a_few_plain_lines(capfd):
    """With stderr not a terminal (a log file), a 100-pass run prints one progress line per
    tenth of the run, and no carriage-return redraws of a bar."""
    args = EPLBArgs(ep_size=1).resolve()
    cfg = RuntimeConfig(model=MODEL, batch_tokens=8, progress=True, threads_per_rank=1)
    launch(cfg, [RunSpec("one", args, WorkloadSpec(seed=1), num_passes=100)], args)
    captured = capfd.readouterr()
    assert "\r" not in captured.err + captured.out
    lines = [line for line in captured.out.splitlines() if line.startswith("[one] pass ")]
    assert [line.split(":")[0] for line in lines] == [f"[one] pass {10 * i}/100" for i in range(1, 11)]
    assert all(", step_ms " in line and ", rebal 0" in line for line in lines)
