"""Planning a rebalance: the window every rank plans from, one job per attempt behind the
``PlanningJob`` protocol, and the collectives by which every rank learns rank 0's verdict
and plan.

Only rank 0 plans. ``ThreadPlanningJob`` runs the planner in a daemon thread, so serving never
waits for the solver; the planner may itself be a ``planner_process.PlannerProcess``, whose
worker process then plans while the thread waits on it without holding the GIL. A fresh job
per attempt: a planner that timed out and finishes late writes into its own, abandoned job,
never into a later one; while it runs the manager starts no other (``PlanStatus.PLANNER_BUSY``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from eplb_plugin.algorithms import Placement
from eplb_plugin.args import EPLBArgs
from eplb_plugin.balance import balancedness, placement_balancedness
from eplb_plugin.comm import all_reduce_host, broadcast_host
from eplb_plugin.dispatch_info import follows_pass as dispatch_follows_pass
from eplb_plugin.errors import ConfigError, PlacementError
from eplb_plugin.executor.staging import expert_bytes
from eplb_plugin.location import ExpertLocation
from eplb_plugin.manager.protocols import LoadWindow, Planner
from eplb_plugin.manager.records import MIB
from eplb_plugin.manager.targets import check_plan_shape, plan_passes
from eplb_plugin.maps import checked_replica_count

PLAN_TIME_SHARE = 0.7  # of the plan timeout, what an anytime policy's search may take (the rest: scoring it)


@dataclass(frozen=True)
class PolicyChoice:
    """What the planner is asked, resolved once from the flags.

    algorithm: the placement policy ``--eplb-algorithm`` resolves to; split: how the host's
    dispatch splits an expert's tokens over its replicas; per_pass: the policy plans from the
    window's passes ([B, L, E]) instead of their sum; max_slots_moved: ``--eplb-move-budget-mb``
    in slots, the one figure of the budget per rebalance that ``MoveCredit.grant`` adds (None:
    no budget); follows_pass: the dispatch splits each pass itself (minmax), so a plan is
    scored pass by pass (``predicted_balancedness``); anytime: the policy's search stops at a
    time limit with its best map so far (``Policy.anytime``), so a plan is asked to finish
    within ``PLAN_TIME_SHARE`` of the plan timeout instead of running past it; dispatch: the
    ``--ep-dispatch-algorithm`` that serves the plans (a per-pass policy scores passes under it)."""

    algorithm: str
    split: str
    per_pass: bool
    max_slots_moved: int | None
    follows_pass: bool
    anytime: bool = False
    dispatch: str | None = None

    @classmethod
    def resolve(cls, args: EPLBArgs, *, expert_weights: Sequence[Sequence[torch.Tensor]],
                num_groups: int | None = None) -> PolicyChoice:
        """ConfigError for an unknown policy, a move budget the policy cannot take or one below one
        expert. num_groups: the model's expert groups (what ``auto`` picks by)."""
        # Import the policies now: an import inside the planning thread would hold the GIL and
        # stall serving at the first rebalance.
        import scipy.optimize  # noqa: F401  (imported lazily by the migration-aware policies)

        from eplb_plugin.algorithms import PER_PASS_POLICIES, POLICIES, split_for_dispatch

        algorithm, dispatch = args.policy(num_groups), args.ep_dispatch_algorithm
        return cls(algorithm=algorithm, split=split_for_dispatch(dispatch), per_pass=algorithm in PER_PASS_POLICIES,
                   max_slots_moved=move_budget_slots(args.eplb_move_budget_mb, expert_weights=expert_weights),
                   follows_pass=dispatch is not None and dispatch_follows_pass(dispatch),
                   anytime=POLICIES.get(algorithm).anytime,
                   dispatch=dispatch)

    def plan_kwargs(self, live: ExpertLocation, *, num_nodes: int, num_groups: int | None,
                    max_slots_moved: int | None = None, plan_timeout_s: float | None = None) -> dict[str, Any]:
        """The planner's keyword arguments for a plan from the ``live`` ExpertLocation;
        max_slots_moved: this plan's move budget (the credit granted; default: the budget per
        rebalance); plan_timeout_s: the manager's plan timeout (an anytime policy is given
        ``PLAN_TIME_SHARE`` of it as ``time_limit_s``, the rest left for scoring the plan)."""
        slots = self.max_slots_moved if max_slots_moved is None else max_slots_moved
        extra: dict[str, Any] = {} if slots is None else {"max_slots_moved": slots}
        if self.anytime and plan_timeout_s is not None:
            extra["time_limit_s"] = PLAN_TIME_SHARE * plan_timeout_s
        return dict(num_physical_experts=live.num_physical_experts, num_gpus=live.ep_size, num_nodes=num_nodes,
                    num_groups=num_groups, algorithm=self.algorithm, split=self.split,
                    previous=live.physical_to_logical_map, dispatch=self.dispatch, **extra)


@dataclass
class MoveCredit:
    """The move budget's account across rebalances, in slots: each plan is granted one
    rebalance's budget more (``grant(per_rebalance)``; the manager's is
    ``PolicyChoice.max_slots_moved``), unused slots carry over up to ``1 + carry`` budgets
    (``--eplb-move-budget-carry``), and the slots a plan changes are spent, so the average
    per rebalance stays within the budget while one rebalance can follow a shift in traffic
    with the budget saved before it. A grant made ``at_pass`` is a rate: the share of the
    ``interval`` passes since the last grant (at most one budget), so the budget is one per
    interval however many rebalances (interval, drift, manual) share it: a drift rebalance
    between two interval ones takes its share from the next."""

    carry: int
    interval: int = 1  # passes per whole budget (--eplb-rebalance-num-iterations)
    balance: int = 0
    last_grant_pass: int = 0

    def grant(self, per_rebalance: int, at_pass: int | None = None) -> int:
        """Add one rebalance's budget of ``per_rebalance`` slots, or its share of the passes
        since the last grant when ``at_pass`` is given (at most ``1 + carry`` budgets kept);
        the slots the next plan may move."""
        share = 1.0
        if at_pass is not None:
            share = min(1.0, max(0, at_pass - self.last_grant_pass) / max(1, self.interval))
            self.last_grant_pass = at_pass
        self.balance = min(self.balance + round(share * per_rebalance), (1 + self.carry) * per_rebalance)
        return self.balance

    def spend(self, slots: int) -> None:
        """A plan that changes ``slots`` slots was accepted."""
        self.balance = max(0, self.balance - slots)


class PlanOutcome(NamedTuple):
    """What a finished planning job produced: the planner's Placement, or the error it raised."""

    placement: Any
    error: BaseException | None

    def checked(self, *, num_layers: int, num_physical_experts: int) -> PlanOutcome:
        """This outcome, or a failed one where the placement is malformed (``check_plan_shape``)."""
        if self.error is not None:
            return self
        error = check_plan_shape(self.placement, num_layers=num_layers, num_physical_experts=num_physical_experts)
        return self if error is None else PlanOutcome(None, error)

    def on_all_layers(self, layers: list[int] | None, live: ExpertLocation) -> PlanOutcome:
        """A checked plan of ``layers`` alone (``on_layers``) as a plan of every layer: the
        others keep ``live``'s maps and weights. layers None: this outcome as it is."""
        if self.error is not None or layers is None:
            return self
        rows = torch.as_tensor(layers)
        full = live.physical_to_logical_map.clone()
        full[rows] = self.placement.physical_to_logical_map.to(full.dtype).cpu()
        weights = self.placement.replica_weights
        if weights is not None:
            weights, planned = live.effective_replica_weights().clone(), weights
            weights[rows] = planned.to(weights.dtype).cpu()
        return PlanOutcome(Placement(full, weights, slots_moved=getattr(self.placement, "slots_moved", None),
                                     solver_seconds=getattr(self.placement, "solver_seconds", 0.0)), None)


def full_plan(outcome: PlanOutcome, *, layers: list[int] | None, live: ExpertLocation) -> PlanOutcome:
    """A finished attempt's outcome, checked (``PlanOutcome.checked``) and, for a plan of
    ``layers`` alone, as a plan of every layer (``PlanOutcome.on_all_layers``)."""
    planned = live.num_layers if layers is None else len(layers)
    checked = outcome.checked(num_layers=planned, num_physical_experts=live.num_physical_experts)
    return checked.on_all_layers(layers, live)


def predicted_balancedness(plan_counts: torch.Tensor, placement: Any, *, num_gpus: int, follows_pass: bool) -> float:
    """The balancedness ``placement`` should reach on the window it was planned from, measured
    as the window's own figure is: GPU loads summed over the window, mean/max per layer, mean
    over layers.

    plan_counts: [L, E], or [B, L, E] (the window's passes, consecutive ones summed).
    follows_pass: the dispatch splits each pass itself (minmax): each row of [B, L, E] (the
    window as one row for [L, E]) is split as minmax would (``evaluate.minmax_gpu_loads``);
    otherwise the window's sum splits by the placement's replica weights, or equally.
    """
    if not follows_pass:
        counts = plan_counts.sum(0) if plan_counts.dim() == 3 else plan_counts
        return placement_balancedness(counts, placement.physical_to_logical_map, num_gpus, placement.replica_weights)
    from eplb_plugin.algorithms.evaluate import minmax_gpu_loads

    passes = plan_counts if plan_counts.dim() == 3 else plan_counts[None]
    loads = minmax_gpu_loads(passes.numpy(), placement.physical_to_logical_map.numpy(), num_gpus=num_gpus)
    return balancedness(torch.from_numpy(loads.sum(0)))


class ScoringPlanner:
    """``planner``, then ``predicted_balancedness`` of its plan, in the planning thread (rank 0):
    scoring a per-pass plan under minmax replays the window's passes (seconds at DeepSeek-V3
    sizes), too long for the serving thread. One per attempt, like its job, so a late plan
    scores into its own, abandoned instance.

    plan_counts: the window the plan is scored on ([L, E] or [B, L, E], every layer); live:
    the placement serving while it plans; layers: the layers it plans (None: all).
    ``predicted``: NaN until a well-formed plan was scored (a malformed one is the manager's
    to report)."""

    def __init__(self, planner: Planner, *, plan_counts: torch.Tensor, live: ExpertLocation,
                 layers: list[int] | None, follows_pass: bool):
        self.planner, self.plan_counts, self.live, self.layers = planner, plan_counts, live, layers
        self.follows_pass = follows_pass
        self.predicted = float("nan")

    def __call__(self, counts: torch.Tensor, **kwargs: Any) -> Any:
        placement = self.planner(counts, **kwargs)
        outcome = full_plan(PlanOutcome(placement, None), layers=self.layers, live=self.live)
        if outcome.error is None:  # well-formed: integer ids of the right shape (PlanOutcome.checked)
            try:  # a plan with ids out of range or an expert missing is the manager's to refuse
                checked_replica_count(outcome.placement.physical_to_logical_map.long(), self.live.num_logical_experts,
                                      "plan")
            except PlacementError:
                return placement
            self.predicted = predicted_balancedness(self.plan_counts, outcome.placement,
                                                    num_gpus=self.live.ep_size, follows_pass=self.follows_pass)
        return placement


def on_layers(counts: torch.Tensor, kwargs: dict[str, Any], layers: list[int] | None,
              ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The planner's input for a plan of ``layers`` alone (a drift rebalance): the counts
    ([L, E] or [B, L, E]) and the live map (``previous``) of those layers, so that a move
    budget is spent on them. layers None: every layer, the input as it is."""
    if layers is None:
        return counts, kwargs
    rows = torch.as_tensor(layers)
    return counts.index_select(-2, rows), {**kwargs, "previous": kwargs["previous"][rows]}


@runtime_checkable
class PlanningJob(Protocol):
    """One planning attempt, started when it is built (see ``PlanningJobFactory``)."""

    def poll(self) -> PlanOutcome | None:
        """None while the plan runs; then its outcome (the same at every call). Never blocks."""
        ...

    def cancel(self, wait_s: float) -> None:
        """Abandon the attempt; wait at most ``wait_s`` for work that cannot be interrupted."""
        ...


class PlanningJobFactory(Protocol):
    """Starts a job that runs ``planner(counts, **kwargs)``."""

    def __call__(self, planner: Planner, counts: torch.Tensor, kwargs: dict[str, Any]) -> PlanningJob: ...


class ThreadPlanningJob:
    """A planning attempt in a daemon thread (a ``PlanningJobFactory`` as its constructor).

    A planner's exception is stored and handed to the serving thread by ``poll``, never only
    logged."""

    def __init__(self, planner: Planner, counts: torch.Tensor, kwargs: dict[str, Any]):
        self._outcome: PlanOutcome | None = None
        self._thread = threading.Thread(target=self._run, args=(planner, counts, kwargs), name="eplb-planner",
                                        daemon=True)
        self._thread.start()

    def _run(self, planner: Planner, counts: torch.Tensor, kwargs: dict[str, Any]) -> None:
        try:
            placement = planner(counts, **kwargs)
        except BaseException as exc:  # stored and re-raised on the serving thread
            self._outcome = PlanOutcome(None, exc)
            return
        self._outcome = PlanOutcome(placement, None)

    def poll(self) -> PlanOutcome | None:
        return self._outcome

    def cancel(self, wait_s: float) -> None:
        """A running planner cannot be interrupted: wait for it at most ``wait_s`` seconds."""
        self._thread.join(timeout=wait_s)


def default_planner(counts: torch.Tensor, **kwargs: Any) -> Any:
    """``algorithms.plan`` (imported when first called)."""
    from eplb_plugin.algorithms import plan

    return plan(counts, **kwargs)


class PlanStatus(IntEnum):
    """Rank 0's verdict on the plan in progress, broadcast to every rank each pass."""

    PENDING = 0
    READY = 1
    FAILED = 2
    PLANNER_BUSY = 3  # no plan started: an earlier one, past its timeout, still runs (skip)


def rank0_status(outcome: PlanOutcome | None, *, timed_out: bool) -> PlanStatus:
    """Rank 0's verdict: ready once a plan came without error, failed once one came with an
    error or the timeout passed first, else pending."""
    if outcome is not None and outcome.error is None:
        return PlanStatus.READY
    if outcome is not None or timed_out:
        return PlanStatus.FAILED
    return PlanStatus.PENDING


def failure_message(cause: BaseException | None, *, rank: int, plan_timeout_s: float) -> str:
    """Why planning failed, as this rank knows it (rank 0 holds the cause; None: timed out)."""
    if rank != 0:
        return "planning failed on rank 0"
    if cause is None:
        return f"planning took longer than {plan_timeout_s} s"
    return f"planning failed on rank 0 ({cause!r})"


def agree_on_status(status: PlanStatus, group: Any) -> PlanStatus:
    """Rank 0's status on every rank. Collective: every rank calls it at the same pass."""
    return PlanStatus(int(broadcast_host(torch.tensor([int(status)], dtype=torch.int64), group)[0]))


class ReceivedPlan(NamedTuple):
    """Rank 0's plan as every rank receives it: the map [L, P] int64, the replica weights
    [L, P] float32 (None: equal split) and its predicted balancedness (NaN: not scored)."""

    physical_to_logical_map: torch.Tensor
    replica_weights: torch.Tensor | None
    predicted: float


def broadcast_plan(placement: Any, *, shape: tuple[int, int], group: Any,
                   predicted: float = float("nan")) -> ReceivedPlan:
    """Rank 0's plan and its predicted balancedness on every rank.

    placement: rank 0's checked Placement (None on the other ranks). Collective: every rank
    calls it at the same pass; rank 0's plan is the plan, so every rank moves the same
    experts to the same slots."""
    new_map = torch.zeros(shape, dtype=torch.int64)
    weights = torch.zeros(shape, dtype=torch.float32)
    extras = torch.tensor([0.0, predicted], dtype=torch.float64)  # (has replica weights, predicted)
    if placement is not None:
        new_map = placement.physical_to_logical_map.to(torch.int64).cpu()
        if placement.replica_weights is not None:
            weights = placement.replica_weights.to(torch.float32).cpu()
            extras[0] = 1.0
    new_map = broadcast_host(new_map, group)
    weights = broadcast_host(weights, group)
    extras = broadcast_host(extras, group)
    return ReceivedPlan(new_map, weights if extras[0] else None, float(extras[1]))


def gather_window(window: LoadWindow, group: Any, *, per_pass: bool,
                  last_passes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The load window summed over ranks, float64 on CPU: (logical counts, [L, E], or
    [B, L, E] with ``per_pass``: the window's passes in at most MAX_PLAN_PASSES buckets;
    physical counts, [L, P]). last_passes: the logical counts of the window's last passes
    only (all it has, if fewer); the physical counts stay the whole window's. Collective:
    every rank calls it at the same pass, and then plans from (and checks) the same counts."""
    if per_pass or last_passes is not None:
        passes = window.logical_count_passes()
        if last_passes is not None:
            passes = passes[-last_passes:]
        passes = passes.to("cpu", torch.float64)  # (the passes kept only)
        logical = plan_passes(passes) if per_pass else passes.sum(0)
    else:
        logical = window.logical_count_window().to("cpu", torch.float64)
    physical = window.physical_count_window().to("cpu", torch.float64)
    summed = all_reduce_host(torch.cat([logical.flatten(), physical.flatten()]), group)
    return summed[: logical.numel()].view_as(logical), summed[logical.numel():].view_as(physical)


def move_budget_slots(budget_mb: float | None, *, expert_weights: Sequence[Sequence[torch.Tensor]]) -> int | None:
    """--eplb-move-budget-mb as slots per rebalance (the budget over one expert's bytes in
    the first layer that holds expert weights; a model's MoE layers share expert sizes);
    None without a budget or without expert weights. ConfigError for a budget below one
    expert (``EPLBArgs.policy`` refuses a policy that takes no budget)."""
    if budget_mb is None:
        return None
    slot_bytes = next((expert_bytes(layer) for layer in expert_weights if layer), 0)
    if slot_bytes == 0:  # no layer holds expert weights here: nothing ever moves
        return None
    slots = int(budget_mb * MIB // slot_bytes)
    if slots < 1:
        raise ConfigError(f"--eplb-move-budget-mb {budget_mb} is below one expert's weights "
                          f"({slot_bytes / MIB:.3f} MiB): no slot could ever move")
    return slots


def redundancy_curve(plan_counts: torch.Tensor, *, location: ExpertLocation, args: EPLBArgs, algorithm: str,
                     num_groups: int | None, max_per_gpu: int) -> list:
    """Expected balancedness per pass against redundant slots (0 .. ``max_per_gpu`` per
    GPU), planned with ``algorithm`` for ``args``' dispatch on ``plan_counts`` ([L, E], or
    [B, L, E] for per-pass policies, whose passes score held out: ``algorithms.sizing``);
    [] for empty counts."""
    from eplb_plugin.algorithms.sizing import redundancy_curve as curve
    from eplb_plugin.algorithms.sizing import redundant_choices

    if plan_counts.numel() == 0:
        return []
    num_logical, num_gpus = location.num_logical_experts, location.ep_size
    return curve(plan_counts.numpy(), num_gpus=num_gpus,
                 redundant=redundant_choices(num_logical, num_gpus, max_per_gpu * num_gpus),
                 dispatch=args.ep_dispatch_algorithm or "static", algorithm=algorithm,
                 num_nodes=args.nnodes, num_groups=num_groups)
