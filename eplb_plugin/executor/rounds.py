"""A layer's move in rounds: ``plan_layer_rounds`` splits a move whose staging would exceed a
per-rank budget into rounds whose intermediate maps are all valid placements (see its
docstring); ``schedule_layer_move`` / ``LayerMoveSchedule`` add what the executor's pipeline
needs (which round may be staged while the previous one commits, and the staging rows per
rank). Each round's transfer plan is ``executor/plan.py``'s. Pure CPU code, the same on
every rank; maps are ``physical_to_logical_map [P]`` as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from heapq import heappop, heappush

import torch

from eplb_plugin.executor.plan import (
    LayerTransferPlan,
    _changed_slots,
    _check_maps,
    _index,
    _num_staged,
    _plan,
)


def plan_layer_rounds(
    old_physical_to_logical_map: torch.Tensor,
    new_physical_to_logical_map: torch.Tensor,
    *,
    ep_size: int,
    max_staged_experts: int | None = None,
) -> list[torch.Tensor]:
    """Split a layer's move into rounds that each stage at most ``max_staged_experts`` per rank.

    Returns the maps after each round, ``[P]`` int64 each, the last equal to the new map
    (an empty list when nothing changes; one entry when everything fits or no budget).
    Every intermediate map is a valid placement that can serve: each round only rewrites
    slots such that every logical expert of the new map keeps a replica, so the next round
    has a sender and the weights always match the map a round commits.

    A round's staging on a rank is bounded by the number of distinct new experts among
    its rewritten slots. When single-replica experts form a cycle (A->B, B->A), the
    cycle must move in one round; if a cycle alone exceeds the budget it still goes as
    one round (the budget is then exceeded for that round, the only case where it is).
    """
    old, new = _check_maps(old_physical_to_logical_map, new_physical_to_logical_map, ep_size)
    maps, _ = _rounds(old, new, ep_size, max_staged_experts)
    return [torch.tensor(m, dtype=torch.int64) for m in maps]


def _rounds(old: list[int], new: list[int], ep_size: int,
            cap: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """``plan_layer_rounds`` on validated maps as lists: (maps after each round, and per
    round and rank the distinct new experts of its rewritten slots, the staging bound).

    Expert counts are kept across rounds (not recounted per round), and a chain's staging is
    checked on the ranks it touches only (the others are within the budget already).
    """
    num_local = len(old) // ep_size
    needed = set(new)
    work = list(old)
    remaining = _changed_slots(old, new)
    count: dict[int, int] = {}
    for e in old:
        count[e] = count.get(e, 0) + 1
    maps: list[list[int]] = []
    bounds: list[list[int]] = []
    while remaining:
        items: list[set[int]] = [set() for _ in range(ep_size)]
        chosen: set[int] = set()
        by_new: dict[int, list[int]] = {}  # new expert -> remaining slots, in order
        for p in remaining:
            by_new.setdefault(new[p], []).append(p)
        # Step 1: take every chain that keeps each rank's staging within the budget. Until one
        # is taken the state is that of step 2, so the cheapest chain is remembered for it.
        best = None
        for p in remaining:
            if p in chosen:
                continue
            mine = items[p // num_local]
            if cap is not None and len(mine) >= cap and new[p] not in mine:
                continue  # p alone would exceed its rank's budget (the chain below includes p)
            chain, adds, removes = _chain(p, work, new, count, by_new, chosen, needed)
            extra: dict[int, set[int]] = {}
            for q in chain:
                r = q // num_local
                if new[q] not in items[r]:
                    extra.setdefault(r, set()).add(new[q])
            if not chosen:
                key = (max(map(len, extra.values())), chain)
                if best is None or key < best[0]:
                    best = (key, adds, removes, extra)
            if cap is None or all(len(items[r]) + len(x) <= cap for r, x in extra.items()):
                for r, x in extra.items():
                    items[r] |= x
                chosen.update(chain)
                _apply(count, adds, removes)
        # Step 2: nothing fits: a cycle must move at once; take the cheapest one alone.
        if not chosen:
            (_, chain), adds, removes, extra = best
            items = [extra.get(r, set()) for r in range(ep_size)]
            chosen.update(chain)
            _apply(count, adds, removes)
        for p in chosen:
            work[p] = new[p]
        remaining = [p for p in remaining if p not in chosen]
        maps.append(list(work))
        bounds.append([len(x) for x in items])
    return maps, bounds


def _apply(count: dict[int, int], adds: dict[int, int], removes: dict[int, int]) -> None:
    for e, n in adds.items():
        count[e] = count.get(e, 0) + n
    for e, n in removes.items():
        count[e] = count.get(e, 0) - n


def _chain(p, work, new, count, by_new, chosen, needed) -> tuple[list[int], dict[int, int], dict[int, int]]:
    """Slots that must change with slot p so every needed expert keeps a replica.

    Returns (slots, experts added, experts removed). Rewriting p removes work[p]; if that
    was its last replica, a remaining slot whose new expert it is joins, and so on: each
    step fixes the lost expert removed first. Lost experts wait in a heap keyed by when
    they were first removed (checked again when popped), so a long chain costs
    O(n log n), not O(n^2).
    """
    chain, members, adds, removes = [p], {p}, {new[p]: 1}, {work[p]: 1}
    first_removed = {work[p]: 0}
    lost: list[tuple[int, int]] = []

    def is_lost(y: int) -> bool:
        return y in needed and count.get(y, 0) - removes[y] + adds.get(y, 0) < 1

    if is_lost(work[p]):
        lost.append((0, work[p]))
    while True:
        while lost and not is_lost(lost[0][1]):
            heappop(lost)
        if not lost:
            return chain, adds, removes
        q = next(q for q in by_new[lost[0][1]] if q not in chosen and q not in members)
        chain.append(q)
        members.add(q)
        adds[new[q]] = adds.get(new[q], 0) + 1
        y = work[q]
        removes[y] = removes.get(y, 0) + 1
        order = first_removed.setdefault(y, len(first_removed))
        if is_lost(y):
            heappush(lost, (order, y))


@dataclass(frozen=True)
class MoveSchedule:
    """A layer's move as rounds, with the decisions every rank must share.

    maps[k]: [P] map once round k commits (the last is the new map). plans[k]: round k,
    from maps[k-1] (the old map for k = 0) to maps[k]. prefetch[k]: round k is staged
    before round k-1 commits (never for k = 0); the same on every rank, so that after a
    failure every rank has posted the same operations. pool_rows[r]: staging rows (experts)
    rank r allocates: at most the budget, except a forced cycle (``plan_layer_rounds``).
    """

    maps: tuple[torch.Tensor, ...]
    plans: tuple[LayerTransferPlan, ...]
    prefetch: tuple[bool, ...]
    pool_rows: tuple[int, ...]


class LayerMoveSchedule:
    """``schedule_layer_move`` computed lazily: the maps and pool size up front, each round's
    plan and prefetch decision on demand (the executor plans round k+1 while round k's P2P
    is in flight, so per-round planning costs no transfer time).

    Pure CPU and the same on every rank, so a caller may build it off the serving path (a
    background thread) and pass it to ``move_experts(..., schedule=...)`` / ``move_layers``.
    ``old``, ``new``: the [P] int64 maps it moves between; ``ep_size``, ``cap`` (the budget in
    experts per rank, None = unbounded), ``gpus_per_node``, ``pipeline``: what it was made for
    (an executor checks them against its own arguments).
    """

    def __init__(self, old_physical_to_logical_map: torch.Tensor, new_physical_to_logical_map: torch.Tensor,
                 *, ep_size: int, max_staged_experts: int | None = None, gpus_per_node: int | None = None,
                 pipeline: bool = True):
        self.old = old_physical_to_logical_map.detach().to("cpu", torch.int64)
        self.new = new_physical_to_logical_map.detach().to("cpu", torch.int64)
        self.ep_size, self.cap, self.pipeline, self.gpus_per_node = ep_size, max_staged_experts, pipeline, gpus_per_node
        old, new = _check_maps(self.old, self.new, ep_size)
        index = _index(old, new, ep_size)
        staged = _num_staged(new, index)  # the whole layer's staging, before making its plan
        self._plans: dict[int, LayerTransferPlan] = {}
        half = self.cap // 2 if pipeline and self.cap is not None and self.cap >= 2 else self.cap
        if not any(index[0]):
            self._lists: list[list[int]] = [old]  # the map before round 0, then after each round
            self.pool_rows: tuple[int, ...] = (0,) * ep_size
        elif half is None or max(staged) <= half:
            # The whole layer fits: one atomic round.
            self._lists, self._plans[0] = [old, new], _plan(old, new, ep_size, gpus_per_node, index)
            self.pool_rows = tuple(staged)
        else:
            maps, bounds = _rounds(old, new, ep_size, half)
            self._lists = [old] + maps
            # Rows per rank and round: at most the distinct new experts of its changed slots.
            rows = []
            for r in range(ep_size):
                single = max(bk[r] for bk in bounds)
                pair = max((x[r] + y[r] for x, y in zip(bounds, bounds[1:])), default=0)
                rows.append(max(single, min(self.cap, pair)) if pipeline else single)
            self.pool_rows = tuple(rows)
        self._maps: list[torch.Tensor] | None = None

    @property
    def maps(self) -> list[torch.Tensor]:
        """[P] int64 map once round k commits, per round (the last is the new map)."""
        if self._maps is None:  # made on first use: tensors cost microseconds each
            n = len(self._lists) - 1
            self._maps = [self.new] if n == 1 else list(torch.tensor(self._lists[1:], dtype=torch.int64)) if n else []
        return self._maps

    def __len__(self) -> int:
        return len(self._lists) - 1

    def plan(self, k: int) -> LayerTransferPlan:
        """Round k's transfer plan (every rank's share), from maps[k-1] (or old) to maps[k]."""
        plan = self._plans.get(k)
        if plan is None:
            if not 0 <= k < len(self):
                raise IndexError(f"round {k} of a schedule of {len(self)} rounds")
            plan = self._plans[k] = _plan(self._lists[k], self._lists[k + 1], self.ep_size, self.gpus_per_node)
        return plan

    def prefetch(self, k: int) -> bool:
        """Round k may be staged before round k-1 commits: on every rank it reads no slot
        round k-1 writes, and both rounds' staging fits the budget."""
        if k == 0 or not self.pipeline:
            return False
        for p, c in zip(self.plan(k - 1).ranks, self.plan(k).ranks):
            if self.cap is not None and p.num_staged_experts + c.num_staged_experts > self.cap:
                return False
            if not c.staging_reads.isdisjoint(p.changed_local_slots):
                return False
        return True


def schedule_layer_move(
    old_physical_to_logical_map: torch.Tensor,
    new_physical_to_logical_map: torch.Tensor,
    *,
    ep_size: int,
    max_staged_experts: int | None = None,
    gpus_per_node: int | None = None,
    pipeline: bool = True,
) -> MoveSchedule:
    """Rounds for one layer's move, double-buffered within the budget.

    With ``pipeline`` and a budget of at least 2 experts, rounds take half the budget each,
    so that round k+1's transfer runs while round k commits; round k+1 is staged early only
    if, on every rank, it reads no slot that round k writes and both rounds' staging fits
    the budget. A layer whose staging fits one round (half the budget; the whole budget
    without ``pipeline``) moves in one round, atomically. Maps: [P] integer, same on every rank.
    """
    lazy = LayerMoveSchedule(old_physical_to_logical_map, new_physical_to_logical_map, ep_size=ep_size,
                             max_staged_experts=max_staged_experts, gpus_per_node=gpus_per_node,
                             pipeline=pipeline)
    n = len(lazy)
    return MoveSchedule(tuple(lazy.maps), tuple(lazy.plan(k) for k in range(n)),
                        tuple(lazy.prefetch(k) for k in range(n)), lazy.pool_rows)
