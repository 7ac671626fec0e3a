"""SGLang builds the plugin's manager adapter with its own signature; it rebalances SGLang's weights."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from test_sglang_helpers import (
    fake_model_layout,
    fake_runtime,
    import_sglang_or_skip,
    stubs_on_path,
)

from conftest import destroy_process_group, distinct_slot_weights, run_forked_ranks

import_sglang_or_skip()
pytestmark = pytest.mark.sglang

NUM_LAYERS, NUM_LOGICAL, NUM_PHYSICAL = 3, 6, 8  # layer 0 is dense (no routed experts)
INTERVAL_PASSES = 4
PLANNING_PASSES = 150  # passes the background planner may take (ranks poll it in lockstep)
PASS_S = 0.02


WORLD = 2


def _slot_weights(phy2log_row: torch.Tensor, rank: int) -> list[torch.Tensor]:
    return distinct_slot_weights(phy2log_row, rank, NUM_PHYSICAL // WORLD)


def _sglang_rank(rank: int):
    """SGLang's runtime, expert-location metadata and recorder (the plugin's) for one gloo rank
    with EPLB on; returns (recorder, the trivial map, a model whose routed layers 1 and 2
    hold that map's slots)."""
    from sglang.srt.eplb import expert_distribution, expert_location

    from eplb_plugin.integrations.sglang import _recorder_init_new

    fake_runtime(ep_size=WORLD, tp_rank=rank, enable_eplb=True, eplb_rebalance_num_iterations=INTERVAL_PASSES,
                 expert_distribution_recorder_mode="stat", expert_distribution_recorder_buffer_size=INTERVAL_PASSES,
                 ep_num_redundant_experts=NUM_PHYSICAL - NUM_LOGICAL, eplb_algorithm="eplb_plugin")
    metadata = expert_location.ExpertLocationMetadata.init_trivial(None, moe_ep_rank=rank)
    expert_location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
    recorder = _recorder_init_new(expert_distribution.ExpertDistributionRecorder.init_new, metadata, rank)
    expert_distribution.set_global_expert_distribution_recorder(recorder)
    trivial = metadata.physical_to_logical_map_cpu.clone()
    model = SimpleNamespace(routed_experts_weights_of_layer={
        1: _slot_weights(trivial[1], rank), 2: _slot_weights(trivial[2], rank)})
    return recorder, trivial, model


def _rebalance_on_rank(rank: int, port: int) -> None:
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool (hangs)
    from sglang.srt.eplb import expert_distribution, expert_location
    from sglang.srt.eplb.eplb_manager import EPLBManager  # noqa: F401  (the name SGLang uses)

    from eplb_plugin.integrations.sglang_manager import SGLangEPLBManager

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    recorder, trivial, model = _sglang_rank(rank)

    manager = SGLangEPLBManager(  # SGLang 0.5.23's keyword signature
        model_config=None, get_model=lambda: model, get_expert_location_updater=lambda: None,
        get_expert_backup_client=lambda: None, get_weight_updater=lambda: None,
    )
    assert recorder.recording
    # Slots 2 and 3 hold experts 2 and 3, which have no replica on rank 1: rank 0 is the hot GPU.
    hot = torch.tensor([[2, 3], [2, 3], [3, 2], [4, 2]], dtype=torch.int32)
    for pass_id in range(INTERVAL_PASSES + PLANNING_PASSES):
        with recorder.with_forward_pass(pass_id, None):
            for layer in (1, 2):
                with recorder.with_current_layer(layer):
                    recorder.on_select_experts(topk_ids=hot)
        manager.on_forward_pass_end()
        if pass_id == 0:  # SGLang's scheduler on POST /stop_ then /dump_expert_distribution_record
            expert_distribution.get_global_expert_distribution_recorder().stop_record()
            expert_distribution.get_global_expert_distribution_recorder().dump_record(output_mode="object")
        time.sleep(PASS_S)  # the planner runs in a background thread while passes go on
    assert manager.failures == []
    live = manager.manager.location.physical_to_logical_map
    assert not torch.equal(live[1:], trivial[1:]), f"no rebalance happened: {manager.manager.history}"
    assert torch.equal(expert_location.get_global_expert_location_metadata().physical_to_logical_map_cpu, live)
    for layer in (1, 2):
        for got, want in zip(model.routed_experts_weights_of_layer[layer], _slot_weights(live[layer], rank)):
            assert torch.equal(got, want), f"layer {layer}: a slot holds the wrong expert"
    dist.barrier()
    destroy_process_group()


def test_sglang_constructs_the_adapter_which_rebalances_sglangs_weights(monkeypatch):
    """Built with SGLang's keyword signature on 2 gloo ranks: after the interval the weights follow
    the new map on every rank and SGLang's global expert-location metadata serves it, though
    the user stopped and dumped the expert distribution record after the first pass."""

    with stubs_on_path():
        import sglang.srt.eplb.eplb_manager  # noqa: F401  imported once; forked ranks share it
    fake_model_layout(monkeypatch, num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL)
    run_forked_ranks(_rebalance_on_rank, WORLD)


def _build_fails_on_rank_0(rank: int, port: int) -> None:
    from datetime import timedelta

    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool (hangs)

    from eplb_plugin.errors import ConfigError
    from eplb_plugin.integrations import sglang_checks
    from eplb_plugin.integrations.sglang_manager import SGLangEPLBManager

    # A bounded wait: without an agreement rank 1 would block in the manager's collectives.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=20))
    recorder, _, model = _sglang_rank(rank)
    if rank == 0:
        def refuse(*args, **kwargs):
            raise ConfigError("rank 0 cannot move these weights")

        sglang_checks.check_movable_weights = refuse
    manager = SGLangEPLBManager(
        model_config=None, get_model=lambda: model, get_expert_location_updater=lambda: None,
        get_expert_backup_client=lambda: None, get_weight_updater=lambda: None,
    )
    hot = torch.tensor([[2, 3], [2, 3], [3, 2], [4, 2]], dtype=torch.int32)
    for pass_id in range(INTERVAL_PASSES * 2):
        with recorder.with_forward_pass(pass_id, None):
            for layer in (1, 2):
                with recorder.with_current_layer(layer):
                    recorder.on_select_experts(topk_ids=hot)
        manager.on_forward_pass_end()
    reason = manager._rebalance_disabled_reason
    expected = "rank 0 cannot move these weights" if rank == 0 else "another rank failed to build"
    assert reason is not None and expected in reason, reason
    assert manager.manager is None and len(manager.failures) == 1
    dist.barrier()
    destroy_process_group()


def test_a_failure_building_the_manager_on_one_rank_turns_rebalancing_off_on_every_rank(monkeypatch):
    """The manager is built at the first forward pass; a failure there on rank 0 alone (weights it
    cannot move, a metrics server that will not start) is agreed on by one all-reduce, so every
    rank turns rebalancing off at that pass instead of rank 1 blocking in the manager's
    collectives while rank 0 serves on."""
    with stubs_on_path():
        import sglang.srt.eplb.eplb_manager  # noqa: F401  imported once; forked ranks share it
    fake_model_layout(monkeypatch, num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL)
    run_forked_ranks(_build_fails_on_rank_0, WORLD)
