"""Tests of eplb_plugin.executor.plan: pure transfer planning, no process group."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_executor_transfer import random_map

from eplb_plugin.errors import PlacementError
from eplb_plugin.executor.plan import (
    LocalCopy,
    Recv,
    Send,
    plan_layer_transfer,
    plan_transfers,
)
from eplb_plugin.executor.rounds import LayerMoveSchedule, plan_layer_rounds, schedule_layer_move


def _t(xs):
    return torch.tensor(xs, dtype=torch.int64)


def _simulate(old, new, plan):
    """Apply a plan to 'weights' that are just the logical ids; return the resulting map."""
    s = plan.num_local_slots
    before = list(old)
    after = list(old)
    for rp in plan.ranks:
        for c in rp.local_copies:
            assert before[rp.rank * s + c.src_local_slot] == c.logical_expert
            after[rp.rank * s + c.dst_local_slot] = before[rp.rank * s + c.src_local_slot]
        for v in rp.recvs:
            # The matching send on the peer must exist and read the right expert.
            match = [x for x in plan.ranks[v.peer].sends if x.peer == rp.rank and x.logical_expert == v.logical_expert]
            assert len(match) == 1
            assert before[v.peer * s + match[0].src_local_slot] == v.logical_expert
            for d in v.dst_local_slots:
                after[rp.rank * s + d] = before[v.peer * s + match[0].src_local_slot]
    return after


def test_unchanged_map_moves_nothing():
    """A plan whose maps are equal has no copies, sends or receives."""
    m = _t([0, 1, 2, 3, 0, 1])
    plan = plan_layer_transfer(m, m.clone(), ep_size=2)
    assert plan.is_empty and plan.num_experts_sent == 0
    assert all(not r.local_copies and not r.sends and not r.recvs for r in plan.ranks)
    assert plan_layer_rounds(m, m.clone(), ep_size=2) == []


def test_duplicates_on_one_rank_receive_once_and_fan_out():
    """Two new replicas of one remote expert on a rank are one receive with two slots."""
    old = _t([0, 1, 2, 3, 4, 5])
    new = _t([0, 4, 4, 3, 4, 5])  # rank 0 (slots 0-2) needs expert 4 twice
    plan = plan_layer_transfer(old, new, ep_size=2)
    assert plan.ranks[0].recvs == (Recv(peer=1, logical_expert=4, dst_local_slots=(1, 2)),)
    assert plan.ranks[1].sends == (Send(peer=0, logical_expert=4, src_local_slot=1),)
    assert _simulate(old.tolist(), new.tolist(), plan) == new.tolist()


def test_expert_already_on_rank_is_copied_locally_from_a_stable_slot():
    """A new replica of an expert the rank holds is a local copy, from an unchanged slot."""
    old = _t([7, 1, 7, 3])
    new = _t([7, 7, 2, 3])  # expert 2 is nowhere in the old map
    with pytest.raises(PlacementError, match="no slot of the old map"):
        plan_layer_transfer(old, new, ep_size=1)
    new = _t([7, 7, 7, 3])
    plan = plan_layer_transfer(old, new, ep_size=1)
    assert plan.ranks[0].local_copies == (LocalCopy(0, 1, 7),)
    assert plan.ranks[0].staged_copy_sources == ()
    # Slot 0 (a holder of 7) is overwritten: the copy must come from slot 2, which stays, so
    # nothing needs staging (copying from slot 0 would have to stage it first).
    plan = plan_layer_transfer(old, _t([3, 7, 7, 3]), ep_size=1)
    assert plan.ranks[0].local_copies == (LocalCopy(3, 0, 3), LocalCopy(2, 1, 7))
    assert plan.ranks[0].staged_copy_sources == ()


def test_local_swap_stages_its_sources():
    """A swap on one rank reads slots it overwrites, so both sources are staged."""
    old, new = _t([0, 1]), _t([1, 0])
    plan = plan_layer_transfer(old, new, ep_size=1)
    assert plan.ranks[0].staged_copy_sources == (0, 1)
    assert plan.ranks[0].num_staged_experts == 2


def test_sender_prefers_same_node_and_spreads_over_holders():
    """Senders are picked on the receiver's node first, then least-loaded among holders."""
    # 4 ranks, 2 per node, 2 slots each. Expert 9 on ranks 1 and 2; ranks 0 and 3 need it.
    old = _t([0, 1, 9, 2, 9, 3, 4, 5])
    new = _t([9, 1, 9, 2, 9, 3, 9, 5])
    plan = plan_layer_transfer(old, new, ep_size=4, gpus_per_node=2)
    assert plan.ranks[0].recvs[0].peer == 1  # same node as rank 0
    assert plan.ranks[3].recvs[0].peer == 2  # same node as rank 3
    # One node: both holders still share the two sends.
    plan1 = plan_layer_transfer(old, new, ep_size=4)
    assert sorted(len(r.sends) for r in plan1.ranks) == [0, 0, 1, 1]


def test_random_maps_plan_reproduces_new_map_and_pairs_match():
    """On random maps with duplicates the simulated plan lands the new map; ops pair in order."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        ep = [1, 2, 3, 4][trial % 4]
        num_local = 1 + trial % 5
        p = ep * num_local
        e = max(1, p - trial % 3)
        old, new = random_map(g, p, e), random_map(g, p, e)
        plan = plan_layer_transfer(old, new, ep_size=ep, gpus_per_node=2)
        assert _simulate(old.tolist(), new.tolist(), plan) == new.tolist()
        assert plan.num_slots_changed == int((old != new).sum())
        for a in range(ep):
            for b in range(ep):
                s = [(x.logical_expert) for x in plan.ranks[a].sends if x.peer == b]
                r = [(x.logical_expert) for x in plan.ranks[b].recvs if x.peer == a]
                assert s == r
        assert plan_transfers(old[None], new[None], ep_size=ep)[0] == plan_layer_transfer(old, new, ep_size=ep)


def test_rounds_respect_budget_and_keep_every_expert():
    """Each round stages at most the budget per rank and every intermediate map keeps all experts."""
    g = torch.Generator().manual_seed(1)
    for trial in range(100):
        ep, num_local = 2 + trial % 3, 3 + trial % 4
        p = ep * num_local
        e = p - trial % 4
        old, new = random_map(g, p, e), random_map(g, p, e)
        budget = 1 + trial % 3
        maps = plan_layer_rounds(old, new, ep_size=ep, max_staged_experts=budget)
        assert torch.equal(maps[-1], new)
        prev = old
        over_budget_rounds = 0
        for m in maps:
            assert set(m.tolist()) >= set(new.tolist())
            plan = plan_layer_transfer(prev, m, ep_size=ep)
            # Over budget only when a cycle of single replicas must move at once (alone).
            staged = max(r.num_staged_experts for r in plan.ranks)
            over_budget_rounds += staged > budget
            prev = m
        assert over_budget_rounds <= len(maps) // 2 + 1
        assert len(plan_layer_rounds(old, new, ep_size=ep)) == 1


def test_round_budget_binds_when_no_cycle():
    """Four changed slots on one rank with budget 2 take two rounds of two experts."""
    old = _t([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    new = _t([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3])  # rank 1 swaps 4 slots for replicas
    maps = plan_layer_rounds(old, new, ep_size=2, max_staged_experts=2)
    assert len(maps) == 2
    for prev, m in zip([old] + maps[:-1], maps):
        assert plan_layer_transfer(prev, m, ep_size=2).ranks[1].num_staged_experts <= 2


def test_bad_maps_raise_placement_error():
    """Wrong shapes, float maps and an indivisible ep_size name the problem."""
    with pytest.raises(PlacementError, match="differ in shape"):
        plan_layer_transfer(_t([0, 1]), _t([0, 1, 1]), ep_size=1)
    with pytest.raises(PlacementError, match="1-D integer"):
        plan_layer_transfer(torch.zeros(4), torch.zeros(4), ep_size=1)
    with pytest.raises(PlacementError, match="divide"):
        plan_layer_transfer(_t([0, 1, 2]), _t([0, 1, 2]), ep_size=2)


def _run_pipelined(old, sched):
    """Simulate the executor's order (round k+1 staged before round k commits when
    prefetched) on 'weights' that are the logical ids; return the map after each commit."""
    s = sched.plans[0].num_local_slots
    state = list(old)
    staged = {}

    def stage(k):
        vals = {}
        for rp in sched.plans[k].ranks:
            for v in rp.recvs:
                send = next(x for x in sched.plans[k].ranks[v.peer].sends
                            if x.peer == rp.rank and x.logical_expert == v.logical_expert)
                vals[(rp.rank, "recv", v.logical_expert)] = state[v.peer * s + send.src_local_slot]
            for src in rp.staged_copy_sources:
                vals[(rp.rank, "copy", src)] = state[rp.rank * s + src]
        staged[k] = vals

    def commit(k):
        vals, before = staged.pop(k), list(state)
        for rp in sched.plans[k].ranks:
            for v in rp.recvs:
                for d in v.dst_local_slots:
                    state[rp.rank * s + d] = vals[(rp.rank, "recv", v.logical_expert)]
            for c in rp.local_copies:
                key = (rp.rank, "copy", c.src_local_slot)
                state[rp.rank * s + c.dst_local_slot] = vals.get(key, before[rp.rank * s + c.src_local_slot])

    out = []
    stage(0)
    for k in range(len(sched.plans)):
        if k + 1 < len(sched.plans) and sched.prefetch[k + 1]:
            stage(k + 1)
        commit(k)
        out.append(list(state))
        if k + 1 < len(sched.plans) and not sched.prefetch[k + 1]:
            stage(k + 1)
    return out


def test_pipelined_schedule_lands_every_round_and_stays_within_budget():
    """Staging round k+1 before round k commits (where the schedule allows) still lands every
    round's map exactly; prefetch only when no slot conflicts and both rounds fit the budget."""
    g = torch.Generator().manual_seed(3)
    prefetched = 0
    for trial in range(120):
        ep, num_local = 2 + trial % 3, 3 + trial % 4
        p = ep * num_local
        e = p - trial % 4
        old, new = random_map(g, p, e), random_map(g, p, e)
        budget = 1 + trial % 5
        sched = schedule_layer_move(old, new, ep_size=ep, max_staged_experts=budget)
        assert torch.equal(sched.maps[-1], new)
        assert _run_pipelined(old.tolist(), sched) == [m.tolist() for m in sched.maps]
        assert not sched.prefetch[0]
        for k in range(1, len(sched.plans)):
            prefetched += sched.prefetch[k]
            for prev, cur in zip(sched.plans[k - 1].ranks, sched.plans[k].ranks):
                if sched.prefetch[k]:
                    assert not cur.staging_reads & set(prev.changed_local_slots)
                    assert prev.num_staged_experts + cur.num_staged_experts <= budget
        for r in range(ep):
            per_round = [pl.ranks[r].num_staged_experts for pl in sched.plans]
            # Over budget only for a forced cycle: a round rewriting more distinct experts.
            forced = any(len({int(b[q]) for q in range(r * num_local, (r + 1) * num_local) if a[q] != b[q]}) > budget
                         for a, b in zip([old] + list(sched.maps[:-1]), sched.maps))
            assert sched.pool_rows[r] >= max(per_round) and (forced or sched.pool_rows[r] <= budget)
        half = budget // 2 if budget >= 2 else 1
        if max(r.num_staged_experts for r in plan_layer_transfer(old, new, ep_size=ep).ranks) <= half:
            assert len(sched.maps) == 1  # a layer that fits one round stays one atomic round
    assert prefetched > 20


def test_swap_schedule_double_buffers_half_the_budget():
    """8 experts swapped between 2 ranks with a 4-expert budget: 4 rounds of 2, each staged
    while the previous commits, 4 staging rows per rank; a 16-expert budget is one round,
    and so is an 8-expert budget without pipelining."""
    old = torch.arange(20)
    new = old.clone()
    new[:8], new[10:18] = old[10:18], old[:8]
    sched = schedule_layer_move(old, new, ep_size=2, max_staged_experts=4)
    assert len(sched.maps) == 4 and sched.prefetch == (False, True, True, True) and sched.pool_rows == (4, 4)
    assert len(schedule_layer_move(old, new, ep_size=2, max_staged_experts=8).maps) == 2
    one = schedule_layer_move(old, new, ep_size=2, max_staged_experts=16)
    assert len(one.maps) == 1 and one.pool_rows == (8, 8)
    serial = schedule_layer_move(old, new, ep_size=2, max_staged_experts=8, pipeline=False)
    assert len(serial.maps) == 1 and serial.pool_rows == (8, 8)
    serial = schedule_layer_move(old, new, ep_size=2, max_staged_experts=4, pipeline=False)
    assert len(serial.maps) == 2 and serial.prefetch == (False, False)


def test_optimized_planners_match_the_straightforward_reference():
    """On random maps with duplicates (1-8 ranks, up to 96 slots, budgets 1-6 and none, both
    kinds of rounds), plans, rounds, maps, prefetch verdicts and pool rows are identical to
    the reference planners'."""
    from executor_plan_reference import (
        ReferenceLayerMoveSchedule,
        reference_plan_layer_rounds,
        reference_plan_layer_transfer,
    )

    def draw(n: int) -> int:
        return int(torch.randint(n, (1,), generator=g))

    g = torch.Generator().manual_seed(11)
    # Every combination of rank count, node size, budget and kind of change occurs; the
    # rest is drawn independently per trial.
    for ep, per_node, cap, few in itertools.product([1, 2, 3, 4, 8], [None, 1, 2], [None, 1, 2, 3, 4, 5, 6],
                                                    [False, True]):
        num_local = 1 + draw(12)
        p = ep * num_local
        e = max(1, p - draw(5))
        old, new = random_map(g, p, e), random_map(g, p, e)
        if few:  # a few changed slots only, as in a typical rebalance
            new = old.clone()
            idx = torch.randperm(p, generator=g)[: 1 + draw(8)]
            new[idx] = old[torch.randperm(p, generator=g)[: len(idx)]]
        assert plan_layer_transfer(old, new, ep_size=ep, gpus_per_node=per_node) == reference_plan_layer_transfer(
            old, new, ep_size=ep, gpus_per_node=per_node)
        got = plan_layer_rounds(old, new, ep_size=ep, max_staged_experts=cap)
        want = reference_plan_layer_rounds(old, new, ep_size=ep, max_staged_experts=cap)
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
        for pipeline in (True, False):
            fast = LayerMoveSchedule(old, new, ep_size=ep, max_staged_experts=cap, gpus_per_node=per_node,
                                     pipeline=pipeline)
            ref = ReferenceLayerMoveSchedule(old, new, ep_size=ep, max_staged_experts=cap, gpus_per_node=per_node,
                                             pipeline=pipeline)
            assert len(fast) == len(ref) and fast.pool_rows == ref.pool_rows
            assert all(torch.equal(a, b) for a, b in zip(fast.maps, ref.maps))
            assert [fast.plan(k) for k in range(len(fast))] == [ref.plan(k) for k in range(len(ref))]
            assert [fast.prefetch(k) for k in range(len(fast))] == [ref.prefetch(k) for k in range(len(ref))]
