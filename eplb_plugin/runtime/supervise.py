"""Lifecycle of the runtime's rank processes: stop requests, lost peers, the launcher's watch.

- Stop: SIGTERM to a rank (or SIGINT / SIGTERM to the launcher, which forwards SIGTERM to
  every rank) sets this process's stop flag; a rank whose launcher is gone sets it too
  (``stop_reason``). Ranks agree on stopping at a pass boundary (one element of the per-pass
  all-reduce), finish the run collectively (weights verified) and rank 0 writes the results
  of the passes that ran. Ranks ignore SIGINT: a terminal's Ctrl-C reaches the whole process
  group, and the launcher alone decides.
- Lost peer: when a pass's collective fails (a rank was killed, or stopped answering past
  the process-group timeout), each surviving rank marks itself in the launcher's store
  (``RANK_FAILED_KEY``), waits ``PEER_GRACE_S`` for the other survivors, names the ranks that
  never marked themselves, prints one line and exits with ``PEER_LOST_EXIT``.
- Launcher (``supervise``): hosts that store on the rendezvous host only (never all
  interfaces), watches the ranks, forwards stop signals, kills ranks still running once the
  others gave up on them (or past a grace), and returns one ``LaunchOutcome``.
"""

from __future__ import annotations

import json
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from eplb_plugin.errors import EPLBError

PEER_LOST_EXIT = 3  # a rank's exit status when it stopped because a peer stopped answering
ERROR_EXIT = 2  # a rank's exit status after a typed error (bad input): its one line is in the store
RUNTIME_ERROR_EXIT = 1  # a rank's exit status when the process group did not form (its one line too)
PEER_GRACE_S = 3.0  # how long a surviving rank waits for the others to mark themselves
STOP_GRACE_S = 15.0  # how long the launcher waits for ranks to finish after a stop
POLL_S = 0.1
RANK_FAILED_KEY = "eplb/failed/{rank}"  # a surviving rank's mark: JSON {pass, line, lost}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_stop_signal: int | None = None
_launcher_pid: int | None = None


class LaunchError(EPLBError, RuntimeError):
    """The ranks did not all finish: stopped by a signal, or a rank was lost.

    ``results``: the runs rank 0 reported (the passes that ran; may be empty);
    ``exit_code``: what the command should exit with (non-zero).
    """

    def __init__(self, message: str, *, results: list[dict[str, Any]], exit_code: int):
        super().__init__(message)
        self.results = results
        self.exit_code = exit_code


class RendezvousError(EPLBError, RuntimeError):
    """The process group did not form: peers did not join within the timeout, or the
    rendezvous address could not be reached (a runtime failure, not a bad flag)."""


class PeerLostError(EPLBError, RuntimeError):
    """This rank's collective failed because other ranks stopped answering."""

    def __init__(self, message: str, *, lost: list[int], pass_id: int):
        super().__init__(message)
        self.lost = lost
        self.pass_id = pass_id
        self.partial: dict[str, Any] | None = None  # rank 0: the results of the passes that ran


# ---------------------------------------------------------------------- ranks


def install_rank_handlers(launcher_pid: int | None) -> None:
    """In a rank process: SIGTERM requests a stop, SIGINT is ignored (the launcher decides),
    and a launcher that disappears (``launcher_pid`` no longer the parent) requests a stop."""
    global _launcher_pid
    _launcher_pid = launcher_pid
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_stop_signal)


def _on_stop_signal(signum: int, frame: Any) -> None:
    global _stop_signal
    _stop_signal = signum


def mark_error(store: Any, rank: int, line: str, *, result_path: str | None = None) -> bool:
    """A rank stopping on an error (its one line) leaves that line for its launcher: in the
    launcher's store (local spawn), else in ``error_path(result_path, rank)`` (each node's
    launcher has its own result path). Returns whether the launcher will see it."""
    if store is not None:
        try:
            store.set(RANK_FAILED_KEY.format(rank=rank), json.dumps({"line": line, "error": True}))
            return True
        except RuntimeError:
            return False  # the launcher is gone; the rank's own stderr line remains
    if result_path is not None:
        with open(error_path(result_path, rank), "w") as f:
            f.write(line)
        return True
    return False


def error_path(result_path: str, rank: int) -> str:
    """Where rank ``rank`` leaves its error line when its launcher hosts no store."""
    return f"{result_path}.rank{rank}.error"


def read_error_files(outcome: LaunchOutcome, result_path: str, ranks: Sequence[int]) -> None:
    """Note in ``outcome.errors`` (keyed by local index) the lines ranks ``ranks`` left in
    their error files, and remove the files."""
    for index, rank in enumerate(ranks):
        path = error_path(result_path, rank)
        if os.path.exists(path):
            with open(path) as f:
                outcome.errors[index] = f.read()
            os.unlink(path)


def stop_exit_code() -> int:
    """128 + the stop signal (the shell's convention), or 1."""
    return 128 + _stop_signal if _stop_signal is not None else 1


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Ask this process's serving loop to stop at the next pass boundary."""
    _on_stop_signal(signum, None)


def clear_stop() -> None:
    global _stop_signal
    _stop_signal = None


def stop_reason() -> str | None:
    """Why this rank should stop now (a signal, or its launcher is gone), or None."""
    if _stop_signal is not None:
        return signal.Signals(_stop_signal).name
    if _launcher_pid is not None and os.getppid() != _launcher_pid:
        return "the launcher is gone"
    return None


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """In a one-process run: SIGINT / SIGTERM stop the serving loop at a pass boundary
    instead of killing it mid-pass; the previous handlers come back afterwards."""
    previous = _install(_on_stop_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _install(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """Handle SIGINT / SIGTERM with ``handler``; returns the previous handlers. A signal
    ignored at start stays ignored (a script's background job ignores SIGINT); off the main
    thread (an embedding application's) nothing is installed: its owner handles signals."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}


def name_unanswering(store: Any, *, rank: int, world_size: int, pass_id: int, cause: BaseException,
                     grace_s: float = PEER_GRACE_S) -> PeerLostError:
    """After a failed collective: mark this rank alive in ``store``, wait up to grace_s for
    the other survivors, and return the error naming the ranks that never answered."""
    first = str(cause).strip().splitlines()[0][:160] if str(cause).strip() else type(cause).__name__
    lost: list[int] = []
    if store is not None:
        try:
            store.set(RANK_FAILED_KEY.format(rank=rank), json.dumps({"pass": pass_id}))
            deadline = time.monotonic() + grace_s
            while True:
                lost = [r for r in range(world_size) if not store.check([RANK_FAILED_KEY.format(rank=r)])]
                if not lost or time.monotonic() > deadline:
                    break
                time.sleep(POLL_S)
        except RuntimeError:  # the store itself is gone: the launcher went away
            lost = []
    who = (f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} stopped answering" if lost
           else "a peer stopped answering")
    message = f"rank {rank}: stopping at pass {pass_id}: {who} ({first})"
    if store is not None and lost:
        try:
            store.set(RANK_FAILED_KEY.format(rank=rank), json.dumps({"pass": pass_id, "line": message, "lost": lost}))
        except RuntimeError:
            pass  # the launcher is gone too; the line below still says what happened
    return PeerLostError(message, lost=lost, pass_id=pass_id)


# ---------------------------------------------------------------------- launcher


def host_store(host: str, port: int = 0, *, timeout_s: float) -> tuple[dist.TCPStore, int]:
    """A TCPStore served by this process, listening on ``host`` only (the rendezvous of the
    ranks, and where they mark themselves when a peer is lost), unlike a TCPStore given a
    port, which listens on every interface. Returns (store, port)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore(host, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                          master_listen_fd=sock.fileno())
    sock.detach()  # the store owns the listening socket now (and closes it)
    return store, port


@dataclass
class LaunchOutcome:
    """How the ranks ended: exit statuses by rank, the stop signal (if any), the lines the
    surviving ranks printed, and the ranks that were lost (died or stopped answering)."""

    exit_codes: dict[int, int | None] = field(default_factory=dict)
    stop_signal: int | None = None
    lost: dict[int, str] = field(default_factory=dict)  # rank -> what happened to it
    lines: list[str] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)  # rank -> the typed error it stopped on

    @property
    def ok(self) -> bool:
        return self.stop_signal is None and not self.lost and all(c == 0 for c in self.exit_codes.values())

    def summary(self) -> str:
        """One line for the launcher's stderr."""
        if self.errors:
            return next(iter(self.errors.values()))
        if self.lost:
            parts = [f"rank {r} {what}" for r, what in sorted(self.lost.items())]
            survivors = sorted(r for r, c in self.exit_codes.items() if r not in self.lost)
            return (f"{'; '.join(parts)}; ranks {survivors} stopped"
                    + (f" ({self.lines[0]})" if self.lines else ""))
        if self.stop_signal is not None:
            return f"stopped by {signal.Signals(self.stop_signal).name}; every rank finished its last pass and exited"
        bad = {r: c for r, c in self.exit_codes.items() if c != 0}
        return f"ranks exited with status {bad}"

    @property
    def exit_code(self) -> int:
        failed = [c for c in self.exit_codes.values() if c != 0]
        if self.errors and failed and all(c == ERROR_EXIT for c in failed):
            return ERROR_EXIT  # every failing rank stopped on a bad input (a config error)
        if self.lost or any(c not in (0, None) for c in self.exit_codes.values()):
            return 1
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        return 0


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering (killed by the launcher)"
    if code < 0:
        return f"died ({signal.Signals(-code).name})"
    return f"exited with status {code}"


def supervise(processes: Sequence[Any], store: Any, *, grace_s: float,
              stop_grace_s: float = STOP_GRACE_S, clock: Callable[[], float] = time.monotonic) -> LaunchOutcome:
    """Watch started rank processes until every one has exited (launcher side).

    SIGINT / SIGTERM to the launcher: SIGTERM to every rank (each stops at the next pass
    boundary), SIGKILL to those still running after stop_grace_s. A rank that exits with a
    status other than 0 / PEER_LOST_EXIT, or dies, is lost; the others then get grace_s to
    notice and exit, after which those still running are killed and named as having stopped
    answering. Ranks every survivor named are killed as soon as the survivors are out.
    """
    outcome = LaunchOutcome()
    signalled: list[int] = []
    previous = _install(lambda signum, frame: signalled.append(signum))
    failed_at: float | None = None
    stop_at: float | None = None
    killed: set[int] = set()  # ranks the launcher killed (past a grace, or named by the survivors)
    try:
        while True:
            alive = [p for p in processes if p.exitcode is None]
            for rank, p in enumerate(processes):
                if p.exitcode is not None:
                    outcome.exit_codes[rank] = p.exitcode
            if not alive:
                break
            if signalled and stop_at is None:
                outcome.stop_signal = signalled[0]
                stop_at = clock()
                for p in alive:
                    _signal(p, signal.SIGTERM)
            failing = [r for r, c in outcome.exit_codes.items() if c != 0]
            if failing and failed_at is None:
                failed_at = clock()
            if failed_at is not None:
                named = _named_by_survivors(store, len(processes), outcome)
                survivors_out = all(processes[r].exitcode is not None for r in range(len(processes)) if r not in named)
                if (named and survivors_out) or clock() - failed_at > grace_s:
                    for p in alive:
                        killed.add(processes.index(p))
                        _signal(p, signal.SIGKILL)
            if stop_at is not None and clock() - stop_at > stop_grace_s:
                for p in alive:
                    _signal(p, signal.SIGKILL)
            multiprocessing.connection.wait([p.sentinel for p in alive], timeout=POLL_S)
        for p in processes:
            p.join()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    _collect_lost(store, processes, outcome, killed)
    return outcome


def _signal(process: Any, signum: int) -> None:
    if process.exitcode is None and process.pid is not None:
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            pass  # exited between the check and the signal


def _named_by_survivors(store: Any, world_size: int, outcome: LaunchOutcome) -> set[int]:
    """Ranks that every rank which exited with PEER_LOST_EXIT could not reach."""
    named: set[int] = set()
    for rank, code in outcome.exit_codes.items():
        if code == PEER_LOST_EXIT:
            named |= set((_read_mark(store, rank) or {}).get("lost", []))
    return named


def _read_mark(store: Any, rank: int) -> dict[str, Any] | None:
    key = RANK_FAILED_KEY.format(rank=rank)
    try:
        return json.loads(store.get(key)) if store is not None and store.check([key]) else None
    except RuntimeError:
        return None


def _collect_lost(store: Any, processes: Sequence[Any], outcome: LaunchOutcome, killed: set[int]) -> None:
    for rank, p in enumerate(processes):
        outcome.exit_codes[rank] = p.exitcode
    if outcome.stop_signal is not None and all(c in (0, -signal.SIGKILL) for c in outcome.exit_codes.values()):
        # Stopped on request: ranks killed past the stop grace were slow, not lost.
        outcome.lost = {r: "did not stop within the grace and was killed"
                        for r, c in outcome.exit_codes.items() if c == -signal.SIGKILL}
        return
    marks = [m for r in range(len(processes)) if (m := _read_mark(store, r)) and m.get("line")]
    outcome.errors = {r: m["line"] for r in range(len(processes)) if (m := _read_mark(store, r)) and m.get("error")}
    marks = [m for m in marks if not m.get("error")]
    outcome.lines = [m["line"] for m in marks]
    named = {r for m in marks for r in m.get("lost", [])}
    for rank, code in outcome.exit_codes.items():
        if code == PEER_LOST_EXIT or (code == 0 and rank not in named):
            continue
        if rank in killed:
            outcome.lost[rank] = "stopped answering (killed by the launcher)"
        else:
            outcome.lost[rank] = _describe_exit(code)


def read_results(path: str) -> tuple[list[dict[str, Any]], str | None]:
    """Rank 0's result file: (the runs, the line it stopped with, if any); ([], None) when
    rank 0 wrote nothing (it was lost)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return [], None
    if not text:
        return [], None
    data = json.loads(text)
    return data["results"], data.get("failure")
