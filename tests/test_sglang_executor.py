"""Across 4 gloo ranks, SGLang's mover and the project's executor leave identical weights."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_sglang_helpers import import_sglang_or_skip

from conftest import destroy_process_group, free_port

import_sglang_or_skip()
pytestmark = pytest.mark.sglang

WORLD, NUM_LOGICAL, SLOTS_PER_RANK = 4, 10, 4
NUM_PHYSICAL = WORLD * SLOTS_PER_RANK


def _maps(case: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Old and new [P] maps; every expert keeps a replica; duplicates on one rank included."""
    gen = torch.Generator().manual_seed(case)
    maps = []
    for _ in range(2):
        extra = torch.randint(0, NUM_LOGICAL, (NUM_PHYSICAL - NUM_LOGICAL,), generator=gen)
        row = torch.cat([torch.arange(NUM_LOGICAL), extra])
        maps.append(row[torch.randperm(NUM_PHYSICAL, generator=gen)])
    if case == 0:  # a hot expert twice on rank 0
        maps[1][:2] = maps[1][0]
        maps[1][torch.isin(torch.arange(NUM_PHYSICAL), torch.arange(2, NUM_PHYSICAL))] = torch.cat(
            [torch.tensor([e for e in range(NUM_LOGICAL) if e != int(maps[1][0])]),
             torch.zeros(NUM_PHYSICAL - 2 - (NUM_LOGICAL - 1), dtype=torch.int64)])
    return maps[0], maps[1]


def _weights(rank: int, phy2log: torch.Tensor) -> list[torch.Tensor]:
    """Tensors whose every slot encodes its logical expert: w13 (f32), w2 (bf16), scale (int32)."""
    local = phy2log[rank * SLOTS_PER_RANK:(rank + 1) * SLOTS_PER_RANK].to(torch.float32)
    w13 = local.view(-1, 1, 1) * 100 + torch.arange(6, dtype=torch.float32).view(1, 2, 3)
    w2 = (local.view(-1, 1) * 2 + torch.arange(5).view(1, 5)).to(torch.bfloat16)
    scale = local.to(torch.int32).view(-1, 1) * 7 + 1
    return [w13.contiguous(), w2.contiguous(), scale.contiguous()]


def _worker(rank: int, port: int, errors) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        from sglang.srt.eplb.expert_location_updater import (
            create_temp_buffers,
            update_expert_weights_single_layer,
        )

        from eplb_plugin.executor import move_experts

        for case in range(3):
            old, new = _maps(case)
            sglang_weights, our_weights = _weights(rank, old), _weights(rank, old)
            update_expert_weights_single_layer(
                routed_experts_weights=sglang_weights, temp_buffers=create_temp_buffers(sglang_weights),
                old_physical_to_logical_map=old.tolist(), new_physical_to_logical_map=new.tolist(),
                num_local_physical_experts=SLOTS_PER_RANK, num_gpu_per_node=WORLD, rank=rank, world_size=WORLD,
            )
            move_experts(our_weights, old, new, None, layer=case)
            expected = _weights(rank, new)
            for mine, theirs, want in zip(our_weights, sglang_weights, expected):
                assert torch.equal(mine, theirs), f"case {case} rank {rank}: executor != SGLang"
                assert torch.equal(mine, want), f"case {case} rank {rank}: wrong expert in a slot"
        dist.barrier()
        destroy_process_group()
    except BaseException as exc:  # reported to the parent, which fails the test
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


def test_executor_and_sglang_mover_produce_identical_weights():
    """Three pairs of maps (one with a hot expert twice on a rank), three tensors of three dtypes."""
    # spawn, not fork: forking a test process that other tests left with threads (SGLang's
    # imports start some) could hang the ranks; each rank imports SGLang itself instead.
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(free_port(), errors), nprocs=WORLD, join=True, start_method="spawn")
    assert errors.empty(), errors.get()
