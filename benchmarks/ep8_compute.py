"""The EP8 compute part of ``bench_end_to_end.py`` (BENCHMARKS.md): on one device, each
simulated EP8 rank's share of the expert work is timed separately (the experts that rank
would hold, with the tokens the dispatch sends it) and the slowest rank is the layer's time,
plus one rank's dispatch of its share of the pass (with the recorder's count); summed over
layers. On CUDA every piece is captured in a CUDA graph and timed over replays, as the
runtime serves. It is measured, not modelled, but it is the compute part of an EP8 step only
(no communication, no count all-gather). Placements (``EP8_PLACEMENTS``): naive (trivial,
no redundancy), EPLB with static dispatch and with ``minmax`` (the equal-split policy), EPLB
with the per-pass policy and ``minmax``, all planned on the previous window of passes
(realized); the per-pass policy planned on the timed pass itself (an oracle: what a
placement can reach at best under ``minmax``); and uniform routing: on the experts alone (the yardstick), on as many slots as
EPLB uses (what the redundant slots' weights cost by themselves), and drawn at random (each
token's experts uniformly: balanced routing with its natural spread). An experiment,
``eplb_perpass_minmax_tiles``, moves parts of GEMM tiles after ``minmax`` (``fewer_tiles``).
Each placement also reports its busiest GPU's GEMM units (``TILE_ROWS``-row units over its
slots) beside the floor no placement and dispatch goes under on the same passes
(``gemm_units_floor``); with ``timed=False`` those counts alone (no weights, nothing run: any
device).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from bench_minmax_dispatch import capture_layers, replay_us  # benchmarks/bench_minmax_dispatch.py

from eplb_plugin.balance import gpu_loads, layer_balancedness, slot_loads
from eplb_plugin.dispatch import ExpertDispatcher
from eplb_plugin.location import ExpertLocation
from eplb_plugin.runtime.config import RuntimeConfig, WorkloadSpec
from eplb_plugin.runtime.moe import expert_ffn, run_local_experts
from eplb_plugin.runtime.weights import FFNShape, make_expert_weights
from eplb_plugin.runtime.workload import shard_tokens

EP8 = 8
EP8_REDUNDANT = 8
EP8_SAMPLE_PASSES = 8  # passes timed for the EP8 compute part (each: L layers x 8 ranks)
EP8_REPLAYS = 10  # CUDA graph replays timed per rank and layer
# The EP8 compute part's placements: name -> (policy planned on the window, None: trivial;
# dispatch; traffic). "uniform" (no redundancy) is the yardstick: every expert exactly the
# same rows, as the runtime's uniform workload routes; "uniform_redundant" is uniform routing
# on as many slots as EPLB uses, so its ratio to "uniform" is what the redundant slots'
# weights alone cost; "uniform_sampled" draws each token's experts uniformly at random
# (balanced routing with its natural spread, no expert exactly equal). "same_pass_perpass_minmax"
# is an oracle, not a realized row: the per-pass policy planned on the very pass it serves
# (what no placement planned on earlier passes beats under ``minmax``).
EP8_PLACEMENTS = {
    "naive": (None, "static", "trace"),
    "eplb": ("eplb_plugin_equal", "static", "trace"),
    "eplb_minmax": ("eplb_plugin_equal", "minmax", "trace"),
    "eplb_perpass_minmax": ("eplb_plugin_perpass", "minmax", "trace"),
    "eplb_perpass_minmax_tiles": ("eplb_plugin_perpass", "minmax_tiles", "trace"),
    "same_pass_perpass_minmax": ("eplb_plugin_perpass", "minmax", "trace_same_pass"),
    "uniform": (None, "static", "uniform"),
    "uniform_redundant": ("eplb_plugin_equal", "static", "uniform"),
    "uniform_sampled": (None, "static", "uniform_sampled"),
}


def _rank_slots(per_rank_counts: list[int], device: torch.device) -> torch.Tensor:
    """[S] rows per local slot -> [sum] local slot id of each row."""
    counts = torch.tensor(per_rank_counts, device=device)
    return torch.repeat_interleave(torch.arange(len(per_rank_counts), device=device), counts)


def _time_rank(tokens_per_slot: list[int], w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, cuda: bool) -> float:
    """Seconds to run one simulated rank's slots (slot s on tokens_per_slot[s] rows).

    CUDA: the runtime's own expert path (grouped GEMM on Hopper) over this rank's rows,
    captured in a CUDA graph (as the runtime serves) and replayed ``EP8_REPLAYS`` times
    between two events: the mean replay, free of launch overhead and host jitter."""
    if cuda:
        local_slot = _rank_slots(tokens_per_slot, x.device)
        rows = x[: local_slot.numel()]  # x holds batch_tokens * top_k rows: every pair fits
        return _graph_seconds(lambda: run_local_experts(rows, local_slot, w13, w2))
    t0 = time.perf_counter()
    for s, n in enumerate(tokens_per_slot):
        if n:
            expert_ffn(x[:n], w13[s], w2[s])
    return time.perf_counter() - t0


def _graph_seconds(work) -> float:
    """Mean seconds of one replay of ``work`` captured in a CUDA graph."""
    return replay_us(capture_layers(lambda _: work(), 1), replays=EP8_REPLAYS, num_layers=1) / 1e6


def _realized_slot_loads(loc: ExpertLocation, dispatch: str, ids: torch.Tensor) -> torch.Tensor:
    """[L, P] tokens per slot as the dispatch sends one pass ([T, L, k] ids): ``static``, each
    EP8 rank its own contiguous share of the tokens with its own table; ``minmax``, the whole
    pass's counts (``--ep-dispatch-counts global``)."""
    num_layers, num_physical = loc.num_layers, loc.num_physical_experts
    if dispatch == "minmax_tiles":  # an experiment: minmax, then fewer GEMM tiles on the busiest GPU
        loads = _realized_slot_loads(loc, "minmax", ids)
        return torch.stack([fewer_tiles(loads[layer], loc.physical_to_logical_map[layer], EP8, TILE_ROWS)
                            for layer in range(num_layers)])
    if dispatch == "minmax":
        shards = [(ExpertDispatcher(loc, rank=0, algorithm="minmax"), ids)]
    else:
        shards = [(ExpertDispatcher(loc, rank=r, algorithm="static"),
                   ids[shard_tokens(ids.shape[0], rank=r, world_size=EP8)]) for r in range(EP8)]
    out = torch.zeros(num_layers, num_physical, dtype=torch.float64)
    for dispatcher, part in shards:
        for layer in range(num_layers):
            slots = dispatcher.dispatch(layer, part[:, layer]).flatten()
            out[layer] += torch.bincount(slots[slots >= 0], minlength=num_physical).double()
    return out


TILE_ROWS = 256  # rows of one M tile of the grouped GEMM on Hopper (128-row tiles in clusters of 2)


def fewer_tiles(loads: torch.Tensor, phy2log: torch.Tensor, num_gpus: int, tile: int) -> torch.Tensor:
    """An experiment on one layer's slot loads [P] (rows): the grouped GEMM pays each slot's
    rows in whole tiles, so while the GPU with the most tiles holds a replicated expert's
    part tile, move that part to another replica whose GPU then still has fewer tiles and
    fewer rows. Returns the new loads [P]."""
    loads = loads.clone()
    per_gpu = loads.numel() // num_gpus
    gpu_of = torch.arange(loads.numel()) // per_gpu
    experts = phy2log.tolist()

    def tiles(g: int) -> int:
        return int(torch.ceil(loads[g * per_gpu:(g + 1) * per_gpu] / tile).sum())

    def rows(g: int) -> float:
        return float(loads[g * per_gpu:(g + 1) * per_gpu].sum())

    for _ in range(4 * loads.numel()):
        cost = [(tiles(g), rows(g)) for g in range(num_gpus)]
        top = max(range(num_gpus), key=lambda g: cost[g])
        best = None
        for s in range(top * per_gpu, (top + 1) * per_gpu):
            part = float(loads[s]) % tile or float(loads[s])
            if loads[s] <= 0:
                continue
            for t, e in enumerate(experts):
                h = int(gpu_of[t])
                if e != experts[s] or h == top:
                    continue
                new_tiles = cost[h][0] - int(torch.ceil(loads[t] / tile)) + int(-(-(float(loads[t]) + part) // tile))
                if new_tiles < cost[top][0] and cost[h][1] + part < cost[top][1]:
                    key = (new_tiles, cost[h][1] + part)
                    if best is None or key < best[0]:
                        best = (key, s, t, part)
        if best is None:
            break
        _, s, t, part = best
        loads[s] -= part
        loads[t] += part
    return loads


def gemm_units(per_slot: torch.Tensor, num_gpus: int, tile: int) -> torch.Tensor:
    """[L, P] rows per slot -> [L, G] each GPU's grouped-GEMM units: its slots' rows in
    whole ``tile``-row units (an empty slot none)."""
    return torch.ceil(per_slot.double() / tile).view(per_slot.shape[0], num_gpus, -1).sum(-1)


def gemm_units_floor(ids: torch.Tensor, num_experts: int, num_gpus: int, tile: int) -> torch.Tensor:
    """[T, L, k] routed ids -> [L] the fewest units the busiest GPU can hold under any
    placement and dispatch: splitting an expert's rows over replicas never saves a unit
    (ceil(a/t) + ceil(b/t) >= ceil((a+b)/t)), so the GPUs share at least the sum over experts
    of ceil(rows/t), and the busiest holds at least its G-th part, and at least its share of
    the rows in whole units."""
    num_layers = ids.shape[1]
    flat = ids.permute(1, 0, 2).reshape(num_layers, -1).long()
    rows = torch.zeros(num_layers, num_experts + 1, dtype=torch.float64)
    rows.scatter_add_(1, torch.where(flat >= 0, flat, num_experts), torch.ones_like(flat, dtype=torch.float64))
    rows = rows[:, :num_experts]
    by_experts = torch.ceil(torch.ceil(rows / tile).sum(1) / num_gpus)
    by_rows = torch.ceil(rows.sum(1) / num_gpus / tile)
    return torch.maximum(by_experts, by_rows)


def _dispatch_seconds(loc: ExpertLocation, dispatch: str, ids: torch.Tensor, device: torch.device) -> float:
    """Seconds per layer of one rank's dispatch of its share of the pass (the recorder's
    count in the same kernel), all layers in one CUDA graph. The count all-gather of
    ``--ep-dispatch-counts global`` is not included (one device)."""
    dispatcher = ExpertDispatcher(loc, rank=0, algorithm=dispatch, device=device, backend="triton")
    share = ids[shard_tokens(ids.shape[0], rank=0, world_size=EP8)].to(device)
    counts = torch.zeros(loc.num_layers, loc.num_physical_experts, dtype=torch.int32, device=device)

    def work() -> None:
        for layer in range(loc.num_layers):
            dispatcher.dispatch(layer, share[:, layer], counts_out=counts)

    return _graph_seconds(work) / loc.num_layers


def ep8_compute_part(cfg: RuntimeConfig, workload: WorkloadSpec, rebalance_every: int, timed: bool = True) -> dict:
    """Slowest simulated EP8 rank's MoE time per pass (dispatch + experts, summed over
    layers), for each of ``EP8_PLACEMENTS``, with the busiest GPU's GEMM units; with
    ``timed=False`` the units and balancedness alone (no weights, nothing run)."""
    m = cfg.model
    cuda = cfg.device == "cuda" and timed
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    w = workload.build(m, cfg.batch_tokens)
    num_physical = m.num_logical_experts + EP8_REDUNDANT
    trivial = ExpertLocation.trivial(num_layers=m.num_layers, num_logical_experts=m.num_logical_experts,
                                     num_physical_experts=m.num_logical_experts, ep_size=EP8)
    passes = list(range(rebalance_every, rebalance_every + EP8_SAMPLE_PASSES))
    counts = []  # [L, E] per pass, for passes 0 .. last sampled
    routed = {}  # the sampled passes' topk_ids [T, L, k]
    for p in range(passes[-1] + 1):
        ids = w.batch(p).topk_ids
        if p in passes:
            routed[p] = ids
        c = torch.zeros(m.num_layers, m.num_logical_experts + 1, dtype=torch.float64)
        c.scatter_add_(1, torch.where(ids >= 0, ids, m.num_logical_experts).permute(1, 0, 2).reshape(m.num_layers, -1),
                       torch.ones(m.num_layers, ids.shape[0] * ids.shape[2], dtype=torch.float64))
        counts.append(c[:, :-1])
    slots_max = -(-num_physical // EP8)
    if timed:
        shape = FFNShape(m.hidden_size, m.intermediate_size, cfg.torch_dtype, device, cfg.seed)
        pool = [make_expert_weights(0, e, shape) for e in range(slots_max)]  # values do not change the time
        w13 = torch.stack([a for a, _ in pool])
        w2 = torch.stack([b for _, b in pool])
        x = torch.randn(cfg.batch_tokens * m.top_k, m.hidden_size, device=device).to(cfg.torch_dtype)
    uniform = torch.full((m.num_layers, m.num_logical_experts), cfg.batch_tokens * m.top_k / m.num_logical_experts,
                         dtype=torch.float64)
    out: dict = {"label": "EP8 compute part (one device, each simulated EP8 rank's expert FFNs timed alone; "
                          "step = sum over layers of the rank's dispatch + the slowest rank's experts; "
                          "no communication)",
                 "timing": f"CUDA graph per rank and layer, mean of {EP8_REPLAYS} replays" if cuda
                           else "eager, one core",
                 "ep_size": EP8, "sample_passes": passes, "gemm_tile_rows": TILE_ROWS,
                 "gemm_units_floor": float(np.mean([gemm_units_floor(routed[p], m.num_logical_experts, EP8,
                                                                     TILE_ROWS).mean() for p in passes])),
                 "placements": {}}
    if not timed:
        out["timing"] = "none (--ep8-units-only)"
    elif not cuda:
        torch.set_num_threads(1)  # one core per simulated rank, as in the runtime's CPU ranks
    if timed:
        expert_ffn(x[:16], w13[0], w2[0])  # warm-up (kernel selection, allocator)
    for name, (policy, dispatch, traffic) in EP8_PLACEMENTS.items():
        steps, expert_steps, dispatch_us, bals, units = [], [], [], [], []
        for p in passes:
            if policy is None:
                loc = trivial
            else:  # planned on the passes before p only (realized, not fitted), or on p itself (the oracle)
                window = (torch.stack(counts[p - rebalance_every : p]) if traffic == "trace"  # [B, L, E]
                          else counts[p][None] if traffic == "trace_same_pass" else uniform)
                loc = ExpertLocation.from_logical_count(window, num_physical_experts=num_physical, ep_size=EP8,
                                                        algorithm=policy)
            if traffic == "uniform":
                per_slot = slot_loads(uniform, loc.physical_to_logical_map, loc.replica_weights)
            elif traffic == "uniform_sampled":  # k distinct experts per token, uniformly at random
                gen = torch.Generator().manual_seed(p)
                draws = torch.rand(routed[p].shape[0], m.num_layers, m.num_logical_experts, generator=gen)
                per_slot = _realized_slot_loads(loc, dispatch, draws.topk(m.top_k, dim=-1).indices)
            else:  # the trace's pass p
                per_slot = _realized_slot_loads(loc, dispatch, routed[p])
            per_slot = per_slot.round().long()  # [L, P]
            bals.append(float(layer_balancedness(gpu_loads(per_slot, EP8)).mean()))
            units.append(float(gemm_units(per_slot, EP8, TILE_ROWS).max(1).values.mean()))
            if not timed:
                continue
            per_layer = 0.0 if not cuda else _dispatch_seconds(loc, dispatch.removesuffix("_tiles"), routed[p], device)
            experts = sum(max(_time_rank(r, w13, w2, x, cuda) for r in per_slot[layer].view(EP8, -1).tolist())
                          for layer in range(m.num_layers))
            expert_steps.append(experts)
            dispatch_us.append(1e6 * per_layer)
            steps.append(experts + per_layer * m.num_layers)
        out["placements"][name] = {"policy": policy, "dispatch": dispatch, "traffic": traffic,
                                   "balancedness_mean": float(np.mean(bals)),
                                   "gemm_units_busiest_mean": float(np.mean(units))}
        if not timed:
            continue
        out["placements"][name] |= {"step_ms_median": 1e3 * float(np.median(steps)),
                                   "expert_step_ms_median": 1e3 * float(np.median(expert_steps)),
                                   "dispatch_us_per_layer_median": float(np.median(dispatch_us)),
                                   "step_ms_per_pass": [1e3 * s for s in steps]}
    if not timed:
        return out
    uni = out["placements"]["uniform"]["step_ms_median"]
    uni_redundant = out["placements"]["uniform_redundant"]["step_ms_median"]
    uni_sampled = out["placements"]["uniform_sampled"]["step_ms_median"]
    for v in out["placements"].values():
        v["step_over_uniform"] = v["step_ms_median"] / uni
        v["step_over_uniform_redundant"] = v["step_ms_median"] / uni_redundant
        v["step_over_uniform_sampled"] = v["step_ms_median"] / uni_sampled
    return out


def print_ep8(ep8: dict) -> None:
    """One line per placement of ``ep8_compute_part``'s result (timed or units only)."""
    print(f"EP8 compute part: the busiest GPU holds at least {ep8['gemm_units_floor']:.2f} GEMM units of "
          f"{ep8['gemm_tile_rows']} rows (mean over layers and passes), under any placement and dispatch")
    for name, v in ep8["placements"].items():
        if "step_ms_median" not in v:
            print(f"EP8 compute part, {name:>19}: busiest GPU {v['gemm_units_busiest_mean']:.2f} GEMM units, "
                  f"balancedness {v['balancedness_mean']:.3f}")
            continue
        print(f"EP8 compute part, {name:>19}: step {v['step_ms_median']:.3f} ms (median; experts "
              f"{v['expert_step_ms_median']:.3f}, dispatch {v['dispatch_us_per_layer_median']:.1f} us/layer), "
              f"{v['step_over_uniform']:.3f}x uniform ({v['step_over_uniform_redundant']:.3f}x on as many slots, "
              f"{v['step_over_uniform_sampled']:.3f}x sampled uniform), "
              f"balancedness {v['balancedness_mean']:.3f}, busiest GPU {v['gemm_units_busiest_mean']:.2f} GEMM units")
