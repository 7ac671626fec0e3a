"""Shared test helpers: where the real traces live, and a free TCP port for gloo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def traces_dir() -> Path:
    """``$EPLB_TRACES_DIR`` or ``../shared/traces`` beside the repository."""
    return Path(os.environ.get("EPLB_TRACES_DIR", REPO_ROOT.parent / "shared" / "traces"))


def trace_path(name: str) -> Path:
    """Path of a shared trace file; skips the test cleanly where it is absent."""
    path = traces_dir() / name
    if not path.exists():
        pytest.skip(f"trace {name} not found in {traces_dir()}")
    return path


def free_port() -> int:
    """A TCP port that is free right now (picked by the OS, never fixed)."""
    from eplb_plugin.runtime.launch import free_port as pick

    return pick()


def destroy_process_group() -> None:
    """Tear down the default process group after collecting reference cycles: gloo aborts the
    process when Work objects or groups kept alive by caught errors outlive the group."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.destroy_process_group()


def gloo_worker(rank: int, world: int, port: int, cases, timeout_s: float) -> None:
    """``mp.spawn`` target: join a gloo group of ``world`` ranks on localhost:port, run
    ``cases(rank, world)`` (a module-level function), and tear the group down together."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        cases(rank, world)
    finally:
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
        destroy_process_group()


def _cases_worker(rank: int, world: int, port: int, cases, results) -> None:
    import datetime
    import traceback

    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # A failed assertion on one rank leaves the other waiting in a collective: time out soon.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for case in cases:
            try:
                case(rank, dist.group.WORLD)
                results[(rank, case.__name__)] = "ok"
            except Exception:  # any failure is reported per case; the next case still runs
                results[(rank, case.__name__)] = traceback.format_exc()
            dist.barrier()  # the next case starts on every rank from a clean state
    finally:
        destroy_process_group()


def run_gloo_cases(cases, world: int = 2) -> dict:
    """Run every ``case(rank, group)`` (module-level functions) on ``world`` spawned gloo
    ranks, one after the other; returns {(rank, case name): "ok" or the traceback}."""
    import torch.multiprocessing as mp

    shared = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_cases_worker, args=(world, free_port(), cases, shared), nprocs=world, start_method="spawn",
                       join=True)
    return dict(shared)


def _forked_rank(rank: int, case, port: int, errors) -> None:
    try:
        case(rank, port)
    except BaseException as exc:  # reported to the parent, which fails the test
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


def run_forked_ranks(case, world_size: int) -> None:
    """Run ``case(rank, port)`` in ``world_size`` forked processes (they share what the
    parent imported) and fail with the first rank's error."""
    import torch.multiprocessing as mp

    errors = mp.get_context("fork").SimpleQueue()
    mp.start_processes(_forked_rank, args=(case, free_port(), errors), nprocs=world_size, join=True,
                       start_method="fork")
    assert errors.empty(), errors.get()


def distinct_slot_weights(phy2log_row, rank: int, per_rank: int, *, with_int: bool = True) -> list:
    """Weights of one rank's slots that name the expert each holds (a float tensor, and with
    ``with_int`` an int one), so a test can tell every slot's expert from its weights."""
    import torch

    e = phy2log_row[rank * per_rank:(rank + 1) * per_rank].to(torch.float32)
    weights = [(e.view(-1, 1) * 10 + torch.arange(3)).contiguous()]
    return weights + [(e * 3).to(torch.int32).view(-1, 1).contiguous()] if with_int else weights
