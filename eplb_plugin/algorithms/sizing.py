"""Redundancy sizing: how much per-pass balance each count of redundant slots buys, and how
many redundant slots a per-GPU memory budget allows.

``redundancy_curve`` plans with each candidate count of redundant slots and scores the plan
on passes it did not see: with per-pass counts ``[B, L, E]`` it plans on the first half
of the passes and scores every pass of the second half under the host's dispatch (the
realized balance a rebalance on the first half would have served); with one ``[L, E]``
window it can only score in sample (an upper bound, marked as such).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .evaluate import per_pass_balancedness
from .names import DEFAULT_ALGORITHM


@dataclass(frozen=True)
class SizingPoint:
    """One row of the curve: ``redundant`` slots (``per_gpu`` each), the expected mean
    per-pass balancedness under ``dispatch``, and whether it was scored on held-out passes."""

    redundant: int
    per_gpu: int
    balancedness: float
    held_out: bool


def redundant_choices(num_logical: int, num_gpus: int, max_redundant: int) -> list[int]:
    """Redundant slot counts from 0 up to ``max_redundant`` that keep P = E + r divisible by
    the GPUs (one more slot per GPU each step; the first step fills up to a multiple)."""
    return list(range(min_redundant(num_logical, num_gpus), max_redundant + 1, num_gpus))


def min_redundant(num_logical: int, num_gpus: int) -> int:
    """The fewest redundant slots that keep P = E + r divisible by the GPUs (0 where they divide E)."""
    return (-num_logical) % num_gpus


def max_useful_redundant(num_logical: int, num_gpus: int) -> int:
    """The most redundant slots that can buy balance: E * (G - 1), every GPU holding every
    expert (each expert's tokens then split over all GPUs; a second replica of an expert on
    one GPU takes no load off any GPU)."""
    return num_logical * (num_gpus - 1)


def redundant_per_gpu(num_logical: int, redundant: int, num_gpus: int) -> int:
    """Redundant slots on the GPU that holds most of them (slots per GPU over the slots
    without redundancy)."""
    return (num_logical + redundant) // num_gpus - num_logical // num_gpus


def max_redundant_for_memory(budget_bytes_per_gpu: float, *, expert_bytes: int, num_layers: int,
                             num_logical: int, num_gpus: int) -> int:
    """The most redundant slots (all GPUs together) whose weights fit ``budget_bytes_per_gpu``
    on every GPU: a redundant slot per GPU costs one expert in every MoE layer.

    Capped at ``max_useful_redundant`` (an infinite budget gives that), and never below
    ``min_redundant``: where E does not divide over the GPUs, the fewest slots that do are
    returned even if they do not fit (compare ``redundant_per_gpu`` with the budget to tell).
    """
    if not budget_bytes_per_gpu >= 0:  # NaN too
        raise ConfigError(f"the memory budget must be >= 0 (got {budget_bytes_per_gpu} bytes)")
    per_slot = expert_bytes * num_layers  # one redundant slot per GPU, every MoE layer
    most_per_gpu = redundant_per_gpu(num_logical, max_useful_redundant(num_logical, num_gpus), num_gpus)
    per_gpu = most_per_gpu if budget_bytes_per_gpu >= most_per_gpu * per_slot \
        else int(budget_bytes_per_gpu // per_slot)
    # the largest r with E + r divisible by G and (E + r) / G - E // G <= per_gpu
    redundant = num_gpus * (per_gpu + num_logical // num_gpus) - num_logical
    return max(redundant, min_redundant(num_logical, num_gpus))


def redundancy_curve(counts: np.ndarray, *, num_gpus: int, redundant: list[int], dispatch: str = "static",
                     algorithm: str = DEFAULT_ALGORITHM, num_nodes: int = 1, num_groups: int | None = None) -> list[SizingPoint]:
    """counts: [L, E] (one window) or [B, L, E] (passes; B >= 2 scores on held-out passes).
    redundant: slot counts to try (each keeping E + r divisible by ``num_gpus``). The plan
    is made for the split ``dispatch`` performs (``split_for_dispatch``) and, by a per-pass
    policy, for ``dispatch`` itself (``plan``'s)."""
    from . import plan, split_for_dispatch

    counts = np.asarray(counts, dtype=np.float64)
    per_pass = counts if counts.ndim == 3 else counts[None]
    num_logical = per_pass.shape[2]
    held_out = per_pass.shape[0] >= 2
    fit, score = (per_pass[: per_pass.shape[0] // 2], per_pass[per_pass.shape[0] // 2:]) if held_out \
        else (per_pass, per_pass)
    points = []
    for r in redundant:
        if (num_logical + r) % num_gpus:
            raise ConfigError(f"{num_logical} experts + {r} redundant slots do not divide over {num_gpus} GPUs")
        placement = plan(fit, num_physical_experts=num_logical + r, num_gpus=num_gpus, num_nodes=num_nodes,
                         num_groups=num_groups, algorithm=algorithm, split=split_for_dispatch(dispatch),
                         dispatch=dispatch)
        weights = placement.replica_weights
        bal = per_pass_balancedness(score, placement.physical_to_logical_map.numpy(), num_gpus=num_gpus,
                                    dispatch=dispatch, replica_weights=None if weights is None else weights.numpy())
        points.append(SizingPoint(r, redundant_per_gpu(num_logical, r, num_gpus), float(bal.mean()), held_out))
    return points
