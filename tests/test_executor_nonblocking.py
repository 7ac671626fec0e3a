"""Tests of eplb_plugin.executor.nonblocking over gloo ranks (one spawn, several cases)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from test_executor_transfer import (
    EXPERT_BYTES,
    NUM_LOCAL,
    TIMEOUT_S,
    _same,
    identity_weights,
    random_map,
)

from eplb_plugin.errors import TransferError
from eplb_plugin.executor import AsyncExpertMover, LayerMove

from conftest import free_port, gloo_worker

NUM_LAYERS = 4


def _layers(rank: int, world: int, gen: torch.Generator):
    p = NUM_LOCAL * world
    mine = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
    moves = []
    for layer in range(NUM_LAYERS):
        old, new = random_map(gen, p, p - 1), random_map(gen, p, p - 1)
        moves.append(LayerMove(layer, identity_weights(layer, old[mine].tolist()), old, new, old.clone()))
    return moves, mine


def _consistent(moves, mine) -> bool:
    """Every layer's weights are exactly its live map's experts (no half-applied layer)."""
    return all(_same(list(m.weights), identity_weights(m.layer, m.live_map[mine].tolist())) for m in moves)


def _serve(mover, moves, mine, chunk: int) -> list[list[int]]:
    """A serving loop: a 'forward pass' (matmuls) then commit_ready at each pass boundary."""
    x = torch.randn(64, 64)
    committed = []
    for _ in range(2000):
        if mover.done:
            break
        x = torch.tanh(x @ x.T / 64)  # the pass
        layers = mover.commit_ready(max_layers=chunk)
        assert len(layers) <= chunk
        committed.append(layers)
        assert _consistent(moves, mine)
    return committed


def _cases(rank: int, world: int) -> None:
    gen = torch.Generator().manual_seed(7)

    # Case 1: every layer lands exactly, chunk by chunk, each pass sees whole layers only;
    # one mover (one pair of groups) serves two rebalances, there and back.
    for budget, chunk, verify in [(EXPERT_BYTES, 1, True), (None, 2, False), (10**9, 3, True), (2 * EXPERT_BYTES, 1, False)]:
        moves, mine = _layers(rank, world, gen)
        ptrs = [t.data_ptr() for m in moves for t in m.weights]
        mover = AsyncExpertMover(budget_bytes=budget, verify=verify, timeout_s=TIMEOUT_S)
        groups = (mover.transfer_group, mover.control_group)
        for _ in range(2):
            mover.start(moves)
            _serve(mover, moves, mine, chunk)
            mover.close()
            assert mover.done and (mover.transfer_group, mover.control_group) == groups
            for m in moves:
                assert torch.equal(m.live_map, m.new_physical_to_logical_map)
                assert _same(list(m.weights), identity_weights(m.layer, m.new_physical_to_logical_map[mine].tolist()))
            assert [t.data_ptr() for m in moves for t in m.weights] == ptrs
            moves = [LayerMove(m.layer, m.weights, m.new_physical_to_logical_map, m.old_physical_to_logical_map,
                               m.live_map) for m in moves]  # the next rebalance moves back

    # Case 2: a failure on one rank while staging layer 2 surfaces on every rank; every
    # layer still matches its live map, and layers 2-3 are still on their old maps.
    moves, mine = _layers(rank, world, gen)

    def hook(point, r, layer):
        if point == "after_staging" and r == world - 1 and layer == 2:
            raise RuntimeError("injected")

    mover = AsyncExpertMover(budget_bytes=10**9, timeout_s=TIMEOUT_S, fault_hook=hook)
    mover.start(moves)
    with pytest.raises(TransferError, match="injected" if rank == world - 1 else "another rank"):
        _serve(mover, moves, mine, 1)
    mover.close()
    assert _consistent(moves, mine)
    # Layers 0-1 committed or dropped (staged data is dropped on failure); 2-3 never moved.
    for m in moves:
        done = torch.equal(m.live_map, m.new_physical_to_logical_map)
        assert done or torch.equal(m.live_map, m.old_physical_to_logical_map)
        assert not done or m.layer < 2
    # The same mover retries from the live maps and finishes the rebalance.
    mover.fault_hook = lambda point, r, layer: None
    mover.start([LayerMove(m.layer, m.weights, m.live_map.clone(), m.new_physical_to_logical_map, m.live_map)
                 for m in moves])
    _serve(mover, moves, mine, 2)
    mover.close()
    for m in moves:
        assert torch.equal(m.live_map, m.new_physical_to_logical_map) and _consistent([m], mine)


def test_background_moves_commit_whole_layers_at_pass_boundaries_and_failures_surface():
    """2 gloo ranks: chunked commits land every layer exactly; an injected failure reaches all."""
    mp.spawn(gloo_worker, args=(2, free_port(), _cases, TIMEOUT_S), nprocs=2, join=True)
