"""Tests of eplb_plugin.executor.layers (move_layers) over gloo ranks, and of precomputed
schedules. Weights encode (layer, logical expert, tensor, position), so every slot is
checked exactly (helpers shared with test_executor_transfer)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from test_executor_transfer import (
    EXPERT_BYTES,
    NUM_LOCAL,
    TIMEOUT_S,
    Boom,
    _same,
    identity_weights,
    random_map,
)

from eplb_plugin.errors import ConfigError
from eplb_plugin.executor import (
    LayerMoveError,
    LayerMoveSchedule,
    move_experts,
    move_layers,
    transfer,
)
from eplb_plugin.executor.transfer import prepare_staging

from conftest import free_port, gloo_worker


def _rebalance(gen: torch.Generator, p: int, num_layers: int, unchanged: tuple[int, ...] = ()):
    """Per layer (old, new) random [P] maps with duplicates; the layers in ``unchanged`` keep theirs."""
    maps = []
    for layer in range(num_layers):
        num_logical = p - 1 - layer % 3
        old = random_map(gen, p, num_logical)
        maps.append((old, old.clone() if layer in unchanged else random_map(gen, p, num_logical)))
    return maps


def _cases(rank: int, world: int) -> None:
    p = NUM_LOCAL * world
    mine = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
    gen = torch.Generator().manual_seed(4321)  # same on every rank: same maps everywhere

    def weights_of(maps, base):
        return [identity_weights(base + i, old[mine].tolist()) for i, (old, _) in enumerate(maps)]

    # Case 1: a rebalance of 5 layers (one unchanged) with random maps, per budget: every slot
    # lands exactly, in place; live maps are the new maps; the unchanged layer moves 0 bytes.
    for budget in [None, EXPERT_BYTES, 2 * EXPERT_BYTES, 10**9]:
        maps = _rebalance(gen, p, 5, unchanged=(2,))
        weights = weights_of(maps, 10)
        ptrs = [[t.data_ptr() for t in w] for w in weights]
        live = [old.clone() for old, _ in maps]
        results = move_layers([(w, old, new) for w, (old, new) in zip(weights, maps)], None,
                              layer_ids=[10 + i for i in range(5)], budget_bytes=budget, live_maps=live,
                              timeout_s=TIMEOUT_S)
        cap = (budget or 4 * EXPERT_BYTES) // EXPERT_BYTES
        for i, ((old, new), w, res) in enumerate(zip(maps, weights, results)):
            assert _same(w, identity_weights(10 + i, new[mine].tolist())), (budget, i, old, new)
            assert [t.data_ptr() for t in w] == ptrs[i]
            assert torch.equal(live[i], new)
            sched = LayerMoveSchedule(old, new, ep_size=world, max_staged_experts=cap, pipeline=False)
            assert res.rounds == len(sched) and res.slots_changed == int((old[mine] != new[mine]).sum())
            assert res.bytes_received == res.experts_received * EXPERT_BYTES
            assert res.bytes_sent == res.experts_sent * EXPERT_BYTES
        assert (results[2].slots_changed, results[2].bytes_sent, results[2].bytes_received, results[2].rounds) == \
            (0, 0, 0, 0)

    # Case 2: precomputed schedules and one agreed pool (prepare_staging) give the same result;
    # so does verify mode (layers one at a time).
    pool = prepare_staging(identity_weights(0, [0] * NUM_LOCAL), budget_bytes=2 * EXPERT_BYTES, timeout_s=TIMEOUT_S)
    for verify in (False, True):
        maps = _rebalance(gen, p, 4)
        weights = weights_of(maps, 20)
        scheds = [LayerMoveSchedule(old, new, ep_size=world, max_staged_experts=2, pipeline=False) for old, new in maps]
        move_layers([(w, old, new) for w, (old, new) in zip(weights, maps)], budget_bytes=2 * EXPERT_BYTES,
                    staging=pool, schedules=scheds, verify=verify, timeout_s=TIMEOUT_S)
        for i, ((_, new), w) in enumerate(zip(maps, weights)):
            assert _same(w, identity_weights(20 + i, new[mine].tolist())), (verify, i)

    # Case 3: the next layer's transfer is posted before the previous layer commits (double
    # buffering) when two layers' rounds fit the pool side by side: 4 layers, each swapping
    # one expert between ranks 0 and 1, budget 2 experts.
    old = torch.arange(p)
    new = old.clone()
    new[0], new[NUM_LOCAL] = old[NUM_LOCAL], old[0]
    weights = [identity_weights(30 + i, old[mine].tolist()) for i in range(4)]
    transfer._TRACE = []
    try:
        move_layers([(w, old, new) for w in weights], budget_bytes=2 * EXPERT_BYTES, timeout_s=TIMEOUT_S)
        labels = [label for label, _, _ in transfer._TRACE]
    finally:
        transfer._TRACE = None
    for u in range(3):
        assert labels.index(f"posted{u + 1}") < labels.index(f"committed{u}"), labels
    assert all(_same(w, identity_weights(30 + i, new[mine].tolist())) for i, w in enumerate(weights))

    # Case 4: a failure on one rank at layer i (either hook point; layers of one round each)
    # leaves layers before i moved and layer i onward on their old maps and weights, on every
    # rank; every rank raises naming layer i with every layer's live map; a retry completes.
    for bad_index, point, bad_rank in [(0, "after_staging", world - 1), (2, "before_transfer", 0),
                                       (3, "after_staging", 0), (1, "before_transfer", world - 1)]:
        maps = _rebalance(gen, p, 4)
        weights = weights_of(maps, 40)
        live = [old.clone() for old, _ in maps]

        def hook(where, r, layer, point=point, bad_rank=bad_rank, bad_index=bad_index):
            if where == point and r == bad_rank and layer == 40 + bad_index:
                raise Boom(f"injected at {where}")

        with pytest.raises(LayerMoveError) as info:
            move_layers([(w, old, new) for w, (old, new) in zip(weights, maps)], layer_ids=[40, 41, 42, 43],
                        budget_bytes=10**9, live_maps=live, fault_hook=hook, timeout_s=TIMEOUT_S)
        err = info.value
        assert (err.layer, err.index) == (40 + bad_index, bad_index)
        assert ("Boom" in str(err)) == (rank == bad_rank)
        for i, ((old, new), w) in enumerate(zip(maps, weights)):
            want = new if i < bad_index else old
            assert torch.equal(err.live_physical_to_logical_maps[i], want) and torch.equal(live[i], want)
            assert _same(w, identity_weights(40 + i, want[mine].tolist())), (bad_index, point, i)
        assert torch.equal(err.live_physical_to_logical_map, maps[bad_index][0])
        move_layers([(w, lv, new) for w, lv, (_, new) in zip(weights, live, maps)], layer_ids=[40, 41, 42, 43],
                    budget_bytes=10**9, timeout_s=TIMEOUT_S)
        assert all(_same(w, identity_weights(40 + i, new[mine].tolist())) for i, (w, (_, new)) in
                   enumerate(zip(weights, maps)))

    # Case 5: a layer moved in rounds (budget 1 expert) that fails in its second round stays on
    # its first round's (valid) map; the layer before it moved, the one after kept its map.
    # Then the same in verify mode (one move_experts per layer).
    for verify in (False, True):
        roll = torch.roll(torch.arange(p), NUM_LOCAL // 2)  # every slot changes, experts shift rank
        maps = [(torch.arange(p), roll.clone()) for _ in range(3)]
        weights = weights_of(maps, 50)
        calls = []

        def second_round(where, r, layer, calls=calls):
            calls.append((where, layer))
            if where == "after_staging" and layer == 51 and calls.count(("after_staging", 51)) == 2 and r == 0:
                raise Boom("round 2")

        with pytest.raises(LayerMoveError) as info:
            move_layers([(w, old, new) for w, (old, new) in zip(weights, maps)], layer_ids=[50, 51, 52],
                        budget_bytes=EXPERT_BYTES, fault_hook=second_round, verify=verify, timeout_s=TIMEOUT_S)
        live = info.value.live_physical_to_logical_maps
        first = LayerMoveSchedule(maps[1][0], roll, ep_size=world, max_staged_experts=1, pipeline=False).maps[0]
        assert info.value.layer == 51 and torch.equal(live[1], first) and torch.equal(live[0], roll)
        assert torch.equal(live[2], maps[2][0])
        assert sorted(set(first.tolist())) == list(range(p))
        for i, w in enumerate(weights):
            assert _same(w, identity_weights(50 + i, live[i][mine].tolist())), (verify, i)


def _spawn(world: int) -> None:
    mp.spawn(gloo_worker, args=(world, free_port(), _cases, TIMEOUT_S), nprocs=world, join=True)


def test_layers_land_exactly_and_a_failed_layer_keeps_later_layers_old_on_2_ranks():
    """Random maps with duplicates over several layers and budgets, zero-byte layers, double
    buffering across layers, and failures injected at layer i on one rank, 2 ranks."""
    _spawn(2)


def test_layers_land_exactly_and_a_failed_layer_keeps_later_layers_old_on_3_ranks():
    """The same cases over 3 gloo ranks (odd sizes, rank-major slots)."""
    _spawn(3)


def test_layers_land_exactly_and_a_failed_layer_keeps_later_layers_old_on_4_ranks():
    """The same cases over 4 gloo ranks (more senders per expert)."""
    _spawn(4)


def test_single_process_moves_layers_locally_without_a_group():
    """Without torch.distributed, every layer's move is local copies (including swaps)."""
    maps = [(torch.tensor([0, 1, 2, 2]), torch.tensor([1, 0, 1, 2])), (torch.tensor([3, 1, 2, 0]),) * 2]
    weights = [identity_weights(i, old.tolist()) for i, (old, _) in enumerate(maps)]
    results = move_layers([(w, old, new) for w, (old, new) in zip(weights, maps)])
    assert all(_same(w, identity_weights(i, new.tolist())) for i, (w, (_, new)) in enumerate(zip(weights, maps)))
    assert [(r.local_copies, r.bytes_sent, r.slots_changed) for r in results] == [(3, 0, 3), (0, 0, 0)]


def test_a_precomputed_schedule_must_match_the_move():
    """A schedule made for other maps, another budget or other rounds is a ConfigError that
    names the mismatch; a matching one moves the layer exactly."""
    old, new = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 0, 1, 2])
    w = identity_weights(0, old.tolist())
    sched = LayerMoveSchedule(old, new, ep_size=1, max_staged_experts=4, pipeline=False)
    with pytest.raises(ConfigError, match="max_staged_experts"):
        move_experts(w, old, new, budget_bytes=2 * EXPERT_BYTES, schedule=sched)
    with pytest.raises(ConfigError, match="new_physical_to_logical_map"):
        move_experts(w, old, torch.tensor([0, 0, 1, 2]), schedule=sched)
    with pytest.raises(ConfigError, match="pipeline"):
        move_experts(w, old, new, pipeline=True, schedule=sched)
    with pytest.raises(ConfigError, match="ep_size"):
        move_layers([(w, old, new)], schedules=[LayerMoveSchedule(old, new, ep_size=2, max_staged_experts=4)])
    with pytest.raises(ConfigError, match="schedules has 2 entries for 1 layers"):
        move_layers([(w, old, new)], schedules=[sched, sched])
    assert _same(w, identity_weights(0, old.tolist()))  # nothing moved before the errors
    res = move_experts(w, old, new, schedule=sched)
    assert _same(w, identity_weights(0, new.tolist())) and res.slots_changed == 3
