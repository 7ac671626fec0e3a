"""Tests of eplb_plugin.executor.transfer over gloo ranks (one spawn per world size).

Weights encode (layer, logical expert, tensor, position), so every slot is checked exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from eplb_plugin.errors import ConfigError, TransferError
from eplb_plugin.executor import LayerMoveError, fingerprint, move_experts
from eplb_plugin.executor.integrity import verify_slots
from eplb_plugin.executor.rounds import schedule_layer_move
from eplb_plugin.executor.staging import pair_runs
from eplb_plugin.executor.transfer import prepare_staging

from conftest import free_port, gloo_worker

# (trailing shape, dtype) of each per-slot tensor: like w13, w2, a bf16 bias, fp8/int8 scales.
SPECS = [((3, 5), torch.float32), ((4,), torch.bfloat16), ((2, 3), torch.int8), ((), torch.float32),
         ((2,), torch.float8_e4m3fn)]
NUM_LOCAL = 4
TIMEOUT_S = 30.0
EXPERT_BYTES = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in SPECS)  # one slot


def identity_slot(layer: int, logical: int, ti: int) -> torch.Tensor:
    """One slot of tensor ti for a logical expert: value = f(logical, layer, ti, position)."""
    shape, dtype = SPECS[ti]
    n = max(1, torch.Size(shape).numel())
    pos = torch.arange(n, dtype=torch.float64)
    if dtype == torch.float32:
        vals = (logical * 1000 + layer * 100 + ti * 10) * 64 + pos
    elif dtype == torch.int8:
        vals = (logical * 7 + layer * 3 + pos) % 127
    else:  # bf16 / fp8: small integers are exact
        vals = (logical * 4 + layer + pos) % 16
    return vals.to(dtype).reshape(shape)


def identity_weights(layer: int, local_map: list[int]) -> list[torch.Tensor]:
    """[len(local_map), *shape] per spec, each slot holding its logical expert's encoding."""
    return [torch.stack([identity_slot(layer, e, ti) for e in local_map]) for ti in range(len(SPECS))]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Same bytes (either side may be on a GPU)."""
    return all(torch.equal(x.view(torch.uint8).cpu(), y.view(torch.uint8).cpu()) for x, y in zip(a, b))


def random_map(gen: torch.Generator, num_slots: int, num_logical: int) -> torch.Tensor:
    """[P] with every logical expert at least once and duplicates (often on one rank)."""
    extra = torch.randint(0, num_logical, (num_slots - num_logical,), generator=gen)
    return torch.cat([torch.arange(num_logical), extra])[torch.randperm(num_slots, generator=gen)]



class Boom(RuntimeError):
    pass


def _cases(rank: int, world: int) -> None:
    p = NUM_LOCAL * world
    mine = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
    gen = torch.Generator().manual_seed(1234)  # same on every rank: same maps everywhere

    # Case 1: random maps, several budgets (1 expert -> rounds, default, whole layer), verify on.
    for layer, budget in enumerate([EXPERT_BYTES, None, 10**9, EXPERT_BYTES * 2, None, EXPERT_BYTES]):
        num_logical = p - 1 - layer % 3
        old, new = random_map(gen, p, num_logical), random_map(gen, p, num_logical)
        w = identity_weights(layer, old[mine].tolist())
        ptrs = [t.data_ptr() for t in w]
        live = old.clone()
        res = move_experts(w, old, new, None, layer=layer, budget_bytes=budget, live_map=live,
                           verify=True, timeout_s=TIMEOUT_S)
        assert _same(w, identity_weights(layer, new[mine].tolist())), (layer, old, new)
        assert [t.data_ptr() for t in w] == ptrs  # in place: CUDA graphs stay valid
        assert torch.equal(live, new)
        assert res.slots_changed == int((old[mine] != new[mine]).sum())
        assert res.bytes_received == res.experts_received * EXPERT_BYTES
        # Staging is exactly the pool the schedule asks for: the budget, except a forced cycle.
        cap = (budget or 4 * EXPERT_BYTES) // EXPERT_BYTES
        sched = schedule_layer_move(old, new, ep_size=world, max_staged_experts=cap, pipeline=False)
        assert res.rounds == len(sched.maps) and res.peak_staging_bytes == sched.pool_rows[rank] * EXPERT_BYTES
        expected = {e: int(fingerprint(identity_weights(layer, [e]))[0]) for e in range(num_logical)}
        verify_slots(w, new[mine], expected, rank=rank, layer=layer)

    # Case 1b: pipelined rounds (no verify): half the budget per round, next round staged
    # while the previous commits; weights land exactly and staging stays within the budget.
    for layer, budget_experts in enumerate([2, 3, 4, 5, 100], start=20):
        num_logical = p - 1 - layer % 3
        old, new = random_map(gen, p, num_logical), random_map(gen, p, num_logical)
        w = identity_weights(layer, old[mine].tolist())
        live = old.clone()
        res = move_experts(w, old, new, None, layer=layer, budget_bytes=budget_experts * EXPERT_BYTES,
                           live_map=live, timeout_s=TIMEOUT_S, pipeline=True)
        assert _same(w, identity_weights(layer, new[mine].tolist())), (layer, old, new)
        assert torch.equal(live, new)
        sched = schedule_layer_move(old, new, ep_size=world, max_staged_experts=budget_experts)
        assert res.rounds == len(sched.maps) and res.peak_staging_bytes == sched.pool_rows[rank] * EXPERT_BYTES
        forced = any(r.num_staged_experts > budget_experts for pl in sched.plans for r in pl.ranks)
        assert forced or res.peak_staging_bytes <= budget_experts * EXPERT_BYTES

    # Case 1c: consecutive slots travel as one message per tensor (and commit as one copy):
    # ranks 0 and 1 swap 3 experts, plus a duplicate fanned out to two slots on rank 0.
    old = torch.arange(p)
    new = old.clone()
    new[:3], new[NUM_LOCAL : NUM_LOCAL + 3] = old[NUM_LOCAL : NUM_LOCAL + 3], old[:3]
    new[3] = old[NUM_LOCAL]  # expert NUM_LOCAL lands twice on rank 0 (one receive, two slots)
    new[NUM_LOCAL + 3] = old[3]  # and rank 0's old slot 3 expert keeps a replica on rank 1
    sched = schedule_layer_move(old, new, ep_size=world, max_staged_experts=100)
    assert len(sched.maps) == 1
    assert pair_runs(sched.plans[0], 1, 0) == [(0, 0, 3)] and pair_runs(sched.plans[0], 0, 1) == [(0, 0, 4)]
    w = identity_weights(7, old[mine].tolist())
    res = move_experts(w, old, new, layer=7, budget_bytes=100 * EXPERT_BYTES, timeout_s=TIMEOUT_S)
    assert _same(w, identity_weights(7, new[mine].tolist())) and res.rounds == 1

    # Case 2: an unchanged map moves zero bytes and leaves weights untouched.
    same = random_map(gen, p, p - 2)
    w = identity_weights(9, same[mine].tolist())
    res = move_experts(w, same, same.clone(), layer=9, timeout_s=TIMEOUT_S)
    assert (res.slots_changed, res.bytes_sent, res.bytes_received, res.rounds) == (0, 0, 0, 0)
    assert _same(w, identity_weights(9, same[mine].tolist()))

    # Case 3: a failure on one rank at either point leaves every rank's weights and map as before.
    for point, bad_rank in [("after_staging", world - 1), ("before_transfer", 0)]:
        old, new = random_map(gen, p, p - 1), random_map(gen, p, p - 1)
        w = identity_weights(3, old[mine].tolist())
        live = old.clone()

        def hook(where, r, lay, point=point, bad_rank=bad_rank):
            if where == point and r == bad_rank:
                raise Boom(f"injected at {where}")

        with pytest.raises(LayerMoveError) as info:
            move_experts(w, old, new, layer=3, budget_bytes=10**9, live_map=live,
                         timeout_s=TIMEOUT_S, fault_hook=hook)
        assert info.value.layer == 3 and torch.equal(info.value.live_physical_to_logical_map, old)
        assert ("Boom" in str(info.value)) == (rank == bad_rank)
        assert _same(w, identity_weights(3, old[mine].tolist())) and torch.equal(live, old)

    # Case 4: with rounds, a failure in round 2 leaves the layer on round 1's (valid) map.
    old = torch.arange(p)
    new = torch.roll(torch.arange(p), NUM_LOCAL // 2)  # every slot changes, experts shift rank
    w = identity_weights(5, old[mine].tolist())
    live = old.clone()
    calls = []

    def second_round(where, r, lay):
        calls.append(where)
        if where == "after_staging" and calls.count(where) == 2 and r == 0:
            raise Boom("round 2")

    with pytest.raises(LayerMoveError) as info:
        move_experts(w, old, new, layer=5, budget_bytes=EXPERT_BYTES, live_map=live,
                     timeout_s=TIMEOUT_S, fault_hook=second_round)
    mid = info.value.live_physical_to_logical_map
    assert not torch.equal(mid, old) and not torch.equal(mid, new) and torch.equal(live, mid)
    assert sorted(set(mid.tolist())) == list(range(p))
    assert _same(w, identity_weights(5, mid[mine].tolist()))

    # Case 5: pipelined rounds (round 3 staged while round 2 is still undecided): a failure
    # in round 2 on one rank leaves every rank on round 1's map; the early round is drained.
    old = torch.arange(p)
    new = old.clone()
    new[:3], new[NUM_LOCAL : NUM_LOCAL + 3] = old[NUM_LOCAL : NUM_LOCAL + 3], old[:3]  # ranks 0, 1 swap 3
    sched = schedule_layer_move(old, new, ep_size=world, max_staged_experts=2)
    assert len(sched.maps) == 3 and sched.prefetch == (False, True, True)
    w = identity_weights(6, old[mine].tolist())
    live = old.clone()
    calls.clear()
    with pytest.raises(LayerMoveError) as info:
        move_experts(w, old, new, layer=6, budget_bytes=2 * EXPERT_BYTES, live_map=live,
                     timeout_s=TIMEOUT_S, fault_hook=second_round, pipeline=True)
    assert torch.equal(info.value.live_physical_to_logical_map, sched.maps[0]) and torch.equal(live, sched.maps[0])
    assert _same(w, identity_weights(6, sched.maps[0][mine].tolist()))
    # The group is still usable: the same move now completes.
    move_experts(w, sched.maps[0], new, layer=6, budget_bytes=2 * EXPERT_BYTES, timeout_s=TIMEOUT_S, pipeline=True)
    assert _same(w, identity_weights(6, new[mine].tolist()))

    # Case 6: a whole rebalance with one agreed pool (prepare_staging): layers move exactly,
    # single-round and deferred multi-round; a failure at either point on one rank leaves
    # that layer on its last committed map everywhere, and the pool serves the next layers.
    pool = prepare_staging(w, budget_bytes=2 * EXPERT_BYTES, timeout_s=TIMEOUT_S)
    assert pool.rows == 2
    for layer in range(3):
        old, new = random_map(gen, p, p - 1), random_map(gen, p, p - 1)
        w = identity_weights(20 + layer, old[mine].tolist())
        move_experts(w, old, new, layer=20 + layer, budget_bytes=2 * EXPERT_BYTES, timeout_s=TIMEOUT_S, staging=pool)
        assert _same(w, identity_weights(20 + layer, new[mine].tolist()))
    for point, bad_rank, budget in [("before_transfer", 0, 2), ("after_staging", world - 1, 1)]:
        old = torch.arange(p)
        new = torch.roll(torch.arange(p), NUM_LOCAL // 2)
        w = identity_weights(30, old[mine].tolist())
        live = old.clone()
        calls.clear()

        def hook6(where, r, lay, point=point, bad_rank=bad_rank):
            calls.append(where)
            if where == point and r == bad_rank and calls.count(where) == (1 if point == "before_transfer" else 2):
                raise Boom(f"injected at {where}")

        with pytest.raises(LayerMoveError) as info:
            move_experts(w, old, new, layer=30, budget_bytes=budget * EXPERT_BYTES, live_map=live,
                         timeout_s=TIMEOUT_S, fault_hook=hook6, staging=pool)
        mid = info.value.live_physical_to_logical_map
        assert torch.equal(live, mid) and _same(w, identity_weights(30, mid[mine].tolist()))
        assert torch.equal(mid, old) == (point == "before_transfer")
        move_experts(w, mid, new, layer=30, budget_bytes=budget * EXPERT_BYTES, timeout_s=TIMEOUT_S, staging=pool)
        assert _same(w, identity_weights(30, new[mine].tolist()))


def _spawn(world: int) -> None:
    mp.spawn(gloo_worker, args=(world, free_port(), _cases, TIMEOUT_S), nprocs=world, join=True)


def test_moves_land_exactly_and_failures_leave_old_weights_on_2_ranks():
    """Random maps with duplicates, budgets, zero-byte plans and injected failures, 2 ranks."""
    _spawn(2)


def test_moves_land_exactly_and_failures_leave_old_weights_on_3_ranks():
    """The same cases over 3 gloo ranks (odd sizes, rank-major slots)."""
    _spawn(3)


def test_single_process_moves_locally_without_a_group():
    """Without torch.distributed, a move is local copies only (including a swap)."""
    old, new = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 0, 1, 2])
    w = identity_weights(0, old.tolist())
    res = move_experts(w, old, new, verify=True)
    assert _same(w, identity_weights(0, new.tolist()))
    assert (res.local_copies, res.bytes_sent, res.slots_changed) == (3, 0, 3)


def test_bad_inputs_raise_typed_errors():
    """A budget below one expert or a mis-shaped tensor is a ConfigError naming the value."""
    old = torch.tensor([0, 1])
    w = identity_weights(0, old.tolist())
    with pytest.raises(ConfigError, match="budget_bytes=1"):
        move_experts(w, old, torch.tensor([1, 0]), budget_bytes=1)
    with pytest.raises(ConfigError, match="dim 0 = 2"):
        move_experts([torch.zeros(3, 2)], old, torch.tensor([1, 0]))
    assert issubclass(LayerMoveError, TransferError)


def test_commit_only_if_flag_is_decided_on_the_device():
    """A deferred commit (only_if) writes the slots iff the agreed flag is set, in place."""
    from eplb_plugin.executor.plan import RankTransferPlan, Recv
    from eplb_plugin.executor.staging import StagedRound, commit_round

    for flag in (True, False):
        w = [torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(3, 5, dtype=torch.uint8)]
        bufs = [torch.ones(1, 4, dtype=torch.bfloat16), torch.full((1, 5), 7, dtype=torch.uint8)]
        ptrs = [t.data_ptr() for t in w]
        plan = RankTransferPlan(rank=0, local_copies=(), sends=(), recvs=(Recv(1, 9, (1,)),))
        staged = StagedRound(plan=plan, new_map=torch.zeros(6, dtype=torch.int64), buffers=bufs, rows=[0])
        commit_round(w, staged, only_if=torch.tensor([flag]))
        assert [t.data_ptr() for t in w] == ptrs
        assert torch.equal(w[0][1], bufs[0][0] if flag else torch.zeros(4, dtype=torch.bfloat16))
        assert torch.equal(w[1][1], bufs[1][0] if flag else torch.zeros(5, dtype=torch.uint8))
        assert not w[0][0].any() and not w[0][2].any()
