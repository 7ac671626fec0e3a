"""HTTP endpoints: SGLang's recorder commands act on every rank; bad requests get 4xx, never a crash."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from eplb_plugin.args import EPLBArgs
from eplb_plugin.runtime.config import ModelShape, RunSpec, RuntimeConfig, WorkloadSpec
from eplb_plugin.runtime.http import Command, ControlChannel, ControlServer, Reply
from eplb_plugin.runtime.launch import launch
from eplb_plugin.runtime.workload import read_sglang_per_token_dump, shard_tokens


def request(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, str, dict]:
    req = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


@pytest.fixture
def served():
    """A ControlServer whose 'serving loop' answers each command with its name."""
    channel = ControlChannel()
    channel.render_metrics = lambda: b"eplb_balancedness 0.5\n"
    server = ControlServer(channel).start()
    channel.set_serving(True, run="t")
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            pending = channel.take()
            if pending is not None:
                pending.complete(Reply(200, f"did {pending.command.name}\n"))
            time.sleep(0.001)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield channel, server.url
    stop.set()
    thread.join()
    server.close()


def test_endpoints_answer_and_bad_requests_get_4xx(served):
    """Commands reach the loop by GET and POST; /health and /metrics answer; unknown paths 404,
    wrong methods 405, an oversized body 413; the server keeps serving after each."""
    channel, url = served
    for path, command in (("/start_expert_distribution_record", Command.START_RECORD),
                          ("/stop_expert_distribution_record", Command.STOP_RECORD),
                          ("/dump_expert_distribution_record", Command.DUMP_RECORD)):
        assert request(url + path)[:2] == (200, f"did {command.name}\n")
        status, body, _ = request(url + path, "POST", b"{}")
        assert (status, body) == (200, f"did {command.name}\n")
    status, body, headers = request(url + "/health")
    assert status == 200 and '"serving"' in body and headers["Content-Type"] == "application/json"
    status, body, headers = request(url + "/metrics")
    assert (status, body) == (200, "eplb_balancedness 0.5\n") and "version=0.0.4" in headers["Content-Type"]
    assert request(url + "/nope")[0] == 404
    assert request(url + "/metrics", "POST")[0] == 405
    status, _, headers = request(url + "/start_expert_distribution_record", "DELETE")
    assert status == 405 and headers["Allow"] == "GET, POST"
    assert request(url + "/health", "PUT")[0] == 405
    assert request(url + "/dump_expert_distribution_record", "POST", b"x" * (2 << 20))[0] == 413
    assert request(url + "/health")[0] == 200


def test_commands_get_503_when_no_pass_is_running(served):
    """After the run ends, a command is refused with 503 instead of waiting forever."""
    channel, url = served
    channel.set_serving(False)
    status, body, _ = request(url + "/start_expert_distribution_record")
    assert status == 503 and "no forward pass" in body
    assert request(url + "/health")[0] == 200


def test_record_and_dump_act_on_every_rank_and_read_back_as_a_trace(tmp_path):
    """Two gloo ranks, per_token recorder: start/stop/dump over HTTP reach both ranks at one pass;
    each rank's dump maps back (through its map) to exactly the workload's logical ids."""
    model = ModelShape(num_layers=2, num_logical_experts=16, top_k=4, hidden_size=8, intermediate_size=4)
    args = EPLBArgs(ep_size=2, ep_num_redundant_experts=2, expert_distribution_recorder_mode="per_token").resolve()
    workload = WorkloadSpec(seed=11)
    ready = tmp_path / "url"
    cfg = RuntimeConfig(model=model, batch_tokens=10, progress=False, http_port=0, ready_file=str(ready),
                        dump_dir=str(tmp_path / "dumps"), threads_per_rank=1)
    results: list = []
    thread = threading.Thread(target=lambda: results.extend(launch(cfg, [RunSpec("http", args, workload, 800)], args)))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text():
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        url = ready.read_text()
        # The server is up before the ranks have built their engines: wait until it serves.
        while '"serving"' not in request(url + "/health")[1]:
            assert time.monotonic() < deadline, "the server never reported serving"
            time.sleep(0.05)
        assert request(url + "/start_expert_distribution_record")[:2] == (200, "Start recording the expert distribution.\n")
        time.sleep(0.05)
        assert request(url + "/stop_expert_distribution_record", "POST")[0] == 200
        status, body, headers = request(url + "/dump_expert_distribution_record")
        assert (status, body) == (200, f"Dump expert distribution record.\n{headers['X-Dump-Path']}\n")
        assert Path(headers["X-Dump-Path"]).exists()
        status, metrics, _ = request(url + "/metrics")
        assert status == 200 and "eplb_balancedness" in metrics
        assert request(url + "/bogus")[0] == 404
    finally:
        thread.join(timeout=120)
    assert results and results[0]["slots_failed"] == 0
    dumps = sorted((tmp_path / "dumps").glob("expert_distribution_recorder_*_*.pt"))
    assert len(dumps) == 2  # one per rank, written at the same pass
    built = workload.build(model, cfg.batch_tokens)
    pass_ids = None
    for _rank, path in enumerate(dumps):
        raw = torch.load(path, weights_only=True)
        ids = [r["forward_pass_id"] for r in raw["records"]]
        assert ids and (pass_ids is None or ids == pass_ids)
        pass_ids = ids
        shard = shard_tokens(cfg.batch_tokens, rank=raw["records"][0]["rank"], world_size=2)
        want = torch.cat([built.batch(p).topk_ids[shard] for p in ids])
        assert torch.equal(read_sglang_per_token_dump(path), want)


def test_health_reports_a_stall_with_503_naming_the_last_pass():
    """Serving with no pass finished for stall_s: 503 "stalled" with the last pass; a pass
    finishing makes it 200 again; not serving is never a stall."""
    now = [0.0]
    channel = ControlChannel(stall_s=5.0, clock=lambda: now[0])
    channel.set_serving(True, run="r", passes=100, pass_id=0)
    channel.pass_done(7)
    now[0] = 4.0
    assert channel.health().status == 200
    now[0] = 12.5
    reply = channel.health()
    assert reply.status == 503
    assert json.loads(reply.body) == {"status": "stalled", "run": "r", "passes": 100, "pass_id": 7,
                                      "last_pass": 7, "seconds_since_last_pass": 12.5}
    channel.pass_done(8)
    assert channel.health().status == 200
    channel.set_serving(False, run="r", passes=100)
    now[0] = 100.0
    assert channel.health().status == 200


def test_a_command_answered_503_after_its_timeout_never_runs():
    """A request that timed out before a pass boundary is told the command was not run, and
    the serving loop then skips it."""
    channel = ControlChannel()
    channel.set_serving(True, run="r")
    reply = channel.submit(Command.STOP_RECORD, timeout_s=0.05)
    assert reply.status == 503 and "not run" in reply.body
    assert channel.take() is None


def test_an_idle_connection_is_closed_after_the_socket_timeout():
    """A client that connects and sends nothing does not hold a server thread forever."""
    import socket

    channel = ControlChannel()
    server = ControlServer(channel, socket_timeout_s=0.5).start()
    try:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            assert sock.recv(1) == b""  # the server closed it (before the 10 s client timeout)
    finally:
        server.close()


def test_a_dump_that_cannot_be_written_is_answered_500_and_the_recorder_keeps_serving(tmp_path, monkeypatch):
    """torch.save failing inside the dump (not an OSError of its own) is a 500 "dump failed"
    reply, not an exception that would stop the run; a later dump succeeds."""
    import eplb_plugin.recorder.dump as dump_io
    from eplb_plugin.recorder import ExpertDistributionRecorder
    from eplb_plugin.runtime.http import execute_command

    (tmp_path / "taken").mkdir()
    rec = ExpertDistributionRecorder("per_pass", physical_to_logical_map=torch.tensor([[0, 1]]),
                                     num_logical_experts=2, dump_dir=tmp_path)
    rec.start_record()
    monkeypatch.setattr(dump_io, "default_name", lambda rank: "taken")
    reply = execute_command(rec, Command.DUMP_RECORD)
    assert reply.status == 500 and reply.body.startswith("dump failed: ") and "taken" in reply.body
    monkeypatch.setattr(dump_io, "default_name", lambda rank: "ok.pt")
    assert execute_command(rec, Command.DUMP_RECORD).status == 200


def test_a_taken_command_whose_run_ends_before_answering_still_gets_a_reply():
    """The serving loop took the command, then the run ended (a lost peer, an error) before it
    answered: closing the channel answers it, so the request does not wait forever."""
    channel = ControlChannel()
    channel.set_serving(True, run="r")
    replies: list[Reply] = []
    client = threading.Thread(target=lambda: replies.append(channel.submit(Command.DUMP_RECORD)), daemon=True)
    client.start()
    deadline = time.monotonic() + 10
    while (taken := channel.take()) is None:
        assert time.monotonic() < deadline, "the command never reached the channel"
        time.sleep(0.01)
    channel.set_serving(False, run="r")
    client.join(timeout=10)
    assert not client.is_alive() and taken.reply is replies[0]
    assert replies[0].status == 500 and "run ended" in replies[0].body


def _raw_exchange(server: ControlServer, request_bytes: bytes) -> bytes:
    """Send ``request_bytes`` on one connection (its write side left open) and read all the server sends."""
    import socket

    with socket.create_connection((server.host, server.port), timeout=20) as sock:
        sock.sendall(request_bytes)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def test_a_dump_path_outside_latin_1_gets_one_well_formed_reply(tmp_path):
    """A dump directory with non-Latin-1 characters: one 200 response, X-Dump-Path
    percent-encoded (it decodes to the written file) and the path itself in the body."""
    from urllib.parse import unquote

    from eplb_plugin.recorder import ExpertDistributionRecorder
    from eplb_plugin.runtime.http import execute_command

    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=torch.tensor([[0, 1, 2, 3]]),
                                     num_logical_experts=4, dump_dir=tmp_path / "dümps_😀")
    channel = ControlChannel()
    server = ControlServer(channel, socket_timeout_s=5).start()
    channel.set_serving(True, run="r")

    def loop():
        deadline = time.monotonic() + 20
        while (pending := channel.take()) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if pending is not None:
            pending.complete(execute_command(rec, pending.command))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        out = _raw_exchange(server, b"GET /dump_expert_distribution_record HTTP/1.0\r\n\r\n")
    finally:
        thread.join()
        server.close()
    head, body = out.split(b"\r\n\r\n", 1)
    assert out.count(b"HTTP/1.") == 1 and head.startswith(b"HTTP/1.0 200 "), out
    header = next(line.split(b": ", 1)[1] for line in head.split(b"\r\n") if line.startswith(b"X-Dump-Path: "))
    path = Path(unquote(header.decode("ascii")))
    assert path.exists() and path.parent.name == "dümps_😀"
    assert body.decode() == f"Dump expert distribution record.\n{path}\n"


def test_a_body_shorter_than_its_content_length_gets_408_and_no_error_log(caplog):
    """Content-Length 100 and no body: once the socket timeout passes, a 408 naming the
    length, logged below ERROR (a slow client is not the server's fault)."""
    channel = ControlChannel()
    server = ControlServer(channel, socket_timeout_s=0.5).start()
    try:
        with caplog.at_level("DEBUG", logger="eplb_plugin.runtime.http"):
            out = _raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    finally:
        server.close()
    assert out.startswith(b"HTTP/1.0 408 ") and out.count(b"HTTP/1.") == 1, out
    assert b"Content-Length 100" in out
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
