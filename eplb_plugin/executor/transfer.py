"""Move one layer's expert weights between EP ranks, in place, with bounded staging memory.

Design (atomicity and memory):

- A layer's move is split by ``plan_layer_rounds`` into rounds that each stage at most
  ``budget_bytes // expert_bytes`` experts per rank. Each round has three steps:
  (a) pre-flight: every rank allocates its staging buffers, then all ranks agree (MIN
      all-reduce of a success flag) before any P2P is posted, so a rank that fails early
      never leaves peers waiting on unmatched sends;
  (b) staging: received experts and the sources of local copies that the round overwrites
      land in staging buffers, and sends read the untouched old slots, so every slot still
      holds its old weights; then all ranks agree again (success flag, with integrity);
  (c) commit: only if every rank succeeded, staged data and local copies are written into
      the slots in place (addresses unchanged: CUDA graphs stay valid), and ``live_map`` is
      updated.
- If the budget holds a whole layer's incoming experts the layer moves in one round and is
  atomic: a failure on any rank leaves every rank on the old map with the old weights.
  With a smaller budget each round is atomic and each intermediate map is a valid placement
  (every logical expert of the new map keeps a replica, weights match the map); a failure
  then leaves the layer on the last committed intermediate map, which ``LayerMoveError``
  carries and ``live_map`` shows. Extra memory is at most the budget (plus one expert when a
  cycle of single replicas cannot be split; see ``plan_layer_rounds``).

``move_experts`` is collective: every rank of ``group`` must call it with the same maps and
the same options, in the same order as its other collectives on ``group``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from eplb_plugin.errors import ConfigError, TransferError
from eplb_plugin.executor.integrity import fingerprint
from eplb_plugin.executor.plan import RankTransferPlan, plan_layer_rounds, plan_layer_transfer

DEFAULT_MAX_STAGED_EXPERTS = 4
FaultHook = Callable[[str, int, int], None]  # (point, rank, layer); raise to inject a failure


class LayerMoveError(TransferError):
    """A layer's move failed on some rank. ``live_physical_to_logical_map`` ([P]) is the map the
    layer's weights match now on every rank (the old map unless an earlier round committed)."""

    def __init__(self, message: str, *, rank: int, layer: int, live_map: torch.Tensor):
        super().__init__(message)
        self.rank = rank
        self.layer = layer
        self.live_physical_to_logical_map = live_map


@dataclass(frozen=True)
class MoveResult:
    """What one rank moved for one layer. Bytes are this rank's P2P traffic."""

    slots_changed: int
    local_copies: int
    experts_sent: int
    experts_received: int
    bytes_sent: int
    bytes_received: int
    seconds: float
    rounds: int
    peak_staging_bytes: int


@dataclass
class StagedRound:
    """One rank's staged data for one round, ready to commit."""

    plan: RankTransferPlan
    new_map: torch.Tensor  # [P] the layer's map once this round commits
    buffers: list[torch.Tensor]  # per weight tensor: [rows, *tensor.shape[1:]]
    copy_rows: dict[int, int]  # staged local-copy source slot -> buffer row
    bytes_sent: int = 0
    bytes_received: int = 0
    expected: dict[int, int] = field(default_factory=dict)  # logical -> fingerprint
    sent_fingerprints: torch.Tensor | None = None  # [len(sends)] int64, with verify
    recv_fingerprints: torch.Tensor | None = None  # [len(recvs)] int64, with verify
    ready_event: object = None  # torch.cuda.Event on GPU, set by the non-blocking mover


def group_info(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup | None, int, int]:
    """(group, rank in group, group size); (None, 0, 1) when torch.distributed is not set up."""
    if not dist.is_available() or not dist.is_initialized():
        return None, 0, 1
    group = group or dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


def expert_bytes(weights: Sequence[torch.Tensor]) -> int:
    """Bytes of one slot over all tensors (each [num_local_slots, ...])."""
    return sum(t[0].numel() * t.element_size() for t in weights)


def max_staged_experts(weights: Sequence[torch.Tensor], budget_bytes: int | None) -> int:
    """Experts per rank that fit in ``budget_bytes`` (None: DEFAULT_MAX_STAGED_EXPERTS)."""
    if budget_bytes is None:
        return DEFAULT_MAX_STAGED_EXPERTS
    per = expert_bytes(weights)
    if budget_bytes < per:
        raise ConfigError(
            f"budget_bytes={budget_bytes} is below one expert ({per} bytes over "
            f"{len(weights)} tensors); raise it to at least {per}"
        )
    return budget_bytes // per


def check_weights(weights: Sequence[torch.Tensor], num_local_slots: int) -> None:
    """Raise ConfigError unless every tensor is contiguous with dim 0 = num_local_slots."""
    if not weights:
        raise ConfigError("weights is empty: pass every tensor whose dim 0 is the local slot")
    for i, t in enumerate(weights):
        if t.dim() < 1 or t.shape[0] != num_local_slots or not t.is_contiguous():
            raise ConfigError(
                f"weights[{i}] has shape {tuple(t.shape)} (contiguous={t.is_contiguous()}); "
                f"it must be contiguous with dim 0 = {num_local_slots} local slots"
            )


def agree(ok: bool, group: dist.ProcessGroup | None, device: torch.device, timeout_s: float) -> bool:
    """True iff every rank passed ok=True. Collective: every rank of group calls it identically.

    A MIN all-reduce of one int; waits at most timeout_s (gloo honours it; NCCL's own
    watchdog timeout applies to the kernel, and .item() below is the host sync we need).
    """
    if group is None or dist.get_world_size(group) == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    work = dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group, async_op=True)
    work.wait(timeout=timedelta(seconds=timeout_s))
    return bool(flag.item())  # host sync: the decision must be known on the host


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """A uint8 view of a contiguous tensor (writes through it land in x)."""
    return x.reshape(-1).view(torch.uint8)


def _peer(group: dist.ProcessGroup, peer: int) -> int:
    return peer if group is dist.group.WORLD else dist.get_global_rank(group, peer)


def allocate_round(
    weights, plan: RankTransferPlan, new_map: torch.Tensor, *, verify: bool
) -> StagedRound:
    """Step (a): staging buffers (one row per received expert and per staged copy source),
    and with verify the fingerprints of what this rank sends. Posts no communication."""
    sources = plan.staged_copy_sources
    rows = len(plan.recvs) + len(sources)
    buffers = [torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in weights]
    copy_rows = {s: len(plan.recvs) + i for i, s in enumerate(sources)}
    staged = StagedRound(plan=plan, new_map=new_map, buffers=buffers, copy_rows=copy_rows)
    if verify:
        staged.sent_fingerprints = fingerprint(weights, [s.src_local_slot for s in plan.sends])
        staged.recv_fingerprints = torch.zeros(len(plan.recvs), dtype=torch.int64, device=weights[0].device)
    return staged


def exchange_round(
    weights: Sequence[torch.Tensor],
    staged: StagedRound,
    *,
    group: dist.ProcessGroup | None,
    verify: bool,
    timeout_s: float,
) -> None:
    """Step (b): fill staging buffers (local copies + P2P); slots are only read.

    With verify, each send is followed by its source's fingerprint and each staged row is
    checked against it (raises TransferError on mismatch). Every rank of group must call it
    for the same round (the ops of each pair of ranks match one to one, in plan order).
    """
    plan = staged.plan
    for src, row in staged.copy_rows.items():
        for t, buf in zip(weights, staged.buffers):
            buf[row].copy_(t[src])
    if group is None or (not plan.sends and not plan.recvs):
        return
    nccl = dist.get_backend(group) == "nccl"
    sent_fps, recv_fps = staged.sent_fingerprints, staged.recv_fingerprints
    verify = verify and sent_fps is not None
    ops: list[tuple[bool, torch.Tensor, int]] = []  # (is_send, tensor, group peer)
    # Sends and receives interleaved by peer in plan order; each side posts the same order.
    # Payloads travel as raw bytes: every dtype (fp8, bool...) over every backend, same speed.
    for i, s in enumerate(plan.sends):
        ops += [(True, _as_bytes(t[s.src_local_slot]), s.peer) for t in weights]
        if verify:
            ops.append((True, sent_fps[i : i + 1], s.peer))
        staged.bytes_sent += expert_bytes(weights)
    for j, v in enumerate(plan.recvs):
        ops += [(False, _as_bytes(buf[j]), v.peer) for buf in staged.buffers]
        if verify:
            ops.append((False, recv_fps[j : j + 1], v.peer))
        staged.bytes_received += expert_bytes(weights)
    if nccl:
        p2p = [
            dist.P2POp(dist.isend if snd else dist.irecv, x, _peer(group, peer), group)
            for snd, x, peer in ops
        ]
        works = dist.batch_isend_irecv(p2p)
    else:
        tag: dict[tuple[bool, int], int] = {}
        works = []
        for snd, x, peer in ops:
            k = tag[(snd, peer)] = tag.get((snd, peer), -1) + 1  # i-th message of this pair
            fn = dist.isend if snd else dist.irecv
            works.append(fn(x, _peer(group, peer), group=group, tag=k))
    for w in works:
        w.wait(timeout=timedelta(seconds=timeout_s))
    if verify and plan.recvs:
        got = fingerprint(staged.buffers, range(len(plan.recvs)))
        for j, v in enumerate(plan.recvs):
            staged.expected[v.logical_expert] = int(recv_fps[j])
        bad = (got != recv_fps).nonzero().flatten().tolist()
        if bad:
            raise TransferError(
                f"received experts {[plan.recvs[j].logical_expert for j in bad]} do not match "
                f"their senders' fingerprints"
            )


def commit_round(weights: Sequence[torch.Tensor], staged: StagedRound) -> None:
    """Step (c): write staged rows and local copies into the slots, in place."""
    plan = staged.plan
    for t, buf in zip(weights, staged.buffers):
        for j, v in enumerate(plan.recvs):
            for d in v.dst_local_slots:
                t[d].copy_(buf[j])
        for c in plan.local_copies:
            row = staged.copy_rows.get(c.src_local_slot)
            t[c.dst_local_slot].copy_(t[c.src_local_slot] if row is None else buf[row])


def move_experts(
    weights: Sequence[torch.Tensor],
    old_physical_to_logical_map: torch.Tensor,
    new_physical_to_logical_map: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    layer: int = 0,
    budget_bytes: int | None = None,
    gpus_per_node: int | None = None,
    live_map: torch.Tensor | None = None,
    verify: bool = False,
    timeout_s: float = 300.0,
    fault_hook: FaultHook | None = None,
) -> MoveResult:
    """Move one layer's experts in place from the old map to the new one.

    weights: this rank's tensors, each contiguous [num_local_slots, ...] (w13, w2, scales...).
    old_physical_to_logical_map, new_physical_to_logical_map: [P] integer, same on all ranks.
    group: the EP process group (None: WORLD, or a single rank when not initialized).
    budget_bytes: max staging memory per rank (None: DEFAULT_MAX_STAGED_EXPERTS experts).
    live_map: optional [P] tensor (any device) set to each round's map once it commits.
    verify: check P2P payloads against the senders' fingerprints and every changed slot
    afterwards. fault_hook(point, rank, layer) is called at "before_transfer" and
    "after_staging" (tests raise from it to inject a failure on one rank).
    Collective over group. Raises LayerMoveError (a TransferError) on any rank's failure,
    on every rank; the layer then holds ``err.live_physical_to_logical_map``.
    """
    start = time.perf_counter()
    group, rank, world = group_info(group)
    old = old_physical_to_logical_map.detach().to("cpu", torch.int64)
    new = new_physical_to_logical_map.detach().to("cpu", torch.int64)
    if old.numel() % world:
        raise ConfigError(f"{old.numel()} slots do not divide over ep_size={world} ranks")
    check_weights(weights, old.numel() // world)
    flag_device = weights[0].device if group is not None and dist.get_backend(group) == "nccl" else torch.device("cpu")
    rounds = plan_layer_rounds(old, new, ep_size=world, max_staged_experts=max_staged_experts(weights, budget_bytes))
    hook = fault_hook or (lambda point, r, lay: None)
    totals = dict(slots=0, copies=0, sent=0, recv=0, bsent=0, brecv=0, peak=0)
    current = old
    for k, round_map in enumerate(rounds):
        plan = plan_layer_transfer(current, round_map, ep_size=world, gpus_per_node=gpus_per_node).ranks[rank]
        error: BaseException | None = None
        staged = None
        try:
            hook("before_transfer", rank, layer)
            staged = allocate_round(weights, plan, round_map, verify=verify)
        except Exception as exc:  # reported to every rank below, then re-raised
            error = exc
        # Pre-flight agreement: no rank posts P2P unless every rank could stage.
        if agree(error is None, group, flag_device, timeout_s):
            try:
                exchange_round(weights, staged, group=group, verify=verify, timeout_s=timeout_s)
                hook("after_staging", rank, layer)
            except Exception as exc:  # reported to every rank below, then re-raised
                error = exc
            # Commit agreement: every rank's staging landed (and verified) or nobody commits.
            committed = agree(error is None, group, flag_device, timeout_s)
        else:
            committed = False
        if not committed:
            cause = f"{type(error).__name__}: {error}" if error else "another rank failed"
            raise LayerMoveError(
                f"rank {rank}: layer {layer} move failed in round {k + 1}/{len(rounds)} ({cause}); "
                f"the layer stays on its {'old' if k == 0 else 'intermediate'} map",
                rank=rank, layer=layer, live_map=current.clone(),
            ) from error
        commit_round(weights, staged)
        if live_map is not None:
            live_map.copy_(round_map)
        if verify and staged.plan.changed_local_slots:
            verify_committed(weights, staged, rank=rank, layer=layer)
        current = round_map
        totals["slots"] += len(plan.changed_local_slots)
        totals["copies"] += len(plan.local_copies)
        totals["sent"] += len(plan.sends)
        totals["recv"] += len(plan.recvs)
        totals["bsent"] += staged.bytes_sent
        totals["brecv"] += staged.bytes_received
        totals["peak"] = max(totals["peak"], sum(b.numel() * b.element_size() for b in staged.buffers))
    return MoveResult(
        slots_changed=totals["slots"], local_copies=totals["copies"], experts_sent=totals["sent"],
        experts_received=totals["recv"], bytes_sent=totals["bsent"], bytes_received=totals["brecv"],
        seconds=time.perf_counter() - start, rounds=len(rounds), peak_staging_bytes=totals["peak"],
    )


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
    for c in plan.local_copies:
        row = staged.copy_rows.get(c.src_local_slot)
        src = fingerprint(staged.buffers, [row]) if row is not None else fingerprint(weights, [c.src_local_slot])
        want[c.dst_local_slot] = int(src[0])
    bad = [d for d in dsts if got[d] != want[d]]
    if bad:
        raise TransferError(f"rank {rank}, layer {layer}: slots {bad} fail the fingerprint check after commit")
