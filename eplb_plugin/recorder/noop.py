"""NoopRecorder, the recorder when recording is off (``--expert-distribution-recorder-mode``
unset): the hooks do nothing, and what needs counts raises ConfigError naming the flag."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from eplb_plugin.errors import ConfigError


class NoopRecorder:
    """The recorder when recording is off: allocates nothing, launches nothing."""

    mode = None
    recording = False

    def with_current_layer(self, layer_idx: int) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def with_debug_name(self, debug_name: str) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def disable_this_region(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def counts_discarded(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def with_forward_pass(self, forward_pass_id: int, forward_batch: Any = None, **_: Any) -> contextlib.nullcontext:
        return contextlib.nullcontext({})

    def on_select_experts(self, topk_ids: torch.Tensor, **_: Any) -> None:
        pass

    def on_deepep_dispatch_normal(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_deepep_dispatch_low_latency(self, *args: Any, **kwargs: Any) -> None:
        pass

    on_dispatch_receive_counts = on_deepep_dispatch_low_latency

    def get_current_pass_count_buffer(self, layer_idx: int) -> None:
        return None

    def select_counts_buffer(self, layer_idx: int | None = None) -> None:
        return None

    def set_physical_to_logical_map(self, new_map: torch.Tensor) -> None:
        pass

    def _off(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError("the expert distribution recorder is off: set --expert-distribution-recorder-mode to record")

    start_record = stop_record = dump_record = logical_count_window = physical_count_window = _off
    keep_window_for_eplb = _off
