"""What each dispatch algorithm promises (a leaf module: placement policies read it without
importing the dispatcher). ``DISPATCH_INFO`` is the registry of algorithms; the flag's
``Literal`` in ``args.py`` is tested against it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
