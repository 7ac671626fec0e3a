"""Registries: the registry type, and each registry against its flag and its facts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from eplb_plugin.errors import ConfigError
from eplb_plugin.registry import Registry


@dataclass(frozen=True)
class _Entry:
    name: str
    size: int


def test_register_returns_the_entry_and_get_finds_it_by_name():
    """register hands back what it registered (usable as a decorator); get returns it by name."""
    registry: Registry[_Entry] = Registry("widget")
    entry = _Entry("small", 1)
    assert registry.register(entry) is entry
    registry.register(_Entry("large", 9))
    assert registry.get("small") is entry
    assert registry.names() == ("small", "large") and list(registry) == ["small", "large"]
    assert "large" in registry and "huge" not in registry and len(registry) == 2


def test_an_unknown_name_is_a_config_error_listing_the_known_names():
    """get of an unknown name raises ConfigError naming the choice, the name and every known one."""
    registry: Registry[_Entry] = Registry("--widget")
    registry.register(_Entry("small", 1))
    registry.register(_Entry("large", 9))
    with pytest.raises(ConfigError, match=r"--widget 'huge' is unknown; choose one of \['small', 'large'\]"):
        registry.get("huge")


def test_a_name_registered_twice_or_missing_is_refused():
    """A second entry of one name, or an entry without a string name, is a ConfigError."""
    registry: Registry[_Entry] = Registry("widget")
    registry.register(_Entry("small", 1))
    with pytest.raises(ConfigError, match="'small' is registered twice"):
        registry.register(_Entry("small", 2))
    with pytest.raises(ConfigError, match="non-empty string name"):
        registry.register(object())  # type: ignore[arg-type]
    assert registry.get("small").size == 1


def test_dispatch_registry_matches_the_flag_and_states_each_algorithms_facts():
    """--ep-dispatch-algorithm's Literal names the registered algorithms, in order; only
    weighted honours replica weights, only minmax follows the pass, random draws are not
    graph-safe, and the table (static) and minmax dispatchers count the slots they map."""
    from eplb_plugin.args import DISPATCH_ALGORITHMS
    from eplb_plugin.dispatch_info import DISPATCH_INFO, dispatch_info

    assert DISPATCH_INFO.names() == DISPATCH_ALGORITHMS
    facts = {n: dispatch_info(n) for n in DISPATCH_INFO}
    assert [n for n, f in facts.items() if f.honours_replica_weights] == ["weighted"]
    assert [n for n, f in facts.items() if f.follows_pass] == ["minmax"]
    assert [n for n, f in facts.items() if not f.graph_safe] == ["random", "dynamic"]
    assert [n for n, f in facts.items() if f.counts_slots] == ["static", "minmax"]
    with pytest.raises(ConfigError, match="--ep-dispatch-algorithm 'lp' is unknown"):
        dispatch_info("lp")


def test_policy_registry_states_which_policies_plan_per_pass_and_which_sglang_has():
    """Every registered policy plans through plan(); the per-pass ones and SGLang's own are
    the registered facts, and the views callers read (ALGORITHMS, PER_PASS_POLICIES) agree."""
    from eplb_plugin.algorithms import ALGORITHMS, PER_PASS_POLICIES, POLICIES, resolve_algorithm

    assert list(ALGORITHMS) == list(POLICIES)
    assert PER_PASS_POLICIES == {"deepseek_vec", "eplb_plugin_perpass"}
    assert {p.name for p in POLICIES.entries() if p.sglang_has_it} == {"deepseek", "deepseek_hierarchical",
                                                                       "deepseek_vec"}
    assert all(p.suits for p in POLICIES.entries())
    from eplb_plugin.integrations.sglang import plugin_algorithm_names

    assert set(plugin_algorithm_names()) == {p.name for p in POLICIES.entries() if not p.sglang_has_it}
    assert resolve_algorithm("eplb_plugin") == "eplb_plugin"
    with pytest.raises(ConfigError, match="unknown algorithm 'greedy'; known: auto, eplb_plugin"):
        resolve_algorithm("greedy")


@pytest.mark.parametrize(("num_groups", "num_nodes", "expected"), [
    (None, 1, "deepseek"), (8, 1, "deepseek_hierarchical"), (8, 2, "deepseek_hierarchical"), (8, 3, "deepseek"),
    (6, 4, "deepseek"), (1, 1, "deepseek_hierarchical")])
def test_auto_means_sglangs_choice_everywhere(num_groups, num_nodes, expected):
    """``auto`` is SGLang's name (its --eplb-algorithm default): deepseek_hierarchical where the
    model's expert groups divide over the nodes, else deepseek, in the library, the CLI and the
    runtime alike; the project's own policy goes by its name."""
    from eplb_plugin.algorithms import DEFAULT_ALGORITHM, plan, resolve_algorithm
    from eplb_plugin.args import EPLBArgs

    assert resolve_algorithm("auto", num_groups=num_groups, num_nodes=num_nodes) == expected
    assert EPLBArgs(eplb_algorithm="auto", nnodes=num_nodes).policy(num_groups=num_groups) == expected
    assert EPLBArgs().policy() == DEFAULT_ALGORITHM == "eplb_plugin"  # the runtime's default names it
    import torch

    counts = torch.rand(2, 24) * 100
    kw = dict(num_physical_experts=48, num_gpus=24, num_nodes=num_nodes, num_groups=num_groups)
    ours = plan(counts, algorithm="auto", **kw).physical_to_logical_map
    assert torch.equal(ours, plan(counts, algorithm=expected, **kw).physical_to_logical_map)


def test_auto_matches_sglangs_compute_algorithm():
    """The rule ``auto`` resolves by is SGLang's own ``compute_algorithm``, asked on a grid."""
    eplb_algorithms = pytest.importorskip("sglang.srt.eplb.eplb_algorithms")
    from eplb_plugin.algorithms import resolve_algorithm

    for num_groups in (None, 1, 2, 3, 4, 6, 8, 16):
        for num_nodes in (1, 2, 3, 4, 8):
            theirs = eplb_algorithms.compute_algorithm("auto", num_groups, num_nodes).name
            assert resolve_algorithm("auto", num_groups=num_groups, num_nodes=num_nodes) == theirs


def test_a_policy_registered_in_one_place_plans_through_plan(monkeypatch):
    """Adding a policy is one registration: plan() and resolve_algorithm() then know it."""
    import numpy as np
    import torch

    from eplb_plugin import algorithms

    def trivial(weight, num_physical, *, num_gpus, num_nodes, num_groups, previous, per_pass=None, split="equal"):
        return np.arange(num_physical)[None].repeat(weight.shape[0], 0) % weight.shape[1], None

    registry: Registry[algorithms.Policy] = Registry("placement policy")
    for policy in algorithms.POLICIES.entries():
        registry.register(policy)
    registry.register(algorithms.Policy("round_robin", trivial, "a test policy"))
    monkeypatch.setattr(algorithms, "POLICIES", registry)
    placement = algorithms.plan(torch.ones(2, 4), num_physical_experts=6, num_gpus=2, algorithm="round_robin")
    assert placement.physical_to_logical_map.tolist() == [[0, 1, 2, 3, 0, 1]] * 2


def test_recorder_mode_registry_matches_the_flag_and_states_each_modes_facts():
    """--expert-distribution-recorder-mode's Literal names the registered mode types, in order;
    the modes EPLB accepts are those that feed rebalancing, per_token alone is not graph-safe
    and keeps token rows, stat_approx alone counts from the dispatcher, and each mode is
    registered under its name."""
    from eplb_plugin.args import COUNTING_RECORDER_MODES, RECORDER_MODES
    from eplb_plugin.recorder import MODES

    assert MODES.names() == RECORDER_MODES
    assert all(MODES.get(name).name == name for name in MODES)
    assert tuple(n for n in MODES if MODES.get(n).feeds_rebalancing) == COUNTING_RECORDER_MODES
    assert [n for n in MODES if not MODES.get(n).graph_safe] == ["per_token"]
    assert [n for n in MODES if MODES.get(n).count_source == "dispatch"] == ["stat_approx"]
    assert [n for n in MODES if MODES.get(n).token_rows] == ["per_token"]
    with pytest.raises(ConfigError, match="recorder mode 'stats' is unknown; choose one of"):
        MODES.get("stats")


def test_transport_registry_matches_the_flag_and_only_ipc_requires_pulls():
    """--eplb-transport's Literal names the registered transports, in order; nccl never pulls,
    auto pulls where it can, ipc pulls or refuses."""
    from eplb_plugin.args import TRANSPORT_NAMES
    from eplb_plugin.transports import TRANSPORTS

    assert TRANSPORTS.names() == TRANSPORT_NAMES
    assert [n for n in TRANSPORTS if TRANSPORTS.get(n).pulls] == ["ipc", "auto"]
    assert [n for n in TRANSPORTS if TRANSPORTS.get(n).requires_pulls] == ["ipc"]
    with pytest.raises(ConfigError, match="--eplb-transport 'rdma' is unknown; choose one of"):
        TRANSPORTS.get("rdma")
