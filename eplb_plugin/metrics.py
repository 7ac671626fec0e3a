"""Prometheus metrics for EPLB: balancedness, expert loads, rebalances, moves.

``EPLBMetrics`` owns its own ``CollectorRegistry`` (several instances and tests never
collide). Balancedness comes from device counts without a per-pass host sync:
``update_from_counts`` starts a non-blocking copy into pinned host memory and records a CUDA
event; the copy is read (and the gauges set) at a later call, ``poll()`` or ``render()``,
once the event has completed. On CPU the copy is immediate.

Names (all prefixed ``eplb_``): ``balancedness`` (mean over layers), ``layer_balancedness``
{layer}, ``expert_tokens_total`` {layer} (tokens routed per layer), opt-in
``expert_tokens_per_expert_total`` {layer, expert} (L x P series: keep off for big models),
``rebalances_total``, ``rebalance_errors_total``, ``rebalances_skipped_total``,
``predicted_balancedness``, ``rebalance_seconds``, ``solver_seconds``, ``stall_seconds``
(histograms), ``bytes_moved_total``, ``slots_moved_total``, ``count_updates_skipped_total``.

Rebalance figures come from the manager's ``RebalanceRecord`` alone (``observe_rebalance``,
called once per rebalance when it ends), so they agree with its log lines and the runtime's
report: ``rebalances_total`` and ``rebalance_seconds`` / ``solver_seconds`` count the
rebalances that moved (done); ``stall_seconds``, ``slots_moved_total`` and
``bytes_moved_total`` count every ended rebalance (done, skipped or failed: each paused
serving, and a failed one may have moved layers before it failed).
"""

from __future__ import annotations

from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from eplb_plugin.balance import gpu_loads, layer_balancedness
from eplb_plugin.errors import CountsError

# Histogram buckets, seconds: solver and stall times from milliseconds to tens of seconds.
DURATION_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EPLBMetrics:
    """EPLB's Prometheus metrics on a private registry.

    per_expert: also export one token counter per (layer, slot); off by default because it
    is L x P series (58 x 288 = 16,704 for DeepSeek-V3 on 32 GPUs).
    """

    def __init__(self, *, per_expert: bool = False, namespace: str = "eplb"):
        self.registry = CollectorRegistry(auto_describe=True)
        r, ns = self.registry, namespace
        self.balancedness = Gauge("balancedness", "Mean over layers of mean/max GPU load, latest counts", namespace=ns, registry=r)
        self.layer_balancedness = Gauge("layer_balancedness", "Per-layer mean/max GPU load, latest counts", ["layer"], namespace=ns, registry=r)
        self.expert_tokens = Counter("expert_tokens", "Tokens routed to experts, per MoE layer", ["layer"], namespace=ns, registry=r)
        self.per_expert_tokens = (
            Counter("expert_tokens_per_expert", "Tokens routed per physical slot", ["layer", "expert"], namespace=ns, registry=r)
            if per_expert
            else None
        )
        self.rebalances = Counter("rebalances", "Completed rebalances", namespace=ns, registry=r)
        self.rebalance_seconds = Histogram("rebalance_seconds", "Wall time of a rebalance, start to new map live", namespace=ns, registry=r, buckets=DURATION_BUCKETS_S)
        self.solver_seconds = Histogram("solver_seconds", "Time the placement solver took", namespace=ns, registry=r, buckets=DURATION_BUCKETS_S)
        self.stall_seconds = Histogram("stall_seconds", "Time serving was paused by a rebalance", namespace=ns, registry=r, buckets=DURATION_BUCKETS_S)
        self.bytes_moved = Counter("bytes_moved", "Expert weight bytes moved between GPUs", namespace=ns, registry=r)
        self.slots_moved = Counter("slots_moved", "Slots whose expert changed in a rebalance", namespace=ns, registry=r)
        self.rebalance_errors = Counter("rebalance_errors", "Rebalances that failed (old placement kept)", namespace=ns, registry=r)
        self.rebalances_skipped = Counter("rebalances_skipped", "Rebalances skipped (no tokens, or balanced enough)", namespace=ns, registry=r)
        self.predicted_balancedness = Gauge("predicted_balancedness", "Balancedness the last rebalance's plan predicted on its window", namespace=ns, registry=r)
        self.updates_skipped = Counter("count_updates_skipped", "Count updates dropped because the previous copy was still in flight", namespace=ns, registry=r)
        self._host: torch.Tensor | None = None  # pinned [L, P] landing buffer
        self._event = None  # torch.cuda.Event of the copy in flight, or None
        self._pending_ep_size = 1

    # --------------------------------------------------------------- counts
    def update_from_counts(self, counts: torch.Tensor, ep_size: int) -> bool:
        """Queue ``counts`` for publication without blocking the host.

        counts: [L, P] tokens per physical slot since the previous update (e.g. one pass's
        counts or a window delta), on any device; slots rank-major over ``ep_size`` GPUs.
        Returns False (and counts a skip) when the previous copy has not landed yet.
        """
        if counts.dim() != 2:
            raise CountsError(f"counts must be [L, P] (got shape {tuple(counts.shape)})")
        if counts.shape[1] % ep_size:
            raise CountsError(f"ep_size={ep_size} must divide the {counts.shape[1]} slots of counts")
        self.poll()
        if self._event is not None:
            self.updates_skipped.inc()
            return False
        if not counts.is_cuda:
            self._publish(counts.detach().cpu(), ep_size)
            return True
        if self._host is None or self._host.shape != counts.shape or self._host.dtype != counts.dtype:
            self._host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        self._host.copy_(counts.detach(), non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        self._pending_ep_size = ep_size
        return True

    def poll(self) -> bool:
        """Publish the copy in flight if it has landed (never waits). True if published."""
        if self._event is None or not self._event.query():
            return False
        self._event = None
        self._publish(self._host, self._pending_ep_size)
        return True

    def _publish(self, counts: torch.Tensor, ep_size: int) -> None:
        per_layer = layer_balancedness(gpu_loads(counts, ep_size))
        self.balancedness.set(float(per_layer.mean()))
        tokens = counts.sum(-1, dtype=torch.int64).tolist()
        for layer, (value, n) in enumerate(zip(per_layer.tolist(), tokens)):
            self.layer_balancedness.labels(layer=str(layer)).set(value)
            self.expert_tokens.labels(layer=str(layer)).inc(n)
        if self.per_expert_tokens is not None:
            for layer, row in enumerate(counts.tolist()):
                for slot, n in enumerate(row):
                    if n:
                        self.per_expert_tokens.labels(layer=str(layer), expert=str(slot)).inc(n)

    # ----------------------------------------------------------- rebalances
    def observe_rebalance(self, record: Any) -> None:
        """Export a manager ``RebalanceRecord`` that has ended (done, skipped or failed).

        Every ended one adds its stall, slots and bytes; a failed one counts in
        ``rebalance_errors_total``, a skipped one in ``rebalances_skipped_total``, a done one
        in ``rebalances_total`` with its wall and solver times and predicted balancedness.
        """
        self.stall_seconds.observe(record.stall_s)
        self.slots_moved.inc(record.slots_moved)
        self.bytes_moved.inc(record.bytes_moved)
        if record.error is not None:
            self.rebalance_errors.inc()
        elif record.skipped is not None:
            self.rebalances_skipped.inc()
        else:
            self.rebalances.inc()
            self.rebalance_seconds.observe(record.wall_s)
            self.solver_seconds.observe(record.solver_s)
            predicted = record.balancedness_predicted
            if predicted == predicted:  # NaN = not predicted
                self.predicted_balancedness.set(predicted)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry (publishes a landed copy first)."""
        self.poll()
        return generate_latest(self.registry)
