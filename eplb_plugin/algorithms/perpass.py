"""The project's per-pass policy (``eplb_plugin_perpass``): a placement for ``minmax`` dispatch,
planned on the window's passes rather than their sum.

Under ``minmax`` each pass's tokens of a replicated expert are split so that the pass's
largest GPU load is (near) minimal, so what matters is not only each GPU's mean load but
which GPUs can hand load to which, pass by pass. Starting from the equal-split plan of the
window's sum (migration-aware when a previous placement is given):

1. Each round, every layer draws ``candidates`` changes: a swap of two slots (within one
   node when there are several), or a slot of an expert with spare replicas given to an
   expert drawn by its window load. With one node, half the draws aim: a slot on the GPU
   that peaks in most of the window's passes swapped with one on the least loaded GPU, or a
   spare replica on the least loaded GPU given to an expert of the peaking one.
2. Every candidate is scored on the window's passes with ``minmax``'s own split
   (``kernels/minmax.py``): the mean over passes of the per-pass balancedness.
3. Each layer keeps its best candidate when it beats the current map.

It buys per-pass balance with moves: on the ESFT replay (EP8 / 72 and EP16 / 80 slots) it
changes a third to a half of the slots per rebalance, where the equal-split plan changes a
tenth (``benchmarks/bench_per_pass_balance.py``). With a move budget (``previous`` and
``max_moves``, ``plan_within_budget``) it re-plans only the layers where the live map has
gone stale, a layer whose live map scores below a fresh equal-split plan of the window's
sum on the window's passes: those start from the fresh plan where it is worth its moves
(up to half the budget, best gain per moved slot first), then all of them are refined
within the budget, taking changes by gain per moved slot and also drawing changes that put
a slot back to its live expert. Layers that are not stale keep their slots: small
window-to-window gains there do not hold on the next passes (on the ESFT replay, moving
them changed nothing measurable), so the budget is kept for when the traffic shifts (the
manager carries unused budget over, ``--eplb-move-budget-carry``).

Pure torch on CPU, vectorized over layers and candidates; seeded, so a plan is repeatable.
"""

from __future__ import annotations

import numpy as np
import torch

from ..counts import bucket_passes
from ..errors import UsageError
from ..kernels.minmax import minmax_loads

PERPASS_ROUNDS = 20
PERPASS_CANDIDATES = 16  # changes tried per layer per round
PERPASS_MAX_PASSES = 16  # window passes scored (more are summed into this many buckets)
PERPASS_SCORE_ITERATIONS = 10  # diffusion steps when scoring (ranking candidates needs fewer)
PERPASS_SEED = 0


def _pass_gpu_loads(maps: torch.Tensor, counts: torch.Tensor, *, num_gpus: int) -> torch.Tensor:
    """maps: [N, P] int64; counts: [N, W, E] float32. Returns [N, W, G]: each pass's GPU
    loads under ``minmax`` dispatch."""
    num_maps, num_passes, num_logical = counts.shape
    gpu = minmax_loads(maps.repeat_interleave(num_passes, 0), counts.reshape(num_maps * num_passes, num_logical),
                       num_gpus=num_gpus, iterations=PERPASS_SCORE_ITERATIONS)
    return gpu.view(num_maps, num_passes, num_gpus)


def mean_pass_balancedness(maps: torch.Tensor, counts: torch.Tensor, *, num_gpus: int) -> torch.Tensor:
    """maps: [N, P] int64; counts: [N, W, E] float32 (W passes per map). Returns [N]: the mean
    over the W passes of mean/max GPU load under ``minmax`` dispatch."""
    gpu = _pass_gpu_loads(maps, counts, num_gpus=num_gpus)
    return (gpu.mean(-1) / gpu.amax(-1).clamp_min(1e-9)).mean(1)


def _buckets(per_pass: np.ndarray) -> torch.Tensor:
    """[B, L, E] -> [L, W, E] float32 with W <= PERPASS_MAX_PASSES (consecutive passes summed)."""
    rows = torch.from_numpy(np.ascontiguousarray(per_pass, dtype=np.float32))
    return bucket_passes(rows, PERPASS_MAX_PASSES).permute(1, 0, 2).contiguous()


def refine_for_minmax(
    start: np.ndarray, per_pass: np.ndarray, *, num_gpus: int, num_nodes: int = 1, rounds: int = PERPASS_ROUNDS,
    candidates: int = PERPASS_CANDIDATES, seed: int = PERPASS_SEED, previous: np.ndarray | None = None,
    max_moves: int | None = None,
) -> np.ndarray:
    """start: [L, P] int map to refine (rank-major; with nodes, node-major too); per_pass:
    [B, L, E] window counts. Returns [L, P] int64; no layer scores worse than in ``start``.

    previous / max_moves: the live map and how many slots (over all layers) may differ from
    it in the result. With both, changes are also drawn that put a slot back to its live
    expert, a change that adds moves is taken only while the budget lasts, the layers' best
    changes by gain per added move first, and ``start`` must itself be within the budget
    (UsageError otherwise). With one node, half the draws swap slots between the GPU that
    peaks in most of the window's passes and the least loaded one, or give a spare replica
    on the latter to an expert of the former."""
    gen = torch.Generator().manual_seed(seed)
    counts = _buckets(per_pass)  # [L, W, E]
    current = torch.tensor(np.asarray(start), dtype=torch.int64)  # a copy: refined in place
    num_layers, num_slots = current.shape
    num_passes, num_logical = counts.shape[1], counts.shape[2]
    slots_per_node = num_slots // num_nodes
    budgeted = previous is not None and max_moves is not None
    live = torch.tensor(np.asarray(previous), dtype=torch.int64) if budgeted else current
    moves = (current != live).sum(1)  # [L]
    best = mean_pass_balancedness(current, counts, num_gpus=num_gpus)
    layer_idx = torch.arange(num_layers)[:, None].expand(num_layers, candidates)
    cand_idx = torch.arange(candidates)[None].expand(num_layers, candidates)
    if budgeted and int(moves.sum()) > max_moves:
        raise UsageError(f"start differs from previous in {int(moves.sum())} slots, over max_moves={max_moves}")
    popularity = counts.sum(1) + 1e-3  # [L, E]
    for _ in range(rounds):
        # Step 1: candidate changes, drawn per layer.
        cand = current.unsqueeze(1).repeat(1, candidates, 1)  # [L, K, P]
        i = torch.randint(0, num_slots, (num_layers, candidates), generator=gen)
        j = (i // slots_per_node) * slots_per_node + torch.randint(0, slots_per_node, i.shape, generator=gen)
        kind = torch.rand(i.shape, generator=gen)
        swap = kind < 0.5
        at_i, at_j = cand[layer_idx, cand_idx, i], cand[layer_idx, cand_idx, j]
        cand[layer_idx[swap], cand_idx[swap], i[swap]] = at_j[swap]
        cand[layer_idx[swap], cand_idx[swap], j[swap]] = at_i[swap]
        replicas = torch.zeros(num_layers, num_logical).scatter_add_(1, current, torch.ones(num_layers, num_slots))
        spare = ~swap & (replicas.gather(1, at_i) >= 2)  # the expert keeps a replica elsewhere
        if budgeted:  # a quarter of the draws: a moved slot back to its live expert
            back = kind >= 0.75
            moved_slot = torch.multinomial((current != live).float() + 1e-9, candidates, replacement=True, generator=gen)
            was = live.gather(1, moved_slot)
            now = current.gather(1, moved_slot)
            back &= (replicas.gather(1, now) >= 2) | (was == now)
            cand[layer_idx[back], cand_idx[back], moved_slot[back]] = was[back]
            spare &= ~back
        drawn = torch.multinomial(popularity, candidates, replacement=True, generator=gen)
        if num_nodes == 1:  # half the draws aim at the GPU that peaks most often and the coldest one
            gpu = _pass_gpu_loads(current, counts, num_gpus=num_gpus)  # [L, W, G]
            peaks = torch.zeros(num_layers, num_gpus).scatter_add_(1, gpu.argmax(-1), torch.ones(num_layers, num_passes))
            hot, cold = peaks.argmax(1), gpu.mean(1).argmin(1)  # [L]
            per_gpu = num_slots // num_gpus
            aim = torch.rand(i.shape, generator=gen) < 0.5
            if budgeted:
                aim &= ~back
            cand[layer_idx[aim], cand_idx[aim]] = current[layer_idx[aim]]  # aimed rows start afresh
            hot_slot = hot[:, None] * per_gpu + torch.randint(0, per_gpu, i.shape, generator=gen)
            cold_slot = cold[:, None] * per_gpu + torch.randint(0, per_gpu, i.shape, generator=gen)
            at_h, at_c = current.gather(1, hot_slot), current.gather(1, cold_slot)
            a_swap = aim & swap
            cand[layer_idx[a_swap], cand_idx[a_swap], hot_slot[a_swap]] = at_c[a_swap]
            cand[layer_idx[a_swap], cand_idx[a_swap], cold_slot[a_swap]] = at_h[a_swap]
            a_give = aim & ~swap & (replicas.gather(1, at_c) >= 2)  # a spare replica on the cold GPU ...
            cand[layer_idx[a_give], cand_idx[a_give], cold_slot[a_give]] = at_h[a_give]  # ... hosts a hot expert
            spare &= ~aim
        cand[layer_idx[spare], cand_idx[spare], i[spare]] = drawn[spare]
        # Step 2: score every candidate on the window's passes.
        score = mean_pass_balancedness(cand.view(-1, num_slots), counts.repeat_interleave(candidates, 0),
                                       num_gpus=num_gpus).view(num_layers, candidates)
        # Step 3: keep each layer's best candidate where it improves (within the budget).
        gain = score - best[:, None]
        if not budgeted:
            top, arg = score.max(1)
            better = top > best + 1e-6
        else:
            added = (cand != live[:, None]).sum(-1) - moves[:, None]  # [L, K]
            value = torch.where(added <= 0, gain + 1.0, gain / added.clamp_min(1))  # free changes first
            value = torch.where(gain > 1e-6, value, -1.0)
            top_value, arg = value.max(1)
            better = top_value > 0
            cost = added[torch.arange(num_layers), arg].clamp_min(0)
            order = torch.argsort(top_value, descending=True)
            spend = torch.cumsum(torch.where(better, cost, 0)[order], 0)
            room = max_moves - int(moves.sum())
            within = torch.zeros_like(better)
            within[order] = spend <= room
            better &= within
            top = score[torch.arange(num_layers), arg]
        current[better] = cand[torch.arange(num_layers)[better], arg[better]]
        best = torch.where(better, top, best)
        moves = (current != live).sum(1)
    return current.numpy()


def plan_within_budget(fresh: np.ndarray, live: np.ndarray, per_pass: np.ndarray, *, num_gpus: int,
                       num_nodes: int = 1, max_moves: int) -> np.ndarray:
    """fresh: [L, P] a fresh plan of the window's sum, aligned to ``live`` (the live map,
    [L, P]); per_pass: [B, L, E]. Returns [L, P] int64 differing from ``live`` in at most
    ``max_moves`` slots, changed only in stale layers (the live map scores below the fresh
    one on the window's passes; none stale: ``live``).

    Step 1: stale layers take their fresh map, best window gain per moved slot first, while
    the moves stay within half the budget. Step 2: ``refine_for_minmax`` of the stale layers
    alone from there, within the whole budget (the others keep their live rows, no moves)."""
    counts = _buckets(per_pass)
    live_t = torch.as_tensor(np.asarray(live), dtype=torch.int64)
    fresh_t = torch.as_tensor(np.asarray(fresh), dtype=torch.int64)
    gain = mean_pass_balancedness(fresh_t, counts, num_gpus=num_gpus) \
        - mean_pass_balancedness(live_t, counts, num_gpus=num_gpus)  # [L]
    stale = (gain > 1e-6).nonzero().flatten()
    planned = live_t.numpy().copy()
    if stale.numel() == 0:
        return planned
    cost = (fresh_t != live_t).sum(1)  # [L] slots the fresh map moves
    start = live_t.clone()
    spent = 0
    for layer in torch.argsort(gain / cost.clamp_min(1), descending=True).tolist():
        if gain[layer] > 1e-6 and spent + int(cost[layer]) <= max_moves // 2:
            start[layer] = fresh_t[layer]
            spent += int(cost[layer])
    rows = stale.numpy()
    planned[rows] = refine_for_minmax(start[rows].numpy(), np.asarray(per_pass)[:, rows], num_gpus=num_gpus,
                                      num_nodes=num_nodes, previous=planned[rows], max_moves=max_moves)
    return planned
