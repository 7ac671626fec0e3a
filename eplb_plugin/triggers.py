"""When a rebalance is due: the pure decisions ``EPLBManager`` takes after each pass (the
collective that makes every rank agree on them stays in the manager).

A rebalance starts on request, every ``--eplb-rebalance-num-iterations`` passes, when
``--eplb-rebalance-interval-s`` seconds have passed, or for the layers whose window load
drifted from the load last planned on (cosine below ``--eplb-drift-threshold``). The time
and drift checks run every ``check_every`` passes; their verdicts are all-reduced (max) in
one ``[1 + L]`` vector so that a rank whose clock runs ahead cannot start a rebalance alone.
"""

from __future__ import annotations

import torch


def interval_due(passes_since: int, every_passes: int) -> bool:
    """The pass interval has elapsed since the last rebalance."""
    return passes_since >= every_passes


def checks_due(num_passes: int, check_every: int, *, timed: bool, drifting: bool) -> bool:
    """Whether the time and drift checks run at this pass (they cost a collective)."""
    return (timed or drifting) and num_passes % check_every == 0


def local_verdict(*, elapsed_s: float, interval_s: float | None, drifted: torch.Tensor | None,
                  num_layers: int) -> torch.Tensor:
    """This rank's ``[1 + L]`` float64 verdict: 1 at 0 if the time interval elapsed, 1 at
    1 + l for each drifted layer l (``drifted``: [L] bool, None when drift is off)."""
    verdict = torch.zeros(1 + num_layers, dtype=torch.float64)
    if interval_s is not None and elapsed_s >= interval_s:
        verdict[0] = 1
    if drifted is not None:
        verdict[1:] = drifted.to(torch.float64)
    return verdict


def drifted_layers(current: torch.Tensor, planned: torch.Tensor, threshold: float) -> torch.Tensor:
    """[L] bool: layers with tokens in ``current`` ([L, E] window load) whose cosine
    similarity to ``planned`` (the load last planned on) fell below ``threshold``."""
    cosine = torch.nn.functional.cosine_similarity(current, planned, dim=1)
    return (current.sum(1) > 0) & (cosine < threshold)


def decide(verdict: torch.Tensor) -> tuple[str | None, list[int] | None]:
    """The agreed ``[1 + L]`` verdict -> (trigger, layers): ("time", None) for all layers,
    ("drift", the drifted layers), or (None, None)."""
    if verdict[0] > 0:
        return "time", None
    drifted = verdict[1:].nonzero().flatten().tolist()
    return ("drift", drifted) if drifted else (None, None)


def window_balanced(window_balancedness: float, threshold: float) -> str | None:
    """Why a rebalance is skipped by ``--eplb-min-rebalancing-utilization-threshold``: the
    window summed over ranks is already at least that balanced; None when it is not."""
    if window_balancedness >= threshold:
        return f"balancedness {window_balancedness:.4f} >= threshold {threshold}"
    return None
