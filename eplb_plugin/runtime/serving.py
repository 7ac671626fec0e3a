"""Serving one run on one rank: the pass loop around ``RankEngine``'s pass body.

Each pass (collective: every rank runs the same passes) ``RunLoop`` takes rank 0's pending
HTTP command, has the engine prepare the inputs and align the ranks, times the MoE step
(no garbage collection inside it; under torch.profiler on the passes asked for), saves
captured outputs, all-reduces the pass's stats, runs the command on every rank, gives the
manager its turn (the pass's stall), then logs ended rebalances, samples memory and moves
the progress bar. At the end (or when a rank asked to stop, or a peer was lost) it reduces
the per-pass figures over the ranks, verifies every slot's weights, and builds the results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eplb_plugin.errors import EPLBError, RebalanceError, TransferError
from eplb_plugin.runtime.engine import RankEngine
from eplb_plugin.runtime.http import Command, PendingCommand, execute_command
from eplb_plugin.runtime.profiling import profile_pass
from eplb_plugin.runtime.progress import Progress
from eplb_plugin.runtime.results import as_dict, outcome, rebalance_line, summarize
from eplb_plugin.runtime.supervise import PeerLostError, name_unanswering
from eplb_plugin.runtime.weights import verify_rank_weights

logger = logging.getLogger(__name__)

PROGRESS_EVERY_PASSES = 5
LIVE_WINDOW_PASSES = 20  # passes averaged for the progress bar's live balancedness
FAILURES_KEPT = 64  # failed rebalances' messages kept (the newest; rebalance_failures_total counts all)


class RunLoop:
    """One run of ``engine`` (its RunSpec's passes). ``run()`` serves them; rank 0 gets the
    results. Sets ``engine.stopped`` when the run ended before its last pass."""

    def __init__(self, engine: RankEngine):
        self.engine = engine
        spec = engine.run_spec
        self.bar = Progress(spec.label, spec.num_passes, enabled=engine.cfg.progress and engine.rank == 0)
        self.rebalances_logged = 0  # rebalance records logged so far (counted from the first ever)

    def run(self) -> dict[str, Any] | None:
        """Serve every pass of the run; rank 0 returns the results (others None). Collective."""
        e = self.engine
        spec, n = e.run_spec, e.run_spec.num_passes
        if e.channel is not None:
            e.channel.set_serving(True, run=spec.label, passes=n, pass_id=0)
        start_wall = time.perf_counter()
        done = 0  # passes finished
        try:
            for p in range(n):
                stop_votes = self.serve_pass(p)
                done = p + 1
                if stop_votes:  # some rank asked to stop: every rank stops after this pass
                    e.stopped = f"stopped after pass {p} ({e.should_stop() or 'another rank was asked to stop'})"
                    if e.rank == 0:
                        self.bar.write(f"[{spec.label}] {e.stopped}; finishing the run")
                    break
        except RuntimeError as exc:  # a collective failed: a peer died or stopped answering
            if e.world_size == 1 or isinstance(exc, EPLBError):
                raise
            raise self._peer_lost(done, exc, time.perf_counter() - start_wall) from exc
        finally:
            self.bar.close()
            if e.channel is not None:
                e.channel.set_serving(False, run=spec.label, passes=n)
        wall_s = time.perf_counter() - start_wall
        if done < n:
            self._truncate(done)
        return self._finish(wall_s)

    # ------------------------------------------------------------------ one pass

    def serve_pass(self, p: int) -> int:
        """Pass ``p`` on every rank (collective): its inputs, the timed MoE step, the stats
        all-reduce, the HTTP command, the manager's turn; returns how many ranks asked to stop."""
        e = self.engine
        pending = e.channel.take() if e.channel is not None else None
        inputs = e.inputs(p)
        capture_s = e.ensure_graph(inputs)
        e.align_ranks()  # measurement point: every rank starts the pass idle, together
        h, received, step_s, compute_s = self._timed_forward(p, inputs)
        self._save_capture(p, h)
        stats = e.pass_stats(received, step_s, compute_s, command=int(pending.command) if pending else 0,
                             stop=e.should_stop() is not None)
        e.account(p, stats)
        self._answer(Command(stats.command), pending)
        e.series.stall_s[p] = self._manager_turn(p) + capture_s
        self._after_pass(p)
        return stats.stop_votes

    def _timed_forward(self, p: int, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """The engine's ``forward`` timed to its last kernel, with no garbage collection inside
        and, on the passes asked for, under the profiler. Returns (h, received, step seconds,
        expert compute seconds)."""
        e = self.engine
        with _gc_paused():
            t0 = time.perf_counter()
            with self._profiled(p):
                h, received, compute_s = e.forward(p, inputs)
            if e.device.type == "cuda":
                torch.cuda.synchronize(e.device)  # measurement point: the pass's kernels done
            return h, received, time.perf_counter() - t0, compute_s

    def _profiled(self, p: int) -> contextlib.AbstractContextManager[Any]:
        """torch.profiler around pass ``p`` where rank 0 profiles it (``cfg.profile_passes``)."""
        e = self.engine
        if not (e.rank == 0 and p in e.cfg.profile_passes and e.cfg.profile_dir):
            return contextlib.nullcontext()
        label = e.run_spec.label
        return profile_pass(Path(e.cfg.profile_dir) / f"{label}_profile.txt", label, p, e.device.type == "cuda")

    def _save_capture(self, p: int, h: torch.Tensor) -> None:
        """Save this rank's final hidden states of pass ``p`` if asked (``cfg.capture_passes``)."""
        e = self.engine
        if p in e.cfg.capture_passes and e.cfg.capture_dir:
            torch.save({"pass": p, "tokens": (e.tokens.start, e.tokens.stop), "out": h.cpu()},
                       Path(e.cfg.capture_dir) / f"{e.run_spec.label}_rank{e.rank}_pass{p}.pt")

    def _answer(self, command: Command, pending: PendingCommand | None) -> None:
        """Run the pass's HTTP command on this rank (every rank, same pass); rank 0 replies."""
        if command == Command.NONE:
            return
        reply = execute_command(self.engine.recorder, command)
        if pending is not None:
            pending.complete(reply)

    def _manager_turn(self, p: int) -> float:
        """The manager's end of pass ``p`` (it may plan, move weights, switch maps); returns the
        seconds it took (the pass's stall). A failed rebalance is noted; the old placement serves."""
        e = self.engine
        t1 = time.perf_counter()
        if e.manager is not None:
            try:
                e.manager.on_forward_pass_end()
            except (RebalanceError, TransferError) as exc:  # old placement keeps serving
                # Logged from its record (_log_rebalances), passes counted from 1 as there.
                e.rebalance_failures.append(f"pass {p + 1}: {exc}")
                e.rebalance_failures_total += 1
                del e.rebalance_failures[:-FAILURES_KEPT]
            if e.device.type == "cuda":
                # A move's last copies may still be queued: they are the stall's, not
                # the next pass's step time.
                torch.cuda.synchronize(e.device)
        return time.perf_counter() - t1

    def _after_pass(self, p: int) -> None:
        """After pass ``p``: rebalance log lines, /health's pass, memory samples, the bar."""
        e = self.engine
        self._log_rebalances()
        if e.channel is not None:
            e.channel.pass_done(p + 1)
        e.series.sample_memory(p)
        self.bar.update(1)
        if (p + 1) % PROGRESS_EVERY_PASSES == 0 or p == e.run_spec.num_passes - 1:
            lo = max(0, p + 1 - LIVE_WINDOW_PASSES)
            self.bar.set_postfix(bal=f"{e.series.balancedness[lo:p + 1].mean():.3f}",
                                 step_ms=f"{1e3 * e.series.step_s[lo:p + 1].mean():.2f}",
                                 rebal=self.rebalances_logged, refresh=False)

    def _log_rebalances(self, *, run_ended: bool = False) -> None:
        """Log each rebalance once it has ended (done, skipped or failed), and at the end of the
        run those still in progress (unfinished)."""
        e = self.engine
        history = e.history()
        dropped = getattr(e.manager, "history_dropped", 0)  # records before history[0]
        while self.rebalances_logged - dropped < len(history):
            r = as_dict(history[self.rebalances_logged - dropped])
            if outcome(r) == "unfinished" and not run_ended:
                break  # still planning or moving
            if e.rank == 0:
                self.bar.write(rebalance_line(e.run_spec.label, r))
            self.rebalances_logged += 1

    # ------------------------------------------------------------------ the end

    def _truncate(self, done: int) -> None:
        """Keep the first ``done`` passes' series (a run that stopped early reports those)."""
        e = self.engine
        e.run_spec = dataclasses.replace(e.run_spec, num_passes=max(done, 1))
        e.series.truncate(done)

    def _peer_lost(self, done: int, cause: BaseException, wall_s: float) -> PeerLostError:
        """The error this rank stops with after a failed collective (naming the ranks that
        stopped answering); on rank 0 it carries the results of the passes that ran, built
        without any collective (this rank's own weights verified)."""
        e = self.engine
        error = name_unanswering(e.store, rank=e.rank, world_size=e.world_size, pass_id=done, cause=cause)
        if e.store is not None and not error.lost:
            raise cause  # every rank answered: not a lost peer but an error of its own
        e.stopped = str(error)
        if e.rank == 0 and done > 0:
            self._truncate(done)
            check = verify_rank_weights(e.weights, e.location, e.rank, e.shape) if e.cfg.verify_weights else None
            error.partial = self._every_rebalance(summarize(
                e, e.series.stall_s, wall_s, rss_mb=e.series.rss_mb.tolist(), traced_mb=e.series.traced_mb.tolist(),
                slots_checked=check.slots_checked if check else 0,
                slots_failed=len(check.failures) if check else 0, verified=e.cfg.verify_weights,
            )) | {"stopped": e.stopped}
        return error

    def _every_rebalance(self, result: dict[str, Any]) -> dict[str, Any]:
        """``result`` whose rebalance totals cover every rebalance, as /metrics' do: where the
        manager's history dropped its oldest records ("rebalances" lists the newest), the
        totals are the manager's exact ones, not the kept records' sums."""
        e = self.engine
        dropped = getattr(e.manager, "history_dropped", 0)
        if not dropped:
            return result
        every = e.manager.totals
        return result | {
            "rebalances_dropped": dropped, "num_rebalances": every.done, "num_rebalances_skipped": every.skipped,
            "num_rebalances_failed": every.failed, "slots_moved": every.slots_moved,
            "bytes_moved": every.bytes_moved, "stall_s_total": every.stall_s,
        }

    def _finish(self, wall_s: float) -> dict[str, Any] | None:
        """Collective: reduce stalls, verify every slot, close the manager; rank 0 returns results."""
        e = self.engine
        if e.manager is not None:
            e.manager.close()
            e.location = getattr(e.manager, "location", e.location)
            self._log_rebalances(run_ended=True)  # the last ones, and unfinished
        series = e.series
        stall = torch.from_numpy(np.concatenate([series.stall_s, series.rss_mb, series.traced_mb]))
        check = verify_rank_weights(e.weights, e.location, e.rank, e.shape) if e.cfg.verify_weights else None
        totals = torch.tensor(
            [check.slots_checked if check else 0, len(check.failures) if check else 0], dtype=torch.float64
        )
        if e.world_size > 1:
            import torch.distributed as dist

            # MAX: a pass's stall (and memory sample) is the worst rank's; SUM: slots checked and failed.
            stall_dev, totals_dev = stall.to(e.device), totals.to(e.device)
            dist.all_reduce(stall_dev, op=dist.ReduceOp.MAX, group=e.group)
            dist.all_reduce(totals_dev, group=e.group)
            stall, totals = stall_dev.cpu(), totals_dev.cpu()
        n, samples = len(series.stall_s), len(series.rss_mb)
        stall, rss, traced = stall[:n], stall[n : n + samples], stall[n + samples :]
        if check and check.failures:
            logger.error("rank %d: %d slot(s) hold wrong weights: %s", e.rank, len(check.failures), check.failures[:8])
        if e.rank != 0:
            return None
        result = self._every_rebalance(summarize(
            e, stall.numpy(), wall_s, rss_mb=rss.tolist(), traced_mb=traced.tolist(),
            slots_checked=int(totals[0]), slots_failed=int(totals[1]), verified=e.cfg.verify_weights))
        return result | {"stopped": e.stopped} if e.stopped else result


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No garbage collection inside the timed pass: the loop waits for each pass, so a
    collection there would stall the GPUs (every rank waits for the rank that collects),
    which a pipelined server hides behind the previous pass."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
