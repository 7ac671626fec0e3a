"""The ranks' agreement on a move's steps, and the host waits it uses.

- ``Agreement``: one MIN all-reduce of an int32 flag per step ("every rank succeeded").
  Posting never blocks; ``result`` waits on the host with a timeout. On NCCL the all-reduce
  follows the round's P2P on the same communicator stream, so a flag of 1 on any rank means
  every rank's P2P of that round completed. Its device-to-host copy runs on a side stream, so
  the caller's stream (where commits run) never waits for later rounds.
- ``wait_event`` / ``wait_work``: host waits with a timeout. They poll CUDA events
  (``Work.wait(timeout)`` on NCCL sleeps in 1 ms steps, which cost ~3 ms per round before).

Used by ``transfer.move_experts``, ``layers.move_layers`` and ``nonblocking.AsyncExpertMover``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from eplb_plugin.comm import is_nccl
from eplb_plugin.errors import TransferError


class Stopped(Exception):
    """A host wait was abandoned because the mover stopped (another failure is reported)."""


FIRST_SLEEP_S = 1e-4  # a background wait's first sleep; it doubles up to its sleep_s


def wait_event(event, timeout_s: float, what: str, *, sleep_s: float = 0.0,
               stop: Callable[[], bool] | None = None) -> None:
    """Poll a CUDA event until it completes; TransferError after timeout_s.

    sleep_s = 0 spins (yielding the GIL each poll): lowest latency, for blocking moves.
    A background thread passes the longest sleep between polls: sleeps start at
    FIRST_SLEEP_S and double up to it, so a short wait ends soon and a long one seldom takes
    the GIL from the serving thread (each wake does; ``benchmarks/bench_mover_polling.py``).
    """
    if event.query():
        return
    deadline = time.monotonic() + timeout_s
    sleep = min(FIRST_SLEEP_S, sleep_s)
    while not event.query():
        if stop is not None and stop():
            raise Stopped(what)
        if time.monotonic() > deadline:
            raise TransferError(f"waited {timeout_s} s for {what}")
        time.sleep(sleep)
        sleep = min(2 * sleep, sleep_s)


def wait_work(work, timeout_s: float, what: str) -> None:
    """Host wait for a gloo Work: TransferError (naming ``what``) instead of gloo's raw
    RuntimeError when a peer does not answer within timeout_s or its connection closed.

    On gloo a timed-out wait closes the connection to the peer it waited for: the group is
    unusable afterwards (later collectives fail at once), which is how a gone peer surfaces.
    """
    try:
        work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise TransferError(f"{what}: no answer within {timeout_s:g} s ({exc})") from exc


# (id(group), device) -> (group, flags, pinned host flags, side stream, free events):
# what an Agreement needs, kept between blocking moves (creating them cost ~1 ms a move).
_AGREEMENT_CACHE: dict = {}


class Agreement:
    """Steps 0..n-1 of "did every rank succeed?": a MIN all-reduce of an int32 flag each.

    Collective: every rank posts the same steps in the same order relative to its other
    operations on group. post() never blocks the host; result() waits with a timeout.
    """

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device, n: int, *,
                 sleep_s: float = 0.0, stop: Callable[[], bool] | None = None, reuse: bool = False):
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        self.gpu = self.group is not None and is_nccl(self.group) and device.type == "cuda"
        self.sleep_s, self.stop = sleep_s, stop
        self.works: list = [None] * n
        self.events: list = [None] * n
        self._key = (id(self.group), str(device)) if reuse and self.gpu else None
        res = _AGREEMENT_CACHE.pop(self._key, None) if self._key is not None else None
        if res is not None and res[0] is self.group and res[1].numel() >= n:
            # Reused (released by a move that finished): every copy into `host` completed.
            _, flags, self.host, self.stream, self._pool_events = res
            self.flags = flags[:n]
            self.flags.fill_(1)  # stream-ordered before the all-reduces that read it
        else:
            self.flags = torch.ones(max(n, 16), dtype=torch.int32, device=device if self.gpu else "cpu")[:n]
            self._pool_events = []
            if self.gpu:
                self.host = torch.empty(self.flags._base.numel(), dtype=torch.int32, pin_memory=True)
                self.stream = torch.cuda.Stream(device=device)

    def release(self) -> None:
        """Keep the buffers, stream and events for the next move on this group (call only
        once every posted step's result was read)."""
        if self._key is None or self.group is None:
            return
        base = self.flags._base if self.flags._base is not None else self.flags
        _AGREEMENT_CACHE[self._key] = (self.group, base, getattr(self, "host", None),
                                       getattr(self, "stream", None), self._pool_events)
        self._key = None

    def _event(self):
        return self._pool_events.pop() if self._pool_events else torch.cuda.Event()

    def post(self, i: int, ok: bool, device_ok: torch.Tensor | None = None, *, read: bool = True) -> None:
        """Contribute this rank's flag for step i (device_ok: [1] int32 on the device, or None).
        read=False (NCCL): no copy to the host nor event; only ``device_flag(i)`` or
        ``read_all`` after a later step's ``result`` may read it."""
        flag = self.flags[i : i + 1]
        if not ok:
            flag.zero_()
        if device_ok is not None:
            flag.mul_(device_ok)
        if self.group is None:
            return
        work = dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group, async_op=True)
        self.works[i] = work
        if not self.gpu or not read:
            return
        with torch.cuda.stream(self.stream):
            # Only this side stream waits for the all-reduce (the caller's stream keeps
            # committing earlier rounds); the host then polls the event.
            work.wait()
            self.host[i : i + 1].copy_(flag, non_blocking=True)
            self.events[i] = self._event()
            self.events[i].record()

    def device_flag(self, i: int, timeout_s: float) -> torch.Tensor:
        """Step i's agreed flag as a [1] bool tensor, ordered before what the caller's stream
        runs next (NCCL: that stream waits for the all-reduce; the host does not). Gloo:
        waits on the host (timeout_s). For commits that run only if every rank agreed."""
        if self.group is not None:
            if self.gpu:
                self.works[i].wait()  # stream-level: the current stream waits for the all-reduce
                if self.events[i] is None:
                    self.works[i] = None  # no host read of this step (post(read=False))
            else:
                work, self.works[i] = self.works[i], None  # a kept Work would outlive the group
                wait_work(work, timeout_s, f"the ranks' agreement on step {i}")
        return self.flags[i : i + 1].bool()

    def read_all(self, n: int) -> list[bool]:
        """Steps 0..n-1's agreed flags, once a result() of a step posted after them returned
        (the all-reduces complete in order on the communicator's stream)."""
        if self.gpu:
            self.stream.synchronize()  # nothing pending there beyond what result() waited for
            return [bool(x) for x in self.flags[:n].cpu().tolist()]
        return [bool(x) for x in self.flags[:n].tolist()]

    def result(self, i: int, timeout_s: float, what: str) -> bool:
        """True iff every rank posted ok for step i. Waits on the host (timeout_s)."""
        if self.group is None:
            return bool(self.flags[i])
        if self.gpu:
            wait_event(self.events[i], timeout_s, what, sleep_s=self.sleep_s, stop=self.stop)
            self._pool_events.append(self.events[i])  # completed: free to record again
            self.events[i] = self.works[i] = None
            return bool(self.host[i])
        work, self.works[i] = self.works[i], None  # a kept Work (e.g. in an exception's frames) outlives the group
        if work is not None:  # None: device_flag(i) already waited for it
            wait_work(work, timeout_s, what)  # gloo honours the timeout
        return bool(self.flags[i])
