"""EPLBManager: decides when to rebalance, plans in the background, and moves weights.

Every rank calls ``on_forward_pass_end()`` after every forward pass. The manager is a
state machine driven from that call, so all collectives run on the serving thread, at pass
boundaries, in the same order on every rank:

1. IDLE: count passes. A rebalance triggers every ``--eplb-rebalance-num-iterations``
   passes, or (checked every ``check_every_passes``) after ``--eplb-rebalance-interval-s``
   seconds, or for the layers whose load drifted below ``--eplb-drift-threshold`` cosine
   similarity to the load last planned on. Time and drift verdicts are all-reduced (MAX),
   so ranks whose clocks differ still agree.
2. GATHER: the recorder's window (logical [L, E] and physical [L, P] counts) is summed over
   ranks. If the window's balancedness is already >= the
   ``--eplb-min-rebalancing-utilization-threshold``, the rebalance is skipped.
3. PLANNING: rank 0 runs the placement policy in a background thread, so serving never
   waits for the solver. While it runs, rank 0 broadcasts a one-int status per pass.
4. When the plan is ready, rank 0 broadcasts the new map (and replica weights): every rank
   gets exactly the same plan. A failed (or timed-out) plan is broadcast as a failure and
   re-raised as RebalanceError on every rank's serving thread; the old placement stays.
5. MOVING: ``--eplb-rebalance-layers-per-chunk`` layers per pass (all at once by default)
   move through the executor. A layer's new map goes live only once its weights landed on
   every rank; a failed layer stays on the map its weights match, the error is re-raised,
   and serving continues.

``on_location_change(location)`` is called whenever any layer's map changes, so the host
rebuilds its dispatch tables; the recorder gets the new map too (a new map epoch).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any

import torch
import torch.distributed as dist

from eplb_plugin.args import EPLBArgs
from eplb_plugin.balance import balancedness, gpu_loads, placement_balancedness
from eplb_plugin.comm import all_reduce_host, broadcast_host, group_info, is_nccl
from eplb_plugin.errors import (
    ConfigError,
    PlacementError,
    RebalanceError,
    TransferError,
    UsageError,
)
from eplb_plugin.location import ExpertLocation, equal_split_weights
from eplb_plugin.transports import IPC, NCCL, TRANSPORTS
from eplb_plugin.triggers import checks_due, decide, drifted_layers, interval_due, local_verdict

logger = logging.getLogger(__name__)

DEFAULT_CHECK_EVERY_PASSES = 32
DEFAULT_PLAN_TIMEOUT_S = 300.0
DEFAULT_HISTORY_LIMIT = 64  # rebalance records kept in ``history`` (the newest; totals stay exact)
MIB = 1 << 20

Planner = Callable[..., Any]


class _Status(IntEnum):
    """Rank 0's verdict on the plan in progress, broadcast to every rank each pass."""

    PENDING = 0
    READY = 1
    FAILED = 2


class Phase(str, Enum):
    """Where the manager is in a rebalance: idle -> planning -> moving -> idle; planning and
    moving also end in idle when the rebalance is skipped or fails."""

    IDLE = "idle"
    PLANNING = "planning"
    MOVING = "moving"


_NEXT_PHASES = {Phase.IDLE: {Phase.PLANNING}, Phase.PLANNING: {Phase.MOVING, Phase.IDLE},
                Phase.MOVING: {Phase.IDLE}}


@dataclass
class RebalanceRecord:
    """One rebalance, as logged and exported: the one source of every rebalance figure (log
    lines, Prometheus metrics, the runtime's report). Balancedness is mean/max GPU load.

    slots_moved counts slots of the whole EP group whose expert changed; bytes_moved is this
    rank's traffic (sent + received); transport: how same-host ranks moved it, "ipc"
    (copy-engine pulls) or the P2P backend ("nccl", "gloo"), None before a move.
    stall_s: seconds this rank's serving thread spent on the rebalance, from the pass that
    started it (trigger check and gather) to its end (plan polls and broadcast, moves,
    commits). wall_s: seconds from its start to its end (the last layer live, the skip or
    the failure); None while it runs. end_pass: the pass it ended at; None while it runs.
    """

    index: int
    trigger: str
    start_pass: int
    layers: list[int] = field(default_factory=list)
    solver_s: float = 0.0
    slots_moved: int = 0
    bytes_moved: int = 0
    stall_s: float = 0.0
    balancedness_before: float = float("nan")
    balancedness_predicted: float = float("nan")
    balancedness_achieved: float | None = None
    end_pass: int | None = None
    skipped: str | None = None
    error: str | None = None
    transport: str | None = None
    wall_s: float | None = None


@dataclass
class RebalanceTotals:
    """Every rebalance's figures summed (exact whatever ``history`` kept): done, skipped and
    failed counts, slots and this rank's bytes moved, serving-thread stall."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    slots_moved: int = 0
    bytes_moved: int = 0
    stall_s: float = 0.0

    def add(self, record: RebalanceRecord) -> None:
        if record.skipped is not None:
            self.skipped += 1
        elif record.error is not None:
            self.failed += 1
        else:
            self.done += 1
        self.slots_moved += record.slots_moved
        self.bytes_moved += record.bytes_moved
        self.stall_s += record.stall_s


@dataclass
class _PlanAttempt:
    """What one background planning run produced (written by its thread only)."""

    result: Any = None
    error: BaseException | None = None
    done: bool = False


MAX_PLAN_PASSES = 128  # per-pass policies see at most this many rows (consecutive passes summed)


def plan_passes(rows: torch.Tensor) -> torch.Tensor:
    """[n, L, E] per-pass counts -> at most MAX_PLAN_PASSES rows, consecutive passes summed
    into equal buckets (bounds what every rank all-reduces and the planner reads)."""
    if rows.shape[0] <= MAX_PLAN_PASSES:
        return rows
    bucket = torch.arange(rows.shape[0]) * MAX_PLAN_PASSES // rows.shape[0]
    return torch.zeros(MAX_PLAN_PASSES, *rows.shape[1:], dtype=rows.dtype).index_add_(0, bucket, rows)


def _default_planner(counts: torch.Tensor, **kwargs: Any) -> Any:
    from eplb_plugin.algorithms import plan

    return plan(counts, **kwargs)


def _default_layers_mover(*args: Any, **kwargs: Any) -> Any:
    from eplb_plugin.executor import move_layers

    return move_layers(*args, **kwargs)


class EPLBManager:
    """Rebalances one EP group's experts while it serves.

    args: resolved EPLBArgs (``--enable-eplb`` set).
    location: the placement serving now.
    recorder: an ExpertDistributionRecorder in ``stat`` or ``stat_approx`` mode.
    expert_weights: per MoE layer, this rank's tensors whose dim 0 is the local slot.
    group: the EP process group (None: the default group, or one rank without communication
        when torch.distributed is not initialized).
    rank: this process's rank in ``group`` (checked).
    num_groups: expert groups of the model (group-limited routing), if any.
    on_location_change: called on the serving thread with the new ExpertLocation.
    planner: injectable for tests (default: algorithms.plan).
    layers_mover: moves a chunk of layers in one collective call, pipelined across layers
        (default: executor.move_layers); injectable for tests (e.g. with a fault_hook) and by
        integrations (the SGLang adapter moves each run of like layers in its own call).
    skip_rebalance: ``fn(window_balancedness) -> reason | None``, called on every rank at the
        same pass once the window is summed; a reason skips the rebalance. Default: skip when
        the window's balancedness is >= ``--eplb-min-rebalancing-utilization-threshold`` (a
        host with another meaning for that flag, as SGLang, passes its own rule).
    ready_to_move: ``fn(target_location) -> bool``, called on every rank at each pass
        boundary where a chunk would move; False postpones the chunk to the next pass (every
        rank must answer the same: agree by a collective). Lets a host prepare its own view of
        the target (SGLang's dispatch metadata) off the serving thread. Default: always ready.
    """

    def __init__(
        self,
        args: EPLBArgs,
        *,
        location: ExpertLocation,
        recorder: Any,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        group: Any = None,
        rank: int = 0,
        num_groups: int | None = None,
        metrics: Any = None,
        on_location_change: Callable[[ExpertLocation], None] | None = None,
        check_every_passes: int = DEFAULT_CHECK_EVERY_PASSES,
        plan_timeout_s: float = DEFAULT_PLAN_TIMEOUT_S,
        planner: Planner | None = None,
        layers_mover: Callable[..., Any] | None = None,
        skip_rebalance: Callable[[float], str | None] | None = None,
        ready_to_move: Callable[[ExpertLocation], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        history_limit: int | None = DEFAULT_HISTORY_LIMIT,
    ):
        if len(expert_weights) != location.num_layers:
            raise UsageError(
                f"expert_weights has {len(expert_weights)} layers, the placement has {location.num_layers}"
            )
        self.args = args
        self.location = location
        self.recorder = recorder
        self.expert_weights = expert_weights
        self.group, self.rank, _ = group_info(group)
        if rank != self.rank:
            raise UsageError(f"rank={rank} differs from this process's rank {self.rank} in the EP group")
        self.num_groups = num_groups
        self.metrics = metrics
        self.on_location_change = on_location_change
        self.check_every_passes = check_every_passes
        self.plan_timeout_s = plan_timeout_s
        # Import the policies now: an import inside the planning thread would hold the GIL and
        # stall serving at the first rebalance.
        import scipy.optimize  # noqa: F401  (imported lazily by the migration-aware policies)

        from eplb_plugin.algorithms import PER_PASS_POLICIES, resolve_algorithm, split_for_dispatch

        self._algorithm = resolve_algorithm(args.eplb_algorithm)
        self._split = split_for_dispatch(args.ep_dispatch_algorithm)  # what the host's dispatch does
        self._per_pass_plan = self._algorithm in PER_PASS_POLICIES  # plans from [B, L, E] window rows
        self._max_slots_moved = self._move_budget_slots(args, expert_weights)
        self._planner_process = None
        if planner is None and args.eplb_plan_in_process and self.rank == 0:
            from eplb_plugin.planner_process import PlannerProcess

            planner = self._planner_process = PlannerProcess(self._algorithm)  # only rank 0 plans
        self.planner = planner or _default_planner
        self.layers_mover = layers_mover or _default_layers_mover
        self.skip_rebalance = skip_rebalance or self._window_balanced
        self.ready_to_move = ready_to_move
        self.clock = clock
        # The newest ``history_limit`` records (None: all); ``history_dropped`` older ones were
        # dropped, their figures kept in ``totals``: a server's memory does not grow with passes.
        self.history: list[RebalanceRecord] = []
        self.history_limit = history_limit
        self.history_dropped = 0
        self.totals = RebalanceTotals()
        self.num_passes = 0
        self._last_rebalance_pass = 0
        self._last_rebalance_time = clock()
        self._planned_on: torch.Tensor | None = None  # [L, E] float64 loads of the last plan
        self._phase = Phase.IDLE
        self._record: RebalanceRecord | None = None
        self._plan_thread: threading.Thread | None = None
        self._attempt = _PlanAttempt()
        self._plan_started = 0.0
        self._started = 0.0  # perf_counter at the current rebalance's start
        self._charged_until = 0.0  # perf_counter up to which its serving-thread time is in stall_s
        self._target: ExpertLocation | None = None
        self._pending_layers: list[int] = []
        self._requested: str | None = None
        self._budget_bytes = int(args.eplb_transfer_budget_mb * MIB)
        self._gpus_per_node = args.num_gpus_per_node if args.nnodes > 1 else None
        self._counts = torch.zeros(0)
        self._plan_counts = torch.zeros(0)
        self._live_maps: dict[int, torch.Tensor] = {}
        self._old_rows: dict[int, torch.Tensor] = {}
        self._async_mover = None
        transport = TRANSPORTS.get(args.eplb_transport)
        if transport.requires_pulls and not all(t.is_cuda for weights in expert_weights for t in weights):
            others = [name for name in TRANSPORTS if not TRANSPORTS.get(name).requires_pulls]
            raise ConfigError(f"--eplb-transport {transport.name} pulls weights through CUDA IPC, but the expert "
                              f"weights are not all on CUDA devices; use {' or '.join(others)}")
        if args.eplb_non_blocking:
            from eplb_plugin.executor import AsyncExpertMover

            # Collective: the mover creates its own process groups, so every rank builds its
            # manager at the same point of its start-up.
            self._async_mover = AsyncExpertMover(
                group, budget_bytes=self._budget_bytes, gpus_per_node=self._gpus_per_node,
                verify=args.eplb_verify_weights, transport=args.eplb_transport,
                timeout_s=args.eplb_rebalance_timeout_s,
            )
        self._peers = None  # PeerViews of every layer's weights (blocking moves), see _resolve_peers
        self._pulls = False  # this rebalance's blocking moves pull through self._peers (_resolve_peers)
        # The window EPLB plans on records every pass from now on, whatever a user's dump
        # session (start/stop/dump_expert_distribution_record) does.
        recorder.keep_window_for_eplb()

    # ------------------------------------------------------------------ public

    def rebalance_now(self, trigger: str = "manual") -> None:
        """Ask for a rebalance at the next pass boundary. Every rank must ask at the same pass."""
        self._requested = trigger

    @property
    def busy(self) -> bool:
        return self._phase is not Phase.IDLE

    @property
    def phase(self) -> Phase:
        """idle, planning or moving (``Phase``)."""
        return self._phase

    def _enter(self, phase: Phase) -> None:
        """Move to ``phase``; a transition the state machine does not have is a bug, raised."""
        if phase not in _NEXT_PHASES[self._phase]:
            raise RuntimeError(f"EPLB manager: no transition from {self._phase.value} to {phase.value}")
        self._phase = phase

    def redundancy_curve(self, max_per_gpu: int = 4) -> list:
        """Expected balancedness per pass against redundant slots (0 .. ``max_per_gpu`` per
        GPU), planned with this manager's policy for its dispatch on the counts the last
        rebalance planned from (summed over ranks; per-pass policies' passes score held out,
        see ``algorithms.sizing``). Rank 0 plans, so rank 0 holds the counts; [] before the
        first rebalance has gathered them. Runs the planner once per row: call it off the
        serving path."""
        from eplb_plugin.algorithms.sizing import redundancy_curve, redundant_choices

        counts = self._plan_counts
        if counts.numel() == 0:
            return []
        num_logical, num_gpus = self.location.num_logical_experts, self.location.ep_size
        return redundancy_curve(counts.numpy(), num_gpus=num_gpus,
                                redundant=redundant_choices(num_logical, num_gpus, max_per_gpu * num_gpus),
                                dispatch=self.args.ep_dispatch_algorithm or "static", algorithm=self._algorithm,
                                num_nodes=self.args.nnodes, num_groups=self.num_groups)

    @property
    def target_location(self) -> ExpertLocation | None:
        """The placement the rebalance in progress moves to (None when none moves)."""
        return self._target

    def on_forward_pass_end(self) -> None:
        """Advance the manager by one pass. Every rank calls it after every pass.

        Raises RebalanceError (on every rank, at the same pass) when a rebalance failed;
        the placement then stays as it was and the next call carries on.
        """
        self.num_passes += 1
        self._charged_until = time.perf_counter()
        if self._phase is Phase.IDLE:
            trigger, layers = self._check_triggers()
            if trigger is not None:
                self._start(trigger, layers)
        if self._phase is Phase.PLANNING:
            self._poll_plan()
        if self._phase is Phase.MOVING and (self.ready_to_move is None or self.ready_to_move(self._target)):
            self._move_chunk()
        if self._record is not None:
            self._charge(self._record)

    def _charge(self, record: RebalanceRecord) -> None:
        """Add the serving thread's time since the last charge to the rebalance's stall."""
        now = time.perf_counter()
        record.stall_s += now - self._charged_until
        self._charged_until = now

    def close(self) -> None:
        """Wait for a planning thread still running (it cannot be interrupted), stop the planner
        process and the mover."""
        if self._plan_thread is not None:
            self._plan_thread.join(timeout=self.plan_timeout_s)
        if self._planner_process is not None:
            self._planner_process.close()
        if self._async_mover is not None:
            self._async_mover.close()

    # ------------------------------------------------------------------ triggers

    def _check_triggers(self) -> tuple[str | None, list[int] | None]:
        if self._requested is not None:
            trigger, self._requested = self._requested, None
            return trigger, None
        if interval_due(self.num_passes - self._last_rebalance_pass, self.args.eplb_rebalance_num_iterations):
            return "interval", None
        timed = self.args.eplb_rebalance_interval_s is not None
        drifting = self.args.eplb_drift_threshold is not None and self._planned_on is not None
        if not checks_due(self.num_passes, self.check_every_passes, timed=timed, drifting=drifting):
            return None, None
        drifted = None
        if drifting:
            drifted = drifted_layers(self.recorder.logical_count_window().to("cpu", torch.float64),
                                     self._planned_on, self.args.eplb_drift_threshold)
        verdict = local_verdict(elapsed_s=self.clock() - self._last_rebalance_time,
                                interval_s=self.args.eplb_rebalance_interval_s, drifted=drifted,
                                num_layers=self.location.num_layers)
        # Every rank runs the checks at the same pass; the max over ranks is the verdict, so a
        # rank whose clock runs ahead cannot start a rebalance alone.
        return decide(all_reduce_host(verdict, self.group, op="max"))

    # ------------------------------------------------------------------ gather + plan

    def _start(self, trigger: str, layers: list[int] | None) -> None:
        record = RebalanceRecord(index=self.history_dropped + len(self.history), trigger=trigger,
                                 start_pass=self.num_passes)
        self.history.append(record)
        if self.history_limit is not None and len(self.history) > self.history_limit:
            drop = len(self.history) - self.history_limit  # the oldest (finished long ago)
            del self.history[:drop]
            self.history_dropped += drop
        self._last_rebalance_pass = self.num_passes
        self._last_rebalance_time = self.clock()
        self._started = time.perf_counter()
        if self._per_pass_plan:  # [B, L, E]: the window's passes, in buckets
            logical = plan_passes(self.recorder.logical_count_passes().to("cpu", torch.float64))
        else:
            logical = self.recorder.logical_count_window().to("cpu", torch.float64)
        physical = self.recorder.physical_count_window().to("cpu", torch.float64)
        # Sum the window over ranks: every rank then plans from (and checks) the same counts.
        summed = all_reduce_host(torch.cat([logical.flatten(), physical.flatten()]), self.group)
        logical = summed[: logical.numel()].view_as(logical)
        physical = summed[logical.numel():].view_as(physical)
        record.balancedness_before = balancedness(gpu_loads(physical, self.location.ep_size))
        self._fill_achieved(record.balancedness_before)
        if physical.sum() == 0:
            return self._skip(record, "no tokens recorded in the window")
        why = self.skip_rebalance(record.balancedness_before)
        if why is not None:
            return self._skip(record, why)
        record.layers = list(range(self.location.num_layers)) if layers is None else layers
        self._record = record
        self._plan_counts = logical  # what the planner reads: [L, E], or [B, L, E] for per-pass policies
        self._counts = logical.sum(0) if logical.dim() == 3 else logical  # [L, E]
        self._enter(Phase.PLANNING)
        # A fresh box per attempt: a planner that timed out and finishes late writes into its
        # own attempt, never into a later one.
        self._attempt = _PlanAttempt()
        self._plan_started = time.perf_counter()
        if self.rank == 0:
            self._plan_thread = threading.Thread(
                target=self._plan_in_background, args=(self._attempt,), name="eplb-planner", daemon=True
            )
            self._plan_thread.start()

    def _move_budget_slots(self, args: EPLBArgs, expert_weights: Sequence[Sequence[torch.Tensor]]) -> int | None:
        """--eplb-move-budget-mb as slots per rebalance (the budget over one expert's bytes in
        the first layer that holds expert weights; a model's MoE layers share expert sizes);
        None without a budget or without expert weights."""
        from eplb_plugin.algorithms import POLICIES

        if args.eplb_move_budget_mb is None:
            return None
        if not POLICIES.get(self._algorithm).move_budget:
            takes = [p.name for p in POLICIES.entries() if p.move_budget]
            raise ConfigError(f"--eplb-move-budget-mb needs a policy that takes a move budget ({takes}); "
                              f"--eplb-algorithm resolves to {self._algorithm!r}")
        slot_bytes = next((sum(t[0].numel() * t.element_size() for t in layer) for layer in expert_weights if layer), 0)
        if slot_bytes == 0:  # no layer holds expert weights here: nothing ever moves
            return None
        slots = int(args.eplb_move_budget_mb * MIB // slot_bytes)
        if slots < 1:
            raise ConfigError(f"--eplb-move-budget-mb {args.eplb_move_budget_mb} is below one expert's weights "
                              f"({slot_bytes / MIB:.3f} MiB): no slot could ever move")
        return slots

    def _window_balanced(self, window_balancedness: float) -> str | None:
        threshold = self.args.eplb_min_rebalancing_utilization_threshold
        if window_balancedness >= threshold:
            return f"balancedness {window_balancedness:.4f} >= threshold {threshold}"
        return None

    def _plan_in_background(self, attempt: _PlanAttempt) -> None:
        try:
            attempt.result = self.planner(
                self._plan_counts,
                num_physical_experts=self.location.num_physical_experts,
                num_gpus=self.location.ep_size,
                num_nodes=self.args.nnodes,
                num_groups=self.num_groups,
                algorithm=self._algorithm,
                split=self._split,
                previous=self.location.physical_to_logical_map,
                **({} if self._max_slots_moved is None else {"max_slots_moved": self._max_slots_moved}),
            )
        except BaseException as exc:  # stored and re-raised on the serving thread
            attempt.error = exc
        finally:
            attempt.done = True

    def _poll_plan(self) -> None:
        status = torch.zeros(1, dtype=torch.int64)
        if self.rank == 0:
            done = self._attempt.done
            timed_out = time.perf_counter() - self._plan_started > self.plan_timeout_s
            if done and self._attempt.error is None:
                self._attempt.error = self._check_plan_shape(self._attempt.result)
            if done and self._attempt.error is None:
                status[0] = _Status.READY
            elif done or timed_out:
                status[0] = _Status.FAILED
        status = broadcast_host(status, self.group)
        if status[0] == _Status.PENDING:
            return
        record = self._record
        record.solver_s = time.perf_counter() - self._plan_started
        if status[0] == _Status.FAILED:
            cause = self._attempt.error if self.rank == 0 else None
            if self.rank != 0:
                message = "planning failed on rank 0"
            elif cause is None:
                message = f"planning took longer than {self.plan_timeout_s} s"
            else:
                message = f"planning failed on rank 0 ({cause!r})"
            self._fail(record, RebalanceError(f"rebalance {record.index}: {message}; keeping the old placement"), cause)
        self._receive_plan()

    def _check_plan_shape(self, result: Any) -> PlacementError | None:
        """Rank 0, before broadcasting: a plan whose map or weights have the wrong type or
        shape (which would make the broadcast itself disagree) is a failed plan."""
        loc = self.location
        want = [loc.num_layers, loc.num_physical_experts]
        map_ = getattr(result, "physical_to_logical_map", None)
        if not isinstance(map_, torch.Tensor) or list(map_.shape) != want:
            got = list(map_.shape) if isinstance(map_, torch.Tensor) else type(map_).__name__
            return PlacementError(f"the planner returned a physical_to_logical_map of {got}, expected shape {want}")
        if map_.is_complex() or map_.dtype == torch.bool or (
                map_.is_floating_point() and not torch.equal(map_, map_.round())):
            return PlacementError("the planner returned a physical_to_logical_map with non-integer ids")
        weights = getattr(result, "replica_weights", None)
        if weights is not None and (not isinstance(weights, torch.Tensor) or list(weights.shape) != want):
            got = list(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            return PlacementError(f"the planner returned replica_weights of {got}, expected shape {want}")
        return None

    def _receive_plan(self) -> None:
        loc = self.location
        shape = (loc.num_layers, loc.num_physical_experts)
        new_map = torch.zeros(shape, dtype=torch.int64)
        weights = torch.zeros(shape, dtype=torch.float32)
        has_weights = torch.zeros(1, dtype=torch.int64)
        if self.rank == 0:
            result = self._attempt.result
            new_map = result.physical_to_logical_map.to(torch.int64).cpu()
            if result.replica_weights is not None:
                weights = result.replica_weights.to(torch.float32).cpu()
                has_weights[0] = 1
        # Rank 0's plan is the plan: every rank moves the same experts to the same slots.
        new_map = broadcast_host(new_map, self.group)
        weights = broadcast_host(weights, self.group)
        has_weights = broadcast_host(has_weights, self.group)
        record = self._record
        planned = record.layers
        target_map = loc.physical_to_logical_map.clone()
        target_map[planned] = new_map[planned]
        target_weights = None
        live_weights = loc.effective_replica_weights()
        if has_weights[0] or loc.replica_weights is not None:
            target_weights = live_weights.clone()
            target_weights[planned] = (weights if has_weights[0] else equal_split_weights(new_map, loc.num_logical_experts))[planned]
        # Layers whose map changes move weights; a change of replica weights alone goes live now.
        record.layers = [layer for layer in planned if not torch.equal(target_map[layer], loc.physical_to_logical_map[layer])]
        reweighted = [
            layer for layer in planned if layer not in record.layers and target_weights is not None
            and not torch.equal(target_weights[layer], live_weights[layer])
        ]
        try:  # every rank validates the plan it received (the same bytes: the same verdict)
            self._target = ExpertLocation.from_physical_to_logical_map(
                target_map, num_logical_experts=loc.num_logical_experts, ep_size=loc.ep_size,
                replica_weights=target_weights, source=f"rebalance {record.index} plan",
            )
        except PlacementError as exc:  # nothing moved: the old placement stays
            self._fail(record, RebalanceError(f"rebalance {record.index}: invalid plan: {exc}; "
                                              "keeping the old placement"), exc)
        record.balancedness_predicted = placement_balancedness(
            self._counts, target_map, loc.ep_size, target_weights
        )
        self._planned_on = self._counts
        # Layers without routed experts (dense layers: no weight tensors) move nothing: their
        # new map goes live now, with the reweighted ones.
        weightless = [layer for layer in record.layers if not self.expert_weights[layer]]
        self._pending_layers = [layer for layer in record.layers if self.expert_weights[layer]]
        record.slots_moved += sum(int((target_map[layer] != loc.physical_to_logical_map[layer]).sum())
                                  for layer in weightless)
        self._go_live({layer: target_map[layer] for layer in reweighted + weightless})
        self._old_rows = {layer: loc.physical_to_logical_map[layer].clone() for layer in record.layers}
        self._enter(Phase.MOVING)
        try:
            if self._async_mover is not None:
                self._start_async_moves()
            else:
                self._resolve_peers()
        except (ConfigError, TransferError) as exc:  # nothing moved: the old placement stays
            self._fail(record, RebalanceError(f"rebalance {record.index}: the move could not start: {exc}"), exc)
        logger.info(
            "EPLB rebalance %d (%s): solver %.3f s, %d layers to move, balancedness %.4f -> %.4f predicted",
            record.index, record.trigger, record.solver_s, len(record.layers),
            record.balancedness_before, record.balancedness_predicted,
        )

    # ------------------------------------------------------------------ move

    def _move_chunk(self) -> None:
        if self._async_mover is not None:
            return self._commit_async_chunk()
        record = self._record
        chunk = self.args.eplb_rebalance_layers_per_chunk or len(self._pending_layers)
        layers, self._pending_layers = self._pending_layers[:chunk], self._pending_layers[chunk:]
        live: dict[int, torch.Tensor] = {}
        try:
            self._move_layers(layers, live)
        except TransferError as exc:
            failed = getattr(exc, "layer", None)
            self._go_live(live)
            self._fail(record, RebalanceError(f"rebalance {record.index}: moving layer {failed} failed: {exc}"), exc)
        self._go_live(live)
        if not self._pending_layers:
            self._finish(record)

    def _move_layers(self, layers: list[int], live: dict[int, torch.Tensor]) -> None:
        """The chunk in one ``move_layers`` call: layer i's commit overlaps layer i+1's transfer.
        Fills ``live`` with the layers that moved; on LayerMoveError, with the layers before
        the failed one and the failed layer's live map."""
        old_maps = [self.location.physical_to_logical_map[layer] for layer in layers]
        new_maps = [self._target.physical_to_logical_map[layer] for layer in layers]
        try:
            results = self.layers_mover(
                [(self.expert_weights[layer], old, new) for layer, old, new in zip(layers, old_maps, new_maps)],
                self.group,
                layer_ids=layers,
                budget_bytes=self._budget_bytes,
                gpus_per_node=self._gpus_per_node,
                verify=self.args.eplb_verify_weights,
                timeout_s=self.args.eplb_rebalance_timeout_s,
                peers=self._peers if self._pulls else None,
            )
        except TransferError as exc:
            index = getattr(exc, "index", None)
            if index is not None:
                for layer, new in zip(layers[:index], new_maps[:index]):
                    live[layer] = new
                live[layers[index]] = exc.live_physical_to_logical_map
            # What moved before the failure is recorded (it is live): slots and this rank's bytes.
            record = self._record
            record.slots_moved += sum(int((old != live[layer]).sum()) for layer, old in zip(layers, old_maps)
                                      if layer in live)
            record.bytes_moved += getattr(exc, "bytes_moved", 0)
            raise
        record = self._record
        for layer, old, new, result in zip(layers, old_maps, new_maps, results):
            live[layer] = new
            record.slots_moved += int((old != new).sum())
            record.bytes_moved += result.bytes_sent + result.bytes_received

    def _resolve_peers(self) -> None:
        """Blocking moves: how this rebalance's layers travel between same-host ranks
        (``--eplb-transport``; ``record.transport``). The peers' weights for pulls are
        exchanged at the first rebalance and again when any rank's weight tensors were
        reallocated since (e.g. by a weight reload); collective over the EP group, at the same
        pass on every rank. ConfigError where ipc was asked for and is impossible."""
        from eplb_plugin.executor.peers import resolve_peers

        transport = NCCL.name if self.args.eplb_verify_weights else self.args.eplb_transport
        tensors = [t for weights in self.expert_weights for t in weights]  # dense layers: none
        peers = resolve_peers(transport, tensors, self.group, known=self._peers)
        self._peers = peers or self._peers
        self._pulls = peers is not None and peers.active
        self._record.transport = IPC.name if self._pulls else self._p2p_backend()

    def _p2p_backend(self) -> str:
        """The backend point-to-point moves run on: the EP group's ("nccl", "gloo"), "local" with one rank."""
        group, _, world = group_info(self.group)
        if world == 1:
            return "local"
        return "nccl" if is_nccl(group) else str(dist.get_backend(group))

    def _start_async_moves(self) -> None:
        from eplb_plugin.executor import LayerMove

        self._live_maps = {
            layer: self.location.physical_to_logical_map[layer].clone() for layer in self._pending_layers
        }
        self._async_mover.start([
            LayerMove(
                layer=layer,
                weights=self.expert_weights[layer],
                old_physical_to_logical_map=self.location.physical_to_logical_map[layer],
                new_physical_to_logical_map=self._target.physical_to_logical_map[layer],
                live_map=self._live_maps[layer],
            )
            for layer in self._pending_layers
        ])
        self._record.transport = IPC.name if self._async_mover.pulls else self._p2p_backend()

    def _commit_async_chunk(self) -> None:
        """Non-blocking mode: commit what the background mover has staged, at this boundary."""
        record = self._record
        chunk = self.args.eplb_rebalance_layers_per_chunk or len(self._live_maps)
        try:
            layers = self._async_mover.commit_ready(max_layers=chunk)
        except TransferError as exc:
            self._go_live(self._changed_live_maps())
            record.slots_moved = sum(int((live != self._old_rows[layer]).sum()) for layer, live in self._live_maps.items())
            record.bytes_moved = self._async_mover.bytes_committed
            self._fail(record, RebalanceError(f"rebalance {record.index}: non-blocking move failed: {exc}"), exc)
        if layers:
            self._go_live({layer: self._live_maps[layer] for layer in layers})
        if self._async_mover.done:
            record.slots_moved = sum(
                int((self._target.physical_to_logical_map[layer] != self._old_rows[layer]).sum())
                for layer in record.layers
            )
            record.bytes_moved = self._async_mover.bytes_committed
            self._pending_layers = []
            self._finish(record)

    def _changed_live_maps(self) -> dict[int, torch.Tensor]:
        return {
            layer: live for layer, live in self._live_maps.items()
            if not torch.equal(live, self.location.physical_to_logical_map[layer])
        }

    def _go_live(self, live: dict[int, torch.Tensor]) -> None:
        """Make the given layers' maps ([P] each, matching weights that have landed on every
        rank) live, at a pass boundary; tell the recorder and the host."""
        if not live:
            return
        loc, target = self.location, self._target
        new_map = loc.physical_to_logical_map.clone()
        for layer, row in live.items():
            new_map[layer] = row.to("cpu", torch.int64)
        weights = None
        if target.replica_weights is not None or loc.replica_weights is not None:
            weights = loc.effective_replica_weights().clone()
            equal = equal_split_weights(new_map, loc.num_logical_experts)
            planned = target.effective_replica_weights()
            for layer in live:
                reached = torch.equal(new_map[layer], target.physical_to_logical_map[layer])
                weights[layer] = planned[layer] if reached else equal[layer]
        self.location = ExpertLocation.from_physical_to_logical_map(
            new_map, num_logical_experts=loc.num_logical_experts, ep_size=loc.ep_size,
            replica_weights=weights, source="live placement",
        )
        if hasattr(self.recorder, "set_physical_to_logical_map"):
            self.recorder.set_physical_to_logical_map(new_map.to(self.recorder.physical_to_logical_map.device))
        if self.on_location_change is not None:
            self.on_location_change(self.location)

    def _end(self, record: RebalanceRecord) -> None:
        """The rebalance ended (done, skipped or failed) at this pass: its last stall and its wall time."""
        self._charge(record)
        record.end_pass = self.num_passes
        record.wall_s = time.perf_counter() - self._started
        self.totals.add(record)

    def _finish(self, record: RebalanceRecord) -> None:
        self._end(record)
        self._enter(Phase.IDLE)
        self._target, self._record = None, None
        logger.info(
            "EPLB rebalance %d done at pass %d: %d slots, %.1f MiB moved, stall %.3f s",
            record.index, self.num_passes, record.slots_moved, record.bytes_moved / MIB, record.stall_s,
        )
        self._export(record)

    # ------------------------------------------------------------------ outcomes

    def _skip(self, record: RebalanceRecord, why: str) -> None:
        record.skipped = why
        self._end(record)
        logger.info("EPLB rebalance %d skipped: %s (stall %.3f s)", record.index, why, record.stall_s)
        self._export(record)

    def _fail(self, record: RebalanceRecord, error: RebalanceError, cause: BaseException | None) -> None:
        record.error = str(error)
        self._end(record)
        if self._phase is not Phase.IDLE:  # a rebalance that failed before planning never left idle
            self._enter(Phase.IDLE)
        self._target, self._record, self._pending_layers = None, None, []
        logger.error("%s", error)
        self._export(record)
        raise error from cause

    def _fill_achieved(self, window_balancedness: float) -> None:
        """The window just gathered ran (mostly) on the last rebalance's placement."""
        done = [r for r in self.history[:-1] if r.skipped is None and r.error is None and r.end_pass is not None]
        if done and done[-1].balancedness_achieved is None:
            done[-1].balancedness_achieved = window_balancedness

    def _export(self, record: RebalanceRecord) -> None:
        if self.metrics is not None:
            self.metrics.observe_rebalance(record)


