"""SGLang's own placement code with the plugin: ``init_by_eplb`` and ``--init-expert-location``."""

from __future__ import annotations

import functools

import pytest
import torch
from test_sglang_helpers import fake_model_layout, fake_runtime, import_sglang_or_skip

from eplb_plugin.algorithms import rebalance_experts
from eplb_plugin.location import ExpertLocation
from eplb_plugin.location_files import load_init_expert_location
from eplb_plugin.recorder import ExpertDistributionRecorder

import_sglang_or_skip()
pytestmark = pytest.mark.sglang

NUM_LAYERS, NUM_LOGICAL, EP_SIZE, NUM_REDUNDANT = 3, 12, 4, 4
NUM_PHYSICAL = NUM_LOGICAL + NUM_REDUNDANT


@pytest.fixture
def sglang_eplb(monkeypatch):
    """SGLang's eplb modules with the plugin's algorithm hooks in place (undone afterwards)."""
    from sglang.srt.eplb import eplb_algorithms, expert_location

    from eplb_plugin.integrations import sglang as plugin

    monkeypatch.setattr(eplb_algorithms, "compute_algorithm",
                        functools.partial(plugin._compute_algorithm, eplb_algorithms.compute_algorithm))
    monkeypatch.setattr(eplb_algorithms, "rebalance_experts",
                        functools.partial(plugin._rebalance_experts, eplb_algorithms.rebalance_experts))
    fake_model_layout(monkeypatch, num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL)
    return expert_location


def _skewed_counts(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(1, 50, (2, NUM_LAYERS, NUM_LOGICAL), generator=gen, dtype=torch.int32)
    base[:, :, 3] *= 20  # one hot expert per layer
    return base


def test_init_by_eplb_with_eplb_plugin_returns_the_projects_placement(sglang_eplb):
    """SGLang's init_by_eplb under --eplb-algorithm eplb_plugin gives the project's planner's maps."""
    fake_runtime(ep_size=EP_SIZE, eplb_algorithm="eplb_plugin", ep_num_redundant_experts=NUM_REDUNDANT)
    counts = _skewed_counts()
    metadata = sglang_eplb.ExpertLocationMetadata.init_by_eplb(None, counts)
    expected_p2l, expected_l2p, _ = rebalance_experts(
        counts, NUM_PHYSICAL, NUM_PHYSICAL // EP_SIZE, None, 1, "eplb_plugin")
    assert torch.equal(metadata.physical_to_logical_map, expected_p2l)
    width = expected_l2p.shape[-1]
    assert torch.equal(metadata.logical_to_all_physical_map[..., :width], expected_l2p)
    assert (metadata.logical_to_all_physical_map[..., width:] == -1).all()
    assert torch.equal(metadata.logical_to_all_physical_map_num_valid,
                       ExpertLocation.from_physical_to_logical_map(
                           expected_p2l, num_logical_experts=NUM_LOGICAL, ep_size=EP_SIZE).logical_replica_count)


def test_sglang_algorithm_names_keep_sglangs_planner(sglang_eplb):
    """--eplb-algorithm deepseek still runs SGLang's own deepseek policy."""
    from sglang.srt.eplb.eplb_algorithms import deepseek

    fake_runtime(ep_size=EP_SIZE, eplb_algorithm="deepseek", ep_num_redundant_experts=NUM_REDUNDANT)
    counts = _skewed_counts(1)
    metadata = sglang_eplb.ExpertLocationMetadata.init_by_eplb(None, counts)
    expected, _, _ = deepseek.rebalance_experts(
        weight=counts.sum(0), num_replicas=NUM_PHYSICAL, num_groups=None, num_nodes=1,
        num_gpus=EP_SIZE, enable_hierarchical=False)
    assert torch.equal(metadata.physical_to_logical_map, expected)


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_init_expert_location_loads_the_projects_placement_files(sglang_eplb, tmp_path, suffix):
    """A placement saved by ExpertLocation.save loads through SGLang's --init-expert-location."""
    location = ExpertLocation.from_logical_count(
        _skewed_counts(2), num_physical_experts=NUM_PHYSICAL, ep_size=EP_SIZE, algorithm="eplb_plugin")
    path = location.save(tmp_path / f"placement{suffix}")
    fake_runtime(ep_size=EP_SIZE, ep_num_redundant_experts=NUM_REDUNDANT, init_expert_location=str(path))
    metadata = sglang_eplb.compute_initial_expert_location_metadata(None, moe_ep_rank=0)
    assert torch.equal(metadata.physical_to_logical_map.cpu(), location.physical_to_logical_map)
    assert torch.equal(metadata.logical_to_all_physical_map_num_valid, location.logical_replica_count)


def test_init_expert_location_plans_from_the_projects_stat_dump(sglang_eplb, tmp_path, monkeypatch):
    """A stat dump written by the project's recorder is a logical_count SGLang plans with eplb_plugin."""
    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(tmp_path))
    trivial = ExpertLocation.trivial(num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL,
                                     num_physical_experts=NUM_PHYSICAL, ep_size=EP_SIZE)
    recorder = ExpertDistributionRecorder("stat", physical_to_logical_map=trivial.physical_to_logical_map,
                                          num_logical_experts=NUM_LOGICAL, ep_size=EP_SIZE)
    recorder.start_record()
    gen = torch.Generator().manual_seed(3)
    for pass_id in range(3):
        with recorder.with_forward_pass(pass_id):
            for layer in range(NUM_LAYERS):
                with recorder.with_current_layer(layer):
                    recorder.on_select_experts(torch.randint(0, NUM_PHYSICAL, (40, 2), generator=gen))
    path = recorder.dump_record("file")
    fake_runtime(ep_size=EP_SIZE, ep_num_redundant_experts=NUM_REDUNDANT, init_expert_location=str(path),
                 eplb_algorithm="eplb_plugin")
    metadata = sglang_eplb.compute_initial_expert_location_metadata(None, moe_ep_rank=0)
    # SGLang cannot carry replica weights: the plan is for an equal split (the default).
    expected = load_init_expert_location(str(path), num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL,
                                         num_physical_experts=NUM_PHYSICAL, ep_size=EP_SIZE,
                                         algorithm="eplb_plugin")
    assert torch.equal(metadata.physical_to_logical_map.cpu(), expected.physical_to_logical_map)


@pytest.mark.parametrize("dispatch, planned_for", [("dynamic", "static"), ("minmax", "minmax")])
def test_init_by_eplb_with_the_per_pass_policy_plans_the_passes_for_the_servers_dispatch(sglang_eplb, dispatch,
                                                                                          planned_for):
    """SGLang's init_by_eplb hands a plugin policy the [B, L, E] passes; the per-pass policy
    plans on them for the server's --ep-dispatch-algorithm (SGLang's rebalance_experts has no
    argument for it: the hook reads SGLang's runtime config). SGLang's dynamic spreads evenly,
    as static does (whose rank tables init_by_eplb would need a process group for)."""
    fake_runtime(ep_size=EP_SIZE, eplb_algorithm="eplb_plugin_perpass", ep_num_redundant_experts=NUM_REDUNDANT,
                 ep_dispatch_algorithm=dispatch)
    counts = _skewed_counts(4)
    metadata = sglang_eplb.ExpertLocationMetadata.init_by_eplb(None, counts)
    expected = {d: rebalance_experts(counts, NUM_PHYSICAL, NUM_PHYSICAL // EP_SIZE, None, 1, "eplb_plugin_perpass",
                                     dispatch=d)[0] for d in ("static", "minmax")}
    assert torch.equal(metadata.physical_to_logical_map, expected[planned_for])
    assert not torch.equal(expected["static"], expected["minmax"])


def test_without_sglangs_runtime_config_the_hook_plans_for_the_default_dispatch(sglang_eplb, caplog):
    """Where SGLang's runtime config is not published, the hook cannot read the dispatch: the
    per-pass policy plans for its default (minmax) and says so, rather than failing the plan."""
    from sglang.srt import runtime_context as rc

    from eplb_plugin.integrations import sglang as plugin

    fake_runtime(ep_size=EP_SIZE, eplb_algorithm="eplb_plugin_perpass", ep_num_redundant_experts=NUM_REDUNDANT)
    rc._CONTEXT._config_bags = {}
    assert plugin._server_dispatch() is None
    assert "could not read SGLang's --ep-dispatch-algorithm" in caplog.text
