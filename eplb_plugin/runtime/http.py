"""HTTP control and observability for the reference runtime (stdlib server, rank 0 only).

Endpoints (localhost unless told otherwise):

- ``/start_expert_distribution_record``, ``/stop_expert_distribution_record``,
  ``/dump_expert_distribution_record`` (GET or POST; SGLang's meanings and plain-text
  replies). The request thread queues a command in ``ControlChannel`` and waits; the
  engine on rank 0 takes it at the next pass boundary and ships it to every rank with the
  per-pass collective, so every rank acts at the same pass (stat dumps all-reduce).
- ``/metrics``: Prometheus text. ``/health``: JSON with the run and pass; 503 with status
  "stalled" (naming the last pass that finished) when a run is serving but no pass has
  finished for ``stall_s`` seconds (a hung rank, a stuck collective).
- Anything else: 404; a method other than GET/POST (HEAD on /health, /metrics): 405.

A handler never raises into the server: bad input gets a 4xx, an unexpected error a 500.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

from eplb_plugin.errors import ConfigError, EPLBError

logger = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 120.0  # how long a request waits for the next pass boundary
DEFAULT_STALL_S = 30.0  # /health: no pass finished for this long while serving = stalled
SOCKET_TIMEOUT_S = 30.0  # an idle or slow connection is closed after this long
MAX_BODY_BYTES = 1 << 20
DRAIN_CAP_BYTES = 64 << 20
TEXT = "text/plain; charset=utf-8"


class Command(IntEnum):
    """Recorder commands shipped from rank 0 to every rank (0 = none)."""

    NONE = 0
    START_RECORD = 1
    STOP_RECORD = 2
    DUMP_RECORD = 3


COMMAND_PATHS = {
    "/start_expert_distribution_record": Command.START_RECORD,
    "/stop_expert_distribution_record": Command.STOP_RECORD,
    "/dump_expert_distribution_record": Command.DUMP_RECORD,
}


NOT_SERVING = "no forward pass is running; try again while the server serves\n"
RUN_ENDED = "the run ended before the command completed; it may have run on some ranks\n"

@dataclass
class Reply:
    status: int
    body: str
    headers: dict[str, str] = field(default_factory=dict)


REPLIES = {
    Command.START_RECORD: "Start recording the expert distribution.\n",
    Command.STOP_RECORD: "Stop recording the expert distribution.\n",
    Command.DUMP_RECORD: "Dump expert distribution record.\n",
}


def execute_command(recorder: Any, command: Command) -> Reply:
    """Run a recorder command on this rank (every rank runs it at the same pass: a stat
    dump is collective) and return the reply rank 0 sends: SGLang's text, with the dump's
    path on the body's second line and percent-encoded in ``X-Dump-Path``; 400 for a
    refused command, 500 when the dump cannot be written."""
    try:
        if command == Command.START_RECORD:
            recorder.start_record()
        elif command == Command.STOP_RECORD:
            recorder.stop_record()
        elif command == Command.DUMP_RECORD:
            path = recorder.dump_record("file")
            if path is None:  # a rank that does not write (stat modes: ranks other than 0)
                return Reply(200, REPLIES[command])
            # A header holds Latin-1 only: there the path is percent-encoded; the body has it as is.
            return Reply(200, f"{REPLIES[command]}{path}\n", {"X-Dump-Path": quote(str(path))})
        return Reply(200, REPLIES[command])
    except EPLBError as exc:  # e.g. the recorder is off, a bad dump name
        return Reply(400, f"{exc}\n")
    except OSError as exc:  # the dump directory is not writable
        return Reply(500, f"dump failed: {exc}\n")


@dataclass
class PendingCommand:
    """A command waiting for a pass boundary. ``state``: queued -> taken (the serving loop
    runs it) or queued -> cancelled (its request timed out and was answered 503; it never
    runs). Changed under the channel's lock."""

    command: Command
    done: threading.Event = field(default_factory=threading.Event)
    reply: Reply | None = None
    state: str = "queued"

    def complete(self, reply: Reply) -> None:
        self.reply = reply
        self.done.set()


class ControlChannel:
    """Hands HTTP commands to the serving loop and their replies back (thread-safe)."""

    def __init__(self, stall_s: float = DEFAULT_STALL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._queue: queue.Queue[PendingCommand] = queue.Queue()
        self._taken: list[PendingCommand] = []  # taken and not yet answered (at most a few)
        self._lock = threading.Lock()
        self._serving = False
        self.status: dict[str, object] = {"status": "starting"}
        self.render_metrics: Callable[[], bytes] = lambda: b""
        self.stall_s, self.clock = stall_s, clock
        self._last_pass_at = clock()

    def pass_done(self, pass_id: int) -> None:
        """The serving loop finished pass ``pass_id - 1`` (``pass_id`` passes in all)."""
        with self._lock:
            self.status["pass_id"] = pass_id
            self._last_pass_at = self.clock()

    def health(self) -> Reply:
        """200 with the status JSON, or 503 "stalled" when serving and no pass finished for
        ``stall_s`` seconds."""
        with self._lock:
            status = dict(self.status)
            since = self.clock() - self._last_pass_at
            serving = self._serving
        if serving and since > self.stall_s:
            status.update(status="stalled", last_pass=status.get("pass_id", 0),
                          seconds_since_last_pass=round(since, 1))
            return Reply(503, json.dumps(status) + "\n")
        return Reply(200, json.dumps(status) + "\n")

    def set_serving(self, serving: bool, **status: object) -> None:
        """Open (a run is passing) or close the channel; closing answers every command still
        waiting: those queued (never run: 503) and those taken but not answered (the run
        ended while running them, e.g. a lost peer: 500), so no request waits forever."""
        with self._lock:
            self._serving = serving
            self.status = {"status": "serving" if serving else "idle", **status}
            self._last_pass_at = self.clock()
        if not serving:
            self.fail_pending(Reply(503, NOT_SERVING))
            with self._lock:
                taken, self._taken = self._taken, []
            for pending in taken:
                if not pending.done.is_set():
                    pending.complete(Reply(500, RUN_ENDED))

    def submit(self, command: Command, timeout_s: float = COMMAND_TIMEOUT_S) -> Reply:
        """Queue ``command`` for the next pass boundary and wait for its reply (HTTP thread)."""
        with self._lock:
            if not self._serving:
                return Reply(503, NOT_SERVING)
            pending = PendingCommand(command)
            self._queue.put(pending)
        if not pending.done.wait(timeout_s):
            with self._lock:
                if pending.state == "queued":  # never runs now: the client is told it did not
                    pending.state = "cancelled"
                    return Reply(503, f"the serving loop did not reach a pass boundary within {timeout_s:.0f} s; "
                                      "the command was not run\n")
            pending.done.wait()  # taken: answered at this pass boundary, or when the run ends
        assert pending.reply is not None
        return pending.reply

    def take(self) -> PendingCommand | None:
        """The oldest waiting command (now taken: it will run), or None (serving loop, rank 0)."""
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                return None
            with self._lock:
                if pending.state == "queued":
                    pending.state = "taken"
                    self._taken = [p for p in self._taken if not p.done.is_set()] + [pending]
                    return pending

    def fail_pending(self, reply: Reply) -> None:
        """Answer every queued command with ``reply`` (they never run)."""
        while (pending := self.take()) is not None:
            pending.complete(reply)


class _Handler(BaseHTTPRequestHandler):
    channel: ControlChannel  # set on the subclass built by ControlServer
    server_version = "eplb-plugin"
    timeout = SOCKET_TIMEOUT_S  # socket timeout: an idle connection does not hold a thread forever

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        logger.debug("http %s - " + format, self.address_string(), *args)

    def _send(self, reply: Reply, *, content_type: str = TEXT, head: bool = False) -> None:
        body = reply.body.encode() if isinstance(reply.body, str) else reply.body
        self.send_response(reply.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, method: str) -> None:
        """Build the reply, then send it: one response per request, whatever failed."""
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        content_type, head = TEXT, False
        try:
            reply = self._read_body()
            if reply is None:
                reply, content_type, head = self._reply_to(method, path)
        except (ValueError, UnicodeDecodeError) as exc:  # a malformed header or body
            reply = Reply(400, f"bad request: {exc}\n")
        except Exception as exc:  # request boundary: log, answer 500, keep serving
            logger.exception("http %s %s failed", method, path)
            reply = Reply(500, f"internal error: {type(exc).__name__}: {exc}\n")
        self._send(reply, content_type=content_type, head=head)

    def _reply_to(self, method: str, path: str) -> tuple[Reply, str, bool]:
        """The reply to ``method`` on ``path``, its content type, and whether it goes without
        its body (HEAD on /health, /metrics)."""
        allowed = {"GET", "POST"} if path in COMMAND_PATHS else {"GET", "HEAD"}
        if path not in COMMAND_PATHS and path not in ("/metrics", "/health"):
            return Reply(404, f"unknown path {path}; try /health, /metrics or {sorted(COMMAND_PATHS)}\n"), TEXT, False
        if method not in allowed:
            return Reply(405, f"{method} not allowed on {path}\n", {"Allow": ", ".join(sorted(allowed))}), TEXT, False
        if path in COMMAND_PATHS:
            return self.channel.submit(COMMAND_PATHS[path]), TEXT, False
        if path == "/metrics":
            metrics = Reply(200, self.channel.render_metrics().decode())
            return metrics, "text/plain; version=0.0.4; charset=utf-8", method == "HEAD"
        return self.channel.health(), "application/json", method == "HEAD"

    def _read_body(self) -> Reply | None:
        """Read and drop the request's body (the endpoints take none); a reply when it is
        refused: 413 over MAX_BODY_BYTES, 400 shorter than its Content-Length, 408 when it
        does not come within the socket timeout. A refused body closes the connection."""
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError(f"Content-Length {length} is negative")
        if length > MAX_BODY_BYTES:
            # Read what was sent (up to a cap) before answering, so the client sees the 413
            # rather than a reset connection; past the cap the connection closes.
            remaining = min(length, DRAIN_CAP_BYTES)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
            self.close_connection = True
            return Reply(413, f"request body over {MAX_BODY_BYTES} bytes\n")
        if length == 0:
            return None
        try:
            received = len(self.rfile.read(length))
        except TimeoutError:
            logger.debug("http %s - body of Content-Length %d timed out", self.address_string(), length)
            self.close_connection = True
            return Reply(408, f"request body of Content-Length {length} did not arrive within {self.timeout:g} s\n")
        if received < length:
            self.close_connection = True
            return Reply(400, f"bad request: body of {received} bytes, but Content-Length {length}\n")
        return None

    # Every method goes through _route, which answers 405 to the ones a path does not take.
    do_GET = functools.partialmethod(_route, "GET")
    do_POST = functools.partialmethod(_route, "POST")
    do_HEAD = functools.partialmethod(_route, "HEAD")
    do_PUT = functools.partialmethod(_route, "PUT")
    do_DELETE = functools.partialmethod(_route, "DELETE")
    do_PATCH = functools.partialmethod(_route, "PATCH")
    do_OPTIONS = functools.partialmethod(_route, "OPTIONS")


def listen_error(host: str, port: int, exc: OSError) -> ConfigError:
    """The ConfigError for a ``host:port`` the server cannot listen on, naming the flag at fault."""
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"--host {host!r}: not an address of this machine ({exc}); "
                           "give one of its names or addresses (127.0.0.1, 0.0.0.0)")
    return ConfigError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                       "give a free port, or --port 0 for any")


def check_listen_address(host: str, port: int) -> None:
    """Raise ConfigError (``listen_error``) where the HTTP server could not listen, by
    binding as it would and letting go: the launcher's check before any rank starts."""
    try:
        ThreadingHTTPServer((host, port), BaseHTTPRequestHandler).server_close()
    except OSError as exc:
        raise listen_error(host, port, exc) from exc


class ControlServer:
    """A ThreadingHTTPServer in a daemon thread, bound to ``host:port`` (port 0 = any free).
    ConfigError (``listen_error``) where it cannot listen there."""

    def __init__(self, channel: ControlChannel, *, host: str = "127.0.0.1", port: int = 0,
                 socket_timeout_s: float = SOCKET_TIMEOUT_S):
        handler = type("EPLBHandler", (_Handler,), {"channel": channel, "timeout": socket_timeout_s})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise listen_error(host, port, exc) from exc
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="eplb-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ControlServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5.0)
