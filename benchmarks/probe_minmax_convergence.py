"""How close ``minmax``'s diffusion gets to the exact per-pass optimum, by steps (CPU).

The layer-passes are those the budgeted per-pass policy serves in the ESFT replay of
``bench_per_pass_balance.py`` (intent then law, 256-token passes, re-plan every 8 passes on
the last 8, 10% move budget carried; EP8 with 72 slots and EP16 with 80), 8 layers drawn per
pass. Each is solved exactly (an LP, scipy's HiGHS: ``evaluate.exact_min_max_load``) and by
the diffusion (``kernels/minmax.py``) with a fixed number of steps, and with a stop once the
best peak has fallen by less than ``STOP_TOL`` of itself for ``STOP_PATIENCE`` steps in a row
(at most ``STOP_MAX`` steps; an experiment, not in the kernels), and with the kernels' stop
on a whole pass (at the default steps, none once the peak is within ``MINMAX_STOP_TOKENS`` of
the largest base load: no split goes under it). Reported: the mean excess of the peak over
the optimum, and the steps taken.

``--synthetic`` (no traces needed): the momentum's effect away from the traces. Skewed
synthetic windows (per-layer Dirichlet(0.3) popularity) planned by the per-pass policy for
ten shapes (EP8 to EP72), then served passes drawn from a drifted popularity; the excess
of 4 steps (momentum 0.6, the kernels'), 8 and 16 (0.5 and 0.6) over 200 steps (the optimum, near
enough), and the steps the whole-pass stop takes at the default steps.

    python benchmarks/probe_minmax_convergence.py [--synthetic]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _traces import ESFT_TRACES, esft_missing, esft_topk_ids  # benchmarks/_traces.py
from bench_per_pass_balance import MOVE_BUDGET_CARRY, MOVE_BUDGET_SHARE
from bench_realized_balance import NUM_LOGICAL, rank_counts

from eplb_plugin.algorithms import plan
from eplb_plugin.algorithms.evaluate import exact_min_max_load
from eplb_plugin.kernels.minmax import (
    MINMAX_MOMENTUM,
    build_minmax_tables,
    minmax_gpu_shares,
    minmax_iterations,
    minmax_problem,
)
from eplb_plugin.manager.planning import MoveCredit

FIXED_STEPS = (8, 12, 16, 64)
STOP_MAX, STOP_TOL, STOP_PATIENCE = 16, 1e-4, 2
LAYERS_PER_PASS = 8


def served(counts: list[np.ndarray], *, num_gpus: int, num_slots: int, every: int = 8):
    """(pass counts [L, E], map [L, P]) of every pass after the first plan, as the budgeted
    per-pass policy serves them."""
    num_layers = counts[0].shape[0]
    phy2log = np.broadcast_to(np.arange(num_slots) % NUM_LOGICAL, (num_layers, num_slots)).copy()
    credit, per = MoveCredit(carry=MOVE_BUDGET_CARRY), int(MOVE_BUDGET_SHARE * phy2log.size)
    for p in range(every, len(counts)):
        if p % every == 0:
            budget = {} if p == every else {"max_slots_moved": credit.grant(per)}
            placement = plan(np.stack(counts[p - every:p]), num_physical_experts=num_slots, num_gpus=num_gpus,
                             algorithm="eplb_plugin_perpass", previous=phy2log, **budget)
            if p > every:
                credit.spend(int(placement.slots_moved))
            phy2log = placement.physical_to_logical_map.numpy()
        yield counts[p], phy2log


def stop_when_flat(counts: torch.Tensor, tables) -> tuple[torch.Tensor, torch.Tensor]:
    """(best peak [N], steps taken [N]) of the diffusion stopped per row once it is flat."""
    problem = minmax_problem(counts, tables.multi_experts, tables.multi_gpus, tables.single_slots)
    x = prev = problem.equal
    best_peak = problem.peak(x)
    active = torch.ones_like(best_peak, dtype=torch.bool)
    flat = torch.zeros_like(best_peak)
    steps = torch.zeros_like(best_peak)
    for _ in range(STOP_MAX):
        nx, nprev = problem.advance(x, prev, MINMAX_MOMENTUM)
        x = torch.where(active[:, None, None], nx, x)
        prev = torch.where(active[:, None, None], nprev, prev)
        peak = problem.peak(x)
        fell = peak < best_peak * (1 - STOP_TOL)
        best_peak = torch.where(active, torch.minimum(peak, best_peak), best_peak)
        flat = torch.where(fell, torch.zeros_like(flat), flat + 1)
        steps += active.float()
        active &= flat < STOP_PATIENCE
    return best_peak, steps


def whole_pass_stop(counts: torch.Tensor, tables, num_gpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(peak [N], steps taken [N]) of the split with the kernels' whole-pass stop at the
    default steps (``minmax_gpu_shares(stop=True)``; the steps counted alongside)."""
    problem = minmax_problem(counts, tables.multi_experts, tables.multi_gpus, tables.single_slots)
    stop_at = problem.stop_at()
    x = prev = problem.equal
    steps = torch.zeros(counts.shape[0])
    for _ in range(minmax_iterations(num_gpus)):
        going = problem.peak(x) > stop_at
        nx, nprev = problem.advance(x, prev, MINMAX_MOMENTUM)
        x = torch.where(going[:, None, None], nx, x)
        prev = torch.where(going[:, None, None], nprev, prev)
        steps += going.float()
    _, loads = minmax_gpu_shares(counts, tables.multi_experts, tables.multi_gpus, tables.single_slots, stop=True)
    return loads.amax(-1), steps


SYNTHETIC_SHAPES = ((64, 72, 8, 256, 6), (64, 80, 16, 256, 6), (256, 288, 8, 512, 8), (256, 320, 32, 512, 8),
                    (128, 160, 16, 256, 8), (256, 288, 36, 512, 8), (256, 288, 72, 512, 8),
                    (384, 432, 72, 512, 8), (256, 320, 64, 512, 8),
                    (256, 384, 48, 1024, 8))  # experts, slots, GPUs, tokens per pass, top-k


def synthetic(seed: int = 7, num_layers: int = 16, passes: int = 16) -> dict:
    """{shape: {"<steps>/<momentum>": mean excess % over 200 steps, over all rows and over the
    rows whose peak the split can lower}} on synthetic passes."""
    rng = np.random.default_rng(seed)
    results = {}
    for experts, slots, gpus, tokens, top_k in SYNTHETIC_SHAPES:
        pop = rng.dirichlet(np.full(experts, 0.3), size=num_layers)
        window = np.stack([np.stack([rng.multinomial(tokens * top_k, pop[layer]) for layer in range(num_layers)])
                           for _ in range(8)])
        maps = plan(window, num_physical_experts=slots, num_gpus=gpus,
                    algorithm="eplb_plugin_perpass").physical_to_logical_map.long().repeat(passes, 1)
        drifted = [0.7 * pop[layer] + 0.3 * rng.dirichlet(np.full(experts, 0.3)) for layer in range(num_layers)]
        counts = torch.tensor(np.stack([rng.multinomial(tokens * top_k, drifted[layer])
                                        for _ in range(passes) for layer in range(num_layers)]))
        tables = build_minmax_tables(maps, experts, num_gpus=gpus, entries=False)
        peaks = {}
        for steps, momentum in ((4, 0.6), (8, 0.5), (8, 0.6), (16, 0.5), (16, 0.6), (200, 0.5)):
            _, loads = minmax_gpu_shares(counts, tables.multi_experts, tables.multi_gpus, tables.single_slots,
                                         iterations=steps, momentum=momentum)
            peaks[f"{steps}/{momentum}"] = loads.amax(-1).double()
        ref = peaks.pop("200/0.5")
        name = f"E{experts}_P{slots}_EP{gpus}"
        # Rows whose peak is a GPU of single-replica experts: no split can lower it (at EP72
        # with 4 slots per GPU, nearly all). The excess is given over all rows and over the others.
        base = minmax_problem(counts, tables.multi_experts, tables.multi_gpus, tables.single_slots).base
        movable = ref > base.amax(-1).double() + 1e-3
        results[name] = {k: 100 * float((v / ref - 1).mean()) for k, v in peaks.items()}
        results[name].update({f"{k} movable rows": 100 * float((v / ref - 1)[movable].mean()) if movable.any() else 0.0
                              for k, v in peaks.items()})
        results[name]["rows_peak_fixed_pct"] = 100 * float((~movable).double().mean())
        peak, taken = whole_pass_stop(counts, tables, gpus)
        results[name].update({"whole-pass stop": 100 * float((peak.double() / ref - 1).mean()),
                              "whole-pass stop steps_mean": float(taken.mean()),
                              "whole-pass stop no_step_pct": 100 * float((taken == 0).double().mean()),
                              "default_steps": minmax_iterations(gpus)})
        print(name, {k: round(v, 3) for k, v in results[name].items()}, flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    ap.add_argument("--synthetic", action="store_true", help="the momentum on synthetic shapes instead (no traces)")
    ns = ap.parse_args(argv)
    if ns.synthetic:
        t0 = time.perf_counter()
        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "minmax_convergence_synthetic_cpu.json"
        path.write_text(json.dumps({
            "benchmark": "minmax_convergence_synthetic",
            "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
            "excess_pct_over_200_steps": synthetic(), "wall_s": time.perf_counter() - t0}, indent=1))
        print(f"wrote {path}")
        return 0
    if esft_missing():
        return 0
    t0 = time.perf_counter()
    ids = esft_topk_ids()
    rng = np.random.default_rng(0)
    results: dict = {}
    for num_gpus, num_slots in ((8, 72), (16, 80)):
        counts = [rank_counts(ids, p, 256, num_gpus).sum(0) for p in range(ids.shape[0] // 256)]
        rows = [(c[layer], m[layer]) for c, m in served(counts, num_gpus=num_gpus, num_slots=num_slots)
                for layer in rng.choice(c.shape[0], LAYERS_PER_PASS, replace=False)]
        exact = np.array([exact_min_max_load(c, m, num_gpus=num_gpus) for c, m in rows])
        batch = torch.tensor(np.stack([c for c, _ in rows]))
        tables = build_minmax_tables(torch.tensor(np.stack([m for _, m in rows])), NUM_LOGICAL, num_gpus=num_gpus,
                                     entries=False)
        base = minmax_problem(batch, tables.multi_experts, tables.multi_gpus, tables.single_slots).base
        movable = exact > base.amax(-1).double().numpy() + 1e-3  # rows whose peak the split can lower
        row: dict = {"layer_passes": len(rows), "movable_layer_passes": int(movable.sum())}
        for steps in FIXED_STEPS:
            _, loads = minmax_gpu_shares(batch, tables.multi_experts, tables.multi_gpus, tables.single_slots,
                                         iterations=steps)
            excess = loads.amax(-1).double().numpy() / exact - 1
            row[f"{steps} steps"] = {"excess_pct_mean": 100 * float(np.mean(excess)),
                                     "excess_pct_mean_movable_rows": 100 * float(np.mean(excess[movable])),
                                     "steps_mean": steps}
        peak, taken = stop_when_flat(batch, tables)
        row[f"stop when flat (<= {STOP_MAX} steps)"] = {
            "excess_pct_mean": 100 * float(np.mean(peak.double().numpy() / exact - 1)),
            "steps_mean": float(taken.mean()), "steps_max": int(taken.max())}
        peak, taken = whole_pass_stop(batch, tables, num_gpus)
        excess = peak.double().numpy() / exact - 1
        row[f"whole-pass stop (<= {minmax_iterations(num_gpus)} steps)"] = {
            "excess_pct_mean": 100 * float(np.mean(excess)),
            "excess_pct_mean_movable_rows": 100 * float(np.mean(excess[movable])),
            "steps_mean": float(taken.mean()), "no_step_pct": 100 * float((taken == 0).float().mean())}
        results[f"EP{num_gpus}_{num_slots}slots"] = row
        for name, v in row.items():
            if isinstance(v, dict):
                print(f"EP{num_gpus:<3}{num_slots:>4} slots  {name:>26}: {v['excess_pct_mean']:.3f}% over the optimum, "
                      f"{v['steps_mean']:.1f} steps", flush=True)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "minmax_convergence_esft_cpu.json"
    path.write_text(json.dumps({
        "benchmark": "minmax_convergence", "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "traces": list(ESFT_TRACES), "stop": {"max_steps": STOP_MAX, "tol": STOP_TOL, "patience": STOP_PATIENCE},
        "results": results, "wall_s": time.perf_counter() - t0}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
