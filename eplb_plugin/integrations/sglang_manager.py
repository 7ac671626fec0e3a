"""SGLangEPLBManager: replaces SGLang's ``EPLBManager`` and drives the project's manager.

SGLang 0.5.21-0.5.23 builds it in ``ModelRunner.maybe_init_eplb_manager`` (before the model
is loaded) as::

    EPLBManager(model_config=..., get_model=..., get_expert_location_updater=...,
                get_expert_backup_client=..., get_weight_updater=...)

and calls ``on_forward_pass_end()`` after every forward pass (all ranks), plus
``disable_rebalance(reason)`` / ``enable_rebalance()`` / ``reset_generator()`` around
elastic-EP scaling. The project's ``EPLBManager`` is built at the first
``on_forward_pass_end()`` (the model exists then) with:

- expert weights: the model's ``routed_experts_weights_of_layer`` (layer id -> tensors whose
  dim 0 is the local slot); layers without routed experts (dense layers) have none, and the
  manager makes their new maps live without a move;
- the recorder SGLang holds (the project's, built by the ``init_new`` hook);
- the placement of SGLang's global ``ExpertLocationMetadata``; each time layers go live, that
  metadata is updated in place for those layers (as SGLang's updater does), so dispatch uses
  the new map at the next pass;
- SGLang's default process group (SGLang's own mover uses WORLD ranks too).

A failed rebalance (``RebalanceError``, raised on every rank at the same pass) is logged with
its cause and serving continues on the old placement: raising it out of the forward pass
would kill SGLang's scheduler (sgl-project/sglang#7224).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from eplb_plugin.errors import ConfigError, RebalanceError
from eplb_plugin.integrations.sglang import LOG_PREFIX

logger = logging.getLogger(__name__)

METRICS_PORT_ENV = "EPLB_PLUGIN_METRICS_PORT"

# EPLBArgs field -> SGLang's resolved ``get_exec().moe`` leaf of the same meaning.
_SGLANG_MOE_FIELDS = (
    "enable_eplb",
    "eplb_algorithm",
    "eplb_rebalance_num_iterations",
    "eplb_rebalance_layers_per_chunk",
    "eplb_min_rebalancing_utilization_threshold",
    "expert_distribution_recorder_mode",
    "expert_distribution_recorder_buffer_size",
    "expert_balancedness_report_mode",
    "ep_num_redundant_experts",
    "ep_dispatch_algorithm",
    "init_expert_location",
)


def eplb_args_from_sglang() -> Any:
    """EPLBArgs from SGLang's resolved flags plus ``$EPLB_PLUGIN_CONFIG`` (plugin-only fields)."""
    from sglang.srt.runtime_context import get_exec, get_parallel

    from eplb_plugin.args import EPLBArgs
    from eplb_plugin.integrations.sglang import plugin_settings

    moe = get_exec().moe
    values: dict[str, Any] = {name: getattr(moe, name) for name in _SGLANG_MOE_FIELDS if hasattr(moe, name)}
    parallel = get_parallel()
    values["ep_size"] = parallel.ep_size
    values["nnodes"] = parallel.nnodes
    values.update(plugin_settings())
    return EPLBArgs(**values)


class SGLangEPLBManager:
    """SGLang's ``EPLBManager`` signature over the project's manager (see the module doc)."""

    def __init__(
        self,
        *,
        model_config: Any,
        get_model: Callable[[], Any],
        get_expert_location_updater: Callable[[], Any] | None = None,
        get_expert_backup_client: Callable[[], Any] | None = None,
        get_weight_updater: Callable[[], Any] | None = None,
        **unused: Any,
    ):
        from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder

        self._model_config = model_config
        self._get_model = get_model
        self._manager: Any = None
        self._weights_of_layer: dict[int, list[torch.Tensor]] = {}
        self._rebalance_disabled_reason: str | None = None
        self.failures: list[RebalanceError] = []
        recorder = get_global_expert_distribution_recorder()
        if hasattr(recorder, "keep_window_for_eplb"):
            # EPLB's window records from now on, whatever /start_, /stop_ and
            # /dump_expert_distribution_record do to the user's session.
            recorder.keep_window_for_eplb()
        elif not recorder.recording:
            recorder.start_record()  # SGLang's own recorder: _build refuses it at the first pass
        logger.info("%s EPLBManager active: the project's manager replaces SGLang's", LOG_PREFIX)

    # ---------------------------------------------------------- SGLang's API

    def on_forward_pass_end(self) -> None:
        """Every rank, after every forward pass (SGLang's ModelRunner calls it)."""
        if self._rebalance_disabled_reason is not None:
            return
        if self._manager is None:
            self._manager = self._build()
        try:
            self._manager.on_forward_pass_end()
        except RebalanceError as exc:
            self.failures.append(exc)
            logger.error("%s rebalance failed; serving continues on the old placement: %s",
                         LOG_PREFIX, exc, exc_info=exc)

    def disable_rebalance(self, reason: str) -> None:
        self._rebalance_disabled_reason = reason

    def enable_rebalance(self) -> None:
        self._rebalance_disabled_reason = None
        self.reset_generator()

    def reset_generator(self) -> None:
        """SGLang rebuilt the placement (elastic EP): rebuild the manager from it next pass."""
        if self._manager is not None:
            self._manager.close()
        self._manager = None

    @property
    def manager(self) -> Any:
        """The project's EPLBManager (None until the first forward pass)."""
        return self._manager

    # ---------------------------------------------------------------- build

    def _build(self) -> Any:
        import torch.distributed as dist
        from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder
        from sglang.srt.eplb.expert_location import (
            ModelConfigForExpertLocation,
            get_global_expert_location_metadata,
        )
        from sglang.srt.runtime_context import get_parallel

        from eplb_plugin.location import ExpertLocation
        from eplb_plugin.manager import EPLBManager
        from eplb_plugin.recorder import ExpertDistributionRecorder

        metadata = get_global_expert_location_metadata()
        recorder = get_global_expert_distribution_recorder()
        if not isinstance(recorder, ExpertDistributionRecorder):
            raise ConfigError(
                f"SGLang's recorder is {type(recorder).__name__}, not the plugin's: is the "
                "ExpertDistributionRecorder.init_new hook applied (SGLANG_PLUGINS excludes eplb_plugin?)"
            )
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != metadata.ep_size:
            raise ConfigError(
                f"the plugin moves weights over SGLang's default group ({world} ranks), but "
                f"--ep-size is {metadata.ep_size}; pipeline parallelism with EPLB is not supported"
            )
        self._weights_of_layer = dict(self._get_model().routed_experts_weights_of_layer)
        location = ExpertLocation.from_physical_to_logical_map(
            metadata.physical_to_logical_map_cpu, num_logical_experts=metadata.num_logical_experts,
            ep_size=metadata.ep_size, source="SGLang's expert location",
        )
        layout = ModelConfigForExpertLocation.from_model_config(self._model_config)
        self._rank = get_parallel().tp_rank if world > 1 else 0
        args = eplb_args_from_sglang()
        manager = EPLBManager(
            args,
            location=location,
            recorder=recorder,
            expert_weights=[self._weights_of_layer.get(layer, []) for layer in range(location.num_layers)],
            group=None,  # the executor then uses WORLD, as SGLang's mover does
            rank=self._rank,
            num_groups=getattr(layout, "num_groups", None),
            metrics=_metrics(args, self._rank),
            on_location_change=self._publish_location,
        )
        logger.info(
            "%s manager built: %d layers (%d with routed experts), %d slots over %d ranks, "
            "rebalance every %d passes", LOG_PREFIX, location.num_layers, len(self._weights_of_layer),
            location.num_physical_experts, location.ep_size, args.eplb_rebalance_num_iterations,
        )
        return manager

    def _publish_location(self, location: Any) -> None:
        """Make SGLang's global metadata (dispatch tables included) follow the live placement."""
        from sglang.srt.eplb.expert_location import (
            ExpertLocationMetadata,
            get_global_expert_location_metadata,
        )

        current = get_global_expert_location_metadata()
        new_map = location.physical_to_logical_map
        changed = (current.physical_to_logical_map_cpu != new_map).any(dim=1).nonzero().flatten().tolist()
        if not changed:
            return
        new_metadata = ExpertLocationMetadata.init_by_mapping(
            self._model_config, new_map, moe_ep_rank=self._rank
        )
        current.update(new_metadata, update_layer_ids=changed)
        logger.info("%s %d layers now serve their new placement", LOG_PREFIX, len(changed))


def _metrics(args: Any, rank: int) -> Any:
    """Prometheus metrics when ``--enable-expert-distribution-metrics``; served by rank 0 on
    ``127.0.0.1:$EPLB_PLUGIN_METRICS_PORT`` when that is set (SGLang's /metrics is its own)."""
    if not args.enable_expert_distribution_metrics:
        return None
    from eplb_plugin.metrics import EPLBMetrics

    metrics = EPLBMetrics()
    port = os.environ.get(METRICS_PORT_ENV)
    if port and rank == 0:
        from prometheus_client import start_http_server

        start_http_server(int(port), addr="127.0.0.1", registry=metrics.registry)
        logger.info("%s metrics on http://127.0.0.1:%s/metrics", LOG_PREFIX, port)
    return metrics
