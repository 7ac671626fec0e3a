"""What each dispatch algorithm promises (a leaf module: placement policies read it without
importing the dispatcher)."""

from __future__ import annotations

from dataclasses import dataclass

from eplb_plugin.errors import ConfigError


@dataclass(frozen=True)
class DispatchInfo:
    """What a dispatch algorithm promises. honours_replica_weights: splits by planned
    weights (so a placement may be planned for a weighted split); follows_pass: the split
    depends on the pass's own counts; graph_safe: only device ops on fixed-shape tables
    (capturable in a CUDA graph); counts_slots: ``dispatch(counts_out=)`` adds the chosen
    slots to the recorder's buffer itself (no separate count kernel)."""

    name: str
    honours_replica_weights: bool
    follows_pass: bool
    graph_safe: bool
    counts_slots: bool = False


DISPATCH_INFO: dict[str, DispatchInfo] = {
    info.name: info for info in (
        DispatchInfo("static", honours_replica_weights=False, follows_pass=False, graph_safe=True),
        DispatchInfo("dynamic", honours_replica_weights=False, follows_pass=False, graph_safe=False),
        DispatchInfo("random", honours_replica_weights=False, follows_pass=False, graph_safe=False),
        DispatchInfo("weighted", honours_replica_weights=True, follows_pass=False, graph_safe=True),
        DispatchInfo("minmax", honours_replica_weights=False, follows_pass=True, graph_safe=True, counts_slots=True),
    )
}


def dispatch_info(name: str) -> DispatchInfo:
    """The facts of dispatch algorithm ``name``; ConfigError naming the known ones."""
    if name not in DISPATCH_INFO:
        raise ConfigError(f"--ep-dispatch-algorithm {name!r} is unknown; choose one of {list(DISPATCH_INFO)}")
    return DISPATCH_INFO[name]
