"""The adapter's rebalance as SGLang drives it: ``rebalance()`` (elastic EP's fault path), LPLB
solvers re-initialized after updates, one metadata build per rebalance (off the serving
thread), weights re-read
after a reload, and SGLang's meaning of the utilization threshold."""

from __future__ import annotations

import threading
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
WORLD = 2
PER_RANK = NUM_PHYSICAL // WORLD


def _slot_weights(phy2log_row: torch.Tensor, rank: int) -> list[torch.Tensor]:
    return distinct_slot_weights(phy2log_row, rank, PER_RANK)


def _traffic(recorder, adapter, hot: torch.Tensor, passes: int = 3) -> None:
    for pass_id in range(passes):
        with recorder.with_forward_pass(pass_id, None):
            for layer in (1, 2):
                with recorder.with_current_layer(layer):
                    recorder.on_select_experts(topk_ids=hot)
        adapter.on_forward_pass_end()


def _run_to_end(generator) -> int:
    """Drive a rebalance() generator as SGLang's elastic-EP fault path does; returns its yields."""
    return sum(1 for _ in generator)


def _cases(rank: int, port: int) -> None:
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool (hangs)
    from sglang.srt.eplb import expert_distribution, expert_location
    from sglang.srt.model_executor.model_runner_components import moe_ep_setup

    from eplb_plugin.integrations.sglang import _recorder_init_new
    from eplb_plugin.integrations.sglang_manager import SGLangEPLBManager

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    fake_runtime(ep_size=WORLD, tp_rank=rank, enable_eplb=True, eplb_rebalance_num_iterations=1000,
                 expert_distribution_recorder_mode="stat", expert_distribution_recorder_buffer_size=1000,
                 ep_num_redundant_experts=NUM_PHYSICAL - NUM_LOGICAL, eplb_algorithm="eplb_plugin",
                 eplb_rebalance_layers_per_chunk=1, ep_dispatch_algorithm="lp")
    metadata = expert_location.ExpertLocationMetadata.init_trivial(None, moe_ep_rank=rank)
    expert_location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
    recorder = _recorder_init_new(expert_distribution.ExpertDistributionRecorder.init_new, metadata, rank)
    expert_distribution.set_global_expert_distribution_recorder(recorder)
    solver_maps: list[torch.Tensor] = []  # the global map each LPLB solver re-initialization saw
    moe_ep_setup.init_lplb_solvers = lambda *, model_config: solver_maps.append(
        expert_location.get_global_expert_location_metadata().physical_to_logical_map_cpu.clone())
    build_threads: list[str] = []  # where each SGLang metadata build ran
    build = expert_location.ExpertLocationMetadata.init_by_mapping

    def recorded_build(*args, **kwargs):
        build_threads.append(threading.current_thread().name)
        return build(*args, **kwargs)

    expert_location.ExpertLocationMetadata.init_by_mapping = staticmethod(recorded_build)
    trivial = metadata.physical_to_logical_map_cpu.clone()
    model = SimpleNamespace(routed_experts_weights_of_layer={
        1: _slot_weights(trivial[1], rank), 2: _slot_weights(trivial[2], rank)})
    adapter = SGLangEPLBManager(model_config=None, get_model=lambda: model, get_expert_location_updater=lambda: None,
                                get_expert_backup_client=lambda: None, get_weight_updater=lambda: None)

    # rebalance(): an immediate rebalance from the window, one chunk (layer) per yield.
    _traffic(recorder, adapter, torch.tensor([[2, 3], [2, 3], [3, 2], [4, 2]], dtype=torch.int32))
    _run_to_end(adapter.rebalance())
    assert adapter.failures == []
    first = adapter.manager.location.physical_to_logical_map.clone()
    assert not torch.equal(first[1:], trivial[1:]), f"no rebalance happened: {adapter.manager.history}"
    assert torch.equal(expert_location.get_global_expert_location_metadata().physical_to_logical_map_cpu, first)
    for layer in (1, 2):
        for got, want in zip(model.routed_experts_weights_of_layer[layer], _slot_weights(first[layer], rank)):
            assert torch.equal(got, want), f"layer {layer}: a slot holds the wrong expert"
    # Two chunks went live: the LPLB solvers were re-initialized after each, on the new map.
    changed = [layer for layer in (1, 2) if not torch.equal(first[layer], trivial[layer])]
    assert len(solver_maps) == len(changed) and torch.equal(solver_maps[-1], first)
    # SGLang's metadata was built once for the rebalance, not once per chunk, off the serving thread.
    assert adapter._publisher.builds == 1
    assert build_threads == ["eplb-sglang-metadata"]

    # A weight reload replaces the tensors: the next rebalance moves the new ones.
    old_tensors = model.routed_experts_weights_of_layer
    model.routed_experts_weights_of_layer = {layer: [t.clone() for t in ws] for layer, ws in old_tensors.items()}
    snapshot = {layer: [t.clone() for t in ws] for layer, ws in old_tensors.items()}
    _traffic(recorder, adapter, torch.tensor([[0, 1], [0, 1], [1, 0], [5, 0]], dtype=torch.int32))
    _run_to_end(adapter.rebalance())
    assert adapter.failures == []
    second = adapter.manager.location.physical_to_logical_map
    assert not torch.equal(second[1:], first[1:]), f"no second rebalance: {adapter.manager.history}"
    for layer in (1, 2):
        for got, want in zip(model.routed_experts_weights_of_layer[layer], _slot_weights(second[layer], rank)):
            assert torch.equal(got, want), f"layer {layer}: a reloaded slot holds the wrong expert"
        for dead, before in zip(old_tensors[layer], snapshot[layer]):
            assert torch.equal(dead, before), f"layer {layer}: the mover wrote to a replaced tensor"
    assert adapter._publisher.builds == 2
    assert build_threads == ["eplb-sglang-metadata"] * 2

    # Called while the manager's own rebalance is in progress: that one finishes, then SGLang's.
    # Its plan takes a while, so it is still in progress after this pass on every rank
    # (a fast plan could land and move within the same pass end).
    plan_fn = adapter.manager.planner

    def slow_planner(*args, **kwargs):
        time.sleep(0.5)
        return plan_fn(*args, **kwargs)

    adapter.manager.planner = slow_planner
    adapter.manager.rebalance_now("interval")
    adapter.on_forward_pass_end()
    assert adapter.manager.busy
    _run_to_end(adapter.rebalance())
    assert [(r.trigger, r.end_pass is not None) for r in adapter.manager.history[-2:]] == [
        ("interval", True), ("sglang rebalance()", True)]
    assert not adapter.manager.busy and adapter.failures == []

    adapter.disable_rebalance("elastic EP scale-up is pending")
    assert _run_to_end(adapter.rebalance()) == 0  # disabled: SGLang's rebalance() returns at once
    adapter.manager.close()
    dist.barrier()
    destroy_process_group()


def test_rebalance_lp_solvers_metadata_and_reloaded_weights_follow_sglang(monkeypatch):
    """On 2 gloo ranks: rebalance() moves every layer now (elastic EP's fault path); with lp
    dispatch the solvers are re-initialized after each chunk on the new map; SGLang's metadata
    is built once per rebalance, in a background thread; after a weight reload the new tensors are moved, the replaced
    ones untouched."""

    with stubs_on_path():
        import sglang.srt.eplb.eplb_manager  # noqa: F401  imported once; forked ranks share it
        import sglang.srt.model_executor.model_runner_components.moe_ep_setup  # noqa: F401
    fake_model_layout(monkeypatch, num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL)
    run_forked_ranks(_cases, WORLD)


def _stat_recorder(passes: list[torch.Tensor]):
    """A one-rank stat recorder over 2 GPUs whose window holds ``passes`` ([L, P] each)."""
    from eplb_plugin.recorder import ExpertDistributionRecorder

    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=torch.arange(4).repeat(1, 1),
                                     num_logical_experts=4, ep_size=2, backend="torch")
    rec.start_record()
    for pass_id, counts in enumerate(passes):
        with rec.with_forward_pass(pass_id):
            rec.pass_counts.add_(counts)
    return rec


def test_the_utilization_threshold_keeps_sglangs_meaning():
    """SGLang skips when the mean per-pass utilization is strictly above the threshold, and only
    with a balancedness report mode on: two passes loading one GPU each are balanced summed
    (the plugin's own rule would skip) but 0.5 per pass, so SGLang's rule rebalances."""
    with stubs_on_path():
        from sglang.srt.eplb.expert_distribution import compute_utilization_rate

    from eplb_plugin.integrations.sglang_metadata import sglang_utilization_gate

    alternating = _stat_recorder([torch.tensor([[5, 5, 0, 0]]), torch.tensor([[0, 0, 6, 4]])])
    gate = sglang_utilization_gate(alternating, threshold=0.9, report_mode="server_log", group=None)
    assert gate(1.0) is None  # the summed window is balanced; per pass it is not
    even = _stat_recorder([torch.tensor([[3, 1, 2, 2]]), torch.tensor([[1, 1, 1, 1]])])
    sglang = float(torch.mean(compute_utilization_rate(torch.tensor([[[4.0, 4.0]], [[2.0, 2.0]]]))))
    assert sglang == pytest.approx(1.0)
    reason = sglang_utilization_gate(even, threshold=0.9, report_mode="server_log", group=None)(1.0)
    assert reason == "mean per-pass utilization 1.0000 > threshold 0.9 (SGLang's rule)"
    assert sglang_utilization_gate(even, threshold=0.9, report_mode="off", group=None)(1.0) is None
    assert sglang_utilization_gate(even, threshold=1.0, report_mode="server_log", group=None)(1.0) is None
    half = _stat_recorder([torch.tensor([[2, 2, 0, 0]])])  # utilization (2 + eps) / (4 + eps)
    assert sglang_utilization_gate(half, threshold=0.6, report_mode="both", group=None)(0.5) is None
    assert sglang_utilization_gate(half, threshold=0.4, report_mode="both", group=None)(0.5) is not None
