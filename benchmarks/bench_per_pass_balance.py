"""Realized per-pass balance of planner x dispatch on drifting real traffic (CPU replay).

ESFT intent then law (``../shared/traces`` or ``$EPLB_TRACES_DIR``), cut into passes of
``--pass-tokens`` tokens, each pass's tokens sharded over the EP ranks as the runtime does.
Every ``--every`` passes the planner re-plans on the last ``--every`` passes (with the
current placement as ``previous``); every pass after the first plan is scored on its own:

- ``static``: each rank's static table (``dispatch.compute_static_dispatch_table``), exact;
- ``minmax``: the per-pass split on the whole pass's counts (``--ep-dispatch-counts global``);
- ``minmax_local``: each rank splits its own tokens (``--ep-dispatch-counts local``).

The per-pass policy plans for ``minmax`` unless a row says it is planned for static dispatch
(``plan(dispatch="static")``: the passes scored under static's even spread; compare those
rows' ``static`` column). It also runs with a move budget of ``MOVE_BUDGET_SHARE`` of the slots per
rebalance, with unused budget carried over as the manager does by default and as a hard cap,
and with the manager's drift trigger (``--eplb-drift-threshold`` ``DRIFT_THRESHOLD``, checked
every ``DRIFT_CHECK_EVERY`` passes; a drifted layer is re-planned alone on the last
``--drift-passes`` passes), with and without the budget. References: the clairvoyant plan
(made on the next ``--every`` passes) and the same-pass plan (made on the pass it serves),
both with the project's equal-split policy. Slots moved
per rebalance are counted against the previous placement (the first plan, from the trivial
placement, excluded). Exits cleanly where the traces are absent.

    python benchmarks/bench_per_pass_balance.py
    python benchmarks/bench_per_pass_balance.py --traffic sequences   # synthetic traffic, no traces needed
    python benchmarks/bench_per_pass_balance.py --seeds 6   # the budgeted row's spread over search seeds
    python benchmarks/bench_per_pass_balance.py --planner-time   # solver time at DeepSeek-V3 scale
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _traces import (  # benchmarks/_traces.py
    ESFT_TRACES,
    FLAME_TRACE,
    OLMOE_TRACE,
    esft_missing,
    esft_topk_ids,
    flame_topk_ids,
    olmoe_topk_ids,
    sequence_mixture_ids,
)
from bench_realized_balance import NUM_LOGICAL, rank_counts, static_gpu_loads

from eplb_plugin.algorithms import perpass, plan
from eplb_plugin.algorithms.evaluate import minmax_gpu_loads
from eplb_plugin.args import EPLBArgs
from eplb_plugin.balance import layer_balancedness
from eplb_plugin.manager.planning import MoveCredit
from eplb_plugin.triggers import drifted_layers

PLANNERS = ("eplb_plugin_equal", "eplb_plugin_perpass", "deepseek", "deepseek_vec")
MOVE_BUDGET_SHARE = 0.10  # the budgeted per-pass rows: this share of slots moved per rebalance on average
MOVE_BUDGET_CARRY = EPLBArgs.eplb_move_budget_carry  # the manager's default (--eplb-move-budget-carry)
DRIFT_THRESHOLD = 0.95  # the drift row's --eplb-drift-threshold
DRIFT_CHECK_EVERY = 2  # passes between the drift row's checks (the manager's check_every_passes)


def score(per_rank: np.ndarray, phy2log: np.ndarray, num_gpus: int, steps: int | None = None) -> dict[str, float]:
    """Balancedness of one pass under each dispatch (``steps``: minmax's diffusion steps, None:
    the kernels').
    per_rank: [R, L, E] counts."""
    loads = {
        "static": static_gpu_loads(per_rank, phy2log, num_gpus),
        "minmax": minmax_gpu_loads(per_rank.sum(0)[None], phy2log, num_gpus=num_gpus, iterations=steps)[0],
        "minmax_local": minmax_gpu_loads(per_rank, phy2log, num_gpus=num_gpus, iterations=steps).sum(0),
    }
    return {name: float(layer_balancedness(torch.from_numpy(v)).mean()) for name, v in loads.items()}


def replay(counts: list[np.ndarray], *, num_gpus: int, num_slots: int, every: int, planner: str,
           source: str = "past", budget_share: float | None = None, carry: int = MOVE_BUDGET_CARRY,
           score_iterations: int | None = None, drift: float | None = None,
           drift_passes: int = DRIFT_CHECK_EVERY, dispatch: str | None = None) -> dict:
    """source: "past" (the last ``every`` passes), "next" (clairvoyant) or "same" (each pass).
    budget_share: a move budget of this share of all slots per rebalance, unused budget
    carried over ``carry`` rebalances as the manager does (``MoveCredit``; not on the first
    plan, which starts from the trivial placement). drift: as ``--eplb-drift-threshold``
    does in the manager, every ``DRIFT_CHECK_EVERY`` passes between two re-plans the layers
    whose window load's cosine to the load they were last planned on fell below it are
    re-planned alone, on the last ``drift_passes`` passes (``--eplb-drift-window-passes``);
    the interval keeps its schedule, and every re-plan is granted the budget's share of the
    passes since the last one (``budget_share``: a rate). ``minmax_per_block``: the
    ``minmax`` balancedness of each ``every`` passes in a row (where a shift costs, and what
    steady traffic reaches). ``slots_moved_share_mean``: slots moved per ``every`` passes
    (per rebalance without drift), after the first plan. dispatch: what the planner plans for
    (``plan(dispatch=)``; None: its default, ``minmax`` for the per-pass policy)."""
    num_layers = counts[0].shape[1]
    phy2log = np.broadcast_to(np.arange(num_slots) % NUM_LOGICAL, (num_layers, num_slots)).copy()
    scores: dict[str, list[float]] = {}
    moved, solver, drifts = [], [], []
    per_rebalance = None if budget_share is None else int(budget_share * phy2log.size)
    credit = MoveCredit(carry=carry, interval=every, last_grant_pass=every)  # the first plan has no budget
    planned_on = torch.zeros(num_layers, NUM_LOGICAL, dtype=torch.float64)  # each layer's load when last planned
    for p in range(every, len(counts)):
        due = source == "same" or p % every == 0
        layers = None
        if not due and drift is not None and p % DRIFT_CHECK_EVERY == 0:
            load = torch.from_numpy(np.stack([counts[q].sum(0) for q in range(p - every, p)]).sum(0)).double()
            layers = drifted_layers(load, planned_on, drift).nonzero().flatten().tolist() or None
        if due or layers:
            rows = {"past": range(p - (every if layers is None else drift_passes), p),
                    "next": range(p, min(p + every, len(counts))), "same": [p]}[source]
            window = np.stack([counts[q].sum(0) for q in rows])  # [B, L, E] whole-pass counts
            chosen = slice(None) if layers is None else layers
            start = time.perf_counter()
            budget = {} if per_rebalance is None or p == every else {
                "max_slots_moved": credit.grant(per_rebalance, at_pass=p)}
            placement = plan(window[:, chosen], num_physical_experts=num_slots, num_gpus=num_gpus, algorithm=planner,
                             previous=phy2log[chosen], dispatch=dispatch, **budget)
            solver.append(time.perf_counter() - start)
            if p > every:
                changed = int(placement.slots_moved)
                moved.append(changed / phy2log.size)
                if per_rebalance is not None:
                    credit.spend(changed)
            phy2log = phy2log.copy()
            phy2log[chosen] = placement.physical_to_logical_map.numpy()
            planned_on[chosen] = torch.from_numpy(window.sum(0)[chosen]).double()
            if layers is not None:
                drifts.append({"pass": p, "layers": len(layers)})
        for name, value in score(counts[p], phy2log, num_gpus, score_iterations).items():
            scores.setdefault(name, []).append(value)
    blocks = [scores["minmax"][b:b + every] for b in range(0, len(scores["minmax"]), every)]
    intervals = len(range(2 * every, len(counts), every)) if source != "same" else len(moved)
    return {"balancedness_per_pass_mean": {k: float(np.mean(v)) for k, v in scores.items()},
            "minmax_per_block": [round(float(np.mean(b)), 4) for b in blocks],
            "slots_moved_share_mean": float(np.sum(moved) / max(1, intervals)) if moved else 0.0,
            "drift_rebalances": drifts,
            "solver_ms_mean": 1e3 * float(np.mean(solver))}


def seeded_runs(counts: list[np.ndarray], ns: argparse.Namespace, *, num_gpus: int, num_slots: int) -> dict:
    """The default budgeted row once per seed of the per-pass search, and their spread."""
    runs: dict = {}
    default_seed = perpass.PERPASS_SEED
    try:
        for seed in range(ns.seeds):
            perpass.PERPASS_SEED = seed  # read by the planner at call time
            runs[f"seed {seed}"] = r = replay(counts, num_gpus=num_gpus, num_slots=num_slots, every=ns.every,
                                              planner="eplb_plugin_perpass", budget_share=MOVE_BUDGET_SHARE,
                                              score_iterations=ns.score_iterations)
            print(f"EP{num_gpus:<3}{num_slots:>4} slots  seed {seed}: minmax {r['balancedness_per_pass_mean']['minmax']:.4f}"
                  f"  moved {100 * r['slots_moved_share_mean']:5.1f}%", flush=True)
    finally:
        perpass.PERPASS_SEED = default_seed
    values = np.array([r["balancedness_per_pass_mean"]["minmax"] for r in runs.values()])
    moved = np.array([r["slots_moved_share_mean"] for r in runs.values()])
    runs["spread"] = {"minmax_mean": float(values.mean()), "minmax_min": float(values.min()),
                      "minmax_max": float(values.max()), "moved_mean": float(moved.mean()), "moved_max": float(moved.max())}
    print(f"EP{num_gpus:<3}{num_slots:>4} slots  over {ns.seeds} seeds: {json.dumps(runs['spread'])}")
    return runs


def planner_time(*, num_layers: int = 58, num_logical: int = 256, num_slots: int = 288, num_gpus: int = 32,
                 passes: int = 8, budget_share: float = MOVE_BUDGET_SHARE, seed: int = 0,
                 time_limits: tuple[float, ...] = ()) -> dict:
    """The per-pass policy's solver time at DeepSeek-V3 scale (58 MoE layers x 256 experts
    onto 288 slots, EP32) on synthetic windows of ``passes`` passes (skewed expert
    popularity, per-pass noise): the plan without a budget from the trivial placement, then
    budgeted re-plans (``budget_share`` of the slots) of the same traffic (steady: the
    shift test alone) and of traffic whose popularity was drawn afresh (after a shift: the
    shift test, the target, the paths and the refinement). ``time_limits``: the plan after the
    shift again with each ``time_limit_s`` (the anytime search), beside the one without: its
    seconds, slots moved and mean per-pass balancedness on the window under minmax."""
    gen = np.random.default_rng(seed)

    def window() -> np.ndarray:
        hot = gen.gamma(0.7, 1.0, size=(num_layers, num_logical))
        return gen.poisson(hot[None] * gen.gamma(4.0, 0.25, size=(passes, num_layers, num_logical)) * 30)

    first, shifted = window().astype(np.float64), window().astype(np.float64)
    kwargs = dict(num_physical_experts=num_slots, num_gpus=num_gpus, algorithm="eplb_plugin_perpass")
    max_moves = int(budget_share * num_layers * num_slots)
    out: dict = {"num_layers": num_layers, "num_logical": num_logical, "num_slots": num_slots, "num_gpus": num_gpus,
                 "passes": passes, "max_slots_moved": max_moves, "torch_threads": torch.get_num_threads()}
    start = time.perf_counter()
    live = plan(first, **kwargs).physical_to_logical_map
    out["unbudgeted_s"] = time.perf_counter() - start
    for name, counts in (("steady", first), ("after_shift", shifted)):
        start = time.perf_counter()
        placement = plan(counts, previous=live, max_slots_moved=max_moves, **kwargs)
        out[f"budgeted_{name}_s"] = time.perf_counter() - start
        out[f"budgeted_{name}_slots_moved"] = int(placement.slots_moved)
        print(f"{name}: {out[f'budgeted_{name}_s']:.1f} s, {placement.slots_moved} slots moved", flush=True)
        if name == "after_shift" and time_limits:
            rows = torch.from_numpy(counts).float().permute(1, 0, 2)
            score = {"live": float(perpass.mean_pass_balancedness(live, rows, num_gpus=num_gpus).mean()),
                     "no limit": float(perpass.mean_pass_balancedness(placement.physical_to_logical_map, rows,
                                                              num_gpus=num_gpus).mean())}
            out["after_shift_time_limited"] = {"mean_pass_balancedness": score, "runs": []}
            for limit in time_limits:
                start = time.perf_counter()
                limited = plan(counts, previous=live, max_slots_moved=max_moves, time_limit_s=limit, **kwargs)
                run = {"time_limit_s": limit, "s": time.perf_counter() - start, "slots_moved": int(limited.slots_moved),
                       "mean_pass_balancedness": float(perpass.mean_pass_balancedness(
                           limited.physical_to_logical_map, rows, num_gpus=num_gpus).mean())}
                out["after_shift_time_limited"]["runs"].append(run)
                print(f"after_shift, time limit {limit} s: {run}", flush=True)
            print(f"after_shift balancedness: {score}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pass-tokens", type=int, default=256)
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--setups", default="8:72,16:80", help="EP size:slots pairs")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    ap.add_argument("--planner-time", action="store_true",
                    help="time the per-pass policy at DeepSeek-V3 scale on synthetic windows (no traces needed)")
    ap.add_argument("--tag", default="cpu", help="--planner-time: the result file's suffix (which machine)")
    ap.add_argument("--time-limits", default="",
                    help="--planner-time: comma-separated time_limit_s values for the plan after the shift again")
    ap.add_argument("--score-iterations", type=int, default=None,
                    help="minmax's diffusion steps when the passes are scored (default: the kernels', by the "
                         "GPUs); the planner keeps its own; a value writes per_pass_balance_<traffic>_cpu_iterations<N>.json")
    ap.add_argument("--traffic", choices=("esft", "sequences", "olmoe", "flame"), default="esft",
                    help="esft: the ESFT traces, intent then law; sequences: synthetic traffic of two domains "
                         "(_traces.sequence_mixture_ids, not fitted to any trace; no traces needed); olmoe: "
                         "OLMoE-1B-7B's layer 0 on GSM8K (one layer, 4,471 tokens: few passes, try --every 4); flame: "
                         "FLAME-MoE-290M prefill (25 layers, 2,048 tokens, trained with a balance loss: try "
                         "--pass-tokens 128 --every 4); writes per_pass_balance_<traffic>_cpu*.json")
    ap.add_argument("--seeds", type=int, default=0,
                    help="instead: the default budgeted row (10%% carried) with the per-pass search seeded 0 .. N-1 "
                         "(perpass.PERPASS_SEED), the spread of the seeded search; writes per_pass_balance_<traffic>_cpu_seeds.json")
    ap.add_argument("--drift-passes", type=int, default=DRIFT_CHECK_EVERY,
                    help="the drift rows: passes a drift re-plan plans on (--eplb-drift-window-passes; default: "
                         "the passes between two checks, as in the manager)")
    ns = ap.parse_args(argv)
    if ns.planner_time:
        t0 = time.perf_counter()
        result = planner_time(time_limits=tuple(float(x) for x in ns.time_limits.split(",") if x))
        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"per_pass_planner_time_{ns.tag}.json"
        path.write_text(json.dumps({"benchmark": "per_pass_planner_time", "cpu_count": os.cpu_count(),
                                    "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                                    **result, "wall_s": time.perf_counter() - t0}, indent=1))
        print(json.dumps(result), f"\nwrote {path}")
        return 0
    if ns.traffic == "esft" and esft_missing():
        return 0
    t0 = time.perf_counter()
    if ns.traffic in ("olmoe", "flame"):
        ids = olmoe_topk_ids() if ns.traffic == "olmoe" else flame_topk_ids()
        if ids is None:
            return 0
    else:
        ids = esft_topk_ids() if ns.traffic == "esft" else sequence_mixture_ids(pass_tokens=ns.pass_tokens)
    num_passes = ids.shape[0] // ns.pass_tokens
    results: dict = {}
    for setup in ns.setups.split(","):
        num_gpus, num_slots = map(int, setup.split(":"))
        counts = [rank_counts(ids, p, ns.pass_tokens, num_gpus) for p in range(num_passes)]
        if ns.seeds:
            results[f"EP{num_gpus}_{num_slots}slots"] = seeded_runs(counts, ns, num_gpus=num_gpus, num_slots=num_slots)
            continue
        runs = {planner: replay(counts, num_gpus=num_gpus, num_slots=num_slots, every=ns.every, planner=planner,
                           score_iterations=ns.score_iterations)
                for planner in PLANNERS}
        runs[f"eplb_plugin_perpass, move budget {MOVE_BUDGET_SHARE:.0%} of slots, carry {MOVE_BUDGET_CARRY}"] = replay(
            counts, num_gpus=num_gpus, num_slots=num_slots, every=ns.every, planner="eplb_plugin_perpass",
            budget_share=MOVE_BUDGET_SHARE, score_iterations=ns.score_iterations)
        runs[f"eplb_plugin_perpass, move budget {MOVE_BUDGET_SHARE:.0%} of slots, hard cap (carry 0)"] = replay(
            counts, num_gpus=num_gpus, num_slots=num_slots, every=ns.every, planner="eplb_plugin_perpass",
            budget_share=MOVE_BUDGET_SHARE, carry=0, score_iterations=ns.score_iterations)
        for_static = dict(planner="eplb_plugin_perpass", dispatch="static", score_iterations=ns.score_iterations)
        runs["eplb_plugin_perpass, planned for static dispatch"] = replay(
            counts, num_gpus=num_gpus, num_slots=num_slots, every=ns.every, **for_static)
        runs[f"eplb_plugin_perpass, planned for static dispatch, move budget {MOVE_BUDGET_SHARE:.0%} of slots, "
             f"carry {MOVE_BUDGET_CARRY}"] = replay(counts, num_gpus=num_gpus, num_slots=num_slots, every=ns.every,
                                                    budget_share=MOVE_BUDGET_SHARE, **for_static)
        drift = dict(drift=DRIFT_THRESHOLD, drift_passes=ns.drift_passes, score_iterations=ns.score_iterations)
        runs[f"eplb_plugin_perpass, drift {DRIFT_THRESHOLD} (last {ns.drift_passes} passes)"] = replay(
            counts, num_gpus=num_gpus, num_slots=num_slots, every=ns.every, planner="eplb_plugin_perpass", **drift)
        runs[f"eplb_plugin_perpass, move budget {MOVE_BUDGET_SHARE:.0%} of slots, carry {MOVE_BUDGET_CARRY}, "
             f"drift {DRIFT_THRESHOLD} (last {ns.drift_passes} passes)"] = replay(
            counts, num_gpus=num_gpus, num_slots=num_slots, every=ns.every, planner="eplb_plugin_perpass",
            budget_share=MOVE_BUDGET_SHARE, **drift)
        runs["clairvoyant (eplb_plugin_equal on the next passes)"] = replay(
            counts, num_gpus=num_gpus, num_slots=num_slots, every=ns.every, planner="eplb_plugin_equal", source="next",
            score_iterations=ns.score_iterations)
        runs["same pass (eplb_plugin_equal on the pass served)"] = replay(
            counts, num_gpus=num_gpus, num_slots=num_slots, every=ns.every, planner="eplb_plugin_equal", source="same",
            score_iterations=ns.score_iterations)
        results[f"EP{num_gpus}_{num_slots}slots"] = runs
        for name, r in runs.items():
            bal = r["balancedness_per_pass_mean"]
            print(f"EP{num_gpus:<3}{num_slots:>4} slots  {name:>52}: static {bal['static']:.4f}  "
                  f"minmax {bal['minmax']:.4f}  minmax_local {bal['minmax_local']:.4f}  "
                  f"moved {100 * r['slots_moved_share_mean']:5.1f}%  solver {r['solver_ms_mean']:.1f} ms"
                  f"  minmax per {ns.every} passes {' '.join(f'{b:.3f}' for b in r['minmax_per_block'])}")
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if ns.score_iterations is None else f"_iterations{ns.score_iterations}"
    suffix += "_seeds" if ns.seeds else ""
    suffix += f"_pass{ns.pass_tokens}" if ns.pass_tokens != 256 else ""
    suffix += f"_every{ns.every}" if ns.every != 8 else ""
    suffix += f"_drift{ns.drift_passes}" if ns.drift_passes != DRIFT_CHECK_EVERY else ""
    path = out / f"per_pass_balance_{ns.traffic}_cpu{suffix}.json"
    path.write_text(json.dumps({
        "benchmark": "per_pass_balance", "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "traces": {"esft": list(ESFT_TRACES), "olmoe": [OLMOE_TRACE], "flame": [FLAME_TRACE],
                   "sequences": "synthetic: _traces.sequence_mixture_ids() defaults"}[ns.traffic],
        "pass_tokens": ns.pass_tokens, "every": ns.every,
        "minmax_score_iterations": ns.score_iterations or "the kernels' (8 steps up to 8 GPUs, 16 from 9 to 32, 8 past 32)",
        "drift_threshold": DRIFT_THRESHOLD,
        "drift_check_every": DRIFT_CHECK_EVERY,
        "scored": "every pass after the first plan", "results": results, "wall_s": time.perf_counter() - t0,
    }, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
