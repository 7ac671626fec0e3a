"""EPLBManager, the face of the package: the state machine (idle -> planning -> moving ->
idle) driven by ``on_forward_pass_end()``; the package docstring (``manager/__init__.py``)
describes each phase. Every collective runs here, on the serving thread, at pass boundaries,
in the same order on every rank; what is decided without communication lives beside it
(``triggers.py``, ``targets.py``), as do the planning job (``planning.py``) and the movers
(``movers.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, NoReturn

import torch

from eplb_plugin import triggers
from eplb_plugin.args import EPLBArgs
from eplb_plugin.balance import balancedness, gpu_loads
from eplb_plugin.comm import all_reduce_host, group_info
from eplb_plugin.errors import (
    ConfigError,
    PlacementError,
    RebalanceError,
    TransferError,
    UsageError,
)
from eplb_plugin.location import ExpertLocation
from eplb_plugin.manager import planning, targets
from eplb_plugin.manager.movers import Mover, default_layers_mover, make_mover
from eplb_plugin.manager.planning import PlanningJob, PlanningJobFactory, PlanOutcome, PlanStatus
from eplb_plugin.manager.protocols import LayersMover, LoadWindow, Planner, RebalanceObserver
from eplb_plugin.manager.records import MIB, RebalanceHistory, RebalanceRecord

logger = logging.getLogger(__name__)

DEFAULT_CHECK_EVERY_PASSES = 32
DEFAULT_PLAN_TIMEOUT_S = 300.0
DEFAULT_HISTORY_LIMIT = 64  # rebalance records kept in ``history`` (the newest; totals stay exact)
PLANNER_BUSY_REASON = ("the plan of an earlier rebalance, past its timeout, is still running (one plan at a time); "
                       "planning resumes once it ends")


class Phase(str, Enum):
    """Where the manager is in a rebalance: idle -> planning -> moving -> idle; planning and
    moving also end in idle when the rebalance is skipped or fails."""

    IDLE = "idle"
    PLANNING = "planning"
    MOVING = "moving"


_NEXT_PHASES = {Phase.IDLE: {Phase.PLANNING}, Phase.PLANNING: {Phase.MOVING, Phase.IDLE},
                Phase.MOVING: {Phase.IDLE}}


class EPLBManager:
    """Rebalances one EP group's experts while it serves.

    args: resolved EPLBArgs (``--enable-eplb`` set).
    location: the placement serving now.
    recorder: the load window (an ExpertDistributionRecorder in ``stat`` or ``stat_approx`` mode).
    expert_weights: per MoE layer, this rank's tensors whose dim 0 is the local slot.
    group: the EP process group (None: the default group, or one rank without communication
        when torch.distributed is not initialized).
    rank: this process's rank in ``group`` (checked).
    num_groups: expert groups of the model (group-limited routing), if any.
    metrics: told of every rebalance once it ended (``observe_rebalance``), if given.
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
    planning_job: starts rank 0's planning attempts (default: ``ThreadPlanningJob``).
    """

    def __init__(
        self,
        args: EPLBArgs,
        *,
        location: ExpertLocation,
        recorder: LoadWindow,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        group: Any = None,
        rank: int = 0,
        num_groups: int | None = None,
        metrics: RebalanceObserver | None = None,
        on_location_change: Callable[[ExpertLocation], None] | None = None,
        check_every_passes: int = DEFAULT_CHECK_EVERY_PASSES,
        plan_timeout_s: float = DEFAULT_PLAN_TIMEOUT_S,
        planner: Planner | None = None,
        layers_mover: LayersMover | None = None,
        skip_rebalance: Callable[[float], str | None] | None = None,
        ready_to_move: Callable[[ExpertLocation], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        history_limit: int | None = DEFAULT_HISTORY_LIMIT,
        planning_job: PlanningJobFactory = planning.ThreadPlanningJob,
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
        self._policy = planning.PolicyChoice.resolve(args, expert_weights=expert_weights, num_groups=num_groups)
        self._move_credit = planning.MoveCredit(carry=args.eplb_move_budget_carry,  # the same on every rank
                                                interval=args.eplb_rebalance_num_iterations)
        self._planner_process = None
        if planner is None and args.eplb_plan_in_process and self.rank == 0:
            from eplb_plugin.planner_process import PlannerProcess

            planner = self._planner_process = PlannerProcess(self._policy.algorithm)  # only rank 0 plans
        self.planner = planner or planning.default_planner
        self.layers_mover = layers_mover or default_layers_mover
        self.skip_rebalance = skip_rebalance or (
            lambda balanced: triggers.window_balanced(balanced, self.args.eplb_min_rebalancing_utilization_threshold))
        self.ready_to_move = ready_to_move
        self.clock = clock
        self.planning_job = planning_job
        self._history = RebalanceHistory(history_limit)
        self.history = self._history.records  # the newest ``history_limit`` (None: all)
        self.totals = self._history.totals  # every rebalance that ended, whatever history kept
        self.num_passes = 0
        self._last_rebalance_pass = 0  # of the last rebalance that was not a drift's (the interval's start)
        self._last_rebalance_time = clock()
        self._planned_on: torch.Tensor | None = None  # [L, E] float64 loads of the last plan
        self._phase = Phase.IDLE
        self._record: RebalanceRecord | None = None
        self._job: PlanningJob | None = None  # rank 0's planning attempt (the latest)
        self._planner_busy = False  # rank 0: the latest attempt, timed out, still ran when this rebalance began
        self._outcome: PlanOutcome | None = None  # what it produced, checked (rank 0)
        self._scorer: planning.ScoringPlanner | None = None  # its planner, which scores the plan (rank 0)
        self._plan_started = 0.0
        self._started = 0.0  # perf_counter at the current rebalance's start
        self._charged_until = 0.0  # perf_counter up to which its serving-thread time is in stall_s
        self._target: ExpertLocation | None = None
        self._weightless_slots = 0  # slots of the rebalance's layers without weights (live at once)
        self._requested: str | None = None
        self._counts = torch.zeros(0)
        self._plan_counts = torch.zeros(0)
        self._plan_layers: list[int] | None = None  # the layers a drift rebalance plans (None: all)
        # The blocking mover moves through whatever ``self.layers_mover`` is when it moves.
        self.mover: Mover = make_mover(args, group=group, expert_weights=expert_weights,
                                       layers_mover=lambda *a, **k: self.layers_mover(*a, **k))
        # The window EPLB plans on records every pass from now on, whatever a user's dump
        # session (start/stop/dump_expert_distribution_record) does.
        recorder.keep_window_for_eplb()

    # ------------------------------------------------------------------ public

    def rebalance_now(self, trigger: str = "manual") -> None:
        """Ask for a rebalance at the next pass boundary. Every rank must ask at the same pass."""
        self._requested = trigger

    @property
    def history_dropped(self) -> int:
        """Records dropped from ``history`` (the oldest), their figures kept in ``totals``."""
        return self._history.dropped

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

    def _in_progress(self) -> RebalanceRecord:
        """The record of the rebalance in progress (set while planning and moving)."""
        if self._record is None:
            raise RuntimeError(f"EPLB manager: no rebalance in progress while {self._phase.value}")
        return self._record

    def _moving_to(self) -> ExpertLocation:
        """The placement the rebalance moves to (set from its plan's arrival to its end)."""
        if self._target is None:
            raise RuntimeError(f"EPLB manager: no target placement while {self._phase.value}")
        return self._target

    def redundancy_curve(self, max_per_gpu: int = 4) -> list:
        """Expected balancedness per pass against redundant slots (0 .. ``max_per_gpu`` per
        GPU) on the counts the last rebalance planned from (``planning.redundancy_curve``).
        Rank 0 plans, so rank 0 holds the counts; [] before the first rebalance has gathered
        them. Runs the planner once per row: call it off the serving path."""
        return planning.redundancy_curve(self._plan_counts, location=self.location, args=self.args,
                                         algorithm=self._policy.algorithm, num_groups=self.num_groups,
                                         max_per_gpu=max_per_gpu)

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
        if self._phase is Phase.MOVING and (self.ready_to_move is None or self.ready_to_move(self._moving_to())):
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
        if self._job is not None:
            self._job.cancel(self.plan_timeout_s)
        if self._planner_process is not None:
            self._planner_process.close()
        self.mover.close()

    # ------------------------------------------------------------------ triggers

    def _check_triggers(self) -> tuple[str | None, list[int] | None]:
        if self._requested is not None:
            trigger, self._requested = self._requested, None
            return trigger, None
        if triggers.interval_due(self.num_passes - self._last_rebalance_pass, self.args.eplb_rebalance_num_iterations):
            return "interval", None
        timed = self.args.eplb_rebalance_interval_s is not None
        planned_on, threshold = self._planned_on, self.args.eplb_drift_threshold
        drifting = threshold is not None and planned_on is not None
        if not triggers.checks_due(self.num_passes, self.check_every_passes, timed=timed, drifting=drifting):
            return None, None
        drifted = None
        if threshold is not None and planned_on is not None:  # drifting, spelled out for the type checker
            drifted = triggers.drifted_layers(self.recorder.logical_count_window().to("cpu", torch.float64),
                                              planned_on, threshold)
        verdict = triggers.local_verdict(elapsed_s=self.clock() - self._last_rebalance_time,
                                         interval_s=self.args.eplb_rebalance_interval_s, drifted=drifted,
                                         num_layers=self.location.num_layers)
        # Every rank runs the checks at the same pass; the max over ranks is the verdict, so a
        # rank whose clock runs ahead cannot start a rebalance alone.
        return triggers.decide(all_reduce_host(verdict, self.group, op="max"))

    # ------------------------------------------------------------------ gather + plan

    def _start(self, trigger: str, layers: list[int] | None) -> None:
        record = self._history.open(trigger, self.num_passes)
        if trigger != "drift":  # the interval and the clock are every layer's: a drift of some layers keeps them
            self._last_rebalance_pass = self.num_passes
            self._last_rebalance_time = self.clock()
        self._started = time.perf_counter()
        # A drift rebalance plans on the load since the drift: the window's last passes.
        recent = (self.args.eplb_drift_window_passes or self.check_every_passes) if trigger == "drift" else None
        logical, physical = planning.gather_window(self.recorder, self.group, per_pass=self._policy.per_pass,
                                                   last_passes=recent)
        self.recorder.eplb_window_gathered()
        record.balancedness_before = balancedness(gpu_loads(physical, self.location.ep_size))
        self._history.fill_achieved(record.balancedness_before)
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
        self._outcome = None
        self._plan_started = time.perf_counter()
        per_rebalance = self._policy.max_slots_moved  # a rate: a budget per interval, shared by its rebalances
        budget = None if per_rebalance is None else self._move_credit.grant(per_rebalance, at_pass=self.num_passes)
        # A drift rebalance plans its layers alone: a move budget is theirs, and the others keep their maps.
        self._plan_layers = None if len(record.layers) == self.location.num_layers else record.layers
        # At most one plan runs: while a timed-out plan still runs (it cannot be interrupted),
        # rank 0 starts none and _poll_plan tells every rank to skip this rebalance.
        self._planner_busy = self.rank == 0 and self._job is not None and self._job.poll() is None
        if self.rank == 0 and not self._planner_busy:
            kwargs = self._policy.plan_kwargs(self.location, num_nodes=self.args.nnodes, num_groups=self.num_groups,
                                              max_slots_moved=budget, plan_timeout_s=self.plan_timeout_s)
            counts, kwargs = planning.on_layers(self._plan_counts, kwargs, self._plan_layers)
            self._scorer = planning.ScoringPlanner(self.planner, plan_counts=self._plan_counts, live=self.location,
                                                   layers=self._plan_layers, follows_pass=self._policy.follows_pass)
            self._job = self.planning_job(self._scorer, counts, kwargs)

    def _poll_plan(self) -> None:
        status = PlanStatus.PENDING
        if self._planner_busy:
            status = PlanStatus.PLANNER_BUSY
        elif self.rank == 0 and self._job is not None:
            outcome = self._job.poll()
            if outcome is not None:  # a malformed plan would make the broadcast itself disagree
                outcome = planning.full_plan(outcome, layers=self._plan_layers, live=self.location)
            self._outcome = outcome
            timed_out = time.perf_counter() - self._plan_started > self.plan_timeout_s
            status = planning.rank0_status(outcome, timed_out=timed_out)
        status = planning.agree_on_status(status, self.group)
        if status is PlanStatus.PENDING:
            return
        record = self._in_progress()
        if status is PlanStatus.PLANNER_BUSY:
            return self._skip(record, PLANNER_BUSY_REASON)
        record.solver_s = time.perf_counter() - self._plan_started
        if status is PlanStatus.FAILED:
            cause = self._outcome.error if self._outcome is not None else None
            message = planning.failure_message(cause, rank=self.rank, plan_timeout_s=self.plan_timeout_s)
            self._fail(record, RebalanceError(f"rebalance {record.index}: {message}; keeping the old placement"), cause)
        self._receive_plan()

    def _receive_plan(self) -> None:
        loc, record = self.location, self._in_progress()
        placement = self._outcome.placement if self.rank == 0 and self._outcome is not None else None
        predicted = self._scorer.predicted if self._scorer is not None else float("nan")
        plan = planning.broadcast_plan(placement, shape=(loc.num_layers, loc.num_physical_experts), group=self.group,
                                       predicted=predicted)
        target = targets.target_maps(loc, record.layers, plan.physical_to_logical_map, plan.replica_weights)
        # Layers whose map changes move weights; a change of replica weights alone goes live now.
        record.layers = target.changed
        try:  # every rank validates the plan it received (the same bytes: the same verdict)
            self._target = target_location = target.location(loc, source=f"rebalance {record.index} plan")
        except PlacementError as exc:  # nothing moved: the old placement stays
            self._fail(record, RebalanceError(f"rebalance {record.index}: invalid plan: {exc}; "
                                              "keeping the old placement"), exc)
        if self._policy.max_slots_moved is not None:
            self._move_credit.spend(targets.slots_changed(loc.physical_to_logical_map,
                                                          target_location.physical_to_logical_map))
        record.balancedness_predicted = plan.predicted  # scored by rank 0's planning thread
        if self._planned_on is None or self._plan_layers is None:
            self._planned_on = self._counts.clone()
        else:  # the other layers' drift stays measured from the load they were planned on
            self._planned_on[self._plan_layers] = self._counts[self._plan_layers]
        # Layers without routed experts (dense layers: no weight tensors) move nothing: their
        # new map goes live now, with the reweighted ones.
        weightless = [layer for layer in record.layers if not self.expert_weights[layer]]
        moving = [layer for layer in record.layers if self.expert_weights[layer]]
        self._weightless_slots = sum(targets.slots_changed(target.physical_to_logical_map[layer],
                                                           loc.physical_to_logical_map[layer]) for layer in weightless)
        record.slots_moved += self._weightless_slots
        self._go_live({layer: target.physical_to_logical_map[layer] for layer in target.reweighted + weightless})
        self._enter(Phase.MOVING)
        try:
            record.transport = self.mover.start(moving, live_map=self.location.physical_to_logical_map,
                                                target_map=target_location.physical_to_logical_map)
        except (ConfigError, TransferError) as exc:  # nothing moved: the old placement stays
            self._fail(record, RebalanceError(f"rebalance {record.index}: the move could not start: {exc}"), exc)
        logger.info(
            "EPLB rebalance %d (%s): solver %.3f s, %d layers to move, balancedness %.4f -> %.4f predicted",
            record.index, record.trigger, record.solver_s, len(record.layers),
            record.balancedness_before, record.balancedness_predicted,
        )

    # ------------------------------------------------------------------ move

    def _move_chunk(self) -> None:
        record = self._in_progress()
        step = self.mover.step(self.args.eplb_rebalance_layers_per_chunk)
        self._go_live(step.live)
        record.slots_moved = self._weightless_slots + self.mover.slots_moved
        record.bytes_moved = self.mover.bytes_moved
        if step.error is not None:
            self._fail(record, RebalanceError(f"rebalance {record.index}: {step.failure}: {step.error}"), step.error)
        if step.done:
            self._finish(record)

    def _go_live(self, live: dict[int, torch.Tensor]) -> None:
        """Make the given layers' maps ([P] each, matching weights that have landed on every
        rank) live, at a pass boundary; tell the recorder and the host."""
        if not live:
            return
        self.location = targets.live_location(self.location, self._moving_to(), live)
        new_map = self.location.physical_to_logical_map
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
        if self._phase is not Phase.IDLE:  # skipped while planning
            self._enter(Phase.IDLE)
        self._record = None
        logger.info("EPLB rebalance %d skipped: %s (stall %.3f s)", record.index, why, record.stall_s)
        self._export(record)

    def _fail(self, record: RebalanceRecord, error: RebalanceError, cause: BaseException | None) -> NoReturn:
        record.error = str(error)
        self._end(record)
        if self._phase is not Phase.IDLE:  # a rebalance that failed before planning never left idle
            self._enter(Phase.IDLE)
        self._target, self._record = None, None
        logger.error("%s", error)
        self._export(record)
        raise error from cause

    def _export(self, record: RebalanceRecord) -> None:
        if self.metrics is not None:
            self.metrics.observe_rebalance(record)


