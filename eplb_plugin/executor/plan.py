"""Transfer plans: which slots stay, which are copied locally, who sends which expert to whom.

Pure CPU code, no process group. Slots are rank-major: with ``P`` slots over ``ep_size``
ranks, rank ``r`` holds global slots ``[r*S, (r+1)*S)`` with ``S = P // ep_size`` local slots.

A plan moves one layer from ``old`` to ``new`` (both ``physical_to_logical_map [P]``):

- a slot whose expert does not change moves nothing;
- a changed slot whose new expert is already on its rank (old map) is a ``LocalCopy``
  (several new replicas of one expert on one rank are several copies from one source);
- otherwise the rank receives the expert once (``Recv`` with every local slot that needs it,
  fanned out locally) from one rank holding it in the old map, same node first, spread over
  the holders least-loaded first.

Every rank computes the same plan from the same maps; ``sends`` and ``recvs`` are sorted by
``(peer, logical_expert)`` so that the operations of each pair of ranks match one to one.

``plan_layer_rounds`` splits a move whose staging would exceed a per-rank budget into
rounds whose intermediate maps are all valid placements (see its docstring);
``schedule_layer_move`` adds what the executor's pipeline needs (which round may be staged
while the previous one commits, and the staging rows per rank).

Host cost: the executor plans on the serving path, so the planners take each map as a
Python list once and visit only changed slots (and the holders of the experts they need);
expert counts carry over between rounds instead of being recounted. tests/
executor_plan_reference.py keeps the straightforward versions; tests check that both
produce identical plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from heapq import heappop, heappush
from itertools import compress
from operator import ne
from typing import NamedTuple

import torch

from eplb_plugin.errors import PlacementError


class _cached:
    """``functools.cached_property`` without its per-instance lock (Python 3.11 takes one
    on every first access, about 1 us; plans are read on the serving path). Two threads
    computing a value at once both get the same value, so no lock is needed."""

    def __init__(self, fn):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)  # later reads find it in __dict__
        return value


# The operations are NamedTuples (immutable, compared by value like the frozen dataclasses
# around them): a plan makes one per changed slot, and a NamedTuple is made in half the time
# of a frozen dataclass (0.2 vs 0.45 us), which matters on the serving path.
class LocalCopy(NamedTuple):
    """Copy local slot ``src_local_slot`` into ``dst_local_slot`` (both on this rank)."""

    src_local_slot: int
    dst_local_slot: int
    logical_expert: int


class Send(NamedTuple):
    """Send the weights of ``logical_expert`` held in ``src_local_slot`` to rank ``peer``."""

    peer: int
    logical_expert: int
    src_local_slot: int


class Recv(NamedTuple):
    """Receive ``logical_expert`` from rank ``peer`` once; it lands in every ``dst_local_slots``."""

    peer: int
    logical_expert: int
    dst_local_slots: tuple[int, ...]


@dataclass(frozen=True)
class RankTransferPlan:
    """One rank's share of a layer's move. ``sends``/``recvs`` sorted by (peer, logical_expert)."""

    rank: int
    local_copies: tuple[LocalCopy, ...]
    sends: tuple[Send, ...]
    recvs: tuple[Recv, ...]

    @_cached  # computed once per plan (the executor reads them every round)
    def changed_local_slots(self) -> tuple[int, ...]:
        """Local slots written by this move, sorted."""
        dsts = [c.dst_local_slot for c in self.local_copies]
        dsts += [s for r in self.recvs for s in r.dst_local_slots]
        return tuple(sorted(dsts))

    @_cached  # computed once per plan (the executor reads them every round)
    def staged_copy_sources(self) -> tuple[int, ...]:
        """Sources of local copies that this move overwrites: they must be staged first."""
        if not self.local_copies:
            return ()
        changed = set(self.changed_local_slots)
        return tuple(sorted({c.src_local_slot for c in self.local_copies} & changed))

    @_cached  # computed once per plan (the executor reads them every round)
    def num_staged_experts(self) -> int:
        """Staging buffers this rank needs: one per received expert and per staged source."""
        return len(self.recvs) + len(self.staged_copy_sources)

    @_cached  # computed once per plan (the executor reads them every round)
    def staging_reads(self) -> frozenset[int]:
        """Local slots read while staging (send sources, staged copy sources), before commit."""
        return frozenset(s.src_local_slot for s in self.sends) | frozenset(self.staged_copy_sources)


@dataclass(frozen=True)
class LayerTransferPlan:
    """A whole layer's move: ``ranks[r]`` is rank ``r``'s plan."""

    ep_size: int
    num_local_slots: int
    ranks: tuple[RankTransferPlan, ...]

    @property
    def num_slots_changed(self) -> int:
        return sum(len(r.changed_local_slots) for r in self.ranks)

    @property
    def num_experts_sent(self) -> int:
        return sum(len(r.sends) for r in self.ranks)

    @property
    def is_empty(self) -> bool:
        return self.num_slots_changed == 0


def _check_maps(old: torch.Tensor, new: torch.Tensor, ep_size: int) -> tuple[list[int], list[int]]:
    """Validate two [P] maps; return them as lists (the planners work on lists: cheaper than
    tensor element access by an order of magnitude)."""
    lists = []
    for name, m in (("old_physical_to_logical_map", old), ("new_physical_to_logical_map", new)):
        if m.dim() != 1 or m.dtype.is_floating_point or m.dtype == torch.bool:
            raise PlacementError(
                f"{name} must be a 1-D integer tensor [P] for one layer, got "
                f"shape {tuple(m.shape)} dtype {m.dtype}"
            )
        values = m.tolist()
        if values and min(values) < 0:
            raise PlacementError(f"{name} has a negative logical expert {min(values)}")
        lists.append(values)
    if old.shape != new.shape:
        raise PlacementError(
            f"old and new physical_to_logical_map differ in shape: {tuple(old.shape)} vs "
            f"{tuple(new.shape)}; both must be [P]"
        )
    if ep_size <= 0 or old.numel() % ep_size:
        raise PlacementError(
            f"ep_size={ep_size} must be positive and divide the number of slots {old.numel()}"
        )
    old_l, new_l = lists
    missing = set(new_l).difference(old_l)
    if missing:
        raise PlacementError(
            f"new_physical_to_logical_map needs logical experts {sorted(missing)[:8]} that no slot of "
            f"the old map holds, so no rank can send them; start from a map that holds them"
        )
    return old_l, new_l


def _changed_slots(old: list[int], new: list[int]) -> list[int]:
    """Global slots whose expert differs, ascending (C-level loop: no Python per slot)."""
    return list(compress(range(len(old)), map(ne, old, new)))


def plan_layer_transfer(
    old_physical_to_logical_map: torch.Tensor,
    new_physical_to_logical_map: torch.Tensor,
    *,
    ep_size: int,
    gpus_per_node: int | None = None,
) -> LayerTransferPlan:
    """Plan one layer's move from the old map to the new one.

    old_physical_to_logical_map, new_physical_to_logical_map: [P] integer, logical ids >= 0.
    ep_size: ranks; P must divide evenly. gpus_per_node: ranks per node (node = rank //
    gpus_per_node) for same-node-first sender choice; None = one node.
    Raises PlacementError for malformed maps or a new expert absent from the old map.
    """
    old, new = _check_maps(old_physical_to_logical_map, new_physical_to_logical_map, ep_size)
    return _plan(old, new, ep_size, gpus_per_node)


_Index = tuple[list[dict[int, list[int]]], dict[int, dict[int, list[int]]]]  # (wanted, holders), see _index


def _index(old: list[int], new: list[int], ep_size: int) -> _Index:
    """Steps 1-2 of a plan. wanted[r]: new expert -> rank r's changed local slots that get it
    (ascending); holders[e]: rank -> local slots holding e in the old map (ascending), for
    the experts some changed slot gets. Only changed slots and those holders are visited in
    Python; the other slots are skipped by C-level scans (``_changed_slots``, ``compress``)."""
    num_local = len(old) // ep_size
    wanted: list[dict[int, list[int]]] = [{} for _ in range(ep_size)]
    for p in _changed_slots(old, new):
        wanted[p // num_local].setdefault(new[p], []).append(p % num_local)
    needed = {e for w in wanted for e in w}
    holders: dict[int, dict[int, list[int]]] = {}
    for p in compress(range(len(old)), map(needed.__contains__, old)):
        holders.setdefault(old[p], {}).setdefault(p // num_local, []).append(p % num_local)
    return wanted, holders


def _num_staged(new: list[int], index: _Index) -> list[int]:
    """Per rank, the plan's ``num_staged_experts`` without making the plan: one row per new
    expert the rank does not hold (a receive), and one per held expert whose every replica
    on the rank is overwritten (its copy source is staged first)."""
    wanted, holders = index
    num_local = len(new) // len(wanted)
    out = []
    for r, by_expert in enumerate(wanted):
        base, n = r * num_local, 0
        for e in by_expert:
            slots = holders[e].get(r)
            n += slots is None or all(new[base + s] != e for s in slots)
        out.append(n)
    return out


def _plan(old: list[int], new: list[int], ep_size: int, gpus_per_node: int | None,
          index: _Index | None = None) -> LayerTransferPlan:
    """``plan_layer_transfer`` on validated maps as lists (index: ``_index`` of them, if made).

    Host cost matters here (the executor plans on the serving path): see ``_index``.
    """
    num_local = len(old) // ep_size
    per_node = gpus_per_node or ep_size

    # Steps 1-2: the changed slots per rank and new expert; the holders of those experts.
    # A source slot that the move leaves unchanged is preferred, so it never needs staging.
    wanted, holders = index if index is not None else _index(old, new, ep_size)

    def source_slot(rank: int, expert: int) -> int:
        slots = holders[expert][rank]
        base = rank * num_local
        for s in slots:
            if new[base + s] == expert:
                return s
        return slots[0]

    # Step 3: local copies where the rank holds the expert; otherwise one receive per expert.
    copies: list[list[LocalCopy]] = [[] for _ in range(ep_size)]
    needs: list[tuple[int, int, tuple[int, ...]]] = []  # (rank, expert, dst slots)
    for r in range(ep_size):
        by_expert = wanted[r]
        for e in sorted(by_expert):
            if r in holders[e]:
                src = source_slot(r, e)
                copies[r] += [LocalCopy(src, d, e) for d in by_expert[e]]
            else:
                needs.append((r, e, tuple(by_expert[e])))

    # Step 4: choose a sender per (rank, expert): same node first, then least sends so far,
    # then the nearest rank after the receiver on the ring (spreads ties deterministically).
    load = [0] * ep_size
    sends: list[list[Send]] = [[] for _ in range(ep_size)]
    recvs: list[list[Recv]] = [[] for _ in range(ep_size)]
    one_node = per_node >= ep_size
    for r, e, dsts in needs:
        held = holders[e]  # rank -> slots; ranks ascending (filled in slot order)
        if len(held) > 1:
            near = list(held) if one_node else [h for h in held if h // per_node == r // per_node] or list(held)
            h = min(near, key=lambda h: (load[h], (h - r) % ep_size))
        else:
            h = next(iter(held))
        load[h] += 1
        sends[h].append(Send(r, e, source_slot(h, e)))
        recvs[r].append(Recv(h, e, dsts))

    # Step 5: sort so that the i-th op between any two ranks is the same expert on both.
    # Sends are made in (receiver, expert) order already; a rank's copies have distinct dsts.
    ranks = tuple(
        RankTransferPlan(
            rank=r,
            local_copies=tuple(sorted(copies[r], key=_dst_key)),
            sends=tuple(sends[r]),
            recvs=tuple(sorted(recvs[r], key=_peer_key)),
        )
        for r in range(ep_size)
    )
    return LayerTransferPlan(ep_size=ep_size, num_local_slots=num_local, ranks=ranks)


def _dst_key(c: LocalCopy) -> int:
    return c.dst_local_slot


def _peer_key(op: Recv) -> tuple[int, int]:
    return op.peer, op.logical_expert


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


def plan_transfers(
    old_physical_to_logical_map: torch.Tensor,
    new_physical_to_logical_map: torch.Tensor,
    *,
    ep_size: int,
    gpus_per_node: int | None = None,
) -> list[LayerTransferPlan]:
    """One plan per layer. Maps: [L, P] integer. Returns L plans (single-round each)."""
    if old_physical_to_logical_map.dim() != 2 or old_physical_to_logical_map.shape != new_physical_to_logical_map.shape:
        raise PlacementError(
            f"plan_transfers needs two [L, P] maps of one shape, got "
            f"{tuple(old_physical_to_logical_map.shape)} and {tuple(new_physical_to_logical_map.shape)}"
        )
    return [
        plan_layer_transfer(o, n, ep_size=ep_size, gpus_per_node=gpus_per_node)
        for o, n in zip(old_physical_to_logical_map, new_physical_to_logical_map)
    ]


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
