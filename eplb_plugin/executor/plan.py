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

A move whose staging would exceed a per-rank budget goes in rounds (``executor/rounds.py``).

Host cost: the executor plans on the serving path, so the planners take each map as a
Python list once and visit only changed slots (and the holders of the experts they need);
expert counts carry over between rounds instead of being recounted. tests/
executor_plan_reference.py keeps the straightforward versions; tests check that both
produce identical plans.
"""

from __future__ import annotations

from dataclasses import dataclass
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
