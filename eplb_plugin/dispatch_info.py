"""What each dispatch algorithm promises (a leaf module: placement policies read it without
importing the dispatcher). ``DISPATCH_INFO`` is the registry of algorithms; the flag's
``Literal`` in ``args.py`` is tested against it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from eplb_plugin.errors import ConfigError
from eplb_plugin.registry import Registry

# How a token's replica is picked: a fixed per-rank table, uniformly at random, by the
# planned replica shares in occurrence order, or by the pass's minmax split.
Pick = Literal["table", "uniform", "shares", "minmax"]


@dataclass(frozen=True)
class DispatchInfo:
    """What a dispatch algorithm promises. honours_replica_weights: splits by planned
    weights (so a placement may be planned for a weighted split); follows_pass: the split
    depends on the pass's own counts; graph_safe: only device ops on fixed-shape tables
    (capturable in a CUDA graph); counts_slots: ``dispatch(counts_out=)`` adds the chosen
    slots to the recorder's buffer itself, in the kernel that maps them (no separate count
    kernel); pick: how ``ExpertDispatcher`` chooses the replica."""

    name: str
    honours_replica_weights: bool
    follows_pass: bool
    graph_safe: bool
    pick: Pick
    counts_slots: bool = False


DISPATCH_INFO: Registry[DispatchInfo] = Registry("--ep-dispatch-algorithm")
DISPATCH_INFO.register(DispatchInfo("static", honours_replica_weights=False, follows_pass=False, graph_safe=True,
                                    pick="table", counts_slots=True))
DISPATCH_INFO.register(DispatchInfo("random", honours_replica_weights=False, follows_pass=False, graph_safe=False,
                                    pick="uniform"))
DISPATCH_INFO.register(DispatchInfo("dynamic", honours_replica_weights=False, follows_pass=False, graph_safe=False,
                                    pick="uniform"))
DISPATCH_INFO.register(DispatchInfo("weighted", honours_replica_weights=True, follows_pass=False, graph_safe=True,
                                    pick="shares"))
DISPATCH_INFO.register(DispatchInfo("minmax", honours_replica_weights=False, follows_pass=True, graph_safe=True,
                                    pick="minmax", counts_slots=True))


def dispatch_info(name: str) -> DispatchInfo:
    """The facts of dispatch algorithm ``name``; ConfigError naming the known ones."""
    return DISPATCH_INFO.get(name)


# SGLang's own --ep-dispatch-algorithm names that the registry above does not hold, and whether
# each follows the pass: ``lp`` solves each batch's split (SGLang's LPLB), ``fake`` spreads evenly.
SGLANG_ONLY_FOLLOWS_PASS = {"fake": False, "lp": True}


def follows_pass(name: str) -> bool:
    """Whether dispatch ``name`` (the project's, or one of SGLang's own) splits each pass by the
    pass's own counts; the others spread an expert's tokens over its replicas the same way
    whatever the pass. ConfigError naming the known names for an unknown one."""
    if isinstance(name, str) and name in SGLANG_ONLY_FOLLOWS_PASS:
        return SGLANG_ONLY_FOLLOWS_PASS[name]
    if not isinstance(name, str) or name not in DISPATCH_INFO:
        raise ConfigError(f"dispatch {name!r} is unknown; choose one of "
                          f"{[*DISPATCH_INFO.names(), *SGLANG_ONLY_FOLLOWS_PASS]}")
    return DISPATCH_INFO.get(name).follows_pass
