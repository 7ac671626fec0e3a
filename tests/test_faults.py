"""Fault injection on real gloo ranks: a bad plan, a hung or gone rank, a rebalance past its
timeout. Every case ends with the old placement serving (weights verified) or, for a rank
that is really gone, with the survivors stopping with one line naming it."""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_manager import NUM_EXPERTS, Host, _args, mover_failing_at_layer_1, weights_match

from eplb_plugin.executor import move_layers
from eplb_plugin.manager.planning import default_planner

from conftest import free_port, run_gloo_cases

FAULT_TIMEOUT_S = 2.0  # the rebalance timeout the hung-rank cases set: detection in seconds


def _invalid(kind: str):
    """A planner whose plan is invalid in one way (rank 0 plans; the others never call it)."""

    def planner(counts, **kwargs):
        good = default_planner(counts, **kwargs)
        phy2log = good.physical_to_logical_map.clone()
        if kind == "missing_replica":
            phy2log[1] = 0  # layer 1: every slot holds expert 0, experts 1-7 have no replica
        elif kind == "wrong_shape":
            phy2log = phy2log[:, :-2]
        elif kind == "out_of_range":
            phy2log[0, 0] = NUM_EXPERTS
        elif kind == "fractional":
            phy2log = phy2log.to(torch.float32) + 0.5
        return dataclasses.replace(good, physical_to_logical_map=phy2log, replica_weights=None)

    return planner


def case_an_invalid_plan_fails_only_that_rebalance(rank, group):
    """A plan with an expert without a replica, a wrong shape, an id out of range or
    fractional ids: RebalanceError on every rank at the same pass, the placement and the
    weights unchanged, and the next rebalance (a valid plan) completes."""
    for kind, words in (("missing_replica", "no replica"), ("wrong_shape", "expected shape"),
                        ("out_of_range", "outside [0, 8)"), ("fractional", "non-integer")):
        host = Host(rank, group, _args(eplb_rebalance_num_iterations=10_000), planner=_invalid(kind))
        before = host.manager.location.physical_to_logical_map.clone()
        host.serve(10)
        host.manager.rebalance_now()
        errors = host.serve(5000, start=10, until=lambda m: m.history and m.history[0].end_pass is not None)
        assert len(errors) == 1, (kind, errors)
        passes = [None, None]
        dist.all_gather_object(passes, errors[0][0])
        assert passes[0] == passes[1]
        if rank == 0 or kind in ("missing_replica", "out_of_range"):  # rank 0 checks before broadcasting
            assert words in errors[0][1], (kind, errors[0][1])
        assert "keeping the old placement" in errors[0][1]
        assert torch.equal(host.manager.location.physical_to_logical_map, before)
        assert weights_match(host.weights, host.manager.location, rank)
        host.manager.planner = default_planner
        host.manager.rebalance_now()
        assert host.serve(5000, start=6000, until=lambda m: len(m.history) > 1 and m.history[-1].end_pass is not None) == []
        assert host.manager.history[-1].error is None and host.manager.history[-1].slots_moved > 0, host.manager.history
        assert weights_match(host.weights, host.manager.location, rank)


def case_a_rebalance_failing_part_way_records_what_moved(rank, group):
    """A move that fails at layer 1 after layer 0 went live records layer 0's slots and this
    rank's bytes (before: 0 and 0), pipelined or verified layer by layer."""
    for verify in (False, True):
        host = Host(rank, group, _args(eplb_verify_weights=verify), layers_mover=mover_failing_at_layer_1)
        before = host.manager.location.physical_to_logical_map.clone()
        errors = host.serve(5000, until=lambda m: m.history and m.history[0].end_pass is not None)
        assert len(errors) == 1 and "layer 1" in errors[0][1]
        record, live = host.manager.history[0], host.manager.location.physical_to_logical_map
        changed = int((live != before).sum())
        assert changed > 0 and torch.equal(live[1:], before[1:])  # layer 0 moved, the rest did not
        assert record.slots_moved == changed, (verify, record)
        moved = [None, None]
        dist.all_gather_object(moved, record.bytes_moved)
        assert sum(moved) > 0 and sum(moved) % 2 == 0  # every byte sent is a byte received
        assert weights_match(host.weights, host.manager.location, rank)


def case_the_rebalance_history_is_bounded_and_its_totals_stay_exact(rank, group):
    """With history_limit 2, many rebalances keep at most 4 records (the newest, indices
    continuing), and the totals count every rebalance."""
    host = Host(rank, group, _args(eplb_rebalance_num_iterations=3), history_limit=2)
    assert host.serve(5000, until=lambda m: m.history_dropped + len(m.history) >= 12 and not m.busy) == []
    m = host.manager
    assert m.history_dropped > 0 and len(m.history) <= 4
    assert [r.index for r in m.history] == list(range(m.history_dropped, m.history_dropped + len(m.history)))
    started = m.history_dropped + len(m.history)
    assert m.totals.done + m.totals.skipped + m.totals.failed == started and m.totals.failed == 0
    assert m.totals.slots_moved >= sum(r.slots_moved for r in m.history) and m.totals.slots_moved > 0
    assert weights_match(host.weights, m.location, rank)


CASES = [v for k, v in dict(globals()).items() if k.startswith("case_")]


def _hung_rank_worker(rank: int, port: int, verify: bool, results) -> None:
    """Rank 1 stops answering inside a move (it sleeps past the rebalance timeout); rank 0
    must fail the rebalance within about the timeout, keep the old placement and its weights."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        def hanging_mover(*args, **kwargs):
            def hook(point, r, layer):
                if point == "after_staging" and r == 1 and layer == 1:
                    time.sleep(3 * FAULT_TIMEOUT_S)  # stopped answering (a hang, a SIGSTOP)

            return move_layers(*args, fault_hook=hook, **kwargs)

        args = _args(eplb_rebalance_num_iterations=10_000, eplb_verify_weights=verify,
                     eplb_rebalance_timeout_s=FAULT_TIMEOUT_S)
        host = Host(rank, dist.group.WORLD, args, layers_mover=hanging_mover)
        before = host.manager.location.physical_to_logical_map.clone()
        host.serve(10)
        host.manager.rebalance_now()
        start = time.monotonic()
        errors = host.serve(5000, start=10, until=lambda m: m.history and m.history[0].end_pass is not None)
        results[(rank, "seconds")] = time.monotonic() - start
        results[(rank, "errors")] = [e for _, e in errors]
        loc = host.manager.location
        results[(rank, "layers_1_2_old")] = torch.equal(loc.physical_to_logical_map[1:], before[1:])
        results[(rank, "weights_match")] = weights_match(host.weights, loc, rank)
        results[(rank, "record_error")] = host.manager.history[0].error
    except Exception:
        results[(rank, "crash")] = traceback.format_exc()
    # No barrier and no destroy: the timed-out wait closed the gloo pair (as a gone peer does).
    os._exit(0)


@pytest.mark.parametrize("verify", [False, True])
def test_a_rank_that_stops_answering_mid_move_fails_the_rebalance_within_the_timeout(verify):
    """--eplb-rebalance-timeout-s bounds a rebalance's waits: with rank 1 hung mid-move, rank
    0 raises RebalanceError (a TransferError naming the wait, not gloo's raw RuntimeError)
    within seconds, its failed layer and later layers stay on the old map, and every slot
    holds the weights its live map says."""
    shared = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_hung_rank_worker, args=(free_port(), verify, shared), nprocs=2,
                       start_method="spawn", join=True)
    got = dict(shared)
    assert (0, "crash") not in got, got.get((0, "crash"))
    assert len(got[(0, "errors")]) == 1, got
    assert "layer 1" in got[(0, "errors")][0] and "no answer within 2 s" in got[(0, "errors")][0]
    assert got[(0, "seconds")] < 10 * FAULT_TIMEOUT_S  # bounded by the timeout, not the group's 60 s
    assert got[(0, "layers_1_2_old")] and got[(0, "weights_match")]
    assert got[(0, "record_error")] == got[(0, "errors")][0]
    # Rank 1 wakes to a closed connection: it fails the same rebalance, its weights intact.
    assert (1, "crash") not in got, got.get((1, "crash"))
    assert len(got[(1, "errors")]) == 1 and got[(1, "layers_1_2_old")] and got[(1, "weights_match")]


@pytest.fixture(scope="module")
def results():
    return run_gloo_cases(CASES)


@pytest.mark.parametrize("case", [c.__name__ for c in CASES])
def test_fault_case_on_two_gloo_ranks(results, case):
    for rank in range(2):
        assert results.get((rank, case)) == "ok", results.get((rank, case), "case did not run")
