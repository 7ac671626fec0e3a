"""Building blocks of a move: staging pool, one round's P2P and commit (the ranks'
agreement on each step: ``agreement.py``).

Used by ``transfer.move_experts`` (blocking) and ``nonblocking.AsyncExpertMover``.

- ``StagingPool``: per weight tensor one ``[rows, *tensor.shape[1:]]`` buffer, allocated once
  per move (or per mover run) and reused by every round: the extra memory is the pool, sized
  to the budget. A row given back with a CUDA event is reused only after that event.
- ``stage_round``: local copies of overwritten sources into pool rows, then one
  ``batch_isend_irecv`` (NCCL) with every tensor of every expert of the round, or, from
  same-host peers given ``PeerViews``, pulls by copy engines (peers.py); never writes a
  slot. On NCCL nothing waits on the host.
- ``commit_round``: copies staged rows and local copies into the slots, in place.

Payloads travel as raw bytes, so every dtype moves alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from eplb_plugin.comm import is_nccl
from eplb_plugin.errors import TransferError
from eplb_plugin.executor.agreement import wait_work
from eplb_plugin.executor.integrity import fingerprint
from eplb_plugin.executor.peers import PeerViews
from eplb_plugin.executor.plan import LayerTransferPlan, RankTransferPlan


class StagingPool:
    """Staging rows: per weight tensor a [rows, *tensor.shape[1:]] buffer of its dtype.

    A round takes a contiguous block of rows (so the experts it receives from one peer land
    in consecutive rows and travel as one message per tensor): at the bottom if free, else
    at the top, else the first block that fits. Two rounds whose sizes sum to at most the
    pool therefore always fit side by side (one at each end).
    """

    def __init__(self, weights: Sequence[torch.Tensor], rows: int):
        self.signature = signature(weights)
        self.buffers = [torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in weights]
        self.rows = rows
        self._free = [True] * rows
        self._events: dict[int, object] = {}  # row -> event after which it may be rewritten

    def reset(self) -> None:
        """Every row free (a new move: the previous one's transfers were all drained)."""
        self._free = [True] * self.rows
        self._events.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def find(self, n: int) -> int | None:
        """First row of a free block of n rows (bottom, top, then first fit), or None."""
        if n == 0:
            return 0
        fits = [b for b in range(self.rows - n + 1) if all(self._free[b : b + n])]
        if not fits:
            return None
        return 0 if fits[0] == 0 else fits[-1] if fits[-1] == self.rows - n else fits[0]

    def take(self, n: int) -> tuple[list[int], list]:
        """A free block of n rows and the events that must complete before rewriting them."""
        base = self.find(n)
        if base is None:
            raise TransferError(f"staging pool of {self.rows} rows has no {n} free consecutive rows")
        rows = list(range(base, base + n))
        for r in rows:
            self._free[r] = False
        return rows, [e for e in (self._events.pop(r, None) for r in rows) if e is not None]

    def give_back(self, rows: Sequence[int], event=None) -> None:
        for r in rows:
            self._free[r] = True
            if event is not None:
                self._events[r] = event


def signature(weights: Sequence[torch.Tensor]) -> tuple:
    """What a pool must match: each tensor's per-slot shape, dtype and device."""
    return tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in weights)


@dataclass
class StagedRound:
    """One rank's staged data for one round, ready to commit once every rank agrees."""

    plan: RankTransferPlan
    new_map: torch.Tensor  # [P] the layer's map once this round commits
    buffers: list[torch.Tensor]  # the pool's buffers, per weight tensor
    rows: list[int]  # consecutive pool rows: one per recv, then one per staged source
    round_plan: LayerTransferPlan | None = None  # every rank's share (message boundaries)
    error: BaseException | None = None  # this rank's failure while staging
    expected: dict[int, int] = field(default_factory=dict)  # logical -> fingerprint (verify)
    recv_fingerprints: torch.Tensor | None = None  # [len(recvs)] int64, with verify
    device_ok: torch.Tensor | None = None  # [1] int32: received data matched (verify)
    works: list = field(default_factory=list)  # NCCL P2P works (not waited on the host)
    ready_event: object = None  # CUDA event on the staging stream (non-blocking mover)

    @property
    def recv_rows(self) -> list[int]:
        return self.rows[: len(self.plan.recvs)]

    @property
    def copy_rows(self) -> dict[int, int]:
        """Staged local-copy source slot -> pool row."""
        return dict(zip(self.plan.staged_copy_sources, self.rows[len(self.plan.recvs):]))


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """A uint8 view of a contiguous tensor (writes through it land in x)."""
    return x.reshape(-1).view(torch.uint8)


def _peer(group: dist.ProcessGroup, peer: int) -> int:
    return peer if group is dist.group.WORLD else dist.get_global_rank(group, peer)


def expert_bytes(weights: Sequence[torch.Tensor]) -> int:
    """Bytes of one slot over all tensors (each [num_local_slots, ...])."""
    return sum(t[0].numel() * t.element_size() for t in weights)


def runs(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """[(a0, b0, n)]: maximal runs of pairs whose a and b both step by 1."""
    out: list[list[int]] = []
    for a, b in pairs:
        if out and a == out[-1][0] + out[-1][2] and b == out[-1][1] + out[-1][2]:
            out[-1][2] += 1
        else:
            out.append([a, b, 1])
    return [tuple(x) for x in out]


def pair_runs(round_plan: LayerTransferPlan, sender: int, receiver: int) -> list[tuple[int, int, int]]:
    """Messages from sender to receiver in one round: [(first source slot, first recv index
    on the receiver, experts)], one message per tensor each. Both ranks compute the same
    list from the shared plan: consecutive source slots into consecutive receive rows."""
    recv_index = {v.logical_expert: j for j, v in enumerate(round_plan.ranks[receiver].recvs) if v.peer == sender}
    return runs([(s.src_local_slot, recv_index[s.logical_expert])
                 for s in round_plan.ranks[sender].sends if s.peer == receiver])


def stage_round(
    weights: Sequence[torch.Tensor],
    staged: StagedRound,
    *,
    group: dist.ProcessGroup | None,
    verify: bool,
    timeout_s: float,
    tags: dict[tuple[bool, int], int],
    nccl: bool | None = None,
    peers: PeerViews | None = None,
    barrier: bool = False,
) -> None:
    """Fill the round's rows: staged local-copy sources, then P2P. Slots are only read.

    Collective over group for this round: every rank calls it for the same round, in the
    same order relative to its other operations on group. Messages: per pair of ranks, each
    run of experts with consecutive source slots (sender) and receive rows (receiver) goes
    as one message per tensor, in the same order on both sides (``pair_runs``). NCCL:
    posted in the caller's stream order and not waited for; with verify, staged.device_ok
    says whether the payloads match the senders' fingerprints. Gloo: waits for the
    transfers (with timeout_s) and checks on the host. tags: per (is_send, peer) message
    counters for gloo, kept across rounds. peers: experts from ``peers.peers`` are pulled by
    this rank (``PeerViews.pull``, copy engines on CUDA) and not sent by them; the rest go by
    P2P as above. barrier: first wait for every rank (a one-element all-reduce on group,
    stream-ordered on NCCL), so that pulls see the peers' earlier commits (``needs_barrier``;
    every rank passes the same value).
    """
    plan, bufs = staged.plan, staged.buffers
    base = staged.rows[0] if staged.rows else 0
    for src, row in staged.copy_rows.items():
        for t, buf in zip(weights, bufs):
            buf[row].copy_(t[src])
    if group is None:
        return
    nccl = nccl if nccl is not None else is_nccl(group)
    device, me = weights[0].device, plan.rank
    if barrier:
        x = torch.ones(1, dtype=torch.int32, device=device if nccl else "cpu")
        dist.all_reduce(x, group=group)  # NCCL: the current stream waits; gloo: the host waits
    pulled = peers.peers if peers is not None else frozenset()
    if pulled:
        positions = peers.positions(weights)
        for peer in sorted({v.peer for v in plan.recvs} & pulled):
            for src, j, n in pair_runs(staged.round_plan, peer, me):
                for pos, buf in zip(positions, bufs):
                    peers.pull(buf[base + j : base + j + n], peer, pos, src, n)
    if not any(s.peer not in pulled for s in plan.sends) and not any(v.peer not in pulled for v in plan.recvs):
        return
    sent_fps = fingerprint(weights, [s.src_local_slot for s in plan.sends]) if verify else None
    if verify:
        staged.recv_fingerprints = torch.zeros(len(plan.recvs), dtype=torch.int64, device=device)
    recv_fps = staged.recv_fingerprints
    ops: list[tuple[bool, torch.Tensor, int]] = []  # (is_send, tensor, group peer)
    first_send = {}
    for i, s in enumerate(plan.sends):
        first_send.setdefault(s.peer, i)
    for peer in sorted(first_send.keys() - pulled):
        i = first_send[peer]  # my sends to one peer are consecutive, in pair_runs' order
        for src, _, n in pair_runs(staged.round_plan, me, peer):
            ops += [(True, _as_bytes(t[src : src + n]), peer) for t in weights]
            if verify:
                ops.append((True, sent_fps[i : i + n], peer))
            i += n
    first_recv = {}
    for j, v in enumerate(plan.recvs):
        first_recv.setdefault(v.peer, j)
    for peer in sorted(first_recv.keys() - pulled):
        for _, j, n in pair_runs(staged.round_plan, peer, me):
            ops += [(False, _as_bytes(buf[base + j : base + j + n]), peer) for buf in bufs]
            if verify:
                ops.append((False, recv_fps[j : j + n], peer))
    if nccl:
        p2p = [dist.P2POp(dist.isend if snd else dist.irecv, x, _peer(group, peer), group)
               for snd, x, peer in ops]
        staged.works = dist.batch_isend_irecv(p2p)
        if verify and plan.recvs:
            for w in staged.works:
                w.wait()  # stream-level: the fingerprint below reads the received rows
            got = fingerprint(bufs, staged.recv_rows)
            staged.device_ok = (got == recv_fps).all().to(torch.int32).reshape(1)
        return
    works = []
    for snd, x, peer in ops:
        k = tags[(snd, peer)] = tags.get((snd, peer), -1) + 1  # i-th message of this pair
        works.append((dist.isend if snd else dist.irecv)(x, _peer(group, peer), group=group, tag=k))
    for w in works:
        wait_work(w, timeout_s, "a weight transfer")  # gloo: the data must be here before the flag
    del works  # a kept Work (e.g. in an exception's frames) would outlive the process group
    if verify and plan.recvs:
        check_received(staged)


def check_received(staged: StagedRound) -> None:
    """Host check (verify): received rows match their senders' fingerprints; records them."""
    plan = staged.plan
    got = fingerprint(staged.buffers, staged.recv_rows)
    fps = staged.recv_fingerprints
    for v, fp in zip(plan.recvs, fps.tolist()):  # one host read, not one per expert
        staged.expected[v.logical_expert] = fp
    bad = (got != fps).nonzero().flatten().tolist()
    if bad:
        raise TransferError(
            f"received experts {[plan.recvs[j].logical_expert for j in bad]} do not match "
            f"their senders' fingerprints"
        )


def _put(dst: torch.Tensor, src: torch.Tensor, only_if: torch.Tensor | None) -> None:
    if only_if is None:
        dst.copy_(src)
        return
    # dst keeps its bytes unless the flag is set: no host wait, no temporary. Raw bytes,
    # as int32 words when both sides are aligned (fewer, wider accesses).
    d, s = _as_bytes(dst), _as_bytes(src)
    if d.numel() % 4 == 0 and d.storage_offset() % 4 == 0 and s.storage_offset() % 4 == 0:
        d, s = d.view(torch.int32), s.view(torch.int32)
    torch.where(only_if, s, d, out=d)


def commit_round(weights: Sequence[torch.Tensor], staged: StagedRound,
                 only_if: torch.Tensor | None = None) -> None:
    """Write staged rows and local copies into the slots, in place (on the current stream).

    Copies of consecutive rows (or unchanged slots) into consecutive slots go as one copy
    per tensor. Order is free: rows and unstaged sources are not written by this commit.
    only_if: a [1] bool tensor (the round's agreed flag, see ``Agreement.device_flag``):
    the slots are written only where it is true, decided on the device (so the host need
    not wait for the agreement before queueing the commit); None: written unconditionally.
    """
    plan, copy_rows = staged.plan, staged.copy_rows
    from_rows = [(row, d) for v, row in zip(plan.recvs, staged.recv_rows) for d in v.dst_local_slots]
    from_slots = []
    for c in plan.local_copies:
        row = copy_rows.get(c.src_local_slot)
        (from_slots if row is None else from_rows).append((c.src_local_slot if row is None else row, c.dst_local_slot))
    for t, buf in zip(weights, staged.buffers):
        for src, dst, n in runs(sorted(from_rows)):
            _put(t[dst : dst + n], buf[src : src + n], only_if)
        for src, dst, n in runs(sorted(from_slots)):
            _put(t[dst : dst + n], t[src : src + n], only_if)


def verify_committed(weights, staged: StagedRound, *, rank: int, layer: int) -> None:
    """After commit: each changed slot matches the fingerprint of what was received/copied.

    A failure here cannot be rolled back (the slots are written); it raises TransferError.
    """
    plan = staged.plan
    dsts = list(plan.changed_local_slots)
    got = dict(zip(dsts, fingerprint(weights, dsts).tolist()))
    want: dict[int, int] = {}
    for v in plan.recvs:
        fp = staged.expected.get(v.logical_expert)
        for d in v.dst_local_slots:
            want[d] = fp if fp is not None else got[d]
    copy_rows = staged.copy_rows
    staged_copies = [c for c in plan.local_copies if c.src_local_slot in copy_rows]
    slot_copies = [c for c in plan.local_copies if c.src_local_slot not in copy_rows]
    # One fingerprint call (and host read) per source kind, not one per copy.
    for copies, fps in (
        (staged_copies, fingerprint(staged.buffers, [copy_rows[c.src_local_slot] for c in staged_copies])),
        (slot_copies, fingerprint(weights, [c.src_local_slot for c in slot_copies])),
    ):
        for c, fp in zip(copies, fps.tolist()):
            want[c.dst_local_slot] = fp
    bad = [d for d in dsts if got[d] != want[d]]
    if bad:
        raise TransferError(f"rank {rank}, layer {layer}: slots {bad} fail the fingerprint check after commit")
