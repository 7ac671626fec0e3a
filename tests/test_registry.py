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
    graph-safe."""
    from eplb_plugin.args import DISPATCH_ALGORITHMS
    from eplb_plugin.dispatch_info import DISPATCH_INFO, dispatch_info

    assert DISPATCH_INFO.names() == DISPATCH_ALGORITHMS
    facts = {n: dispatch_info(n) for n in DISPATCH_INFO}
    assert [n for n, f in facts.items() if f.honours_replica_weights] == ["weighted"]
    assert [n for n, f in facts.items() if f.follows_pass] == ["minmax"]
    assert [n for n, f in facts.items() if not f.graph_safe] == ["random", "dynamic"]
    with pytest.raises(ConfigError, match="--ep-dispatch-algorithm 'lp' is unknown"):
        dispatch_info("lp")
