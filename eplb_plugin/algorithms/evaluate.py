"""Placement quality under dispatch, and the replay loop (recorder window -> planner -> move).

Dispatch semantics, as a model of expected GPU load (the runtime ops live in
``eplb_plugin.dispatch``):

- ``static``: a token goes to a replica on its sending rank if there is one, else to a fixed
  replica. With tokens originating uniformly over ranks, the expected split is equal.
- ``random`` and ``dynamic`` (SGLang's name for it): uniform over replicas: equal split.
- ``weighted``: split by the placement's replica weights (equal when it has none).
- ``minmax``: per pass, each expert's tokens of that pass split over its replicas to
  minimize the max GPU load (the dispatcher's own split, ``kernels/minmax.py``, on the
  whole pass's counts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..balance import gpu_loads, layer_balancedness
from ..dispatch_info import DISPATCH_INFO
from ..errors import CountsError, UsageError
from ..kernels.minmax import minmax_loads
from .names import DEFAULT_ALGORITHM
from .split import equal_slot_loads

DISPATCHES = DISPATCH_INFO.names()


def pass_counts(topk_ids: np.ndarray, *, num_logical: int, pass_tokens: int) -> np.ndarray:
    """Cut a per-token trace into passes and count each pass's tokens per expert.

    topk_ids: [T, L, k] int, logical ids; a negative id (SGLang's -1) is padding and is not
    counted. Tokens past the last whole pass of ``pass_tokens`` are left out. Returns
    [B, L, E] float64, B = T // pass_tokens. CountsError for non-integer ids or ids >=
    ``num_logical`` (they would be counted in the next layer's row); UsageError for a
    ``pass_tokens`` below 1.
    """
    if pass_tokens < 1:
        raise UsageError(f"pass_tokens={pass_tokens} must be >= 1")
    if not np.issubdtype(topk_ids.dtype, np.integer):
        raise CountsError(f"topk_ids must hold integer expert ids, not {topk_ids.dtype}")
    num_tokens, num_layers, _ = topk_ids.shape
    num_passes = num_tokens // pass_tokens
    ids = topk_ids[: num_passes * pass_tokens].astype(np.int64).reshape(num_passes, pass_tokens, num_layers, -1)
    if ids.size and int(ids.max()) >= num_logical:
        raise CountsError(f"topk_ids holds expert id {int(ids.max())}, outside 0..{num_logical - 1} "
                          f"(num_logical={num_logical})")
    offset = (np.arange(num_passes)[:, None] * num_layers + np.arange(num_layers)[None, :]) * num_logical
    flat = (ids + offset[:, None, :, None])[ids >= 0]  # padding (negative ids) dropped
    counts = np.bincount(flat, minlength=num_passes * num_layers * num_logical)
    return counts.reshape(num_passes, num_layers, num_logical).astype(np.float64)


def per_pass_balancedness(
    counts: np.ndarray, phy2log: np.ndarray, *, num_gpus: int, dispatch: str,
    replica_weights: np.ndarray | None = None,
) -> np.ndarray:
    """Balancedness of each pass (mean over layers of mean/max GPU load).

    counts: [B, L, E]; phy2log: [L, P]; replica_weights: [L, P] or None. Returns [B].
    """
    info = DISPATCH_INFO.get(dispatch)  # ConfigError naming the known ones
    num_passes, num_layers, _ = counts.shape
    rows = counts.reshape(num_passes * num_layers, -1)
    maps = np.broadcast_to(phy2log, (num_passes, *phy2log.shape)).reshape(num_passes * num_layers, -1)
    if info.follows_pass:  # the pass's own split: minmax's
        gpu = minmax_gpu_loads(counts, phy2log, num_gpus=num_gpus).reshape(num_passes * num_layers, -1)
    elif info.honours_replica_weights and replica_weights is not None:
        w = np.broadcast_to(replica_weights, (num_passes, *replica_weights.shape)).reshape(maps.shape)
        gpu = gpu_loads(np.take_along_axis(rows, maps, axis=1) * w, num_gpus)
    else:
        gpu = gpu_loads(equal_slot_loads(rows, maps), num_gpus)
    bal = layer_balancedness(torch.from_numpy(gpu)).numpy()
    return bal.reshape(num_passes, num_layers).mean(1)


def minmax_gpu_loads(counts: np.ndarray, phy2log: np.ndarray, *, num_gpus: int,
                     iterations: int | None = None) -> np.ndarray:
    """GPU loads of every pass under ``minmax`` dispatch (fractional: before rounding to
    tokens) with ``iterations`` diffusion steps (None: the kernels', ``minmax_iterations``).
    counts: [B, L, E]; phy2log: [L, P]. Returns [B, L, G] float64."""
    num_passes, num_layers, num_logical = counts.shape
    maps = torch.as_tensor(np.ascontiguousarray(phy2log), dtype=torch.int64).repeat(num_passes, 1)  # [B * L, P]
    gpu = minmax_loads(maps, torch.from_numpy(counts.reshape(num_passes * num_layers, num_logical)), num_gpus=num_gpus,
                       iterations=iterations)
    return gpu.double().numpy().reshape(num_passes, num_layers, num_gpus)


def exact_min_max_load(counts: np.ndarray, phy2log: np.ndarray, *, num_gpus: int) -> float:
    """The exact optimum ``minmax`` approximates, for one layer of one pass: the smallest
    possible max GPU load over fractional splits of each expert's tokens among its replicas'
    GPUs (an LP, solved by scipy's HiGHS). counts: [E]; phy2log: [P]."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix

    slots_per_gpu = phy2log.shape[0] // num_gpus
    pairs = sorted({(int(e), p // slots_per_gpu) for p, e in enumerate(phy2log)})  # (expert, GPU)
    n = len(pairs)
    a_eq = csr_matrix((np.ones(n), ([e for e, _ in pairs], range(n))), shape=(counts.shape[0], n + 1))
    a_ub = csr_matrix(([1.0] * n + [-1.0] * num_gpus, ([g for _, g in pairs] + list(range(num_gpus)),
                                                        list(range(n)) + [n] * num_gpus)), shape=(num_gpus, n + 1))
    cost = np.zeros(n + 1)
    cost[-1] = 1.0  # variables: each pair's tokens, then the max load
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(num_gpus), A_eq=a_eq, b_eq=counts, method="highs")
    if res.status != 0:
        raise RuntimeError(f"HiGHS could not solve the min-max split: {res.message}")
    return float(res.x[-1])


@dataclass
class SimResult:
    """Replay outcome. balancedness[d]: [B] per pass under dispatch d."""

    balancedness: dict[str, np.ndarray]
    rebalance_passes: list[int] = field(default_factory=list)
    slots_moved: list[int] = field(default_factory=list)
    solver_seconds: list[float] = field(default_factory=list)
    num_slots_total: int = 0

    def summary(self) -> dict:
        """Means over all passes, and over the passes after the first rebalance (the first
        interval runs on the naive placement whatever the policy); moves over all rebalances,
        and excluding the first (which starts from the naive placement)."""
        share = [m / self.num_slots_total for m in self.slots_moved] if self.num_slots_total else []
        first = self.rebalance_passes[0] if self.rebalance_passes else 0
        return {
            "balancedness_mean": {d: float(v.mean()) for d, v in self.balancedness.items()},
            "balancedness_mean_after_first_plan": {d: float(v[first:].mean()) for d, v in self.balancedness.items()},
            "rebalances": len(self.slots_moved),
            "slots_moved_share_mean": float(np.mean(share)) if share else 0.0,
            "slots_moved_share_mean_excl_first": float(np.mean(share[1:])) if len(share) > 1 else 0.0,
            "slots_moved_share_max": float(np.max(share)) if share else 0.0,
            "solver_ms_mean": 1e3 * float(np.mean(self.solver_seconds)) if self.solver_seconds else 0.0,
        }


def simulate(
    counts: np.ndarray, *, num_physical: int, num_gpus: int, interval: int = 8, window: int = 8,
    algorithm: str = DEFAULT_ALGORITHM, dispatches=DISPATCHES, decay: float | None = None,
    oracle: bool = False,
) -> SimResult:
    """Replay passes: every ``interval`` passes, plan on the last ``window`` passes (or all
    past passes weighted by ``decay ** age`` when decay is set), move, and score each later
    pass on its own. The first interval runs on the trivial placement (slot p holds p % E).
    ``oracle`` plans on the pass being served (the bound), every pass. A per-pass policy
    (``Policy.per_pass``) plans from the window's passes (weighted by the decay), the others
    from their sum.

    counts: [B, L, E]. Returns SimResult.
    """
    # late import: the package imports this module's siblings
    from . import POLICIES, plan, resolve_algorithm

    per_pass = POLICIES.get(resolve_algorithm(algorithm)).per_pass  # plans from the window's passes, not their sum
    num_passes, num_layers, num_logical = counts.shape
    phy2log = np.broadcast_to(np.arange(num_physical) % num_logical, (num_layers, num_physical)).copy()
    weights = None
    out = {d: np.zeros(num_passes) for d in dispatches}
    result = SimResult(balancedness=out, num_slots_total=num_layers * num_physical)
    for b in range(num_passes):
        due = oracle or (b > 0 and b % interval == 0)
        if due:
            if oracle:
                passes = counts[b:b + 1]
            elif decay is not None:
                passes = (decay ** np.arange(b)[::-1])[:, None, None] * counts[:b]
            else:
                passes = counts[max(0, b - window):b]
            hist = passes if per_pass else passes.sum(0)
            start = time.perf_counter()
            placement = plan(
                hist, num_physical_experts=num_physical, num_gpus=num_gpus, algorithm=algorithm,
                previous=None if oracle else phy2log,
            )
            result.solver_seconds.append(time.perf_counter() - start)
            new = placement.physical_to_logical_map.numpy()
            result.rebalance_passes.append(b)
            result.slots_moved.append(int((new != phy2log).sum()))
            phy2log = new
            weights = None if placement.replica_weights is None else placement.replica_weights.numpy()
        for d in dispatches:
            out[d][b] = per_pass_balancedness(counts[b:b + 1], phy2log, num_gpus=num_gpus, dispatch=d,
                                              replica_weights=weights)[0]
    return result
