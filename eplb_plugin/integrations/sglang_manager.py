"""SGLangEPLBManager: replaces SGLang's ``EPLBManager`` and drives the project's manager.

SGLang 0.5.21-0.5.23 builds it in ``ModelRunner.maybe_init_eplb_manager`` (before the model
is loaded) as::

    EPLBManager(model_config=..., get_model=..., get_expert_location_updater=...,
                get_expert_backup_client=..., get_weight_updater=...)

and calls ``on_forward_pass_end()`` after every forward pass (all ranks), plus
``disable_rebalance(reason)`` / ``enable_rebalance()`` / ``reset_generator()`` around
elastic-EP scaling and ``rebalance()`` (a generator, driven to its end) on the elastic-EP
fault path.

Start-up (the constructor, in ``ModelRunner.initialize``) refuses with a ConfigError what
would fail later: a plugin setting out of range (``EPLBArgs.check_values``, as the runtime
checks it), a policy the plugin's manager does not plan with or a move budget it cannot
take (``auto`` stands for SGLang's choice, ``sglang_checks.sglang_auto_algorithm``),
``minmax`` dispatch that SGLang's mega gate would bypass, a ``$EPLB_PLUGIN_METRICS_PORT``
that is no port or that rank 0 cannot bind (rank 0 serves the metrics from then on), a
recorder mode without counts, ``stat_approx`` without an all-to-all backend, pipeline
parallelism, or an EP size other than the default group's size (``sglang_checks``). The
project's ``EPLBManager`` is built at the first ``on_forward_pass_end()`` (the model exists
then) with:

- expert weights: the model's ``routed_experts_weights_of_layer`` (layer id -> tensors whose
  dim 0 is the local slot), read again at every access (``LiveExpertWeights``), so a weight
  reload never leaves the mover writing to dead tensors; dense layers have none, and the
  manager makes their new maps live without a move. Tensors the mover cannot write in place
  turn rebalancing off (logged); layers of different dtypes move in separate calls;
- the recorder SGLang holds (the project's, built by the ``init_new`` hook);
- the placement of SGLang's global ``ExpertLocationMetadata``; each time layers go live,
  their rows of that metadata are updated in place (``sglang_metadata``: built once per
  rebalance, LPLB solvers re-initialized under ``lp`` dispatch, ``minmax``'s tables copied
  with the rows), so dispatch uses the new map at the next pass;
- SGLang's rule for ``--eplb-min-rebalancing-utilization-threshold``;
- SGLang's default process group (SGLang's own mover uses WORLD ranks too).

Nothing raises out of ``on_forward_pass_end`` (that would kill SGLang's scheduler,
sgl-project/sglang#7224): a failed rebalance (``RebalanceError``, raised on every rank at the
same pass) is logged with its cause and serving continues on the old placement; any other
error is logged, kept in ``failures``, and turns rebalancing off for the server (a failure
building the manager on some ranks only is agreed on, so every rank turns it off together).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from eplb_plugin.algorithms.names import AUTO
from eplb_plugin.errors import ConfigError, RebalanceError, TransferError
from eplb_plugin.integrations import sglang_checks
from eplb_plugin.integrations.sglang_common import LOG_PREFIX
from eplb_plugin.integrations.sglang_metadata import MetadataPublisher, sglang_utilization_gate

logger = logging.getLogger(__name__)

METRICS_PORT_ENV = "EPLB_PLUGIN_METRICS_PORT"
# Where SGLang's rank 0 plans unless $EPLB_PLUGIN_CONFIG sets eplb_plan_in_process: measured on
# the adapter next to a busy serving loop (benchmarks/bench_sglang_planning.py, CPU), a thread
# left the loop's laps as they were and planned faster than a process (0.27 s vs 0.48 s), so
# the thread is the default; the GPU test plan measures it again where the GIL is contended.
SGLANG_PLAN_IN_PROCESS = False
_REBALANCE_POLL_S = 0.001  # rebalance(): pause between lockstep polls of the planner

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
    """EPLBArgs from SGLang's resolved flags plus ``$EPLB_PLUGIN_CONFIG`` (plugin-only fields);
    ConfigError naming the flag for a value out of range."""
    from sglang.srt.runtime_context import get_exec, get_parallel

    from eplb_plugin.args import EPLBArgs
    from eplb_plugin.integrations.sglang_common import plugin_settings

    moe = get_exec().moe
    values: dict[str, Any] = {name: getattr(moe, name) for name in _SGLANG_MOE_FIELDS if hasattr(moe, name)}
    parallel = get_parallel()
    values["ep_size"] = parallel.ep_size
    values["nnodes"] = parallel.nnodes
    values["eplb_plan_in_process"] = SGLANG_PLAN_IN_PROCESS
    values.update(plugin_settings())
    args = EPLBArgs(**values)
    args.check_values()  # the runtime's range checks; SGLang checks its own flags' layout
    return args


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
        from sglang.srt.runtime_context import get_exec

        # Start-up: everything the adapter needs from flags and the process layout is checked
        # here (SGLang builds the manager in ModelRunner.initialize), so a launch it cannot
        # serve stops now with a ConfigError instead of at the first forward pass.
        moe = get_exec().moe
        self._args = eplb_args_from_sglang()
        if self._args.eplb_algorithm == AUTO:  # the running SGLang's own choice, named from here on
            chosen = sglang_checks.sglang_auto_algorithm(_num_groups(model_config), self._args.nnodes)
            self._args = dataclasses.replace(self._args, eplb_algorithm=chosen)
        sglang_checks.check_algorithm(self._args.eplb_algorithm, self._args.ep_dispatch_algorithm)
        self._algorithm = self._args.policy()  # and a move budget only for a policy that takes one
        sglang_checks.check_recorder_mode(moe.expert_distribution_recorder_mode)
        sglang_checks.check_dispatch_algorithm(self._args.ep_dispatch_algorithm, os.environ)
        sglang_checks.check_count_source(moe.expert_distribution_recorder_mode, getattr(moe, "moe_a2a_backend", None))
        world_size, pp_size = sglang_checks.parallel_sizes()
        sglang_checks.check_parallel_layout(world_size=world_size, ep_size=self._args.ep_size, pp_size=pp_size)
        self._world_size = world_size
        self._rank = _sglang_rank(world_size)
        self._metrics = _metrics(self._args, self._rank)  # a bad or busy port stops start-up
        self._planner = None
        if self._args.eplb_plan_in_process and self._rank == 0:
            from eplb_plugin.planner_process import PlannerProcess

            # Spawned and warmed up now, during start-up, not at the first forward pass.
            self._planner = PlannerProcess(self._algorithm)
        self._model_config = model_config
        self._get_model = get_model
        self._manager: Any = None
        self._publisher: MetadataPublisher | None = None
        self._agreed_target: torch.Tensor | None = None  # target whose metadata every rank has
        self._rebalance_disabled_reason: str | None = None
        self.failures: list[BaseException] = []
        recorder = get_global_expert_distribution_recorder()
        if hasattr(recorder, "keep_window_for_eplb"):
            # EPLB's window records from now on, whatever /start_, /stop_ and
            # /dump_expert_distribution_record do to the user's session.
            recorder.keep_window_for_eplb()
        elif not recorder.recording:
            recorder.start_record()  # SGLang's own recorder: _build refuses it at the first pass
        logger.info("%s EPLBManager active: the project's manager replaces SGLang's (policy %s)",
                    LOG_PREFIX, self._algorithm)

    # ---------------------------------------------------------- SGLang's API

    def on_forward_pass_end(self) -> None:
        """Every rank, after every forward pass (SGLang's ModelRunner calls it). Never raises:
        an exception here would kill SGLang's scheduler (sgl-project/sglang#7224)."""
        if self._rebalance_disabled_reason is not None:
            return
        self._step()

    def rebalance(self) -> Iterator[None]:
        """SGLang's meaning: rebalance now from the recorded window, yielding between chunks;
        the elastic-EP fault path drives it to the end. Every rank calls it at the same point.
        A manager rebalance already in progress finishes first."""
        if self._rebalance_disabled_reason is not None:
            return
        if not self._step(advance=False):
            return
        requested = False
        while True:
            if not self._manager.busy:
                if requested:
                    return
                self._manager.rebalance_now("sglang rebalance()")
                requested = True
            if not self._step():
                return
            if self._manager.busy:
                yield
                # Lets the planning thread run while the ranks poll it in lockstep.
                time.sleep(_REBALANCE_POLL_S)

    def disable_rebalance(self, reason: str) -> None:
        self._rebalance_disabled_reason = reason

    def enable_rebalance(self) -> None:
        self._rebalance_disabled_reason = None
        self.reset_generator()

    def reset_generator(self) -> None:
        """SGLang rebuilt the placement (elastic EP): rebuild the manager from it next pass."""
        if self._manager is not None:
            self._manager.close()
        if self._publisher is not None:
            self._publisher.close()
        self._manager, self._publisher, self._agreed_target = None, None, None

    @property
    def manager(self) -> Any:
        """The project's EPLBManager (None until the first forward pass)."""
        return self._manager

    # ---------------------------------------------------------------- steps

    def _step(self, advance: bool = True) -> bool:
        """Build the manager if needed and (``advance``) advance it by one pass. Returns False
        when rebalancing is off after a failure; every failure is logged and kept in
        ``failures``, and serving continues on the placement whose weights are in place."""
        try:
            if self._manager is None:
                self._manager = self._build_on_every_rank()
            if advance:
                self._manager.on_forward_pass_end()
            return True
        except RebalanceError as exc:  # every rank, same pass: the old placement serves on
            self.failures.append(exc)
            logger.error("%s rebalance failed; serving continues on the old placement: %s",
                         LOG_PREFIX, exc, exc_info=exc)
            return True
        except Exception as exc:  # the scheduler's boundary: stored, logged, rebalancing off
            self.failures.append(exc)
            self._rebalance_disabled_reason = f"{type(exc).__name__}: {exc}"
            logger.error("%s rebalancing is off for this server (serving continues on the live "
                         "placement): %s", LOG_PREFIX, self._rebalance_disabled_reason, exc_info=exc)
            return False

    # ---------------------------------------------------------------- build

    def _build_on_every_rank(self) -> Any:
        """``_build``, agreed: every rank, at the same pass. One all-reduce of a failure flag,
        so a failure on some ranks only (weights one rank cannot move) turns rebalancing off
        on every rank, instead of the others waiting in the manager's collectives."""
        from eplb_plugin.comm import all_reduce_host

        manager, error = None, None
        try:
            manager = self._build()
        except Exception as exc:  # raised below, once every rank knows
            error = exc
        failed = all_reduce_host(torch.tensor([0.0 if error is None else 1.0]), None, op="max")[0] > 0
        if error is not None:
            raise error
        if failed:
            manager.close()
            self._publisher.close()
            self._publisher = None
            raise RuntimeError("another rank failed to build the manager (its log says why)")
        return manager

    def _build(self) -> Any:
        from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata
        from sglang.srt.runtime_context import get_exec

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
        location = ExpertLocation.from_physical_to_logical_map(
            metadata.physical_to_logical_map_cpu, num_logical_experts=metadata.num_logical_experts,
            ep_size=metadata.ep_size, source="SGLang's expert location",
        )
        weights = LiveExpertWeights(self._get_model, location.num_layers)
        sglang_checks.check_movable_weights(
            weights.by_layer(), num_local_slots=location.num_physical_experts // location.ep_size)
        rank = self._rank
        moe = get_exec().moe
        args = self._args
        self._publisher = MetadataPublisher(self._model_config, rank=rank,
                                            dispatch_algorithm=moe.ep_dispatch_algorithm)
        manager = EPLBManager(
            args,
            location=location,
            recorder=recorder,
            expert_weights=weights,
            group=None,  # the executor then uses WORLD, as SGLang's mover does
            rank=rank,
            num_groups=_num_groups(self._model_config),
            planner=self._planner,  # rank 0's planner process, if planning in a process
            metrics=self._metrics,
            on_location_change=self._publish_location,
            layers_mover=move_like_layers_together,
            ready_to_move=self._metadata_ready,
            skip_rebalance=sglang_utilization_gate(
                recorder, threshold=args.eplb_min_rebalancing_utilization_threshold,
                report_mode=moe.expert_balancedness_report_mode, group=None),
        )
        logger.info(
            "%s manager built: %d layers (%d with routed experts), %d slots over %d ranks, "
            "rebalance every %d passes", LOG_PREFIX, location.num_layers, len(weights.by_layer()),
            location.num_physical_experts, location.ep_size, args.eplb_rebalance_num_iterations,
        )
        return manager

    def _metadata_ready(self, target: Any) -> bool:
        """Every rank, at each boundary where a chunk would move: SGLang's metadata of the
        target is built (in the background) on every rank. One all-reduce per pass while any
        rank is still building; none once all agreed for this target."""
        from eplb_plugin.comm import all_reduce_host

        if self._agreed_target is not None and torch.equal(self._agreed_target, target.physical_to_logical_map):
            return True
        waiting = torch.tensor([0.0 if self._publisher.prepare(target.physical_to_logical_map) else 1.0])
        if all_reduce_host(waiting, None, op="max")[0] > 0:
            return False
        self._agreed_target = target.physical_to_logical_map.clone()
        return True

    def _publish_location(self, location: Any) -> None:
        """Make SGLang's global metadata (dispatch tables included) follow the live placement."""
        target = self._manager.target_location if self._manager is not None else None
        changed = self._publisher.publish(
            location.physical_to_logical_map, None if target is None else target.physical_to_logical_map)
        if changed:
            logger.info("%s %d layers now serve their new placement", LOG_PREFIX, len(changed))


def _num_groups(model_config: Any) -> int | None:
    """The model's expert groups (group-limited routing), as SGLang reads them; None without."""
    from sglang.srt.eplb.expert_location import ModelConfigForExpertLocation

    return getattr(ModelConfigForExpertLocation.from_model_config(model_config), "num_groups", None)


def _sglang_rank(world_size: int) -> int:
    """This process's rank in SGLang's default group (the EP rank: --ep-size == world)."""
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().tp_rank if world_size > 1 else 0


class LiveExpertWeights(Sequence):
    """The model's routed-expert tensors per layer, read from the model at every access, so a
    weight reload (which replaces the tensors) never leaves the mover writing to dead ones.

    Item ``layer``: the tensors whose dim 0 is the local slot; [] for a dense layer.
    """

    def __init__(self, get_model: Callable[[], Any], num_layers: int):
        self._get_model = get_model
        self._num_layers = num_layers

    def by_layer(self) -> dict[int, list[torch.Tensor]]:
        return dict(self._get_model().routed_experts_weights_of_layer)

    def __len__(self) -> int:
        return self._num_layers

    def __getitem__(self, layer):  # type: ignore[override]
        if isinstance(layer, slice):
            return [self[i] for i in range(*layer.indices(self._num_layers))]
        if not 0 <= layer < self._num_layers:
            raise IndexError(f"layer {layer} outside [0, {self._num_layers})")
        return list(self._get_model().routed_experts_weights_of_layer.get(layer, []))


def move_like_layers_together(layers: list[tuple], group: Any, *, layer_ids: list[int], **kwargs: Any) -> list:
    """``executor.move_layers`` over a chunk whose layers may differ in dtype or per-slot shape
    (a model with MoE layers of two kinds): each run of consecutive like layers moves in one
    call. A failure's ``index`` is made relative to the whole chunk, so the manager knows
    which layers landed."""
    from eplb_plugin.executor import move_layers
    from eplb_plugin.executor.staging import signature

    results: list = []
    start = 0
    while start < len(layers):
        end = start + 1
        while end < len(layers) and signature(layers[end][0]) == signature(layers[start][0]):
            end += 1
        try:
            results.extend(move_layers(layers[start:end], group, layer_ids=layer_ids[start:end], **kwargs))
        except TransferError as exc:
            if getattr(exc, "index", None) is not None:
                exc.index += start
            raise
        start = end
    return results


def _metrics(args: Any, rank: int) -> Any:
    """Prometheus metrics when ``--enable-expert-distribution-metrics``; served by rank 0 on
    ``127.0.0.1:$EPLB_PLUGIN_METRICS_PORT`` when that is set (SGLang's /metrics is its own).
    At start-up, once per server: ConfigError naming the variable for a value that is not a
    port (every rank) or a port rank 0 cannot serve on."""
    if not args.enable_expert_distribution_metrics:
        return None
    from eplb_plugin.metrics import EPLBMetrics

    port = _metrics_port(os.environ.get(METRICS_PORT_ENV, ""))
    metrics = EPLBMetrics()
    if port is not None and rank == 0:
        from prometheus_client import start_http_server

        try:
            start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
        except OSError as exc:
            raise ConfigError(f"{METRICS_PORT_ENV}={port}: rank 0 cannot serve metrics on 127.0.0.1:{port} "
                              f"({exc}); choose a free port or unset {METRICS_PORT_ENV}") from exc
        logger.info("%s metrics on http://127.0.0.1:%s/metrics", LOG_PREFIX, port)
    return metrics


def _metrics_port(raw: str) -> int | None:
    """``$EPLB_PLUGIN_METRICS_PORT`` as a TCP port (None: unset); ConfigError naming it otherwise."""
    raw = raw.strip()
    if not raw:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ConfigError(f"{METRICS_PORT_ENV}={raw!r} is not a TCP port in [1, 65535]")
    return int(raw)
