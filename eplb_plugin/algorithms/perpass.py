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
``max_moves``, ``plan_within_budget``) it re-plans only the layers that are stale (the live
map scores below a fresh equal-split plan of the window's sum on the window's passes) or
whose traffic has shifted (a plan made on half the window's passes beats the live map on
the other half, beyond the passes' noise: ``shifted_layers``). Those layers walk a greedy
path from their live map toward the plan made without a budget, and the budget goes along
the paths where the gain per moved slot is steepest; then they are refined within the
budget. Layers that are neither keep their slots: small window-to-window gains do not hold
on the next passes, so the budget is kept for when the traffic shifts (the manager carries
unused budget over, ``--eplb-move-budget-carry``).

Pure torch on CPU, vectorized over layers and candidates; seeded, so a plan is repeatable.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..balance import gpu_loads, slot_loads
from ..counts import bucket_passes
from ..errors import UsageError
from ..kernels.minmax import build_minmax_tables, minmax_gpu_shares
from .migrate import align_to_previous

DEADLINE_SHARES = (0.5, 0.85)  # a budgeted plan under a deadline: shift test and targets, then the paths
PERPASS_ROUNDS = 20
PERPASS_CANDIDATES = 16  # changes tried per layer per round
PERPASS_MAX_PASSES = 16  # window passes scored (more are summed into this many buckets)
PERPASS_SCORE_ITERATIONS = 10  # diffusion steps when scoring (ranking candidates needs fewer)
PERPASS_SEED = 0  # the search's seed, read at each call (bench_per_pass_balance.py --seeds varies it)
SHIFT_T = 2.0  # standard errors a held-out gain must clear for a layer to count as shifted
SHIFT_MIN_FOLD_PASSES = 2  # passes per fold below which no shift test runs
PATH_SINGLE = 16  # a path's first rounds take one change each ...
PATH_GROWTH = 4  # ... then one more per round every PATH_GROWTH rounds
PATH_LOOKAHEAD = 16  # slots a path runs past the budget's reach before it stops


def _past(deadline: float | None) -> bool:
    """Whether ``deadline`` (a ``time.perf_counter()`` value; None: none) has passed."""
    return deadline is not None and time.perf_counter() >= deadline


def _shares_of(deadline: float | None) -> tuple[float | None, float | None]:
    """The deadlines of a budgeted plan's phases, ``DEADLINE_SHARES`` of the time left until
    ``deadline`` (None: none): the paths, which spend the budget, keep time of their own."""
    if deadline is None:
        return None, None
    now = time.perf_counter()
    left = max(0.0, deadline - now)
    return now + DEADLINE_SHARES[0] * left, now + DEADLINE_SHARES[1] * left


def _pass_gpu_loads(maps: torch.Tensor, counts: torch.Tensor, *, num_gpus: int,
                    follows_pass: bool = True) -> torch.Tensor:
    """maps: [N, P] int64; counts: [N, W, E] float32. Returns [N, W, G]: each pass's GPU
    loads under ``minmax`` dispatch (``follows_pass``), or under a dispatch that spreads each
    expert's tokens evenly over its replicas whatever the pass (static, random, dynamic:
    ``balance.slot_loads``' equal split, as ``evaluate.per_pass_balancedness`` scores them)."""
    num_maps, num_passes, num_logical = counts.shape
    if not follows_pass:
        rows = slot_loads(counts.reshape(num_maps * num_passes, num_logical), maps.repeat_interleave(num_passes, 0))
        return gpu_loads(rows, num_gpus).view(num_maps, num_passes, num_gpus).float()
    tables = build_minmax_tables(maps, num_logical, num_gpus=num_gpus, entries=False)  # once per map, not per pass
    _, gpu = minmax_gpu_shares(counts.reshape(num_maps * num_passes, num_logical),
                               tables.multi_experts.repeat_interleave(num_passes, 0),
                               tables.multi_gpus.repeat_interleave(num_passes, 0),
                               tables.single_slots.repeat_interleave(num_passes, 0),
                               iterations=PERPASS_SCORE_ITERATIONS)
    return gpu.view(num_maps, num_passes, num_gpus)


def _pass_balancedness(maps: torch.Tensor, counts: torch.Tensor, *, num_gpus: int,
                       follows_pass: bool = True) -> torch.Tensor:
    """maps: [N, P] int64; counts: [N, W, E] float32. Returns [N, W]: each pass's mean/max GPU
    load under ``minmax`` dispatch (or an even spread: ``_pass_gpu_loads``)."""
    gpu = _pass_gpu_loads(maps, counts, num_gpus=num_gpus, follows_pass=follows_pass)
    return gpu.mean(-1) / gpu.amax(-1).clamp_min(1e-9)


def mean_pass_balancedness(maps: torch.Tensor, counts: torch.Tensor, *, num_gpus: int,
                           follows_pass: bool = True) -> torch.Tensor:
    """maps: [N, P] int64; counts: [N, W, E] float32 (W passes per map). Returns [N]: the mean
    over the W passes of mean/max GPU load under ``minmax`` dispatch (or an even spread:
    ``_pass_gpu_loads``)."""
    return _pass_balancedness(maps, counts, num_gpus=num_gpus, follows_pass=follows_pass).mean(1)


def _buckets(per_pass: np.ndarray) -> torch.Tensor:
    """[B, L, E] -> [L, W, E] float32 with W <= PERPASS_MAX_PASSES (consecutive passes summed)."""
    rows = torch.from_numpy(np.ascontiguousarray(per_pass, dtype=np.float32))
    return bucket_passes(rows, PERPASS_MAX_PASSES).permute(1, 0, 2).contiguous()


def refine_for_minmax(
    start: np.ndarray, per_pass: np.ndarray, *, num_gpus: int, num_nodes: int = 1, rounds: int = PERPASS_ROUNDS,
    candidates: int = PERPASS_CANDIDATES, seed: int | None = None, previous: np.ndarray | None = None,
    max_moves: int | None = None, deadline: float | None = None, follows_pass: bool = True,
) -> np.ndarray:
    """start: [L, P] int map to refine (rank-major; with nodes, node-major too); per_pass:
    [B, L, E] window counts. Returns [L, P] int64; no layer scores worse than in ``start``.

    previous / max_moves: the live map and how many slots (over all layers) may differ from
    it in the result. With both, changes are also drawn that put a slot back to its live
    expert, a change that adds moves is taken only while the budget lasts, the layers' best
    changes by gain per added move first, and ``start`` must itself be within the budget
    (UsageError otherwise). With one node, half the draws swap slots between the GPU that
    peaks in most of the window's passes and the least loaded one, or give a spare replica
    on the latter to an expert of the former. deadline: a ``time.perf_counter()`` value past
    which no further round starts (the rounds so far are kept: an anytime search).
    follows_pass: the dispatch that will serve the map splits each pass (``minmax``, the
    default) or spreads evenly whatever the pass (static, random): candidates are scored so."""
    gen = torch.Generator().manual_seed(PERPASS_SEED if seed is None else seed)
    counts = _buckets(per_pass)  # [L, W, E]
    current = torch.tensor(np.asarray(start), dtype=torch.int64)  # a copy: refined in place
    num_layers, num_slots = current.shape
    num_passes, num_logical = counts.shape[1], counts.shape[2]
    slots_per_node = num_slots // num_nodes
    budgeted = previous is not None and max_moves is not None
    live = torch.tensor(np.asarray(previous), dtype=torch.int64) if budgeted else current
    moves = (current != live).sum(1)  # [L]
    best = mean_pass_balancedness(current, counts, num_gpus=num_gpus, follows_pass=follows_pass)
    layer_idx = torch.arange(num_layers)[:, None].expand(num_layers, candidates)
    cand_idx = torch.arange(candidates)[None].expand(num_layers, candidates)
    if budgeted and int(moves.sum()) > max_moves:
        raise UsageError(f"start differs from previous in {int(moves.sum())} slots, over max_moves={max_moves}")
    popularity = counts.sum(1) + 1e-3  # [L, E]
    for _ in range(rounds):
        if _past(deadline):
            break
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
            gpu = _pass_gpu_loads(current, counts, num_gpus=num_gpus, follows_pass=follows_pass)  # [L, W, G]
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
                                       num_gpus=num_gpus, follows_pass=follows_pass).view(num_layers, candidates)
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


def shifted_layers(fresh: np.ndarray, live: np.ndarray, per_pass: np.ndarray, *, num_gpus: int,
                   num_nodes: int = 1, deadline: float | None = None, follows_pass: bool = True) -> torch.Tensor:
    """[L] bool: layers where a plan made for the window's traffic beats the live map on
    passes it was not made from, beyond the passes' noise. Two folds: the fresh plan refined
    on the even passes is scored on the odd ones against the live map, and the other way
    round; a layer has shifted when the mean of those per-pass gains is more than
    ``SHIFT_T`` standard errors above 0 (a one-sided t-test). Under steady traffic both maps
    are out of sample on the held-out passes and the refined one has seen half the passes,
    so small window-to-window gains (which do not hold on the next passes) are not taken for
    a shift. Fewer than ``2 * SHIFT_MIN_FOLD_PASSES`` passes: no layer has (no test).
    deadline, follows_pass: as ``refine_for_minmax``'s (less refined fits find fewer shifts)."""
    per_pass = np.asarray(per_pass)
    num_layers = per_pass.shape[1]
    if per_pass.shape[0] < 2 * SHIFT_MIN_FOLD_PASSES:
        return torch.zeros(num_layers, dtype=torch.bool)
    live_t = torch.as_tensor(np.asarray(live), dtype=torch.int64)
    gains = []
    for fit, held in ((per_pass[0::2], per_pass[1::2]), (per_pass[1::2], per_pass[0::2])):
        fitted = torch.as_tensor(refine_for_minmax(fresh, fit, num_gpus=num_gpus, num_nodes=num_nodes,
                                                   deadline=deadline, follows_pass=follows_pass))
        counts = _buckets(held)
        gains.append(_pass_balancedness(fitted, counts, num_gpus=num_gpus, follows_pass=follows_pass)
                     - _pass_balancedness(live_t, counts, num_gpus=num_gpus, follows_pass=follows_pass))
    gain = torch.cat(gains, 1)  # [L, held-out passes of both folds]
    stderr = gain.std(1) / gain.shape[1] ** 0.5
    return gain.mean(1) > SHIFT_T * stderr.clamp_min(1e-9)


def _path_to(live: torch.Tensor, target: torch.Tensor, counts: torch.Tensor, *, num_gpus: int, max_cost: int,
             gen: torch.Generator, deadline: float | None = None,
             follows_pass: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A greedy path of valid maps from ``live`` to ``target`` ([L, P] each), one change
    per step: a change sets a slot to its target expert when the expert it holds keeps a
    replica elsewhere, or else swaps it with a slot that holds that target expert and wants
    this one (a pure swap). Each round draws ``PERPASS_CANDIDATES`` of every layer's valid
    changes, scores each on ``counts`` and takes the best; after the first ``PATH_SINGLE``
    rounds, round ``r`` takes up to ``1 + (r - PATH_SINGLE) // PATH_GROWTH`` of them
    (``PERPASS_CANDIDATES // 2`` at most), best first, on distinct slots and never the last
    replica of an expert, and scores each prefix. So the early, steep part of a path (where
    a budget is spent) is greedy one change at a time, and a long path takes O(sqrt(its
    length)) rounds. A layer stops where no valid change is left (a cycle of three or more
    single replicas stays as it is live), once its path runs ``PATH_LOOKAHEAD`` slots past
    where a binding budget spent over the paths so far (``_spend_along``) would stop it, and
    after ``max_cost`` steps (each step changes a slot or two: a longer prefix would not fit
    that budget), and where ``deadline`` passes (the path so far: every step a valid map).
    follows_pass: as ``refine_for_minmax``'s.

    Returns (cost [L, S]: slots changed after each step, cumulative; score [L, S]; changes
    [S - 1, L, 4]: per step and layer the slots and experts written, (slot, expert, slot,
    expert), -1 where none); step 0 is ``live``."""
    current = live.clone()
    num_layers, num_slots = current.shape
    num_logical = counts.shape[2]
    k = PERPASS_CANDIDATES
    rows = torch.arange(num_layers)
    layer_idx, cand_idx = rows[:, None].expand(num_layers, k), torch.arange(k)[None].expand(num_layers, k)
    cost = [torch.zeros(num_layers, dtype=torch.int64)]
    score = [mean_pass_balancedness(current, counts, num_gpus=num_gpus, follows_pass=follows_pass)]
    changes: list[torch.Tensor] = []
    active = torch.ones(num_layers, dtype=torch.bool)
    for round_ in range(min(num_slots, max_cost)):  # every round closes at least one difference
        if len(changes) >= max_cost or _past(deadline):
            break
        differs = current != target
        if not differs.any():
            break
        replicas = torch.zeros(num_layers, num_logical).scatter_add_(1, current, torch.ones(num_layers, num_slots))
        single = differs & (replicas.gather(1, current) >= 2)  # [L, P]
        # a pure swap's partner: a differing slot that holds this slot's target and wants its expert
        partner_ok = differs[:, None] & (current[:, None] == target[..., None]) \
            & (target[:, None] == current[..., None])  # [L, P, P]
        swap = differs & ~single & partner_ok.any(-1)
        valid = single | swap
        if not valid.any():
            break
        # [L, K] drawn among the valid changes (a layer with none draws anything: never taken)
        slot = torch.multinomial(valid.float() + (~valid.any(1, keepdim=True)).float(), k, replacement=True,
                                 generator=gen)
        leaving, coming = current.gather(1, slot), target.gather(1, slot)
        valid_single, valid_swap = single.gather(1, slot), swap.gather(1, slot)
        partner = torch.where(valid_swap, partner_ok.float().argmax(-1).gather(1, slot), -1)
        cand = current.unsqueeze(1).repeat(1, k, 1)
        ok = valid_single | valid_swap
        cand[layer_idx[ok], cand_idx[ok], slot[ok]] = coming[ok]
        cand[layer_idx[valid_swap], cand_idx[valid_swap], partner[valid_swap]] = leaving[valid_swap]
        ok &= active[:, None]
        moving = ok.any(1).nonzero().flatten()  # only these layers are scored
        if moving.numel() == 0:
            break
        scored = torch.full((num_layers, k), -1.0)
        scored[moving] = torch.where(ok[moving], mean_pass_balancedness(
            cand[moving].view(-1, num_slots), counts[moving].repeat_interleave(k, 0), num_gpus=num_gpus,
            follows_pass=follows_pass).view(-1, k), -1.0)
        take = min(k // 2, 1 + max(0, round_ - PATH_SINGLE) // PATH_GROWTH, max_cost - len(changes))
        # Take up to ``take`` changes per layer, best first: distinct slots, and an expert
        # keeps at least one replica (a single change removes one of ``leaving``'s).
        order = torch.argsort(scored, dim=1, descending=True, stable=True)
        used = torch.zeros(num_layers, num_slots, dtype=torch.bool)
        removed = torch.zeros(num_layers, num_logical)
        taken = torch.zeros(num_layers, dtype=torch.int64)
        round_changes = torch.full((take, num_layers, 4), -1, dtype=torch.int64)
        for rank in range(k):
            c = order[:, rank:rank + 1]
            s_, p_ = slot.gather(1, c)[:, 0], partner.gather(1, c)[:, 0]
            out, into = leaving.gather(1, c)[:, 0], coming.gather(1, c)[:, 0]
            is_single = valid_single.gather(1, c)[:, 0]
            accept = ok.gather(1, c)[:, 0] & (taken < take) & ~used[rows, s_] \
                & ((p_ < 0) | ~used[rows, p_.clamp_min(0)]) \
                & (~is_single | (removed[rows, out] + 1 < replicas[rows, out]))
            if not accept.any():
                continue
            at = taken[accept]
            round_changes[at, rows[accept]] = torch.stack(
                [s_, into, p_, torch.where(p_ >= 0, out, -1)], 1)[accept]
            used[rows[accept], s_[accept]] = True
            swapped = accept & (p_ >= 0)
            used[rows[swapped], p_[swapped]] = True
            removed[rows[accept & is_single], out[accept & is_single]] += 1
            taken += accept.long()
            if bool((taken >= take).all()):
                break
        # Apply the round's changes in order, scoring every prefix (one change: its own score).
        prefixes = []
        for change in round_changes:
            step = change[:, 0] >= 0
            current[rows[step], change[step, 0]] = change[step, 1]
            swapped = change[:, 2] >= 0
            current[rows[swapped], change[swapped, 2]] = change[swapped, 3]
            if take > 1:  # a single change's map was scored as a candidate
                prefixes.append(current.clone())
            changes.append(change)
            cost.append(cost[-1] + (change[:, [0, 2]] >= 0).sum(1))
        if take == 1:
            best = scored.gather(1, order[:, :1])[:, 0]
            score.append(torch.where(round_changes[0, :, 0] >= 0, best, score[-1]))
        else:
            scores = torch.zeros(num_layers, take)
            scores[moving] = mean_pass_balancedness(
                torch.stack(prefixes, 1)[moving].view(-1, num_slots), counts[moving].repeat_interleave(take, 0),
                num_gpus=num_gpus, follows_pass=follows_pass).view(-1, take)
            for j in range(take):
                score.append(torch.where(round_changes[j, :, 0] >= 0, scores[:, j], score[-1]))
        # A layer stops once its path runs PATH_LOOKAHEAD slots past where the budget, spent
        # over the paths so far, would stop it while the budget is binding: the paths only
        # get longer, so the slope the budget reaches down to only rises.
        if int(cost[-1].sum()) > max_cost:
            cost_t, score_t = torch.stack(cost, 1), torch.stack(score, 1)
            stop = torch.tensor(_spend_along(cost_t, score_t, max_cost))
            spent = cost_t[rows, stop]
            if int(spent.sum()) + PATH_LOOKAHEAD > max_cost:
                active &= cost[-1] - spent < PATH_LOOKAHEAD
    empty = torch.empty(0, num_layers, 4, dtype=torch.int64)
    return torch.stack(cost, 1), torch.stack(score, 1), torch.stack(changes) if changes else empty


def _spend_along(cost: torch.Tensor, score: torch.Tensor, budget: int) -> list[int]:
    """cost, score: [L, S] along each layer's path. Returns the step each layer stops at:
    the budget goes to the steepest gains per slot over all layers (each path's upper
    concave hull, its segments taken by slope while they fit and gain)."""
    segments = []  # (gain per slot, layer, from step, to step, slots)
    for layer in range(cost.shape[0]):
        c, v = cost[layer].tolist(), score[layer].tolist()
        hull = [0]  # the upper concave hull of (c, v) from step 0
        for j in range(1, len(c)):
            if c[j] == c[hull[-1]]:
                if v[j] > v[hull[-1]] and len(hull) > 1:
                    hull[-1] = j
                continue
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                if (v[b] - v[a]) * (c[j] - c[a]) <= (v[j] - v[a]) * (c[b] - c[a]):
                    hull.pop()  # b lies on or below the chord from a to j
                else:
                    break
            hull.append(j)
        for a, b in zip(hull, hull[1:]):
            if v[b] > v[a]:
                segments.append(((v[b] - v[a]) / (c[b] - c[a]), layer, a, b, c[b] - c[a]))
    stop, spent = [0] * cost.shape[0], 0
    for _, layer, a, b, slots in sorted(segments, key=lambda seg: -seg[0]):
        if stop[layer] == a and spent + slots <= budget:
            stop[layer], spent = b, spent + slots
    return stop


def plan_within_budget(fresh: np.ndarray, live: np.ndarray, per_pass: np.ndarray, *, num_gpus: int,
                       num_nodes: int = 1, max_moves: int, deadline: float | None = None,
                       follows_pass: bool = True) -> np.ndarray:
    """fresh: [L, P] a fresh plan of the window's sum, aligned to ``live`` (the live map,
    [L, P]); per_pass: [B, L, E]. Returns [L, P] int64 differing from ``live`` in at most
    ``max_moves`` slots, changed only in layers that are stale (the live map scores below
    the fresh one on the window's passes) or have shifted (``shifted_layers``); none: ``live``.

    Step 1: those layers' target is the fresh plan refined on the window (the plan without a
    budget), aligned to the live map. Step 2: each layer's greedy path from its live map to
    its target (``_path_to``), and the budget spent along the paths where the gain per moved
    slot is steepest (``_spend_along``). Step 3: ``refine_for_minmax`` of those layers from
    there, within the whole budget (the others keep their live rows, no moves). deadline: a
    ``time.perf_counter()`` value by which the plan is due: the shift test and the targets
    stop searching by ``DEADLINE_SHARES[0]`` of the time left, the paths by
    ``DEADLINE_SHARES[1]``, the last refinement at the deadline, each where it is (the result
    stays within the budget and no layer scores below its live map). follows_pass: as
    ``refine_for_minmax``'s."""
    live_t = torch.as_tensor(np.asarray(live), dtype=torch.int64)
    targets_by, paths_by = _shares_of(deadline)
    if max_moves == 0:  # nothing may move: no scoring, no shift test
        return live_t.numpy().copy()
    per_pass = np.asarray(per_pass)
    counts = _buckets(per_pass)
    fresh_t = torch.as_tensor(np.asarray(fresh), dtype=torch.int64)
    stale = mean_pass_balancedness(fresh_t, counts, num_gpus=num_gpus, follows_pass=follows_pass) \
        > mean_pass_balancedness(live_t, counts, num_gpus=num_gpus, follows_pass=follows_pass) + 1e-6  # [L]
    steady = (~stale).nonzero().flatten()  # the shift test runs on the layers not already stale
    if steady.numel():
        stale[steady] = shifted_layers(fresh_t[steady].numpy(), live_t[steady].numpy(), per_pass[:, steady.numpy()],
                                       num_gpus=num_gpus, num_nodes=num_nodes, deadline=targets_by,
                                       follows_pass=follows_pass)
    planned = live_t.numpy().copy()
    rows = stale.nonzero().flatten().numpy()
    if rows.size == 0:
        return planned
    target = refine_for_minmax(fresh_t.numpy()[rows], per_pass[:, rows], num_gpus=num_gpus, num_nodes=num_nodes,
                               deadline=targets_by, follows_pass=follows_pass)
    target_t = torch.as_tensor(align_to_previous(target, planned[rows], num_gpus=num_gpus))
    cost, score, changes = _path_to(live_t[rows], target_t, counts[torch.as_tensor(rows)], num_gpus=num_gpus,
                                    max_cost=max_moves, gen=torch.Generator().manual_seed(PERPASS_SEED),
                                    deadline=paths_by, follows_pass=follows_pass)
    start = planned[rows].copy()
    for layer, stop in enumerate(_spend_along(cost, score, max_moves)):
        for slot, expert, partner, other in changes[:stop, layer].tolist():
            if slot >= 0:  # -1: the layer took no step that round
                start[layer, slot] = expert
            if partner >= 0:
                start[layer, partner] = other
    planned[rows] = refine_for_minmax(start, per_pass[:, rows], num_gpus=num_gpus, num_nodes=num_nodes,
                                      previous=planned[rows], max_moves=max_moves, deadline=deadline,
                                      follows_pass=follows_pass)
    return planned
