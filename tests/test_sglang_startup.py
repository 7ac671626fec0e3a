"""The SGLang adapter refuses at start-up what would fail at the first forward pass, and
nothing raises out of ``on_forward_pass_end`` afterwards (that would kill SGLang's scheduler)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_sglang_helpers import (
    fake_model_layout,
    fake_runtime,
    import_sglang_or_skip,
    stubs_on_path,
)

from eplb_plugin.errors import ConfigError

import_sglang_or_skip()
pytestmark = pytest.mark.sglang

NUM_LAYERS, NUM_LOGICAL, NUM_PHYSICAL = 2, 4, 4


@pytest.fixture(scope="module")
def sglang_eplb():
    with stubs_on_path():
        from sglang.srt.eplb import eplb_manager, expert_distribution, expert_location
    return expert_distribution, expert_location, eplb_manager


def _eplb_runtime(**overrides):
    settings = dict(ep_size=1, enable_eplb=True, expert_distribution_recorder_mode="stat",
                    eplb_algorithm="eplb_plugin", eplb_rebalance_num_iterations=4,
                    expert_distribution_recorder_buffer_size=4)
    settings.update(overrides)
    return fake_runtime(**settings)


def _adapter(model=None):
    from eplb_plugin.integrations.sglang_manager import SGLangEPLBManager

    return SGLangEPLBManager(model_config=None, get_model=lambda: model, get_expert_location_updater=lambda: None,
                             get_expert_backup_client=lambda: None, get_weight_updater=lambda: None)


@pytest.mark.parametrize("runtime, message", [
    (dict(eplb_algorithm="elasticity_aware"), "--eplb-algorithm 'elasticity_aware'"),
    (dict(eplb_algorithm="deepseek_vec_hierarchical"), "--eplb-algorithm 'deepseek_vec_hierarchical'"),
    (dict(expert_distribution_recorder_mode="per_pass"), "--expert-distribution-recorder-mode per_pass"),
    (dict(expert_distribution_recorder_mode="stat_approx"), "--moe-a2a-backend is 'none'"),
    (dict(ep_size=8, tp_size=16), r"\(16 ranks\), but --ep-size is 8"),
    (dict(pp_size=2), "--pp-size 2"),
])
def test_the_adapter_refuses_at_construction_what_would_fail_at_the_first_pass(sglang_eplb, runtime, message):
    """Each launch SGLang accepts but the plugin cannot serve stops in the constructor (run by
    ModelRunner.initialize at start-up) with a ConfigError naming the flag."""
    _eplb_runtime(**runtime)
    with pytest.raises(ConfigError, match=message):
        _adapter()


@pytest.mark.parametrize("settings, message", [
    ('{"eplb_move_budget_mb": -3}', "--eplb-move-budget-mb must be finite and > 0"),
    ('{"eplb_move_budget_mb": Infinity}', "--eplb-move-budget-mb must be finite and > 0"),
    ('{"eplb_move_budget_mb": NaN}', "--eplb-move-budget-mb must be finite and > 0"),
    ('{"eplb_move_budget_carry": -1}', "--eplb-move-budget-carry must be an int >= 0"),
    ('{"eplb_transfer_budget_mb": 0}', "--eplb-transfer-budget-mb must be finite and > 0"),
    ('{"eplb_drift_threshold": 7}', r"--eplb-drift-threshold must be in \(0, 1\]"),
    ('{"eplb_rebalance_interval_s": NaN}', "--eplb-rebalance-interval-s must be finite and > 0"),
    ('{"eplb_move_budget_mb": 100}', "--eplb-move-budget-mb needs a policy that takes a move budget"),
])
def test_the_adapter_refuses_out_of_range_plugin_settings_at_construction(sglang_eplb, monkeypatch, settings,
                                                                          message):
    """The plugin's own flags (carried to SGLang's ranks in $EPLB_PLUGIN_CONFIG, as the
    launcher's hook writes them) get the runtime's range checks in the constructor, and a move
    budget given to a policy that takes none (here eplb_plugin) is refused there too, instead of
    failing every rebalance from the first forward pass on."""
    from eplb_plugin.integrations.sglang import CONFIG_ENV

    monkeypatch.setenv(CONFIG_ENV, settings)
    _eplb_runtime()
    with pytest.raises(ConfigError, match=message):
        _adapter()


def test_the_adapter_accepts_a_move_budget_for_a_policy_that_takes_one(sglang_eplb, monkeypatch):
    """The same budget with eplb_plugin_perpass (minmax dispatch) builds."""
    from eplb_plugin.integrations.sglang import CONFIG_ENV

    expert_distribution, expert_location, _ = sglang_eplb
    monkeypatch.setenv(CONFIG_ENV, '{"eplb_move_budget_mb": 100}')
    _eplb_runtime(eplb_algorithm="eplb_plugin_perpass", ep_dispatch_algorithm="minmax")
    fake_model_layout(monkeypatch, num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL)
    _install_recorder(expert_distribution, expert_location)
    assert _adapter()._args.eplb_move_budget_mb == 100


@pytest.mark.parametrize("num_groups, nnodes", [(None, 1), (8, 1), (8, 2), (6, 4)])
def test_auto_plans_with_the_policy_sglangs_auto_picks(sglang_eplb, monkeypatch, num_groups, nnodes):
    """--eplb-algorithm auto (SGLang's default) keeps SGLang's meaning under the plugin: the
    manager plans with what SGLang's compute_algorithm picks for the model's expert groups and
    the nodes (deepseek_hierarchical where the groups divide over the nodes, else deepseek)."""
    from sglang.srt.eplb import eplb_algorithms

    expert_distribution, expert_location, _ = sglang_eplb
    _eplb_runtime(eplb_algorithm="auto", ep_size=4, tp_size=4, nnodes=nnodes)
    monkeypatch.setattr("eplb_plugin.integrations.sglang_checks.parallel_sizes", lambda: (4, 1))
    fake_model_layout(monkeypatch, num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL, num_groups=num_groups)
    _install_recorder(expert_distribution, expert_location)
    expected = "deepseek_hierarchical" if num_groups is not None and num_groups % nnodes == 0 else "deepseek"
    assert eplb_algorithms.compute_algorithm("auto", num_groups, nnodes).name == expected
    adapter = _adapter()
    assert adapter._algorithm == expected
    assert adapter._args.policy() == expected  # what the project's manager plans with


@pytest.mark.parametrize("port", ["abc", "0", "70000", "-1", "80.5"])
def test_a_metrics_port_that_is_not_a_port_is_refused_at_construction(sglang_eplb, monkeypatch, port):
    """Every rank refuses it at start-up, naming the variable (rank 0 failed at the first
    forward pass and turned rebalancing off alone, leaving the others waiting for it)."""
    from eplb_plugin.integrations.sglang import CONFIG_ENV

    expert_distribution, expert_location, _ = sglang_eplb
    monkeypatch.setenv(CONFIG_ENV, '{"enable_expert_distribution_metrics": true}')
    monkeypatch.setenv("EPLB_PLUGIN_METRICS_PORT", port)
    _eplb_runtime()
    fake_model_layout(monkeypatch, num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL)
    _install_recorder(expert_distribution, expert_location)
    with pytest.raises(ConfigError, match=f"EPLB_PLUGIN_METRICS_PORT='{port}' is not a TCP port"):
        _adapter()


def test_a_busy_metrics_port_is_refused_at_construction_on_the_rank_that_serves_it(sglang_eplb, monkeypatch):
    """Rank 0 binds the port in the constructor: a port in use stops start-up with a ConfigError."""
    import socket

    from eplb_plugin.integrations.sglang import CONFIG_ENV

    expert_distribution, expert_location, _ = sglang_eplb
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv(CONFIG_ENV, '{"enable_expert_distribution_metrics": true}')
        monkeypatch.setenv("EPLB_PLUGIN_METRICS_PORT", str(port))
        _eplb_runtime()
        fake_model_layout(monkeypatch, num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL)
        _install_recorder(expert_distribution, expert_location)
        with pytest.raises(ConfigError, match=f"EPLB_PLUGIN_METRICS_PORT={port}: rank 0 cannot serve metrics"):
            _adapter()


def test_the_recorder_refuses_stat_approx_without_an_all_to_all_backend(sglang_eplb):
    """Nothing would deliver dispatch counts: SGLang refuses it when building its recorder, so
    does the plugin's init_new (also without --enable-eplb)."""
    expert_distribution, expert_location, _ = sglang_eplb
    fake_runtime(ep_size=1, expert_distribution_recorder_mode="stat_approx")
    from eplb_plugin.integrations.sglang import _recorder_init_new

    metadata = expert_location.ExpertLocationMetadata._init_raw(
        ep_size=1, physical_to_logical_map=torch.arange(4).repeat(2, 1),
        logical_to_all_physical_map=torch.arange(4).view(1, 4, 1).repeat(2, 1, 1))
    with pytest.raises(ConfigError, match="stat_approx.*--moe-a2a-backend"):
        _recorder_init_new(expert_distribution.ExpertDistributionRecorder.init_new, metadata, 0)


def _install_recorder(expert_distribution, expert_location):
    from eplb_plugin.integrations.sglang import _recorder_init_new

    metadata = expert_location.ExpertLocationMetadata.init_trivial(None, moe_ep_rank=0)
    expert_location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
    recorder = _recorder_init_new(expert_distribution.ExpertDistributionRecorder.init_new, metadata, 0)
    expert_distribution.set_global_expert_distribution_recorder(recorder)
    return recorder


def test_weights_the_mover_cannot_write_turn_rebalancing_off_without_raising(sglang_eplb, monkeypatch):
    """A non-contiguous expert tensor (seen only once the model is loaded) makes the first
    on_forward_pass_end log the error, keep it in ``failures`` and turn rebalancing off; it
    never raises into SGLang's scheduler, then or at later passes."""
    expert_distribution, expert_location, _ = sglang_eplb
    _eplb_runtime()
    fake_model_layout(monkeypatch, num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL)
    _install_recorder(expert_distribution, expert_location)
    strided = torch.zeros(3, NUM_PHYSICAL).t()  # dim 0 = 4 slots, not contiguous
    model = SimpleNamespace(routed_experts_weights_of_layer={1: [strided]})
    adapter = _adapter(model)
    for _ in range(3):
        adapter.on_forward_pass_end()
    assert [type(e) for e in adapter.failures] == [ConfigError]
    assert "routed_experts_weights_of_layer[1][0]" in str(adapter.failures[0])
    assert adapter.manager is None


def test_an_error_escaping_the_manager_turns_rebalancing_off_without_raising(sglang_eplb, monkeypatch):
    """Whatever the project's manager raises besides a failed rebalance is logged and kept,
    rebalancing stops, and on_forward_pass_end returns normally."""
    expert_distribution, expert_location, _ = sglang_eplb
    _eplb_runtime()
    fake_model_layout(monkeypatch, num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL)
    _install_recorder(expert_distribution, expert_location)
    model = SimpleNamespace(routed_experts_weights_of_layer={1: [torch.zeros(NUM_PHYSICAL, 3)]})
    adapter = _adapter(model)
    adapter.on_forward_pass_end()
    calls = []

    def broken() -> None:
        calls.append(1)
        raise ConfigError("a mover refused its input")

    monkeypatch.setattr(adapter.manager, "on_forward_pass_end", broken)
    adapter.on_forward_pass_end()
    adapter.on_forward_pass_end()
    assert calls == [1]
    assert [str(e) for e in adapter.failures] == ["a mover refused its input"]


def test_a_chunk_of_layers_of_two_dtypes_moves_each_layer_to_its_new_map():
    """MoE layers of different dtypes in one chunk: each run of like layers moves in its own
    call (one move_layers call refuses mixed kinds), every slot ends up holding its expert."""
    from eplb_plugin.integrations.sglang_manager import move_like_layers_together

    old = torch.arange(4)
    new = torch.tensor([2, 3, 0, 1])
    kinds = (torch.float32, torch.bfloat16, torch.bfloat16, torch.float32)
    weights = [[(old.view(4, 1) * 10 + layer).to(dtype).contiguous()] for layer, dtype in enumerate(kinds)]
    results = move_like_layers_together([(w, old, new) for w in weights], None, layer_ids=[0, 1, 2, 3])
    assert len(results) == 4
    for layer, (w,) in enumerate(weights):
        assert torch.equal(w.float(), (new.view(4, 1) * 10 + layer).float()), f"layer {layer}"


def test_a_planner_process_asked_for_starts_at_construction_not_at_the_first_pass(sglang_eplb, monkeypatch):
    """With eplb_plan_in_process the worker is spawned and warmed up while SGLang starts (the
    adapter's constructor), so the first forward pass does not wait seconds for it."""
    from eplb_plugin.integrations.sglang import CONFIG_ENV
    from eplb_plugin.planner_process import PlannerProcess

    expert_distribution, expert_location, _ = sglang_eplb
    monkeypatch.setenv(CONFIG_ENV, '{"eplb_plan_in_process": true}')
    _eplb_runtime()
    fake_model_layout(monkeypatch, num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL)
    _install_recorder(expert_distribution, expert_location)
    adapter = _adapter()
    try:
        assert isinstance(adapter._planner, PlannerProcess) and adapter.manager is None
    finally:
        adapter._planner.close()
