"""RankEngine: one EP rank's serving loop for one run.

Each pass, on every rank (the loop is collective: every rank runs the same passes):

1. Take this rank's shard of the pass's global batch (the workload is deterministic, so
   ranks agree without talking) and its hidden states (deterministic from (seed, pass)).
2. Run every MoE layer (``ep_moe_forward``: dispatch, exchange, experts, results back),
   chained ``h = h + MoE_l(rms_normalize(h))``, inside the recorder's pass; on CUDA the
   layers replay as one captured graph where possible (``runtime/graphs.py``). Every rank
   starts the pass together (``_align_ranks``) and the pass is timed to its last kernel.
3. One SUM all-reduce of a small vector: the HTTP command from rank 0, every slot's
   received pairs [L, P], every rank's MoE step time and expert compute time. All ranks
   then know the pass's per-GPU loads (balancedness) and act on the command together.
4. ``manager.on_forward_pass_end()``: the manager may plan, move weights and switch maps
   (then ``on_location_change`` rebuilds the dispatcher). Its time is the pass's stall.

At the end every slot's weights are checked against the fingerprint of the logical expert
the final map says it holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eplb_plugin.algorithms import resolve_algorithm, split_for_dispatch
from eplb_plugin.balance import gpu_loads, layer_balancedness
from eplb_plugin.dispatch import ExpertDispatcher
from eplb_plugin.errors import ConfigError, EPLBError, RebalanceError, TransferError
from eplb_plugin.location import ExpertLocation
from eplb_plugin.location_files import load_init_expert_location
from eplb_plugin.recorder import MODES, create_recorder
from eplb_plugin.runtime.config import RunSpec, RuntimeConfig
from eplb_plugin.runtime.graphs import PassGraph, capture_agreed
from eplb_plugin.runtime.http import Command, ControlChannel, Reply
from eplb_plugin.runtime.moe import (
    default_exchange,
    ep_moe_forward,
    grouped_mm_available,
    rms_normalize,
)
from eplb_plugin.runtime.profiling import profile_pass
from eplb_plugin.runtime.progress import Progress
from eplb_plugin.runtime.results import (
    RSS_EVERY_PASSES,
    as_dict,
    outcome,
    rebalance_line,
    resident_mb,
    summarize,
)
from eplb_plugin.runtime.supervise import PeerLostError, name_unanswering, stop_reason
from eplb_plugin.runtime.weights import FFNShape, build_rank_weights, verify_rank_weights
from eplb_plugin.runtime.workload import shard_tokens

logger = logging.getLogger(__name__)

DEFAULT_MANAGER = "eplb_plugin.manager:EPLBManager"
PROGRESS_EVERY_PASSES = 5
MAX_SERIES_BYTES = 4 << 30  # per-pass figures a run may keep (resident from its start)
LIVE_WINDOW_PASSES = 20  # passes averaged for the progress bar's live balancedness
REPLIES = {
    Command.START_RECORD: "Start recording the expert distribution.\n",
    Command.STOP_RECORD: "Stop recording the expert distribution.\n",
    Command.DUMP_RECORD: "Dump expert distribution record.\n",
}


def resolve_factory(spec: str) -> Any:
    """Import ``"module:attr"``."""
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"manager factory {spec!r} cannot be imported ({exc})") from exc


def make_hidden(pass_id: int, num_tokens: int, hidden_size: int, *, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[T, H] the pass's token activations, deterministic from (seed, pass_id) per device type."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + pass_id)
    return torch.randn(num_tokens, hidden_size, generator=g, device=device).to(dtype)


class RankEngine:
    """One rank's state for one run: placement, weights, dispatcher, recorder, manager.

    group: the EP process group (None with one rank). channel: HTTP commands (rank 0 only).
    store: the launcher's store, where a rank marks itself when a peer is lost (or None).
    should_stop: this rank's stop request (a signal, its launcher gone) or None; every rank's
    vote travels in the per-pass all-reduce, so all stop after the same pass.
    """

    def __init__(
        self, cfg: RuntimeConfig, run: RunSpec, *, rank: int, world_size: int, group: Any,
        device: torch.device, channel: ControlChannel | None = None, metrics: Any = None,
        store: Any = None, should_stop: Callable[[], str | None] = stop_reason,
    ):
        self.cfg, self.run_spec, self.rank, self.world_size, self.group = cfg, run, rank, world_size, group
        self.device, self.channel, self.metrics = device, channel, metrics
        self.store, self.should_stop = store, should_stop  # see runtime/supervise.py
        self.stopped: str | None = None  # why the run ended before its last pass
        model, args = cfg.model, run.eplb
        self.model = model
        num_physical = model.num_logical_experts + args.ep_num_redundant_experts
        self.location: ExpertLocation = load_init_expert_location(
            args.init_expert_location, num_layers=model.num_layers, num_logical_experts=model.num_logical_experts,
            num_physical_experts=num_physical, ep_size=world_size, num_nodes=args.nnodes,
            num_groups=model.num_groups,
            algorithm=resolve_algorithm(args.eplb_algorithm), split=split_for_dispatch(args.ep_dispatch_algorithm),
        )
        self.initial_map = self.location.physical_to_logical_map.clone()
        self.shape = FFNShape(model.hidden_size, model.intermediate_size, cfg.torch_dtype, device, cfg.seed)
        self.weights = build_rank_weights(self.location, rank, self.shape)
        self.workload = run.workload.build(model, cfg.batch_tokens)
        self.tokens = shard_tokens(cfg.batch_tokens, rank=rank, world_size=world_size)
        self.tokens_per_rank = -(-cfg.batch_tokens // world_size)  # every rank pads to this
        self.exchange = cfg.exchange or default_exchange(device)
        self.recorder = create_recorder(
            args.expert_distribution_recorder_mode,
            **self._recorder_kwargs(args),
        )
        self.dispatch_algorithm = args.ep_dispatch_algorithm or "static"
        self.dispatcher = self._make_dispatcher(self.location)
        self.manager = None
        if args.enable_eplb:
            factory = resolve_factory(run.manager_factory or cfg.manager_factory or DEFAULT_MANAGER)
            self.manager = factory(
                args, location=self.location, recorder=self.recorder, expert_weights=self.weights,
                group=group, rank=rank, num_groups=model.num_groups, metrics=metrics,
                on_location_change=self._on_location_change,
            )
        elif args.expert_balancedness_report_mode != "off" or args.enable_expert_distribution_metrics:
            self.recorder.start_record()  # SGLang starts recording when it reports balancedness
        n = run.num_passes
        series_bytes = n * (4 * 8 + 4 * model.num_layers * world_size)
        if series_bytes > MAX_SERIES_BYTES:
            raise ConfigError(f"--num-passes {n} would keep {series_bytes / 2**30:.1f} GiB of per-pass figures on "
                              f"every rank (limit {MAX_SERIES_BYTES / 2**30:.0f} GiB); run fewer passes")
        self.balancedness = np.zeros(n)
        self.step_s = np.zeros(n)
        self.compute_s = np.zeros(n)
        self.stall_s = np.zeros(n)  # per pass, time outside the MoE step (results' off_step_s_per_pass)
        self.gpu_load = np.zeros((n, model.num_layers, world_size), dtype=np.float32)
        self.rss_mb = np.zeros((n + RSS_EVERY_PASSES - 1) // RSS_EVERY_PASSES)
        for series in (self.balancedness, self.step_s, self.compute_s, self.stall_s, self.gpu_load, self.rss_mb):
            series.fill(0)  # touched now: the run's per-pass memory is resident from the start, not grown into
        self.rebalance_failures: list[str] = []
        self._graph: PassGraph | None = None
        self._graph_wanted = self.graphable()
        self.graph_captures = 0
        self._align_token = torch.zeros(1, device=device)

    def _recorder_kwargs(self, args: Any) -> dict[str, Any]:
        if args.expert_distribution_recorder_mode is None:
            return {}
        buffer = args.expert_distribution_recorder_buffer_size
        return dict(
            physical_to_logical_map=self.location.physical_to_logical_map.to(self.device),
            num_logical_experts=self.model.num_logical_experts,
            buffer_size=buffer if buffer is not None else args.eplb_rebalance_num_iterations,
            device=self.device, rank=self.rank, ep_size=self.world_size, group=self.group,
            dump_dir=self.cfg.dump_dir, top_k=self.model.top_k,
            max_tokens_per_pass=self.tokens.stop - self.tokens.start,
        )

    def _make_dispatcher(self, location: ExpertLocation) -> ExpertDispatcher:
        return ExpertDispatcher(
            location, rank=self.rank, algorithm=self.dispatch_algorithm,
            num_gpus_per_node=self.world_size // self.run_spec.eplb.nnodes, device=self.device,
            generator=torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.rank),
            backend=self.cfg.dispatch_backend,
            count_group=self.group if self.cfg.dispatch_counts == "global" and self.world_size > 1 else None,
        )

    def _on_location_change(self, location: ExpertLocation) -> None:
        """Called by the manager on the serving thread once a new map is live on every rank."""
        self.location = location
        # A captured pass reads the dispatcher's tables: the new ones go into the same
        # memory (stream-ordered before the next replay), so the graph stays valid.
        if self._graph is not None and self.dispatcher.update_(location):
            return
        self._graph = None  # capture again at the next pass (if passes run as graphs)
        self.dispatcher = self._make_dispatcher(location)

    # ------------------------------------------------------------------ one pass

    def inputs(self, pass_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of pass ``pass_id``: (hidden [t, H], topk_ids [L, t, k] logical,
        topk_weights [L, t, k]) on the device, layer-major and contiguous so that each layer's
        [t, k] slice is contiguous (no per-layer copies inside the pass). Not part of the MoE
        step's time."""
        batch = self.workload.batch(pass_id)
        ids = batch.topk_ids[self.tokens].to(self.device).transpose(0, 1).contiguous()
        topk_weights = batch.topk_weights[self.tokens].to(self.device).transpose(0, 1).contiguous()
        h = make_hidden(pass_id, self.cfg.batch_tokens, self.model.hidden_size, seed=self.cfg.seed,
                        dtype=self.cfg.torch_dtype, device=self.device)[self.tokens]
        return h, ids, topk_weights

    def forward(self, pass_id: int, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Run pass ``pass_id`` (``inputs`` from ``self.inputs(pass_id)``) through every MoE
        layer. Collective.

        Returns (this rank's final hidden states [t, H], received pairs per local slot
        [L, S] int64, expert compute seconds).
        """
        h, ids, topk_weights = inputs
        with self.recorder.with_forward_pass(pass_id):
            if self._graph is not None:
                h, received = self._graph.replay(h, ids, topk_weights)
                return h, received, 0.0
            return self._layers(h, ids, topk_weights)

    def _layers(self, h: torch.Tensor, ids: torch.Tensor, topk_weights: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Every MoE layer on this rank's tokens (the pass body; collective)."""
        received = []
        compute_s = 0.0
        for layer in range(self.model.num_layers):
            with self.recorder.with_current_layer(layer):
                res = ep_moe_forward(
                    rms_normalize(h), ids[layer], topk_weights[layer], layer=layer,
                    dispatcher=self.dispatcher, weights=self.weights[layer], recorder=self.recorder,
                    group=self.group, world_size=self.world_size, rank=self.rank,
                    tokens_per_rank=self.tokens_per_rank, exchange=self.exchange,
                )
            h = h + res.out
            received.append(res.recv_counts)
            compute_s += res.compute_s
        return h, torch.stack(received), compute_s

    def graphable(self) -> bool:
        """Whether passes run as a CUDA graph: CUDA, asked for, the gather exchange (fixed
        shapes; alltoall reads split sizes on the host), a dispatch made of device ops
        on tables (``DispatchInfo.graph_safe``: static, weighted, minmax; ``random`` and
        ``dynamic`` draw from a host-seeded generator),
        a recorder mode whose hooks only count (``RecorderMode.graph_safe``; per_token also
        copies ids per pass), and the grouped-GEMM expert path (else the experts read the slot
        ends on the host, which a capture cannot do)."""
        mode = self.run_spec.eplb.expert_distribution_recorder_mode
        return (self.device.type == "cuda" and self.cfg.cuda_graph and self.exchange == "gather"
                and self.dispatcher.info.graph_safe and (mode is None or MODES.get(mode).graph_safe)
                and grouped_mm_available(self.cfg.torch_dtype, self.device))

    def _ensure_graph(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
        """Capture the pass if it should run as a graph and none is live (collective).
        Returns the seconds spent (a stall: the pass waits for it)."""
        if self._graph is not None or not self._graph_wanted:
            return 0.0
        start = time.perf_counter()
        body = lambda h, ids, w: self._layers(h, ids, w)[:2]  # noqa: E731
        with self.recorder.counts_discarded():  # the warm-up passes are not traffic
            self._graph = capture_agreed(body, inputs, group=self.group)
        self._graph_wanted = self._graph is not None  # a failed capture is not retried
        self.graph_captures += 1
        return time.perf_counter() - start

    def _align_ranks(self) -> None:
        """Wait until this rank's GPU is idle and every rank got here (collective), so that a
        pass's step time measures the pass, not how much later another rank started it
        (preparing a pass's inputs takes each rank a different host time)."""
        if self.world_size > 1:
            import torch.distributed as dist

            # On NCCL the all-reduce runs after this rank's queued work, and completes once
            # every rank's did: the synchronize below then covers both waits.
            dist.all_reduce(self._align_token, group=self.group)  # returns once every rank sent
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pass_stats(self, command: int, received: torch.Tensor, step_s: float, compute_s: float,
                    stop: bool = False) -> torch.Tensor:
        """One SUM all-reduce (collective): [1 + L * P + 2W + 1] float64 -> the same, summed.
        The last element counts the ranks asking to stop."""
        num_layers, num_local = received.shape
        w = self.world_size
        num_physical = num_local * w
        vec = torch.zeros(1 + num_layers * num_physical + 2 * w + 1, dtype=torch.float64)
        vec[-1] = float(stop)
        if self.rank == 0:
            vec[0] = command
        slots = vec[1 : 1 + num_layers * num_physical].view(num_layers, num_physical)
        slots[:, self.rank * num_local : (self.rank + 1) * num_local] = received.cpu().to(torch.float64)
        tail = 1 + num_layers * num_physical
        vec[tail + self.rank] = step_s
        vec[tail + w + self.rank] = compute_s
        if w > 1:
            import torch.distributed as dist

            comm = vec.to(self.device) if self.device.type == "cuda" else vec  # NCCL needs device tensors
            dist.all_reduce(comm, group=self.group)
            vec = comm.cpu()
        return vec

    def _execute(self, command: Command) -> Reply:
        """Run an HTTP recorder command on this rank (every rank, same pass)."""
        try:
            if command == Command.START_RECORD:
                self.recorder.start_record()
            elif command == Command.STOP_RECORD:
                self.recorder.stop_record()
            elif command == Command.DUMP_RECORD:
                path = self.recorder.dump_record("file")
                headers = {"X-Dump-Path": str(path)} if path is not None else {}
                return Reply(200, REPLIES[command], headers)
            return Reply(200, REPLIES[command])
        except EPLBError as exc:  # e.g. the recorder is off, a bad dump name
            return Reply(400, f"{exc}\n")
        except OSError as exc:  # the dump directory is not writable
            return Reply(500, f"dump failed: {exc}\n")

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any] | None:
        """Serve every pass of the run; rank 0 returns the results (others None). Collective."""
        spec, n = self.run_spec, self.run_spec.num_passes
        cuda = self.device.type == "cuda"
        bar = Progress(spec.label, n, enabled=self.cfg.progress and self.rank == 0)  # a bar, or lines in a log
        if self.channel is not None:
            self.channel.set_serving(True, run=spec.label, passes=n, pass_id=0)
        self._seen_history = 0
        self._bar = bar
        start_wall = time.perf_counter()
        done = 0  # passes finished
        try:
            for p in range(n):
                pending = self.channel.take() if self.channel is not None else None
                inputs = self.inputs(p)
                capture_s = self._ensure_graph(inputs)
                self._align_ranks()  # measurement point: every rank starts the pass idle, together
                profiling = (self.rank == 0 and p in self.cfg.profile_passes and self.cfg.profile_dir)
                prof = (profile_pass(Path(self.cfg.profile_dir) / f"{spec.label}_profile.txt", spec.label, p, cuda)
                        if profiling else contextlib.nullcontext())
                # No garbage collection inside the timed pass: this loop waits for each pass,
                # so a collection there would stall the GPUs (every rank waits for the rank
                # that collects), which a pipelined server hides behind the previous pass.
                gc_was_enabled = gc.isenabled()
                gc.disable()
                try:
                    t0 = time.perf_counter()
                    with prof:
                        h, received, compute_s = self.forward(p, inputs)
                    if cuda:
                        torch.cuda.synchronize(self.device)  # measurement point: the pass's kernels done
                    step_s = time.perf_counter() - t0
                finally:
                    if gc_was_enabled:
                        gc.enable()
                if p in self.cfg.capture_passes and self.cfg.capture_dir:
                    torch.save({"pass": p, "tokens": (self.tokens.start, self.tokens.stop), "out": h.cpu()},
                               Path(self.cfg.capture_dir) / f"{spec.label}_rank{self.rank}_pass{p}.pt")
                vec = self._pass_stats(int(pending.command) if pending else 0, received, step_s, compute_s,
                                       stop=self.should_stop() is not None)
                self._account(p, vec)
                command = Command(int(vec[0]))
                if command != Command.NONE:
                    reply = self._execute(command)
                    if pending is not None:
                        pending.complete(reply)
                t1 = time.perf_counter()
                if self.manager is not None:
                    try:
                        self.manager.on_forward_pass_end()
                    except (RebalanceError, TransferError) as exc:  # old placement keeps serving
                        # Logged from its record (_log_rebalances), passes counted from 1 as there.
                        self.rebalance_failures.append(f"pass {p + 1}: {exc}")
                    if cuda:
                        # A move's last copies may still be queued: they are the stall's, not
                        # the next pass's step time.
                        torch.cuda.synchronize(self.device)
                self.stall_s[p] = time.perf_counter() - t1 + capture_s
                self._seen_history = self._log_rebalances(bar, self._seen_history)
                if self.channel is not None:
                    self.channel.pass_done(p + 1)
                if p % RSS_EVERY_PASSES == 0:
                    self.rss_mb[p // RSS_EVERY_PASSES] = resident_mb()
                bar.update(1)
                if (p + 1) % PROGRESS_EVERY_PASSES == 0 or p == n - 1:
                    lo = max(0, p + 1 - LIVE_WINDOW_PASSES)
                    bar.set_postfix(bal=f"{self.balancedness[lo:p + 1].mean():.3f}",
                                    step_ms=f"{1e3 * self.step_s[lo:p + 1].mean():.2f}",
                                    rebal=self._seen_history, refresh=False)
                done = p + 1
                if vec[-1] > 0:  # some rank asked to stop: every rank stops after this pass
                    self.stopped = f"stopped after pass {p} ({self.should_stop() or 'another rank was asked to stop'})"
                    if self.rank == 0:
                        bar.write(f"[{spec.label}] {self.stopped}; finishing the run")
                    break
        except RuntimeError as exc:  # a collective failed: a peer died or stopped answering
            if self.world_size == 1 or isinstance(exc, EPLBError):
                raise
            raise self._peer_lost(done, exc, time.perf_counter() - start_wall) from exc
        finally:
            bar.close()
            if self.channel is not None:
                self.channel.set_serving(False, run=spec.label, passes=n)
        wall_s = time.perf_counter() - start_wall
        if done < n:
            self._truncate(done)
        return self._finish(wall_s)

    def _truncate(self, done: int) -> None:
        """Keep the first ``done`` passes' series (a run that stopped early reports those)."""
        self.run_spec = dataclasses.replace(self.run_spec, num_passes=max(done, 1))
        for name in ("balancedness", "step_s", "compute_s", "stall_s", "gpu_load"):
            setattr(self, name, getattr(self, name)[:done])
        self.rss_mb = self.rss_mb[: -(-done // RSS_EVERY_PASSES)]

    def _peer_lost(self, done: int, cause: BaseException, wall_s: float) -> PeerLostError:
        """The error this rank stops with after a failed collective (naming the ranks that
        stopped answering); on rank 0 it carries the results of the passes that ran, built
        without any collective (this rank's own weights verified)."""
        error = name_unanswering(self.store, rank=self.rank, world_size=self.world_size, pass_id=done,
                                 cause=cause)
        if self.store is not None and not error.lost:
            raise cause  # every rank answered: not a lost peer but an error of its own
        self.stopped = str(error)
        if self.rank == 0 and done > 0:
            self._truncate(done)
            check = verify_rank_weights(self.weights, self.location, self.rank, self.shape) if self.cfg.verify_weights else None
            error.partial = summarize(
                self, self.stall_s, wall_s, rss_mb=self.rss_mb.tolist(),
                slots_checked=check.slots_checked if check else 0,
                slots_failed=len(check.failures) if check else 0, verified=self.cfg.verify_weights,
            ) | {"stopped": self.stopped}
        return error

    def _account(self, p: int, vec: torch.Tensor) -> None:
        w, num_layers = self.world_size, self.model.num_layers
        num_physical = self.location.num_physical_experts
        slot_counts = vec[1 : 1 + num_layers * num_physical].view(num_layers, num_physical)
        loads = gpu_loads(slot_counts, w)  # [L, W] pairs each GPU computed
        self.gpu_load[p] = loads.numpy()
        self.balancedness[p] = float(layer_balancedness(loads).mean())
        tail = 1 + num_layers * num_physical
        self.step_s[p] = float(vec[tail : tail + w].max())
        self.compute_s[p] = float(vec[tail + w : tail + 2 * w].max())
        if self.metrics is not None and self.rank == 0:
            self.metrics.update_from_counts(slot_counts, w)

    def _history(self) -> list[Any]:
        return list(getattr(self.manager, "history", []) or [])

    def _log_rebalances(self, bar: Any, seen: int, *, run_ended: bool = False) -> int:
        """Log each rebalance once it has ended (done, skipped or failed), and at the end of the
        run those still in progress (unfinished); returns the new ``seen``."""
        history = self._history()
        dropped = getattr(self.manager, "history_dropped", 0)  # records before history[0]
        while seen - dropped < len(history):
            r = as_dict(history[seen - dropped])
            if outcome(r) == "unfinished" and not run_ended:
                break  # still planning or moving
            if self.rank == 0:
                bar.write(rebalance_line(self.run_spec.label, r))
            seen += 1
        return seen

    def _finish(self, wall_s: float) -> dict[str, Any] | None:
        """Collective: reduce stalls, verify every slot, close the manager; rank 0 returns results."""
        if self.manager is not None:
            self.manager.close()
            self.location = getattr(self.manager, "location", self.location)
            self._log_rebalances(self._bar, self._seen_history, run_ended=True)  # the last ones, and unfinished
        stall = torch.from_numpy(np.concatenate([self.stall_s, self.rss_mb]))
        check = verify_rank_weights(self.weights, self.location, self.rank, self.shape) if self.cfg.verify_weights else None
        totals = torch.tensor(
            [check.slots_checked if check else 0, len(check.failures) if check else 0], dtype=torch.float64
        )
        if self.world_size > 1:
            import torch.distributed as dist

            # MAX: a pass's stall (and RSS sample) is the worst rank's; SUM: slots checked and failed.
            stall_dev, totals_dev = stall.to(self.device), totals.to(self.device)
            dist.all_reduce(stall_dev, op=dist.ReduceOp.MAX, group=self.group)
            dist.all_reduce(totals_dev, group=self.group)
            stall, totals = stall_dev.cpu(), totals_dev.cpu()
        stall, rss = stall[: len(self.stall_s)], stall[len(self.stall_s):]
        if check and check.failures:
            logger.error("rank %d: %d slot(s) hold wrong weights: %s", self.rank, len(check.failures), check.failures[:8])
        if self.rank != 0:
            return None
        result = summarize(self, stall.numpy(), wall_s, rss_mb=rss.tolist(), slots_checked=int(totals[0]),
                           slots_failed=int(totals[1]), verified=self.cfg.verify_weights)
        dropped = getattr(self.manager, "history_dropped", 0)
        if dropped:  # "rebalances" lists the newest records; the totals cover every one
            done = self.manager.totals
            result.update(rebalances_dropped=dropped, num_rebalances=done.done, slots_moved=done.slots_moved,
                          bytes_moved=done.bytes_moved)
        return result | {"stopped": self.stopped} if self.stopped else result
