"""Expert distribution recorder: SGLang's surface, on-device counts, map-epoch-aware dumps."""

from __future__ import annotations

from typing import Any

from eplb_plugin.errors import ConfigError
from eplb_plugin.recorder.core import ExpertDistributionRecorder
from eplb_plugin.recorder.dump import DUMP_DIR_ENV, dump_dir, safe_dump_path
from eplb_plugin.recorder.modes import MODES, RecorderMode
from eplb_plugin.recorder.noop import NoopRecorder
from eplb_plugin.recorder.window import physical_to_logical


def create_recorder(mode: str | None, **kwargs: Any) -> ExpertDistributionRecorder | NoopRecorder:
    """The recorder for ``mode``; the no-op recorder (nothing allocated) when mode is None."""
    if mode is None:
        return NoopRecorder()
    if mode not in MODES:
        raise ConfigError(f"recorder mode={mode!r} is not one of {MODES.names()} (or None for off)")
    return ExpertDistributionRecorder(mode, **kwargs)


__all__ = [
    "DUMP_DIR_ENV",
    "MODES",
    "ExpertDistributionRecorder",
    "NoopRecorder",
    "RecorderMode",
    "create_recorder",
    "dump_dir",
    "physical_to_logical",
    "safe_dump_path",
]
