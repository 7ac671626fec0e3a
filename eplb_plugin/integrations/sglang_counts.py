"""Whose per-expert counts SGLang's ``minmax`` mapping splits on: ``--eplb-dispatch-counts``.

``local`` (the default): the split follows the ``topk_ids`` the mapping is given, this rank's
tokens of the layer. ``global``: where each rank routes only its own tokens, the mapping first
all-gathers every rank's ``[E]`` counts of the layer and passes them to ``minmax_dispatch`` as
its ``exchange`` (as the runtime's ``ExpertDispatcher.pass_counts``): every rank solves the
same split of the whole pass and takes its own tokens' run of each expert's quota (its
offset: the expert's tokens on lower ranks), so the union of the ranks' slots is what one
dispatcher of the whole pass would give.

When the exchange runs (decided once per process, ``resolve_count_exchange``, when the live
tables are first built, on an eager pass after SGLang built its groups):

- only where SGLang says the MoE routes a rank-local shard, its own
  ``is_moe_input_scattered_across_dp_ranks()`` (an all-to-all backend such as DeepEP, with or
  without DP attention; FlashInfer's FP4 all-gather; DWDP). Otherwise SGLang gathers the
  tokens before the MoE and every rank routes the same rows: its counts are the pass's
  already, and ``global`` runs nothing (and logs so);
- over SGLang's MoE EP group (``get_parallel().moe_ep_group``): its ranks hold the placement's
  slots (``ExpertLocationMetadata.ep_size``; a size that differs is refused) and, under an
  all-to-all backend, are the ranks whose tokens reach them. SGLang's ``lp`` dispatch
  all-reduces its per-layer counts over the same group;
- through the ``GroupCoordinator``'s ``all_gather`` (not ``torch.distributed`` on its
  ``device_group``): on CUDA it is SGLang's custom op that uses the group's PyNCCL
  communicator inside CUDA-graph capture (the decode graphs capture the mapping), and on CPU
  a plain all-gather over the group's gloo ``device_group``; with one rank it returns at once.

It is a collective: every rank of the group must call it once per MoE layer of every forward.
A rank with no tokens under DP attention skips the top-k and calls ``TopK.empty_topk_output``
(``HashTopK``'s too) instead; the plugin's AFTER hook there (registered only with ``global``)
joins the all-gather with zero counts, exactly as SGLang's ``lp`` solver joins its
all-reduce there. SGLang validated that idle path for ``lp`` on the DeepSeek-V2 family and
GLM-4 MoE Lite / GLM-MoE-DSA; a model whose idle path skips ``empty_topk_output`` would hang
under ``global``, as it would under ``lp``. Padding rows (``moe_num_token_non_padded``) are
left out of the counts before they are exchanged (the kernels read the bound on the device;
the torch path sets those rows to ``-1``), so they never reach the exchange.

Why ``local`` stays the default: the balance gain of ``global`` is measured (CPU replay of
ESFT traffic, 256-token passes split over the EP ranks, ``benchmarks/bench_per_pass_balance.py``,
``benchmarks/results/per_pass_balance_esft_cpu.json``, equal-split plans: per-pass
balancedness 0.929 global against 0.899 local at EP8 / 72 slots, 0.876 against 0.819 at
EP16 / 80 slots; through SGLang's own mapping, ``benchmarks/bench_sglang_dispatch.py``, EP8 /
72 slots, 32 tokens per rank: ``global`` serves what one split of the whole pass serves, its
``no_a2a/minmax`` row, 0.816, against ``a2a/minmax_local`` 0.795 and ``a2a/static`` 0.759),
but its cost is not: one more all-gather of ``[E]`` int32 per MoE layer on
the serving path, which this project could not time (no multi-GPU machine) and which adds a
collective where DeepEP's low-latency decode is latency-bound. Larger per-rank batches also
narrow the gap (each rank's counts approach the pass's proportions). Turn ``global`` on where
the all-gather is measured to cost less than the imbalance it removes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from eplb_plugin.args import EPLBArgs, check_dispatch_counts
from eplb_plugin.dispatch import split_gathered_counts
from eplb_plugin.errors import ConfigError
from eplb_plugin.integrations.sglang_common import LOG_PREFIX, plugin_settings

logger = logging.getLogger(__name__)

COUNTS_FLAG = "--eplb-dispatch-counts"


class GroupCountExchange:
    """``minmax_dispatch``'s ``exchange`` over a SGLang ``GroupCoordinator`` (``group``):
    local [E] int32 this rank's tokens per expert of one layer -> (the pass's [E], tokens of
    each expert on lower ranks of the group [E]), int32: the dtype the kernels read, so the
    exchange adds no conversion (every rank must gather the same dtype: the idle rank's join
    in ``sglang_dispatch.empty_topk_output_joins_exchange`` sends int32 zeros). Collective over ``group``: every rank calls
    it once per MoE layer of every forward, in the same order. No host synchronization."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.world_size = int(group.world_size)
        self.rank = int(group.rank_in_group)

    def __call__(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gathered = self.group.all_gather(local.contiguous(), dim=0)  # [W * E], rank order
        return split_gathered_counts(gathered.view(self.world_size, -1), self.rank)


def dispatch_counts_setting(environ: dict[str, str] | None = None) -> str:
    """``--eplb-dispatch-counts`` as the plugin's settings carry it to SGLang's processes
    (``$EPLB_PLUGIN_CONFIG``, whose values ``plugin_settings`` checks against their fields'
    choices: ConfigError naming the valid values for another)."""
    return str(plugin_settings(environ).get("eplb_dispatch_counts", EPLBArgs.eplb_dispatch_counts))


def routes_whole_pass() -> bool:
    """Whether every rank's ``topk_ids`` are the whole pass: SGLang gathers the tokens before
    the MoE (its ``is_moe_input_scattered_across_dp_ranks()`` is false: no all-to-all
    backend), so a rank's counts are the pass's and ``minmax``'s split may stop once no step
    can lower the peak (``dispatch.minmax_dispatch``'s ``whole_pass``). Where each rank routes
    its own tokens the split of a rank's share takes every step (through an exchange, the
    exchanged counts are whole anyway). An SGLang without that helper: False (every step,
    as before the stop), logged."""
    try:
        from sglang.srt.layers.moe.utils import is_moe_input_scattered_across_dp_ranks
    except ImportError:
        logger.info("%s this SGLang has no is_moe_input_scattered_across_dp_ranks: minmax's split takes every "
                    "step on each rank's tokens", LOG_PREFIX)
        return False
    return not is_moe_input_scattered_across_dp_ranks()


def resolve_count_exchange(*, ep_size: int, setting: str | None = None) -> GroupCountExchange | None:
    """The exchange SGLang's ``minmax`` mapping runs in this process, or None (the split
    follows this rank's own ``topk_ids``). setting: ``--eplb-dispatch-counts`` (None: the
    plugin's settings); ep_size: the placement's EP size (SGLang's metadata)."""
    setting = dispatch_counts_setting() if setting is None else check_dispatch_counts(setting, COUNTS_FLAG)
    if setting == "local":
        return None
    from sglang.srt.layers.moe.utils import is_moe_input_scattered_across_dp_ranks

    if not is_moe_input_scattered_across_dp_ranks():
        logger.info("%s %s global: every rank routes the same gathered tokens (no all-to-all backend), "
                    "so its counts are the pass's already; no exchange", LOG_PREFIX, COUNTS_FLAG)
        return None
    from sglang.srt.runtime_context import get_parallel

    group = get_parallel().moe_ep_group
    if group.world_size == 1:
        return None
    if group.world_size != ep_size:
        raise ConfigError(
            f"{COUNTS_FLAG} global gathers counts over SGLang's MoE EP group ({group.world_size} ranks), but "
            f"the placement spans {ep_size} EP ranks; use {COUNTS_FLAG} local"
        )
    logger.info("%s %s global: minmax splits on the pass's counts, all-gathered over the MoE EP group "
                "(%d ranks) per layer", LOG_PREFIX, COUNTS_FLAG, group.world_size)
    return GroupCountExchange(group)
