"""Placement policies: pure functions from load counts to a placement.

Public API::

    plan(logical_count, *, num_physical_experts, num_gpus, num_nodes=1, num_groups=None,
         algorithm="eplb_plugin", previous=None) -> Placement
    rebalance_experts(tokens_per_expert, num_physical_experts, num_local_physical_experts,
                      num_groups, num_nodes, algorithm) -> (phy2log, log2phy, replica_count)

``rebalance_experts`` has SGLang 0.5.23's signature and return tuple, so SGLang can call it
unchanged (``--eplb-algorithm eplb_plugin``).

``auto`` is SGLang's name and keeps SGLang's meaning wherever a policy is named (its
``compute_algorithm``): ``deepseek_hierarchical`` where the model's expert groups divide over
the nodes, else ``deepseek``. The project's default policy goes by its own name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from ..balance import gpu_loads
from ..counts import checked_count_values
from ..dispatch_info import DISPATCH_INFO, follows_pass
from ..errors import ConfigError, CountsError, PlacementError
from ..maps import (
    checked_replica_count,
    compute_logical_to_physical_map,
    integer_map_ids,
    replica_count,
)
from ..registry import Registry
from .balanced import plan_balanced, replica_weights
from .deepseek import deepseek
from .deepseek_vec import deepseek_vec
from .migrate import align_to_previous, plan_migration_aware
from .names import AUTO, DEFAULT_ALGORITHM, auto_algorithm
from .nodes import cross_node_share, plan_node_aware
from .perpass import plan_within_budget, refine_for_minmax


@dataclass(frozen=True)
class Placement:
    """A planned placement.

    physical_to_logical_map: [L, P] int64, logical expert held by each slot (rank-major).
    replica_weights: [L, P] float32, share of its expert's tokens each slot should get
        (the shares of one expert's slots sum to 1); None = equal split.
    slots_moved: slots whose expert differs from ``previous`` (None without previous).
    solver_seconds: wall time of the planner.
    cross_node_share: share of token traffic sent to another node, tokens originating
        uniformly over nodes and served on their own node where a replica is there
        (None with one node).
    """

    physical_to_logical_map: torch.Tensor
    replica_weights: torch.Tensor | None
    slots_moved: int | None = None
    solver_seconds: float = 0.0
    cross_node_share: float | None = None

    def replica_count(self, num_logical: int) -> torch.Tensor:
        """[L, E] int64 replicas per logical expert."""
        return replica_count(self.physical_to_logical_map, num_logical)


# Step functions: (weight [L, E] float64, P, G, nodes, groups, previous map | None, per_pass
# [B, L, E] | None) -> (map, weights | None)
PolicyFn = Callable[..., "tuple[np.ndarray, np.ndarray | None]"]


def _deepseek(weight, num_physical, *, num_gpus, num_nodes, num_groups, previous, per_pass=None, split="equal"):
    return deepseek(weight, num_physical, num_gpus=num_gpus), None


def _deepseek_hierarchical(weight, num_physical, *, num_gpus, num_nodes, num_groups, previous, per_pass=None, split="equal"):
    phy2log = deepseek(
        weight, num_physical, num_gpus=num_gpus, num_nodes=num_nodes, num_groups=num_groups, hierarchical=True
    )
    return phy2log, None


def _fresh(weight, num_physical, *, num_gpus, num_nodes, num_groups, with_weights):
    """Flat plan; with several nodes, node-aware (``nodes.plan_node_aware``)."""
    phy2log, weights, peak = plan_balanced(weight, num_physical, num_gpus=num_gpus, with_weights=with_weights)
    if num_nodes == 1:
        return phy2log, weights
    if peak is None:  # planned with replica weights: the peak under them (the planner gives the equal-split one)
        assert weights is not None
        peak = gpu_loads(np.take_along_axis(weight, phy2log, 1) * weights, num_gpus).max(1)
    phy2log, perm, hier = plan_node_aware(weight, phy2log, peak, num_physical,
                                          num_gpus=num_gpus, num_nodes=num_nodes, num_groups=num_groups)
    if weights is not None:
        weights = np.take_along_axis(weights, perm, axis=1)
        if hier.any():
            weights[hier] = replica_weights(weight[hier], phy2log[hier], num_gpus)
    return phy2log, weights


def _ours(weight, num_physical, *, num_gpus, num_nodes, num_groups, previous, per_pass=None, split="equal"):
    weighted = split != "equal"  # a weighted split: the plan carries replica weights
    if previous is not None:
        return plan_migration_aware(weight, previous, num_gpus=num_gpus, with_weights=weighted)
    return _fresh(weight, num_physical, num_gpus=num_gpus, num_nodes=num_nodes, num_groups=num_groups,
                  with_weights=weighted)


def _ours_equal(weight, num_physical, *, num_gpus, num_nodes, num_groups, previous, per_pass=None, split="equal"):
    """The earlier spelling of ``eplb_plugin`` with ``split="equal"`` (kept for old flags)."""
    return _ours(weight, num_physical, num_gpus=num_gpus, num_nodes=num_nodes, num_groups=num_groups,
                 previous=previous)


def _deepseek_vec(weight, num_physical, *, num_gpus, num_nodes, num_groups, previous, per_pass=None, split="equal"):
    return deepseek_vec(weight[None] if per_pass is None else per_pass, num_physical, num_gpus=num_gpus), None


def _ours_perpass(weight, num_physical, *, num_gpus, num_nodes, num_groups, previous, per_pass=None, split="equal",
                  max_moves=None, deadline=None, follows_pass=True):
    fresh, _ = _ours_equal(weight, num_physical, num_gpus=num_gpus, num_nodes=num_nodes, num_groups=num_groups,
                           previous=previous)
    window = weight[None] if per_pass is None else per_pass
    if previous is not None and max_moves is not None:  # stale layers only, within the budget
        planned = plan_within_budget(fresh, previous, window, num_gpus=num_gpus, num_nodes=num_nodes,
                                     max_moves=max_moves, deadline=deadline, follows_pass=follows_pass)
    else:
        planned = refine_for_minmax(fresh, window, num_gpus=num_gpus, num_nodes=num_nodes, deadline=deadline,
                                    follows_pass=follows_pass)
    # GPUs relabelled and slots reordered to keep live slots: the same loads, fewer moves
    return (planned if previous is None else align_to_previous(planned, previous, num_gpus=num_gpus)), None


def _groups_always(num_groups: int, num_nodes: int) -> bool:
    return True


def _groups_never(num_groups: int, num_nodes: int) -> bool:
    return False


def _groups_over_nodes(num_groups: int, num_nodes: int) -> bool:
    """DeepSeek's hierarchical recipe packs groups per node where they divide over the nodes,
    and falls back to its global form (no groups) otherwise."""
    return num_groups % num_nodes == 0


@dataclass(frozen=True)
class Policy:
    """A placement policy. plan: its step function (signature above); per_pass: plans from
    the window's per-pass counts [B, L, E] (the others from their sum); sglang_has_it: stock
    SGLang implements a policy of this name itself (the plugin routes only the others to
    this planner); suits: which host it suits, for ``eplb <cmd> --help``; uses_groups:
    whether it plans with ``num_groups`` expert groups over ``num_nodes`` nodes (groups that
    do not divide the experts are refused only then, as DeepSeek's recipe refuses them)."""

    name: str
    plan: PolicyFn
    suits: str
    per_pass: bool = False
    sglang_has_it: bool = False
    move_budget: bool = False  # honours plan(max_slots_moved=) (its step function takes max_moves=)
    anytime: bool = False  # honours plan(time_limit_s=): a search that stops at a deadline (its step takes deadline=)
    for_dispatch: bool = False  # honours plan(dispatch=): scores passes under that dispatch (its step takes follows_pass=)
    uses_groups: Callable[[int, int], bool] = _groups_always


POLICIES: Registry[Policy] = Registry("placement policy")
POLICIES.register(Policy(
    "eplb_plugin", _ours,
    "the project's policy: balanced replicas, node-aware with --nodes > 1, few moves when replanning; planned "
    "for --split (equal by default; weighted adds replica weights for the runtime's weighted dispatch); for "
    "SGLang with the plugin and for the reference runtime"))
POLICIES.register(Policy(
    "eplb_plugin_equal", _ours_equal, "the earlier spelling of eplb_plugin with an equal split, whatever --split says"))
POLICIES.register(Policy(
    "eplb_plugin_perpass", _ours_perpass,
    "the project's per-pass policy: planned on the window's passes (a [B, L, E] input) for the dispatch that "
    "will run (minmax by default; static and the other even spreads too), moves more slots unless given a move "
    "budget; for the reference runtime", per_pass=True, move_budget=True, anytime=True, for_dispatch=True))
POLICIES.register(Policy(
    "deepseek", _deepseek, "DeepSeek's EPLB recipe, global (SGLang's --eplb-algorithm deepseek); for stock SGLang",
    sglang_has_it=True, uses_groups=_groups_never))
POLICIES.register(Policy(
    "deepseek_hierarchical", _deepseek_hierarchical,
    "DeepSeek's hierarchical recipe: group-limited routing (--groups) packed per node (--nodes); for stock SGLang "
    "on several nodes", sglang_has_it=True, uses_groups=_groups_over_nodes))
POLICIES.register(Policy(
    "deepseek_vec", _deepseek_vec,
    "SGLang's time-resolved recipe, planned on the window's passes (SGLang's --eplb-algorithm deepseek_vec); for "
    "stock SGLang", per_pass=True, sglang_has_it=True, uses_groups=_groups_never))
# Views of the registry, for callers that read them by these names.
ALGORITHMS: dict[str, PolicyFn] = {policy.name: policy.plan for policy in POLICIES.entries()}
PER_PASS_POLICIES = frozenset(policy.name for policy in POLICIES.entries() if policy.per_pass)
Split = Literal["equal", "weighted"]
SPLITS: tuple[str, ...] = get_args(Split)


def check_move_budget(name: str, *, what: str, who: str) -> None:
    """ConfigError unless the policy ``name`` takes a move budget (``Policy.move_budget``):
    ``what`` names the budget given, ``who`` the setting that chose the policy."""
    if not POLICIES.get(name).move_budget:
        takes = [p.name for p in POLICIES.entries() if p.move_budget]
        raise ConfigError(f"{what} needs a policy that takes a move budget: {who} resolves to {name!r}, which does "
                          f"not take a move budget; policies that do: {takes}")


def split_for_dispatch(dispatch: str | None) -> Split:
    """The replica split a placement should be planned for under ``dispatch``: "weighted"
    only where the dispatch honours replica weights (``DispatchInfo``); "equal" otherwise,
    unset included (stock SGLang splits equally, and minmax follows each pass around an
    equal-split plan: a weighted map concentrates replicas and leaves the pass's split no room)."""
    info = DISPATCH_INFO.get(dispatch) if dispatch is not None and dispatch in DISPATCH_INFO else None  # SGLang's lp / fake: equal
    return "weighted" if info is not None and info.honours_replica_weights else "equal"


def resolve_algorithm(algorithm, *, num_groups: int | None = None, num_nodes: int = 1) -> str:
    """The registered policy name for ``algorithm`` (SGLang's enum accepted); ConfigError naming
    the known ones. ``auto`` is what SGLang's ``compute_algorithm`` picks for the model's expert
    groups and the nodes: ``deepseek_hierarchical`` where the groups divide over the nodes,
    else ``deepseek``."""
    name = getattr(algorithm, "name", algorithm)  # SGLang passes an enum
    if not isinstance(name, str):
        raise ConfigError(f"algorithm={algorithm!r} must be a name; known: auto, {', '.join(POLICIES)}")
    if name == AUTO:
        return auto_algorithm(num_groups, num_nodes)
    if name not in POLICIES:
        raise ConfigError(f"unknown algorithm {name!r}; known: auto, {', '.join(POLICIES)}")
    return name


def _count_tensor(logical_count) -> torch.Tensor:
    """Counts as given (a tensor, a numpy array or nested lists) -> a tensor whose values can
    be read; CountsError naming the dtype or device for counts that hold no numbers."""
    if isinstance(logical_count, torch.Tensor):
        if logical_count.is_meta:
            raise CountsError(f"logical_count is on the {logical_count.device} device, which holds no values; "
                              "pass counts on the CPU or a GPU")
        return logical_count
    try:
        array = np.asarray(logical_count)
    except ValueError as exc:  # ragged nested lists
        raise CountsError(f"logical_count cannot be read as an array of numbers ({exc})") from exc
    if array.dtype.kind not in "biuf":
        raise CountsError(f"logical_count has dtype {array.dtype}; expected real numbers")
    return torch.from_numpy(array if array.dtype.kind == "b" else array.astype(np.float64))


def _validate_counts(logical_count) -> np.ndarray:
    """[L, E] or [B, L, E] finite, non-negative counts as float64 (shape kept)."""
    counts = _count_tensor(logical_count)
    if counts.dim() not in (2, 3) or 0 in counts.shape:
        raise CountsError(f"logical_count has shape {tuple(counts.shape)}; expected [L, E] or [B, L, E]")
    return checked_count_values(counts).numpy()


def _validate_shape(num_logical, num_physical, num_gpus, num_nodes, num_groups, policy: Policy) -> None:
    sizes = {"num_physical_experts": num_physical, "num_gpus": num_gpus, "num_nodes": num_nodes,
             "num_groups": num_groups}
    for name, value in sizes.items():
        if not (value is None and name == "num_groups") and (
                isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise ConfigError(f"{name}={value!r} must be an int")
    if num_gpus <= 0 or num_nodes <= 0:
        raise ConfigError(f"num_gpus={num_gpus} and num_nodes={num_nodes} must be positive")
    if num_physical < num_logical:
        raise ConfigError(f"num_physical_experts={num_physical} is below the {num_logical} logical experts")
    if num_gpus > num_physical:
        raise ConfigError(f"num_gpus={num_gpus} exceeds num_physical_experts={num_physical}; every GPU needs a slot")
    if num_physical % num_gpus:
        raise ConfigError(f"num_physical_experts={num_physical} is not divisible by num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ConfigError(f"num_gpus={num_gpus} is not divisible by num_nodes={num_nodes}")
    if num_groups is not None and num_groups <= 0:
        raise ConfigError(f"num_groups={num_groups} must be positive")
    if num_groups is not None and num_logical % num_groups and policy.uses_groups(num_groups, num_nodes):
        raise ConfigError(f"num_groups={num_groups} does not divide the {num_logical} logical experts")


def _previous_map(previous, shape: tuple[int, int], num_logical: int) -> np.ndarray | None:
    """The previous placement's map as int64 [L, P], checked as a live placement is: integer
    ids of this plan's experts, every expert with a slot in every layer (PlacementError)."""
    if previous is None:
        return None
    phy2log = previous.physical_to_logical_map if isinstance(previous, Placement) else previous
    phy2log = integer_map_ids(torch.as_tensor(phy2log), "previous map")
    if tuple(phy2log.shape) != shape:
        raise PlacementError(f"previous map has shape {tuple(phy2log.shape)}; expected {shape} for this plan")
    checked_replica_count(phy2log, num_logical, "previous map")
    return phy2log.numpy()


def plan(
    logical_count, *, num_physical_experts: int, num_gpus: int, num_nodes: int = 1,
    num_groups: int | None = None, algorithm: str = DEFAULT_ALGORITHM, previous=None, split: str = "equal",
    max_slots_moved: int | None = None, time_limit_s: float | None = None, dispatch: str | None = None,
) -> Placement:
    """Plan a placement.

    logical_count: [L, E] or [B, L, E] tokens per logical expert, >= 0: per-pass policies
        (``Policy.per_pass``) plan from the B passes, the others from their sum.
    previous: an earlier Placement or [L, P] map; migration-aware policies keep slots where
        moving buys little, and ``slots_moved`` is reported against it.
    split: how the host splits an expert's tokens over its replicas: "equal" (stock SGLang,
        static / random / minmax dispatch) or "weighted" (``weighted`` dispatch: the
        placement then carries replica weights where the policy makes them).
    max_slots_moved: at most this many slots (all layers together) may differ from
        ``previous`` (the move budget of one rebalance; bytes / one expert's bytes); only
        for policies with ``Policy.move_budget``; ignored without ``previous``.
    time_limit_s: seconds from this call after which a search policy (``Policy.anytime``)
        takes no further round and returns its best map so far (within the budget, no layer
        worse than where its search started); the others ignore it. None: no limit.
    dispatch: the dispatch algorithm that will serve the placement (``--ep-dispatch-algorithm``:
        the project's names or SGLang's own). A policy with ``Policy.for_dispatch`` scores each
        pass under it: split for the pass's peak (``minmax``, SGLang's ``lp``) or spread evenly
        over an expert's replicas whatever the pass (``static``, ``random``, ``dynamic``,
        ``weighted`` without weights, SGLang's ``fake``); None: ``minmax``. The others ignore
        it (``split`` says what they plan for). An unknown name is a ConfigError.
    algorithm: a registered policy, or ``auto`` (SGLang's choice, ``resolve_algorithm``).
    Raises CountsError / ConfigError / PlacementError for bad input.
    """
    name = resolve_algorithm(algorithm, num_groups=num_groups, num_nodes=num_nodes)
    policy = POLICIES.get(name)
    extra: dict = {}  # what the policy takes beyond the common arguments
    if max_slots_moved is not None:
        if isinstance(max_slots_moved, bool) or not isinstance(max_slots_moved, (int, np.integer)) \
                or max_slots_moved < 0:
            raise ConfigError(f"max_slots_moved={max_slots_moved!r} must be a non-negative int")
        check_move_budget(name, what="max_slots_moved", who="algorithm")
        extra["max_moves"] = int(max_slots_moved)
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is unknown; choose one of {list(SPLITS)}")
    if time_limit_s is not None and (isinstance(time_limit_s, bool)
                                     or not isinstance(time_limit_s, (int, float, np.integer, np.floating))
                                     or not time_limit_s > 0 or not np.isfinite(time_limit_s)):
        raise ConfigError(f"time_limit_s={time_limit_s!r} must be a positive number of seconds (or None)")
    if dispatch is not None:
        pass_split = follows_pass(dispatch)  # ConfigError for an unknown name, whatever the policy
        if policy.for_dispatch:
            extra["follows_pass"] = pass_split
    per_pass = _validate_counts(logical_count)
    with np.errstate(over="ignore"):  # an overflow is refused just below, by its result
        counts = per_pass.sum(0) if per_pass.ndim == 3 else per_pass
        layer_totals = counts.sum(1)  # every GPU's load is at most its layer's total
    if not np.isfinite(layer_totals).all():
        raise CountsError(f"logical_count sums past the float range (float64 max {np.finfo(np.float64).max:.3g}) "
                          "over passes or experts; rescale the counts")
    num_layers, num_logical = counts.shape
    _validate_shape(num_logical, num_physical_experts, num_gpus, num_nodes, num_groups, policy)
    prev = _previous_map(previous, (num_layers, num_physical_experts), num_logical)
    start = time.perf_counter()
    if time_limit_s is not None and policy.anytime:
        extra["deadline"] = start + float(time_limit_s)
    phy2log, weights = policy.plan(
        counts, num_physical_experts, num_gpus=num_gpus, num_nodes=num_nodes, num_groups=num_groups, previous=prev,
        per_pass=per_pass if per_pass.ndim == 3 else None, split=split, **extra,
    )
    elapsed = time.perf_counter() - start
    moved = None if prev is None else int((phy2log != prev).sum())
    share = cross_node_share(counts, phy2log, num_nodes=num_nodes) if num_nodes > 1 else None
    return Placement(
        physical_to_logical_map=torch.from_numpy(np.ascontiguousarray(phy2log, dtype=np.int64)),
        replica_weights=None if weights is None else torch.from_numpy(np.asarray(weights, dtype=np.float32)),
        slots_moved=moved, solver_seconds=elapsed, cross_node_share=share,
    )


def rebalance_experts(
    tokens_per_expert: torch.Tensor, num_physical_experts: int, num_local_physical_experts: int,
    num_groups: int | None, num_nodes: int, algorithm, *, dispatch: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGLang 0.5.23's entry point: returns (phy2log [L, P], log2phy [L, E, P-E+1], replica_count [L, E]).

    tokens_per_expert: [L, E] or [B, L, E] counts, a tensor, numpy array or nested lists (as
    ``plan`` takes them). The tuple carries no replica weights: SGLang splits equally, so every
    policy plans for that. dispatch: the server's ``--ep-dispatch-algorithm`` (``plan``'s; the
    plugin's hook passes SGLang's), which SGLang's own signature does not carry.
    """
    tokens_per_expert = _count_tensor(tokens_per_expert)  # lists and numpy read once, as plan() reads them
    if num_local_physical_experts <= 0:
        raise ConfigError(f"num_local_physical_experts={num_local_physical_experts} must be positive")
    if num_physical_experts % num_local_physical_experts:
        raise ConfigError(f"num_physical_experts={num_physical_experts} is not divisible by "
                          f"num_local_physical_experts={num_local_physical_experts}")
    name = resolve_algorithm(algorithm, num_groups=num_groups, num_nodes=num_nodes)
    placement = plan(
        tokens_per_expert, num_physical_experts=num_physical_experts,
        num_gpus=num_physical_experts // num_local_physical_experts, num_nodes=num_nodes,
        num_groups=num_groups, algorithm=name, dispatch=dispatch,
    )
    num_logical = tokens_per_expert.shape[-1]
    phy2log = placement.physical_to_logical_map
    return phy2log, compute_logical_to_physical_map(phy2log, num_logical), placement.replica_count(num_logical)


__all__ = ["ALGORITHMS", "AUTO", "DEFAULT_ALGORITHM", "PER_PASS_POLICIES", "POLICIES", "SPLITS", "Placement", "Policy",
           "plan", "rebalance_experts", "resolve_algorithm", "split_for_dispatch"]
