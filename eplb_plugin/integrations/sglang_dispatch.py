"""The project's ``minmax`` dispatch inside SGLang's logical -> physical mapping.

SGLang's ``--ep-dispatch-algorithm`` knows ``static``, ``dynamic`` (a uniformly random
replica per token: an even spread), ``fake`` and ``lp``. The plugin adds the project's own
names (``PLUGIN_DISPATCH_ALGORITHMS``: ``minmax``) through hooks, without touching SGLang's
names:

- the flag: ``add_dispatch_choices`` (called by the plugin's AFTER hook on
  ``ServerArgs.add_cli_args``) appends them to the flag's choices, so argparse accepts
  ``minmax`` and still refuses an unknown name listing every valid one;
- the layer: ``dispatch_info_init_new`` (AROUND ``ExpertLocationDispatchInfo.init_new``)
  returns SGLang's dispatch info plus the layer id for a plugin name (SGLang's info holds
  only the layer's rows);
- the mapping: ``topk_ids_logical_to_physical`` (AROUND SGLang's function of that name, which
  every top-k path calls) runs ``dispatch.minmax_dispatch`` on the layer's ``topk_ids`` for
  a plugin name, and SGLang's own code for the others.

The tables (``kernels.minmax.MinmaxTables``) follow SGLang's global ``ExpertLocationMetadata``
(``LiveMinmaxTables``): built from its CPU map when a metadata object is first used, rows
rewritten in place when layers go live (the plugin's manager: ``MetadataPublisher`` builds the
target's tables in its background thread and copies rows at the pass boundary where the
weights land; SGLang's own updater: the AFTER hook on ``ExpertLocationMetadata.update``), so
a CUDA graph that captured the mapping keeps reading the live tables.

Counts (``sglang_counts``, ``--eplb-dispatch-counts``): by default (``local``) the split
follows the counts of the ``topk_ids`` the mapping is given, i.e. this rank's tokens of the
pass. Without an all-to-all backend every EP rank runs the MoE over the same tokens, so these
are the whole pass's counts and every rank picks the same slots (the split is deterministic:
SGLang's rank-invariance holds), and the split stops once no step can lower the peak
(``sglang_counts.routes_whole_pass``). With an all-to-all backend (DeepEP, with or without DP
attention) each rank routes its own tokens: ``local`` splits those alone; ``global`` all-gathers
every rank's ``[E]`` counts of the layer over the MoE EP group first (``LIVE_TABLES.exchange``,
resolved with the tables), so the ranks' slots together are one split of the whole pass, and
a rank with no tokens joins the all-gather from ``TopK.empty_topk_output``
(``empty_topk_output_joins_exchange``). Rows that pad the batch (a CUDA graph's fixed size,
DP padding) stay out of the split and the counts, exchanged or not: ``init_new`` reads
SGLang's bound (``moe_num_token_non_padded`` of the forward context, a device tensor, as
SGLang's top-k does) and the mapping gives those rows a slot of their expert, which SGLang
then masks. On CUDA the kernels read that bound themselves and write SGLang's int32 slots
directly, so the mapping is the kernels' launches alone (no torch op per layer besides
allocating the output).

Recorder: the mapping counts the slots it picks into the project's recorder in its own launch
(the kernels' ``counts_out``: the recorder's ``select_counts_buffer`` for the layer, real rows
only, as SGLang records the ids after masking the padding to -1), and the recorder's
``on_select_experts``, which SGLang calls next with those ids, then counts nothing for that
layer: each layer is counted once. Where the recorder would not count (off, SGLang's own,
outside a recorded pass, ``stat_approx``) the mapping counts nothing. SGLang's fused
map-and-count kernel (``eplb_map_record_fused``) serves ``static`` only and stays out of the way.

No host synchronization in the mapping (on CUDA it runs as the project's Triton kernels,
``kernels/minmax_triton.py``); TorchDynamo skips it (``torch.compiler.disable``), so SGLang's
compiled top-k post-processing calls it eagerly, inside any CUDA graph being captured.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from typing import Any

import torch

from eplb_plugin.args import EPLBArgs
from eplb_plugin.dispatch import minmax_dispatch
from eplb_plugin.errors import ConfigError
from eplb_plugin.integrations.sglang_common import (
    DISPATCH_FLAG,
    LOG_PREFIX,
    PLUGIN_DISPATCH_ALGORITHMS,
    is_plugin_dispatch,
    plugin_settings,
)
from eplb_plugin.integrations.sglang_counts import (
    GroupCountExchange,
    resolve_count_exchange,
    routes_whole_pass,
)
from eplb_plugin.kernels._launch import use_triton
from eplb_plugin.kernels.minmax import MinmaxTables, build_minmax_tables
from eplb_plugin.kernels.minmax_triton import MinmaxScratch, minmax_scratch

logger = logging.getLogger(__name__)


def add_dispatch_choices(parser: Any) -> bool:
    """Append the plugin's algorithms to ``--ep-dispatch-algorithm``'s choices in SGLang's
    argparse ``parser``; returns False (nothing changed) where the flag is missing."""
    for action in parser._actions:
        if DISPATCH_FLAG in action.option_strings:
            if action.choices is not None:
                action.choices = [*action.choices, *(n for n in PLUGIN_DISPATCH_ALGORITHMS if n not in action.choices)]
            return True
    logger.warning("%s SGLang's parser has no %s flag: the plugin's dispatch algorithms are not offered",
                   LOG_PREFIX, DISPATCH_FLAG)
    return False


# ---------------------------------------------------------------------- tables


def tables_for_map(physical_to_logical_map: torch.Tensor, *, num_logical_experts: int, ep_size: int) -> MinmaxTables:
    """``MinmaxTables`` of a placement. physical_to_logical_map: [L, P] int (CPU: no device work)."""
    return build_minmax_tables(physical_to_logical_map.long(), num_logical_experts, num_gpus=ep_size)


def copy_table_rows(dst: MinmaxTables, src: MinmaxTables, layers: list[int]) -> None:
    """Copy ``layers``' rows of every table from ``src`` into ``dst`` in place (addresses stay
    valid for CUDA graphs); the index goes to the device without a host wait."""
    index_cpu = torch.tensor(layers, dtype=torch.int64)
    for old, new in zip(dst, src):
        if old.shape[1:] != new.shape[1:] or old.dtype != new.dtype:
            raise RuntimeError(f"minmax table rows of shape {tuple(new.shape[1:])} do not fit the live "
                               f"{tuple(old.shape[1:])}: the slot count or EP size changed mid-run")
        index = index_cpu.to(old.device, non_blocking=True)
        old.index_copy_(0, index, new.to(old.device, non_blocking=True).index_select(0, index))


def minmax_steps_setting(environ: dict[str, str] | None = None) -> int | None:
    """``--eplb-dispatch-minmax-steps`` as the plugin's settings carry it to SGLang's processes
    (``$EPLB_PLUGIN_CONFIG``); None: the kernels' default. ConfigError for a value out of range."""
    steps = plugin_settings(environ).get("eplb_dispatch_minmax_steps")
    EPLBArgs(eplb_dispatch_minmax_steps=steps).check_values()
    return steps


class LiveMinmaxTables:
    """The ``minmax`` tables of SGLang's global metadata, on the metadata's device (one per
    process). ``for_metadata`` builds them the first time a metadata object is used (an
    eager pass: SGLang warms up before it captures graphs); later placements are copied into
    the same tensors (``update_rows``). ``exchange``: the count exchange the mapping runs
    (``sglang_counts.resolve_count_exchange``, resolved with the tables; None = local counts).
    ``whole_pass``: every rank routes the whole pass (``sglang_counts.routes_whole_pass``,
    resolved with the tables). ``steps``: the split's diffusion steps (``minmax_steps_setting``,
    resolved with the tables)."""

    def __init__(self) -> None:
        self._metadata: Any = None
        self._tables: MinmaxTables | None = None
        self.scratch: MinmaxScratch | None = None
        self.exchange: GroupCountExchange | None = None
        self.whole_pass = False
        self.steps: int | None = None
        self._lock = threading.Lock()

    def for_metadata(self, metadata: Any) -> MinmaxTables:
        """The live tables of ``metadata`` (SGLang's ``ExpertLocationMetadata``)."""
        if self._metadata is not metadata or self._tables is None:
            with self._lock:
                if self._metadata is not metadata or self._tables is None:
                    device = metadata.physical_to_logical_map.device
                    built = tables_for_map(metadata.physical_to_logical_map_cpu,
                                           num_logical_experts=metadata.num_logical_experts,
                                           ep_size=metadata.ep_size)
                    self._tables = MinmaxTables(*(t.to(device) for t in built))
                    self.scratch = minmax_scratch(self._tables)  # the kernels' counters, kept across calls
                    self.exchange = resolve_count_exchange(ep_size=metadata.ep_size)
                    self.whole_pass = routes_whole_pass()
                    self.steps = minmax_steps_setting()
                    self._metadata = metadata
                    logger.info("%s minmax dispatch tables built: %d layers x %d slots over %d GPUs",
                                LOG_PREFIX, *metadata.physical_to_logical_map_cpu.shape, metadata.ep_size)
        return self._tables

    def built_for(self, metadata: Any) -> bool:
        """Whether the live tables are ``metadata``'s (a metadata never used for minmax has none)."""
        return self._tables is not None and self._metadata is metadata

    def update_rows(self, metadata: Any, source: MinmaxTables, layers: list[int]) -> None:
        """``layers`` of ``metadata`` now serve ``source``'s rows (tables of the whole map)."""
        if layers:
            copy_table_rows(self.for_metadata(metadata), source, layers)


LIVE_TABLES = LiveMinmaxTables()


def metadata_rows_updated(result: Any, metadata: Any, other: Any, update_layer_ids: Any, *args: Any,
                          **kwargs: Any) -> None:
    """AFTER ``ExpertLocationMetadata.update(other, update_layer_ids)`` (SGLang's own updater,
    e.g. elastic EP): the live tables follow the rows SGLang rewrote. Only for the metadata
    the tables were built from (no tables yet: nothing to follow)."""
    if not update_layer_ids or not LIVE_TABLES.built_for(metadata):
        return None
    source = tables_for_map(other.physical_to_logical_map_cpu, num_logical_experts=metadata.num_logical_experts,
                            ep_size=metadata.ep_size)
    LIVE_TABLES.update_rows(metadata, source, sorted(update_layer_ids))
    return None


# ---------------------------------------------------------------------- hooks


@functools.cache
def plugin_dispatch_info_class() -> type:
    """SGLang's ``ExpertLocationDispatchInfo`` plus the layer id and the batch's padding bound
    (the class is made on first use: SGLang is imported only inside functions)."""
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

    @dataclasses.dataclass
    class PluginDispatchInfo(ExpertLocationDispatchInfo):  # type: ignore[misc, valid-type]
        """SGLang's per-layer dispatch info for a plugin algorithm; layer_id: the row of the
        live tables the mapping reads; num_token_non_padded: SGLang's bound of the batch's
        real rows (a one-element device tensor; None = every row is real)."""

        layer_id: int = -1
        num_token_non_padded: torch.Tensor | None = None

    return PluginDispatchInfo


def dispatch_info_init_new(original: Any, cls: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``ExpertLocationDispatchInfo.init_new(layer_id, *, is_draft=False)``."""
    info = original(cls, *args, **kwargs)
    if info is None or not is_plugin_dispatch(info.ep_dispatch_algorithm):
        return info
    layer_id = kwargs["layer_id"] if "layer_id" in kwargs else args[0]
    fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}
    return plugin_dispatch_info_class()(**fields, layer_id=int(layer_id), num_token_non_padded=_padding_bound())


def _padding_bound() -> torch.Tensor | None:
    """SGLang's bound of this forward's real MoE rows, as its top-k reads it (None outside a
    forward, or where the real rows are not a prefix)."""
    from sglang.srt.model_executor.forward_context import get_forward_context, has_forward_context

    if not has_forward_context():
        return None
    get_bound = get_forward_context().moe_num_token_non_padded
    return None if get_bound is None else get_bound()


def topk_ids_logical_to_physical(original: Any, topk_ids: torch.Tensor, info: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND SGLang's ``topk_ids_logical_to_physical(topk_ids, info, log2phy_prob=None)``."""
    if info is None or not is_plugin_dispatch(info.ep_dispatch_algorithm):
        return original(topk_ids, info, *args, **kwargs)
    layer_id = getattr(info, "layer_id", -1)
    if layer_id < 0:
        raise ConfigError(
            f"{DISPATCH_FLAG} {info.ep_dispatch_algorithm}: SGLang's dispatch info carries no layer id "
            "(is the ExpertLocationDispatchInfo.init_new hook applied? SGLANG_PLUGINS must include eplb_plugin)"
        )
    return map_topk_ids(topk_ids, layer_id, info.num_physical_experts, getattr(info, "num_token_non_padded", None))


@torch.compiler.disable
def map_topk_ids(topk_ids: torch.Tensor, layer_id: int, num_physical_experts: int,
                 num_token_non_padded: torch.Tensor | None = None) -> torch.Tensor:
    """topk_ids: [T, k] logical ids (-1 = padding) of this rank's tokens for MoE layer
    ``layer_id`` -> [T, k] physical slots of the same dtype, by ``minmax`` over the live
    placement of SGLang's global metadata (see the module doc for whose counts).
    num_token_non_padded: one-element device tensor, rows at or past it pad the batch."""
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    tables = LIVE_TABLES.for_metadata(get_global_expert_location_metadata())
    bound = None if num_token_non_padded is None else num_token_non_padded.to(topk_ids.device, non_blocking=True)
    return minmax_dispatch(topk_ids, tables, layer=layer_id, num_slots=num_physical_experts,
                           use_kernel=use_triton("auto", topk_ids), exchange=LIVE_TABLES.exchange,
                           counts_out=recorder_counts(layer_id), num_valid_rows=bound, scratch=LIVE_TABLES.scratch,
                           out_dtype=topk_ids.dtype, iterations=LIVE_TABLES.steps, whole_pass=LIVE_TABLES.whole_pass)


def recorder_counts(layer_id: int) -> torch.Tensor | None:
    """The [L, P] int32 buffer of SGLang's global recorder that the mapping adds ``layer_id``'s
    slots to (the recorder then skips its own count of them), or None: the recorder would
    not count them, or is not the project's (SGLang's no-op has no ``select_counts_buffer``)."""
    from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder

    select = getattr(get_global_expert_distribution_recorder(), "select_counts_buffer", None)
    return None if select is None else select(layer_id)


def empty_topk_output_joins_exchange(result: Any, topk: Any, device: Any = None, *args: Any, **kwargs: Any) -> None:
    """AFTER ``TopK.empty_topk_output(device, *, layer_id=None)`` (and ``HashTopK``'s): a rank
    with no tokens this forward skips the top-k, so under ``minmax`` with a count exchange it
    joins the layer's all-gather here with zero counts (as SGLang's ``lp`` solver joins its
    all-reduce there); otherwise nothing. Draft layers map nothing (no dispatch info) and
    skip it on every rank."""
    if getattr(topk, "is_draft", False):
        return None
    from sglang.srt.runtime_context import get_exec

    if not is_plugin_dispatch(get_exec().moe.ep_dispatch_algorithm):
        return None
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    metadata = get_global_expert_location_metadata()
    LIVE_TABLES.for_metadata(metadata)  # resolves the exchange where this rank has not mapped yet
    if LIVE_TABLES.exchange is not None:
        LIVE_TABLES.exchange(torch.zeros(metadata.num_logical_experts, dtype=torch.int32, device=device))
    return None
