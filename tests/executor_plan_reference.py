"""The straightforward planners (before their host cost was optimized), kept as a reference:
tests check that ``eplb_plugin.executor.plan`` produces exactly the same plans, rounds and
schedules. Slow on purpose (tensor maps, recounting every round); not used by the package."""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from eplb_plugin.executor.plan import (
    LayerTransferPlan,
    LocalCopy,
    RankTransferPlan,
    Recv,
    Send,
    _check_maps,  # input validation is not what the reference checks
)


def reference_plan_layer_transfer(
    old_physical_to_logical_map: torch.Tensor,
    new_physical_to_logical_map: torch.Tensor,
    *,
    ep_size: int,
    gpus_per_node: int | None = None,
) -> LayerTransferPlan:
    """The previous ``plan.plan_layer_transfer`` (same contract, see its docstring)."""
    old, new = _check_maps(old_physical_to_logical_map, new_physical_to_logical_map, ep_size)
    num_local = len(old) // ep_size
    per_node = gpus_per_node or ep_size

    # Step 1: where each expert lives in the old map, per rank (local slots, ascending);
    # prefer a source slot that the move leaves unchanged, so it never needs staging.
    holders: dict[int, dict[int, list[int]]] = defaultdict(dict)
    for p, e in enumerate(old):
        holders[e].setdefault(p // num_local, []).append(p % num_local)

    def source_slot(rank: int, expert: int) -> int:
        slots = holders[expert][rank]
        stable = [s for s in slots if new[rank * num_local + s] == expert]
        return (stable or slots)[0]

    # Step 2: per rank, group changed slots by their new expert.
    copies: list[list[LocalCopy]] = [[] for _ in range(ep_size)]
    needs: list[tuple[int, int, tuple[int, ...]]] = []  # (rank, expert, dst slots)
    for r in range(ep_size):
        by_expert: dict[int, list[int]] = defaultdict(list)
        for s in range(num_local):
            p = r * num_local + s
            if old[p] != new[p]:
                by_expert[new[p]].append(s)
        for e in sorted(by_expert):
            if r in holders[e]:
                src = source_slot(r, e)
                copies[r] += [LocalCopy(src, d, e) for d in by_expert[e]]
            else:
                needs.append((r, e, tuple(by_expert[e])))

    # Step 3: choose a sender per (rank, expert): same node first, then least sends so far,
    # then the nearest rank after the receiver on the ring (spreads ties deterministically).
    load = [0] * ep_size
    sends: list[list[Send]] = [[] for _ in range(ep_size)]
    recvs: list[list[Recv]] = [[] for _ in range(ep_size)]
    for r, e, dsts in needs:
        cands = sorted(holders[e])
        near = [h for h in cands if h // per_node == r // per_node] or cands
        h = min(near, key=lambda h: (load[h], (h - r) % ep_size))
        load[h] += 1
        sends[h].append(Send(r, e, source_slot(h, e)))
        recvs[r].append(Recv(h, e, dsts))

    # Step 4: sort so that the i-th op between any two ranks is the same expert on both.
    ranks = tuple(
        RankTransferPlan(
            rank=r,
            local_copies=tuple(sorted(copies[r], key=lambda c: (c.dst_local_slot, c.src_local_slot))),
            sends=tuple(sorted(sends[r], key=lambda s: (s.peer, s.logical_expert))),
            recvs=tuple(sorted(recvs[r], key=lambda v: (v.peer, v.logical_expert))),
        )
        for r in range(ep_size)
    )
    return LayerTransferPlan(ep_size=ep_size, num_local_slots=num_local, ranks=ranks)


def reference_plan_layer_rounds(
    old_physical_to_logical_map: torch.Tensor,
    new_physical_to_logical_map: torch.Tensor,
    *,
    ep_size: int,
    max_staged_experts: int | None = None,
) -> list[torch.Tensor]:
    """The previous ``rounds.plan_layer_rounds`` (same contract, see its docstring)."""
    old, new = _check_maps(old_physical_to_logical_map, new_physical_to_logical_map, ep_size)
    num_local = len(old) // ep_size
    needed = set(new)
    work = list(old)
    remaining = [p for p in range(len(old)) if old[p] != new[p]]
    rounds: list[torch.Tensor] = []
    while remaining:
        count = Counter(work)
        items: list[set[int]] = [set() for _ in range(ep_size)]
        chosen: set[int] = set()
        by_new: dict[int, list[int]] = defaultdict(list)  # new expert -> remaining slots, in order
        for p in remaining:
            by_new[new[p]].append(p)
        # Step 1: take every chain that keeps each rank's staging within the budget.
        for p in remaining:
            if p in chosen:
                continue
            mine = items[p // num_local]
            if max_staged_experts is not None and len(mine) >= max_staged_experts and new[p] not in mine:
                continue  # p alone would exceed its rank's budget (the chain below includes p)
            chain, adds, removes = _chain(p, work, new, count, by_new, chosen, needed)
            after = _staging(items, chain, new, num_local)
            if max_staged_experts is None or max(map(len, after)) <= max_staged_experts:
                items = after
                chosen.update(chain)
                count.update(adds)
                count.subtract(removes)
        # Step 2: nothing fits: a cycle must move at once; take the cheapest one alone.
        if not chosen:
            chains = [_chain(p, work, new, count, by_new, chosen, needed)[0] for p in remaining]
            chosen.update(
                min(chains, key=lambda c: (max(map(len, _staging(items, c, new, num_local))), c))
            )
        for p in chosen:
            work[p] = new[p]
        remaining = [p for p in remaining if p not in chosen]
        rounds.append(torch.tensor(work, dtype=torch.int64))
    return rounds


def _chain(p, work, new, count, by_new, chosen, needed) -> tuple[list[int], Counter, Counter]:
    """Slots that must change with slot p so every needed expert keeps a replica.

    Returns (slots, experts added, experts removed). Rewriting p removes work[p]; if that
    was its last replica, a remaining slot whose new expert it is joins, and so on.
    """
    chain, adds, removes = [p], Counter([new[p]]), Counter([work[p]])
    while True:
        lost = [y for y in removes if y in needed and count[y] - removes[y] + adds[y] < 1]
        if not lost:
            return chain, adds, removes
        q = next(q for q in by_new[lost[0]] if q not in chosen and q not in chain)
        chain.append(q)
        adds[new[q]] += 1
        removes[work[q]] += 1


def _staging(items: list[set[int]], chain: list[int], new, num_local: int) -> list[set[int]]:
    """Per rank, the distinct new experts staged if the chain joins the round."""
    after = [set(x) for x in items]
    for q in chain:
        after[q // num_local].add(new[q])
    return after


class ReferenceLayerMoveSchedule:
    """``schedule_layer_move`` computed lazily: the maps and pool size up front, each round's
    plan and prefetch decision on demand (the executor plans round k+1 while round k's P2P
    is in flight, so per-round planning costs no transfer time)."""

    def __init__(self, old_physical_to_logical_map: torch.Tensor, new_physical_to_logical_map: torch.Tensor,
                 *, ep_size: int, max_staged_experts: int | None = None, gpus_per_node: int | None = None,
                 pipeline: bool = True):
        self.old = old_physical_to_logical_map.detach().to("cpu", torch.int64)
        new = new_physical_to_logical_map.detach().to("cpu", torch.int64)
        self.ep_size, self.cap, self.pipeline, self.gpus_per_node = ep_size, max_staged_experts, pipeline, gpus_per_node
        whole = reference_plan_layer_transfer(self.old, new, ep_size=ep_size, gpus_per_node=gpus_per_node)
        self._plans: dict[int, LayerTransferPlan] = {}
        if whole.is_empty:
            self.maps: list[torch.Tensor] = []
            self.pool_rows: tuple[int, ...] = (0,) * ep_size
        elif self.cap is None or max(r.num_staged_experts for r in whole.ranks) <= (
                self.cap // 2 if pipeline and self.cap >= 2 else self.cap):
            self.maps, self._plans[0] = [new], whole  # the whole layer fits: one atomic round
            self.pool_rows = tuple(r.num_staged_experts for r in whole.ranks)
        else:
            half = self.cap // 2 if pipeline and self.cap >= 2 else self.cap
            self.maps = reference_plan_layer_rounds(self.old, new, ep_size=ep_size, max_staged_experts=half)
            # Rows per rank and round: at most the distinct new experts of its changed slots.
            num_local = len(self.old) // ep_size
            bounds = []
            for a, b in zip([self.old.tolist()] + [m.tolist() for m in self.maps[:-1]], [m.tolist() for m in self.maps]):
                per_rank: list[set[int]] = [set() for _ in range(ep_size)]
                for q, (x, y) in enumerate(zip(a, b)):
                    if x != y:
                        per_rank[q // num_local].add(y)
                bounds.append([len(x) for x in per_rank])
            rows = []
            for r in range(ep_size):
                single = max(bk[r] for bk in bounds)
                pair = max((x[r] + y[r] for x, y in zip(bounds, bounds[1:])), default=0)
                rows.append(max(single, min(self.cap, pair)) if pipeline else single)
            self.pool_rows = tuple(rows)

    def __len__(self) -> int:
        return len(self.maps)

    def plan(self, k: int) -> LayerTransferPlan:
        """Round k's transfer plan (every rank's share), from maps[k-1] (or old) to maps[k]."""
        if k not in self._plans:
            before = self.old if k == 0 else self.maps[k - 1]
            self._plans[k] = reference_plan_layer_transfer(before, self.maps[k], ep_size=self.ep_size,
                                                 gpus_per_node=self.gpus_per_node)
        return self._plans[k]

    def prefetch(self, k: int) -> bool:
        """Round k may be staged before round k-1 commits: on every rank it reads no slot that
        round k-1 writes, and both rounds' staging fits the budget (recomputed here from the
        plans' copies, sends and receives, not from ``plan.py``'s derived properties)."""
        if k == 0 or not self.pipeline:
            return False
        prev, cur = self.plan(k - 1), self.plan(k)
        for r in range(self.ep_size):
            written = _written_slots(prev.ranks[r])
            staged_sources = {c.src_local_slot for c in cur.ranks[r].local_copies} & _written_slots(cur.ranks[r])
            reads = {s.src_local_slot for s in cur.ranks[r].sends} | staged_sources
            if reads & written:
                return False
            if self.cap is not None and _staged_rows(prev.ranks[r]) + _staged_rows(cur.ranks[r]) > self.cap:
                return False
        return True


def _written_slots(rank_plan: RankTransferPlan) -> set[int]:
    """Local slots that a rank's share of a move writes (copy and receive destinations)."""
    slots = {c.dst_local_slot for c in rank_plan.local_copies}
    for v in rank_plan.recvs:
        slots.update(v.dst_local_slots)
    return slots


def _staged_rows(rank_plan: RankTransferPlan) -> int:
    """Staging rows a rank's share needs: one per received expert and per copy source it overwrites."""
    sources = {c.src_local_slot for c in rank_plan.local_copies} & _written_slots(rank_plan)
    return len(rank_plan.recvs) + len(sources)
