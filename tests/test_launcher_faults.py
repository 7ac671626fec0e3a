"""The launcher as an orchestrator sees it: signals, a killed rank, a stopped rank.

Each test starts ``python -m eplb_plugin.launch_server`` (2 gloo ranks, a long run) in its
own session with TMPDIR set to a test folder, waits until it serves (``/health``), injects
the fault and checks: the exit status, one line on stderr naming what happened, the report
of the passes that ran (weights verified), no rank left running, no temporary file left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO_ROOT

STARTUP_S = 120.0  # generous: the CI machine is shared
DIST_TIMEOUT_S = 5.0  # --dist-timeout-s: a stopped rank is detected in seconds
STALL_S = 1.0  # --health-stall-s


class Launcher:
    def __init__(self, tmp_path: Path, *, ignore_sigint: bool = False, extra: tuple[str, ...] = ()):
        self.tmp = tmp_path
        self.ready = tmp_path / "ready"
        self.report = tmp_path / "report"
        env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
        cmd = [sys.executable, "-m", "eplb_plugin.launch_server", "--enable-eplb", "--ep-size", "2",
               "--ep-num-redundant-experts", "2", "--eplb-rebalance-num-iterations", "10",
               "--num-passes", "1000000", "--batch-tokens", "32", "--num-layers", "2", "--no-progress",
               "--threads-per-rank", "1", "--port", "0", "--ready-file", str(self.ready),
               "--report-dir", str(self.report), "--dist-timeout-s", str(DIST_TIMEOUT_S),
               "--health-stall-s", str(STALL_S), "--eplb-rebalance-timeout-s", str(DIST_TIMEOUT_S), *extra]

        def preexec() -> None:
            if ignore_sigint:  # as a shell script's background job starts
                signal.signal(signal.SIGINT, signal.SIG_IGN)

        self.proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True, preexec_fn=preexec)
        self.url = self._wait_serving()
        self.rank_pids = [int((tmp_path / f"ready.rank{r}.pid").read_text()) for r in range(2)]

    def _wait_serving(self) -> str:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the launcher exited early: {self.proc.communicate()}")
            if self.ready.exists() and self.ready.read_text():
                url = self.ready.read_text()
                status, health = self.health(url)
                if status == 200 and health.get("pass_id", 0) >= 15:  # serving, past a rebalance
                    return url
            time.sleep(0.2)
        self.kill()
        pytest.fail("the launcher did not start serving")

    def health(self, url: str | None = None) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen((url or self.url) + "/health", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            return 0, {}

    def finish(self, timeout_s: float = 60.0) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("the launcher did not exit after the fault")
        return self.proc.returncode, out, err

    def kill(self) -> None:
        for pid in [self.proc.pid, *getattr(self, "rank_pids", [])]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.communicate()

    def assert_clean(self) -> None:
        """No rank alive, no temporary result file left."""
        for pid in self.rank_pids:
            assert not _alive(pid), f"rank process {pid} is still running"
        assert list(self.tmp.glob("eplb_runtime_*")) == []

    def report_json(self) -> dict:
        return json.loads((self.report / "report.json").read_text())


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _last_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("[W")]
    return lines[-1] if lines else ""


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and /proc: Linux")


@pytest.mark.parametrize("how", ["sigterm", "sigint_foreground"])
def test_a_stop_signal_stops_every_rank_writes_the_report_and_leaves_nothing(tmp_path, how):
    """SIGTERM to the launcher, or Ctrl-C in a terminal (SIGINT to the whole process group):
    every rank finishes its pass and exits, the report holds the passes that ran (weights
    verified), the launcher exits 128 + the signal with one line, no rank and no temporary
    file is left."""
    launcher = Launcher(tmp_path)
    if how == "sigterm":
        os.kill(launcher.proc.pid, signal.SIGTERM)
    else:
        os.killpg(launcher.proc.pid, signal.SIGINT)
    code, out, err = launcher.finish()
    signum = signal.SIGTERM if how == "sigterm" else signal.SIGINT
    assert code == 128 + signum, err
    assert _last_line(err) == (f"python -m eplb_plugin.launch_server: stopped by {signum.name}; "
                               "every rank finished its last pass and exited")
    assert "Traceback" not in err
    run = launcher.report_json()["runs"][0]
    assert run["stopped"] == f"stopped after pass {run['num_passes'] - 1} (SIGTERM)"  # forwarded to every rank
    assert run["num_passes"] >= 15 and len(run["balancedness_per_pass"]) == run["num_passes"]
    assert run["slots_failed"] == 0 and run["slots_checked"] == 2 * 18
    launcher.assert_clean()


def test_a_script_launcher_ignoring_sigint_stops_on_sigterm(tmp_path):
    """Started from a script (SIGINT ignored): SIGINT changes nothing, SIGTERM stops it all."""
    launcher = Launcher(tmp_path, ignore_sigint=True)
    os.kill(launcher.proc.pid, signal.SIGINT)
    time.sleep(1.0)
    assert launcher.proc.poll() is None and launcher.health()[0] == 200  # still serving
    os.kill(launcher.proc.pid, signal.SIGTERM)
    code, _, err = launcher.finish()
    assert code == 128 + signal.SIGTERM, err
    assert launcher.report_json()["runs"][0]["slots_failed"] == 0
    launcher.assert_clean()


def test_a_rank_whose_launcher_is_killed_exits_on_its_own(tmp_path):
    """SIGKILL to the launcher (no handler runs): the ranks notice their parent is gone and
    exit after finishing their pass."""
    launcher = Launcher(tmp_path)
    os.kill(launcher.proc.pid, signal.SIGKILL)
    launcher.proc.communicate()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in launcher.rank_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in launcher.rank_pids)


def test_a_killed_rank_stops_the_others_with_one_line_naming_it(tmp_path):
    """SIGKILL to rank 1: rank 0 stops at once (its collective fails), writes the results of
    the passes that ran; the launcher exits non-zero with one line naming rank 1."""
    launcher = Launcher(tmp_path)
    os.kill(launcher.rank_pids[1], signal.SIGKILL)
    code, _, err = launcher.finish()
    assert code == 1
    line = _last_line(err)
    assert line.startswith("python -m eplb_plugin.launch_server: rank 1 died (SIGKILL); ranks [0] stopped"), err
    assert "leaked" not in err
    assert "rank 0: stopping at pass" in line and "rank 1 stopped answering" in line
    run = launcher.report_json()["runs"][0]
    assert "rank 1 stopped answering" in run["stopped"] and run["slots_failed"] == 0
    launcher.assert_clean()


def test_a_stopped_rank_makes_health_report_a_stall_then_everyone_exits_naming_it(tmp_path):
    """SIGSTOP to rank 1: /health answers 503 "stalled" naming the last pass; after the
    process-group timeout rank 0 names rank 1, the launcher kills it and exits non-zero with
    one line naming it; the report holds the passes that ran."""
    launcher = Launcher(tmp_path)
    start = time.monotonic()
    os.kill(launcher.rank_pids[1], signal.SIGSTOP)
    status, health = 0, {}
    while time.monotonic() - start < DIST_TIMEOUT_S and status != 503:
        time.sleep(0.3)
        status, health = launcher.health()
    assert status == 503 and health["status"] == "stalled", health
    assert health["last_pass"] == health["pass_id"] and health["seconds_since_last_pass"] >= STALL_S
    code, _, err = launcher.finish()
    assert code == 1
    line = _last_line(err)
    assert line.startswith("python -m eplb_plugin.launch_server: rank 1 stopped answering (killed by the launcher)"), err
    assert time.monotonic() - start < 60  # seconds after the 5 s timeout, not the default 300 s
    run = launcher.report_json()["runs"][0]
    assert "rank 1 stopped answering" in run["stopped"] and run["slots_failed"] == 0
    launcher.assert_clean()


def test_the_launchers_store_listens_on_loopback_only():
    """The rendezvous store the launcher hosts listens on 127.0.0.1 alone (a TCPStore given
    only a port listens on every interface)."""
    from eplb_plugin.runtime.supervise import host_store

    store, port = host_store("127.0.0.1", timeout_s=5.0)
    store.set("k", "v")
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                listening.append(local)
    assert listening == [f"0100007F:{port:04X}"]


_NODE_CMD = [sys.executable, "-m", "eplb_plugin.launch_server", "--ep-size", "2", "--nnodes", "2",
             "--hidden-size", "64", "--moe-intermediate-size", "64", "--batch-tokens", "32", "--num-passes", "20",
             "--no-progress", "--threads-per-rank", "1"]


def _start_node(tmp_path: Path, node_rank: int, addr: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([*_NODE_CMD, "--dist-init-addr", addr, "--node-rank", str(node_rank),
                             "--report-dir", str(tmp_path / f"n{node_rank}"), *extra],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout_s: float = 120.0) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("a node's launcher hung")
    return proc.returncode, err


def _lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line.strip() and not line.startswith("[W")]


def test_a_peer_node_that_never_starts_is_named_in_one_line_without_a_traceback(tmp_path):
    """--nnodes 2 with node 1 never started: after --dist-timeout-s node 0 exits 1 (a
    runtime failure) with one line saying how many ranks joined where, no traceback."""
    from conftest import free_port

    addr = f"127.0.0.1:{free_port()}"
    code, err = _finish(_start_node(tmp_path, 0, addr, "--dist-timeout-s", "3"))
    assert code == 1, err
    assert "Traceback" not in err, err
    assert _lines(err) == [f"python -m eplb_plugin.launch_server: rank 0: only 1 of 2 ranks joined at {addr} "
                           "within --dist-timeout-s 3.0 (no results from rank 0: no report)"], err


def test_nodes_started_with_different_flags_stop_at_start_up_naming_the_flags_and_the_node(tmp_path):
    """Two nodes whose --ep-num-redundant-experts (2 vs 4) and --seed (0 vs 1) differ: every
    rank compares the flags once the group forms and each node exits 2 with one line naming
    both flags and each node's value (was: SIGABRT in gloo, or wrong weights and rc 1)."""
    from conftest import free_port

    addr = f"127.0.0.1:{free_port()}"
    common = ("--enable-eplb", "--dist-timeout-s", "60")
    node1 = _start_node(tmp_path, 1, addr, *common, "--ep-num-redundant-experts", "4", "--seed", "1")
    node0 = _start_node(tmp_path, 0, addr, *common, "--ep-num-redundant-experts", "2")
    for node, (code, err) in enumerate([_finish(node0), _finish(node1)]):
        assert code == 2, (node, err)
        assert "Traceback" not in err, err
        lines = _lines(err)
        assert len(lines) == 1, err
        assert lines[0].startswith(f"python -m eplb_plugin.launch_server: rank {node}: the nodes' flags differ: "), err
        assert "--ep-num-redundant-experts (node 0: 2, node 1: 4)" in lines[0], err
        assert "--seed (node 0: 0, node 1: 1)" in lines[0], err
        assert "--node-rank" not in lines[0], err
