"""SGLang's global ``ExpertLocationMetadata`` following the plugin's live placement.

SGLang's dispatch reads its tables from the global metadata, so whenever layers go live the
adapter writes their rows there, at the same pass boundary as the weights land.

SGLang builds a rebalance's metadata once (``init_by_mapping`` over every layer: L x P
``.item()`` reads and L x E x ep_size nearest-replica searches, 0.1-0.4 s at DeepSeek-V3's
size) and copies rows per chunk, all on the serving thread. ``MetadataPublisher`` builds the
target's metadata once per rebalance too, but in a background thread started when the plan
arrives (``prepare``; the manager's ``ready_to_move`` holds the first chunk until every rank
has it), and each chunk copies only its live layers' rows (``publish``): no rebuild and no
device-to-host read on the serving thread. A live row that is not the target's (a layer a failed move
left on a partial map) gets metadata of its own, built for that map.

With ``--ep-dispatch-algorithm lp`` SGLang re-initializes its LPLB solvers after every
update (they hold the placement's structure); so does ``publish``. With the plugin's ``minmax``
the background build also makes the target's ``minmax`` tables, and ``publish`` copies their
rows into the live tables (``sglang_dispatch.LIVE_TABLES``) with the metadata's rows.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import torch

from eplb_plugin.balance import gpu_loads
from eplb_plugin.integrations.sglang_common import is_plugin_dispatch
from eplb_plugin.integrations.sglang_dispatch import LIVE_TABLES, tables_for_map

logger = logging.getLogger(__name__)

# SGLang's metadata fields with one row per layer (dim 0), as its ``update`` copies them.
_LAYER_FIELDS = (
    "physical_to_logical_map",
    "physical_to_logical_map_cpu",
    "logical_to_all_physical_map",
    "logical_to_all_physical_map_cpu",
    "logical_to_all_physical_map_num_valid",
    "logical_to_rank_dispatch_physical_map",
)
SGLANG_UTILIZATION_WINDOW_PASSES = 1000  # SGLang's EPLB_BALANCEDNESS_WINDOW_SIZES[-1]
_SGLANG_EPSILON = 1e-5  # SGLang's compute_utilization_rate smoothing


class MetadataPublisher:
    """Writes live layers' rows into SGLang's global metadata (see the module doc).

    model_config: SGLang's ModelConfig (for ``init_by_mapping``); rank: this rank's EP rank;
    dispatch_algorithm: SGLang's resolved ``--ep-dispatch-algorithm``.
    """

    def __init__(self, model_config: Any, *, rank: int, dispatch_algorithm: str | None):
        self._model_config = model_config
        self._rank = rank
        self._dispatch_algorithm = dispatch_algorithm
        self._minmax = is_plugin_dispatch(dispatch_algorithm)  # the plugin's dispatch tables follow too
        self._target_map: torch.Tensor | None = None
        self._built: Any = None
        self._built_tables: Any = None  # the target's minmax tables (CPU), built with _built
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.builds = 0  # full metadata builds so far (one per rebalance)

    def prepare(self, target_map: torch.Tensor) -> bool:
        """Build the metadata of ``target_map`` [L, P] (CPU) in a background thread, started at
        the first call for this map; returns whether it is built. A failed build raises here,
        before any weight moved."""
        if self._target_map is None or not torch.equal(self._target_map, target_map):
            self._join()
            self._target_map, self._built, self._built_tables, self._error = target_map.clone(), None, None, None
            self._thread = threading.Thread(target=self._build_target, name="eplb-sglang-metadata", daemon=True)
            self._thread.start()
        if self._thread is not None and not self._thread.is_alive():
            self._join()
        if self._error is not None:
            error, self._error, self._target_map = self._error, None, None
            raise error
        return self._built is not None

    def _build_target(self) -> None:
        try:
            built = self._build(self._target_map)
            if self._minmax:
                self._built_tables = self._tables(self._target_map, built)
            self._built = built  # last: publish() reads both once this is set
        except BaseException as exc:  # re-raised on the serving thread by prepare()
            self._error = exc

    def _build(self, physical_to_logical_map: torch.Tensor) -> Any:
        from sglang.srt.eplb.expert_location import ExpertLocationMetadata

        self.builds += 1
        return ExpertLocationMetadata.init_by_mapping(
            self._model_config, physical_to_logical_map, moe_ep_rank=self._rank
        )

    @staticmethod
    def _tables(physical_to_logical_map: torch.Tensor, metadata: Any) -> Any:
        return tables_for_map(physical_to_logical_map, num_logical_experts=metadata.num_logical_experts,
                              ep_size=metadata.ep_size)

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def publish(self, live_map: torch.Tensor, target_map: torch.Tensor | None) -> list[int]:
        """Make SGLang's global metadata serve ``live_map`` [L, P] (CPU int64), on its way to
        the rebalance's ``target_map`` [L, P] (None: no rebalance in progress); returns the
        layers whose rows changed.

        Rows on the target are copied from the prepared metadata; while it is still being
        built they wait for a later call (only layers without routed experts, whose maps no
        dispatch reads, go live before ``prepare`` is done: moves wait for it)."""
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        current = get_global_expert_location_metadata()
        changed = (current.physical_to_logical_map_cpu != live_map).any(dim=1).nonzero().flatten().tolist()
        on_target = [] if target_map is None else [
            layer for layer in changed if torch.equal(live_map[layer], target_map[layer])]
        off_target = [layer for layer in changed if layer not in on_target]
        ready = (target_map is not None and self._built is not None and self._target_map is not None
                 and torch.equal(self._target_map, target_map))
        if not ready:
            on_target = []
        if on_target:
            _copy_rows(current, self._built, on_target)
            if self._minmax:
                LIVE_TABLES.update_rows(current, self._built_tables, on_target)
        if off_target:  # a layer a failed move left on a partial map: metadata of its own
            own = self._build(live_map)
            _copy_rows(current, own, off_target)
            if self._minmax:
                LIVE_TABLES.update_rows(current, self._tables(live_map, own), off_target)
        published = sorted(on_target + off_target)
        if published and self._dispatch_algorithm == "lp":
            from sglang.srt.model_executor.model_runner_components.moe_ep_setup import (
                init_lplb_solvers,
            )

            init_lplb_solvers(model_config=self._model_config)  # as SGLang after each update
        return published

    def close(self) -> None:
        self._join()


def _copy_rows(current: Any, source: Any, layers: list[int]) -> None:
    """Copy ``layers``' rows of every per-layer field from ``source`` into ``current`` in place
    (addresses stay valid for CUDA graphs); the index goes to the device without a host wait."""
    index_cpu = torch.tensor(layers, dtype=torch.int64)
    for name in _LAYER_FIELDS:
        dst, src = getattr(current, name), getattr(source, name)
        if (dst is None) != (src is None):
            raise RuntimeError(f"SGLang metadata field {name} is set on one side only; dispatch changed mid-run")
        if dst is None:
            continue
        index = index_cpu.to(dst.device, non_blocking=True)
        dst.index_copy_(0, index, src.to(dst.device, non_blocking=True).index_select(0, index))


def sglang_utilization_gate(recorder: Any, *, threshold: float, report_mode: str | None, group: Any) -> Any:
    """SGLang's rule for ``--eplb-min-rebalancing-utilization-threshold``, as a manager
    ``skip_rebalance``: with a balancedness report mode on and a threshold other than 1.0,
    skip when the mean per-pass utilization of the last 1000 recorded passes is strictly
    above the threshold (no pass recorded counts as 0). Every rank calls it at the same pass
    (it all-reduces the GPU loads)."""

    def skip(window_balancedness: float) -> str | None:
        if report_mode in (None, "off") or math.isclose(threshold, 1.0):
            return None
        rows = recorder.physical_count_passes()[-SGLANG_UTILIZATION_WINDOW_PASSES:]  # [n, L, P]
        utilization = 0.0
        if rows.shape[0]:
            loads = gpu_loads(rows.to("cpu", torch.float64), recorder.ep_size)  # [n, L, ep]
            from eplb_plugin.comm import all_reduce_host

            loads = all_reduce_host(loads, group)
            per_pass = ((loads.mean(-1) + _SGLANG_EPSILON) / (loads.amax(-1) + _SGLANG_EPSILON)).mean(-1)
            utilization = float(per_pass.mean())
        if utilization > threshold:
            return f"mean per-pass utilization {utilization:.4f} > threshold {threshold} (SGLang's rule)"
        return None

    return skip
