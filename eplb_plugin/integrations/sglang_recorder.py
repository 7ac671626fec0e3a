"""SGLang's ``ExpertDistributionRecorder.init_new(metadata, rank)`` building the project's recorder.

SGLang 0.5.19+ calls ``init_new(expert_location_metadata, rank)`` (0.5.18 and older passed
``server_args`` first) in ``ModelRunner`` and stores the result as its global recorder; every
hook (``on_select_experts``, ``on_deepep_dispatch_normal``, ``on_deepep_dispatch_low_latency``,
``with_forward_pass``, ``with_current_layer``, ``disable_this_region``, ``start_record``,
``stop_record``, ``dump_record``) is then the project's. The project's recorder already has
SGLang's surface and dump formats, so no wrapper class is needed: this module maps SGLang's
metadata and resolved flags to its constructor.

Stat dumps are summed over SGLang's default process group (as SGLang's own recorder does).
Not carried over: SGLang's per-pass ``outputs["metrics"]`` balancedness report
(``--expert-balancedness-report-mode``); the plugin reports balancedness through its own
metrics and log lines instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from eplb_plugin.integrations.sglang_common import LOG_PREFIX
from eplb_plugin.recorder.modes import MODES

logger = logging.getLogger(__name__)



PER_TOKEN_TOKENS_PER_CHUNK = 8  # SGLang sizes per_token buffers chunked_prefill_size * 8 tokens


def sglang_recorder_kwargs() -> dict[str, Any]:
    """The project's recorder options from SGLang's resolved flags (``get_exec().moe``).

    Raises ConfigError (at start-up: SGLang builds the recorder in ``ModelRunner.initialize``)
    for what SGLang's own recorder refuses: ``stat_approx`` without an all-to-all backend
    (nothing would count it), ``per_token`` with two-batch overlap (the two micro-batches'
    rows would overwrite each other).
    """
    import torch.distributed as dist
    from sglang.srt.runtime_context import get_exec

    from eplb_plugin.errors import ConfigError
    from eplb_plugin.integrations.sglang_checks import check_count_source

    execution = get_exec()
    moe = execution.moe
    mode = moe.expert_distribution_recorder_mode
    check_count_source(mode, getattr(moe, "moe_a2a_backend", None))
    kwargs: dict[str, Any] = {}
    buffer_size = getattr(moe, "expert_distribution_recorder_buffer_size", None)
    if buffer_size is not None:
        kwargs["buffer_size"] = buffer_size
    if mode in MODES.names() and MODES.get(mode).token_rows:
        if getattr(getattr(execution, "overlap", None), "enable_two_batch_overlap", False):
            raise ConfigError(
                "--expert-distribution-recorder-mode per_token with --enable-two-batch-overlap: the "
                "two micro-batches would overwrite each other's rows (SGLang refuses it too); drop one"
            )
        kwargs["max_tokens_per_pass"] = _per_token_capacity()
    if dist.is_available() and dist.is_initialized():
        kwargs["group"] = dist.group.WORLD  # SGLang's stat dump all-reduces over WORLD too
    return kwargs


def _per_token_capacity() -> int:
    """Tokens one pass may record per layer in per_token mode: SGLang's size,
    ``chunked_prefill_size * 8`` (the recorder's default where chunked prefill is off)."""
    from sglang.srt.runtime_context import get_schedule

    from eplb_plugin.recorder.core import DEFAULT_MAX_TOKENS_PER_PASS

    chunk = getattr(get_schedule(), "chunked_prefill_size", None)
    if chunk is None or chunk <= 0:
        return DEFAULT_MAX_TOKENS_PER_PASS
    return chunk * PER_TOKEN_TOKENS_PER_CHUNK


def init_new(original: Callable, expert_location_metadata: Any = None, rank: int = 0, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook body: the project's recorder when a mode is set, else SGLang's no-op."""
    from sglang.srt.runtime_context import get_exec

    from eplb_plugin.recorder import ExpertDistributionRecorder

    mode = get_exec().moe.expert_distribution_recorder_mode
    if mode is None or expert_location_metadata is None or args or kwargs:
        # Off, a model without expert-location support (SGLang asserts), or a signature
        # this adapter does not know: SGLang's own behaviour.
        return original(expert_location_metadata, rank, *args, **kwargs)
    recorder = ExpertDistributionRecorder.from_metadata(
        expert_location_metadata, rank, mode=mode, **sglang_recorder_kwargs()
    )
    logger.info(
        "%s recorder active: mode=%s, %d layers x %d slots, rank %d",
        LOG_PREFIX, mode, recorder.num_layers, recorder.num_physical_experts, rank,
    )
    return recorder
