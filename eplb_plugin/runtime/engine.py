"""RankEngine: one EP rank's state and pass body for one run (``runtime/serving.py`` serves the
passes around it: ``RunLoop(engine).run()``).

Each pass, on every rank (the loop is collective: every rank runs the same passes):

1. Take this rank's shard of the pass's global batch (the workload is deterministic, so
   ranks agree without talking) and its hidden states (deterministic from (seed, pass)).
2. Run every MoE layer (``ep_moe_forward``: dispatch, exchange, experts, results back),
   chained ``h = h + MoE_l(rms_normalize(h))``, inside the recorder's pass; on CUDA the
   layers replay as one captured graph where possible (``runtime/graphs.py``). Every rank
   starts the pass together (``align_ranks``) and the pass is timed to its last kernel.
3. One SUM all-reduce of a small vector: the HTTP command from rank 0, every slot's
   received pairs [L, P], every rank's MoE step time and expert compute time. All ranks
   then know the pass's per-GPU loads (balancedness) and act on the command together.
4. ``manager.on_forward_pass_end()``: the manager may plan, move weights and switch maps
   (then ``on_location_change`` rebuilds the dispatcher). Its time is the pass's stall.

At the end every slot's weights are checked against the fingerprint of the logical expert
the final map says it holds.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from eplb_plugin.algorithms import split_for_dispatch
from eplb_plugin.balance import gpu_loads, layer_balancedness
from eplb_plugin.dispatch import ExpertDispatcher
from eplb_plugin.errors import ConfigError
from eplb_plugin.location import ExpertLocation
from eplb_plugin.location_files import load_init_expert_location
from eplb_plugin.recorder import MODES, create_recorder
from eplb_plugin.runtime.config import RunSpec, RuntimeConfig
from eplb_plugin.runtime.graphs import PassGraph, capture_agreed
from eplb_plugin.runtime.http import ControlChannel
from eplb_plugin.runtime.moe import (
    default_exchange,
    ep_moe_forward,
    grouped_mm_available,
    rms_normalize,
)
from eplb_plugin.runtime.series import PassSeries, PassStats, pack_pass_stats, unpack_pass_stats
from eplb_plugin.runtime.supervise import stop_reason
from eplb_plugin.runtime.weights import FFNShape, build_rank_weights
from eplb_plugin.runtime.workload import shard_tokens

logger = logging.getLogger(__name__)

DEFAULT_MANAGER = "eplb_plugin.manager:EPLBManager"


def resolve_factory(spec: str) -> Any:
    """Import ``"module:attr"``."""
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"manager factory {spec!r} cannot be imported ({exc})") from exc


def make_hidden(pass_id: int, num_tokens: int, hidden_size: int, *, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[T, H] the pass's token activations, deterministic from (seed, pass_id) per device type."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + pass_id)
    return torch.randn(num_tokens, hidden_size, generator=g, device=device).to(dtype)


class RankEngine:
    """One rank's state for one run: placement, weights, dispatcher, recorder, manager.

    group: the EP process group (None with one rank). channel: HTTP commands (rank 0 only).
    store: the launcher's store, where a rank marks itself when a peer is lost (or None).
    should_stop: this rank's stop request (a signal, its launcher gone) or None; every rank's
    vote travels in the per-pass all-reduce, so all stop after the same pass.
    """

    def __init__(
        self, cfg: RuntimeConfig, run: RunSpec, *, rank: int, world_size: int, group: Any,
        device: torch.device, channel: ControlChannel | None = None, metrics: Any = None,
        store: Any = None, should_stop: Callable[[], str | None] = stop_reason,
    ):
        self.cfg, self.run_spec, self.rank, self.world_size, self.group = cfg, run, rank, world_size, group
        self.device, self.channel, self.metrics = device, channel, metrics
        self.store, self.should_stop = store, should_stop  # see runtime/supervise.py
        self.stopped: str | None = None  # why the run ended before its last pass
        model, args = cfg.model, run.eplb
        self.model = model
        num_physical = model.num_logical_experts + args.ep_num_redundant_experts
        self.location: ExpertLocation = load_init_expert_location(
            args.init_expert_location, num_layers=model.num_layers, num_logical_experts=model.num_logical_experts,
            num_physical_experts=num_physical, ep_size=world_size, num_nodes=args.nnodes,
            num_groups=model.num_groups,
            algorithm=args.policy(model.num_groups), split=split_for_dispatch(args.ep_dispatch_algorithm),
            dispatch=args.ep_dispatch_algorithm,
        )
        self.initial_map = self.location.physical_to_logical_map.clone()
        self.shape = FFNShape(model.hidden_size, model.intermediate_size, cfg.torch_dtype, device, cfg.seed)
        self.weights = build_rank_weights(self.location, rank, self.shape)
        self.workload = run.workload.build(model, cfg.batch_tokens)
        self.tokens = shard_tokens(cfg.batch_tokens, rank=rank, world_size=world_size)
        self.tokens_per_rank = -(-cfg.batch_tokens // world_size)  # every rank pads to this
        self.exchange = cfg.exchange or default_exchange(device)
        self.recorder = create_recorder(
            args.expert_distribution_recorder_mode,
            **self._recorder_kwargs(args),
        )
        self.dispatch_algorithm = args.ep_dispatch_algorithm or "static"
        self.dispatcher = self._make_dispatcher(self.location)
        self.manager: Any = None  # the factory's manager (EPLBManager by default) when EPLB is on
        if args.enable_eplb:
            factory = resolve_factory(run.manager_factory or cfg.manager_factory or DEFAULT_MANAGER)
            self.manager = factory(
                args, location=self.location, recorder=self.recorder, expert_weights=self.weights,
                group=group, rank=rank, num_groups=model.num_groups, metrics=metrics,
                on_location_change=self._on_location_change,
            )
        elif args.expert_balancedness_report_mode != "off" or args.enable_expert_distribution_metrics:
            self.recorder.start_record()  # SGLang starts recording when it reports balancedness
        self.series = PassSeries(run.num_passes, num_layers=model.num_layers, world_size=world_size)
        self.rebalance_failures: list[str] = []  # the newest FAILURES_KEPT (runtime/serving.py)
        self.rebalance_failures_total = 0
        self._graph: PassGraph | None = None
        self._graph_wanted = self.graphable()
        self.graph_captures = 0
        self._align_token = torch.zeros(1, device=device)

    def _recorder_kwargs(self, args: Any) -> dict[str, Any]:
        if args.expert_distribution_recorder_mode is None:
            return {}
        buffer = args.expert_distribution_recorder_buffer_size
        return dict(
            physical_to_logical_map=self.location.physical_to_logical_map.to(self.device),
            num_logical_experts=self.model.num_logical_experts,
            buffer_size=buffer if buffer is not None else args.eplb_rebalance_num_iterations,
            device=self.device, rank=self.rank, ep_size=self.world_size, group=self.group,
            dump_dir=self.cfg.dump_dir, top_k=self.model.top_k,
            max_tokens_per_pass=self.tokens.stop - self.tokens.start,
        )

    def _make_dispatcher(self, location: ExpertLocation) -> ExpertDispatcher:
        return ExpertDispatcher(
            location, rank=self.rank, algorithm=self.dispatch_algorithm,
            num_gpus_per_node=self.world_size // self.run_spec.eplb.nnodes, device=self.device,
            generator=torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.rank),
            backend=self.cfg.dispatch_backend,
            count_group=self.group if self.cfg.dispatch_counts == "global" and self.world_size > 1 else None,
            minmax_steps=self.run_spec.eplb.eplb_dispatch_minmax_steps,
            whole_pass=self.world_size == 1,  # one rank routes every token (several: their own, or exchanged)
        )

    def _on_location_change(self, location: ExpertLocation) -> None:
        """Called by the manager on the serving thread once a new map is live on every rank."""
        self.location = location
        # A captured pass reads the dispatcher's tables: the new ones go into the same
        # memory (stream-ordered before the next replay), so the graph stays valid.
        if self._graph is not None and self.dispatcher.update_(location):
            return
        self._graph = None  # capture again at the next pass (if passes run as graphs)
        self.dispatcher = self._make_dispatcher(location)

    # ------------------------------------------------------------------ one pass

    def inputs(self, pass_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of pass ``pass_id``: (hidden [t, H], topk_ids [L, t, k] logical,
        topk_weights [L, t, k]) on the device, layer-major and contiguous so that each layer's
        [t, k] slice is contiguous (no per-layer copies inside the pass). Not part of the MoE
        step's time."""
        batch = self.workload.batch(pass_id)
        ids = batch.topk_ids[self.tokens].to(self.device).transpose(0, 1).contiguous()
        topk_weights = batch.topk_weights[self.tokens].to(self.device).transpose(0, 1).contiguous()
        h = make_hidden(pass_id, self.cfg.batch_tokens, self.model.hidden_size, seed=self.cfg.seed,
                        dtype=self.cfg.torch_dtype, device=self.device)[self.tokens]
        return h, ids, topk_weights

    def forward(self, pass_id: int, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Run pass ``pass_id`` (``inputs`` from ``self.inputs(pass_id)``) through every MoE
        layer. Collective.

        Returns (this rank's final hidden states [t, H], received pairs per local slot
        [L, S] int64, expert compute seconds).
        """
        h, ids, topk_weights = inputs
        with self.recorder.with_forward_pass(pass_id):
            if self._graph is not None:
                h, received = self._graph.replay(h, ids, topk_weights)
                return h, received, 0.0
            return self._layers(h, ids, topk_weights)

    def _layers(self, h: torch.Tensor, ids: torch.Tensor, topk_weights: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Every MoE layer on this rank's tokens (the pass body; collective)."""
        received = []
        compute_s = 0.0
        for layer in range(self.model.num_layers):
            with self.recorder.with_current_layer(layer):
                res = ep_moe_forward(
                    rms_normalize(h), ids[layer], topk_weights[layer], layer=layer,
                    dispatcher=self.dispatcher, weights=self.weights[layer], recorder=self.recorder,
                    group=self.group, world_size=self.world_size, rank=self.rank,
                    tokens_per_rank=self.tokens_per_rank, exchange=self.exchange,
                )
            h = h + res.out
            received.append(res.recv_counts)
            compute_s += res.compute_s
        return h, torch.stack(received), compute_s

    def graphable(self) -> bool:
        """Whether passes run as a CUDA graph: CUDA, asked for, the gather exchange (fixed
        shapes; alltoall reads split sizes on the host), a dispatch made of device ops
        on tables (``DispatchInfo.graph_safe``: static, weighted, minmax; ``random`` and
        ``dynamic`` draw from a host-seeded generator),
        a recorder mode whose hooks only count (``RecorderMode.graph_safe``; per_token also
        copies ids per pass), and the grouped-GEMM expert path (else the experts read the slot
        ends on the host, which a capture cannot do)."""
        mode = self.run_spec.eplb.expert_distribution_recorder_mode
        return (self.device.type == "cuda" and self.cfg.cuda_graph and self.exchange == "gather"
                and self.dispatcher.info.graph_safe and (mode is None or MODES.get(mode).graph_safe)
                and grouped_mm_available(self.cfg.torch_dtype, self.device))

    def ensure_graph(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
        """Capture the pass if it should run as a graph and none is live (collective).
        Returns the seconds spent (a stall: the pass waits for it)."""
        if self._graph is not None or not self._graph_wanted:
            return 0.0
        start = time.perf_counter()
        body = lambda h, ids, w: self._layers(h, ids, w)[:2]  # noqa: E731
        with self.recorder.counts_discarded():  # the warm-up passes are not traffic
            self._graph = capture_agreed(body, inputs, group=self.group)
        self._graph_wanted = self._graph is not None  # a failed capture is not retried
        self.graph_captures += 1
        return time.perf_counter() - start

    def align_ranks(self) -> None:
        """Wait until this rank's GPU is idle and every rank got here (collective), so that a
        pass's step time measures the pass, not how much later another rank started it
        (preparing a pass's inputs takes each rank a different host time)."""
        if self.world_size > 1:
            import torch.distributed as dist

            # On NCCL the all-reduce runs after this rank's queued work, and completes once
            # every rank's did: the synchronize below then covers both waits.
            dist.all_reduce(self._align_token, group=self.group)  # returns once every rank sent
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def pass_stats(self, received: torch.Tensor, step_s: float, compute_s: float, *, command: int,
                    stop: bool) -> PassStats:
        """The pass's one SUM all-reduce (collective; ``runtime/series.py`` lays it out)."""
        vec = pack_pass_stats(received, command=command, rank=self.rank, world_size=self.world_size,
                              step_s=step_s, compute_s=compute_s, stop=stop)
        if self.world_size > 1:
            import torch.distributed as dist

            comm = vec.to(self.device) if self.device.type == "cuda" else vec  # NCCL needs device tensors
            dist.all_reduce(comm, group=self.group)
            vec = comm.cpu()
        return unpack_pass_stats(vec, num_layers=self.model.num_layers,
                                 num_physical=self.location.num_physical_experts, world_size=self.world_size)

    def account(self, p: int, stats: PassStats) -> None:
        """Note pass ``p``'s all-reduced stats in the series (and rank 0's metrics)."""
        loads = gpu_loads(stats.slot_counts, self.world_size)  # [L, W] pairs each GPU computed
        self.series.gpu_load[p] = loads.numpy()
        self.series.balancedness[p] = float(layer_balancedness(loads).mean())
        self.series.step_s[p] = stats.step_s
        self.series.compute_s[p] = stats.compute_s
        if self.metrics is not None and self.rank == 0:
            self.metrics.update_from_counts(stats.slot_counts, self.world_size)

    def history(self) -> list[Any]:
        """The manager's rebalance records kept (the newest; none without a manager)."""
        return list(getattr(self.manager, "history", []) or [])

