"""One-sided pulls (executor/peers.py) over gloo ranks whose weights live in shared memory.

``SharedPeerViews`` lets each rank read its peers' slots directly, as CUDA IPC does on one
node; the executor then sends nothing to those peers. Weights encode (layer, logical
expert, tensor, position), so every slot is checked exactly. Budgets of one expert split
layers into rounds that read slots an earlier round wrote, which needs the barrier: without
it a rank can pull a slot its peer has not committed yet.
"""

from __future__ import annotations

import functools
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_executor_nonblocking import _serve
from test_executor_transfer import (
    EXPERT_BYTES,
    NUM_LOCAL,
    TIMEOUT_S,
    _same,
    identity_weights,
    random_map,
)

from eplb_plugin.errors import TransferError
from eplb_plugin.executor import (
    AsyncExpertMover,
    LayerMove,
    LayerMoveError,
    LayerMoveSchedule,
    layers,
    move_experts,
    move_layers,
    nonblocking,
    transfer,
)
from eplb_plugin.executor.peers import PeerViews, SharedPeerViews, needs_barrier

from conftest import destroy_process_group, free_port, gloo_worker

NUM_LAYERS = 5


def _maps(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(99)
    p = NUM_LOCAL * world
    out = [(random_map(gen, p, p - 1), random_map(gen, p, p - 1)) for _ in range(NUM_LAYERS - 1)]
    roll = torch.roll(torch.arange(p), NUM_LOCAL // 2)  # every slot changes, experts change rank
    return out + [(torch.arange(p), roll)]


class _P2PCounter:
    """Counts P2P calls (pulled experts must not travel by P2P): gloo's isend/irecv, NCCL's
    batch_isend_irecv (whose P2POp accepts only the real isend/irecv, so those stay)."""

    def __init__(self):
        self.count = 0
        names = ("batch_isend_irecv",) if dist.get_backend() == "nccl" else ("isend", "irecv")
        self.saved = {name: getattr(dist, name) for name in names}

    def __enter__(self):
        def wrap(fn):
            def counted(*args, **kwargs):
                self.count += 1
                return fn(*args, **kwargs)
            return counted
        for name, fn in self.saved.items():
            setattr(dist, name, wrap(fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _cases(rank: int, world: int, weights, maps, peers, transport: str = "nccl") -> None:
    """weights: this rank's [layer][tensor]; peers: PeerViews of them all (layer-major)."""
    mine = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
    ptrs = [t.data_ptr() for layer in weights for t in layer]
    where = [old.clone() for old, _ in maps]  # each layer's current map

    def check(what):
        for i, w in enumerate(weights):
            assert _same(w, identity_weights(i, where[i][mine].tolist())), (what, i)
        assert [t.data_ptr() for layer in weights for t in layer] == ptrs, what

    # At budget 1 some rounds read slots that an earlier round of their layer wrote: the
    # barrier's case is covered.
    scheds = [LayerMoveSchedule(old, new, ep_size=world, max_staged_experts=1, pipeline=False) for old, new in maps]
    assert any(needs_barrier([s.plan(j) for j in range(k)], s.plan(k)) for s in scheds for k in range(len(s)))

    # Case 1: move_layers there and back, per budget: every slot lands exactly, in place,
    # and no expert travels by P2P.
    for budget in [None, EXPERT_BYTES, 2 * EXPERT_BYTES, 10**9]:
        for _ in range(2):
            targets = [new if torch.equal(cur, old) else old for cur, (old, new) in zip(where, maps)]
            live = [cur.clone() for cur in where]
            with _P2PCounter() as p2p:
                move_layers([(w, cur, t) for w, cur, t in zip(weights, where, targets)], budget_bytes=budget,
                            live_maps=live, timeout_s=TIMEOUT_S, peers=peers)
            assert p2p.count == 0
            where = targets
            assert all(torch.equal(a, b) for a, b in zip(live, where))
            check(f"move_layers budget={budget}")

    # Case 2: move_experts layer by layer in rounds of one expert (deferred votes), then in
    # verify mode, which ignores the pulls (fingerprints travel with P2P payloads).
    for verify in (False, True):
        with _P2PCounter() as p2p:
            for i, w in enumerate(weights):
                target = maps[i][1] if torch.equal(where[i], maps[i][0]) else maps[i][0]
                move_experts(w, where[i], target, layer=i, budget_bytes=EXPERT_BYTES, verify=verify,
                             timeout_s=TIMEOUT_S, peers=peers)
                where[i] = target
        assert (p2p.count > 0) == verify
        check(f"move_experts verify={verify}")

    # Case 3: a failure on the last rank at layer 2 leaves layers 0-1 moved and 2+ on their
    # old maps and weights on every rank; the retry completes.
    targets = [new if torch.equal(cur, old) else old for cur, (old, new) in zip(where, maps)]

    def hook(point, r, layer):
        if point == "after_staging" and r == world - 1 and layer == 2:
            raise RuntimeError("injected")

    with pytest.raises(LayerMoveError) as info:
        move_layers([(w, cur, t) for w, cur, t in zip(weights, where, targets)], budget_bytes=10**9,
                    fault_hook=hook, timeout_s=TIMEOUT_S, peers=peers)
    assert info.value.layer == 2
    where = [t if i < 2 else cur for i, (cur, t) in enumerate(zip(where, targets))]
    assert all(torch.equal(a, b) for a, b in zip(info.value.live_physical_to_logical_maps, where))
    check("after a failed move_layers")
    move_layers([(w, cur, t) for w, cur, t in zip(weights, where, targets)], timeout_s=TIMEOUT_S, peers=peers)
    where = targets
    check("retried move_layers")

    # Case 4: the non-blocking mover pulls too: every pass sees whole layers, all land.
    moves = [LayerMove(i, w, cur, new if torch.equal(cur, old) else old, cur.clone())
             for i, (w, cur, (old, new)) in enumerate(zip(weights, where, maps))]
    mover = (AsyncExpertMover(budget_bytes=EXPERT_BYTES, timeout_s=TIMEOUT_S, peers=peers) if transport == "nccl"
             else AsyncExpertMover(budget_bytes=EXPERT_BYTES, timeout_s=TIMEOUT_S, transport=transport))
    with _P2PCounter() as p2p:
        mover.start(moves)
        assert mover.pulls
        _serve(mover, moves, mine, 2)
        mover.close()
    assert mover.done and p2p.count == 0
    where = [m.live_map for m in moves]
    assert all(torch.equal(m.live_map, m.new_physical_to_logical_map) for m in moves)
    check("AsyncExpertMover")

    # Case 5: a failure in the mover surfaces on every rank; layers stay whole.
    moves = [LayerMove(i, w, cur, new if torch.equal(cur, old) else old, cur.clone())
             for i, (w, cur, (old, new)) in enumerate(zip(weights, where, maps))]
    mover = AsyncExpertMover(budget_bytes=10**9, timeout_s=TIMEOUT_S, peers=peers, fault_hook=hook)
    mover.start(moves)
    with pytest.raises(TransferError):
        _serve(mover, moves, mine, 1)
    mover.close()
    where = [m.live_map for m in moves]
    check("after a failed AsyncExpertMover")


def _slow_commits() -> None:
    """This rank commits late: a peer that pulled before our commit landed would read stale
    slots (what the barrier prevents)."""
    for module in (layers, transfer, nonblocking):
        def slow(*args, _commit=module.commit_round, **kwargs):
            time.sleep(0.003)
            return _commit(*args, **kwargs)
        module.commit_round = slow


def _shared_memory_cases(weights_by_rank, maps, rank: int, world: int) -> None:
    """The cases on CPU weights in shared memory (``functools.partial`` binds the first two)."""
    if rank == world - 1:
        _slow_commits()
    # CPU weights cannot be pulled through CUDA IPC: every rank learns so, and why.
    views = PeerViews.exchange([t for layer in weights_by_rank[rank] for t in layer], dist.group.WORLD)
    assert not views.active and not views.peers and "not on CUDA" in views.reason
    peers = SharedPeerViews(rank, [[t for layer in w for t in layer] for w in weights_by_rank])
    _cases(rank, world, weights_by_rank[rank], maps, peers)


@pytest.mark.parametrize("world", [2, 3])
def test_pulled_moves_land_exactly_without_p2p_and_failures_keep_old_weights(world):
    maps = _maps(world)
    weights_by_rank = [[[t.share_memory_() for t in identity_weights(i, old[r * NUM_LOCAL:(r + 1) * NUM_LOCAL].tolist())]
                        for i, (old, _) in enumerate(maps)] for r in range(world)]
    cases = functools.partial(_shared_memory_cases, weights_by_rank, maps)
    mp.spawn(gloo_worker, args=(world, free_port(), cases, TIMEOUT_S), nprocs=world, join=True)


def _gpu_worker(rank: int, world: int, port: int, maps) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S), device_id=torch.device("cuda", rank))
    if rank == world - 1:
        _slow_commits()
    try:
        mine = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
        weights = [[t.cuda() for t in identity_weights(i, old[mine].tolist())] for i, (old, _) in enumerate(maps)]
        peers = PeerViews.exchange([t for layer in weights for t in layer], dist.group.WORLD)
        assert peers.active and peers.peers == frozenset(r for r in range(world) if r != rank)
        _cases(rank, world, weights, maps, peers, transport="ipc")
        torch.cuda.synchronize()
    finally:
        dist.barrier()
        destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_pulls_through_cuda_ipc_land_exactly_without_nccl_p2p():
    """2 GPUs: the same cases with PeerViews over CUDA IPC (copy engines), NCCL votes."""
    mp.spawn(_gpu_worker, args=(2, free_port(), _maps(2)), nprocs=2, join=True)
