"""``--eplb-dispatch-counts`` in SGLang: the flag on SGLang's real ServerArgs, and ``minmax``
through SGLang's mapping on 3 gloo ranks that each route their own tokens, with the count
all-gather over a real SGLang ``GroupCoordinator`` (gloo, CPU) and without it."""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from test_sglang_helpers import (
    STUBS_DIR,
    fake_runtime,
    import_sglang_or_skip,
    run_sglang_script,
    stubs_on_path,
)

from eplb_plugin.errors import ConfigError
from eplb_plugin.location import ExpertLocation

WORLD, NUM_LAYERS, NUM_LOGICAL, NUM_PHYSICAL, TOP_K = 3, 3, 10, 15, 3
ROWS = {0: (29, 17, 40), 1: (23, 31, 12), 2: (26, 0, 35)}  # layer -> real rows of each rank (rank 1 idle in layer 2)
PADDED_LAYER, PAD_ROWS = 1, 12  # rank 0's batch of that layer carries 12 padding rows (one busy expert)
SUBPROCESS_TIMEOUT_S = 180

import_sglang_or_skip()
pytestmark = pytest.mark.sglang


def _placement() -> ExpertLocation:
    gen = torch.Generator().manual_seed(11)
    counts = torch.rand(NUM_LAYERS, NUM_LOGICAL, generator=gen) ** 4 * 1000
    return ExpertLocation.from_logical_count(counts, num_physical_experts=NUM_PHYSICAL, ep_size=WORLD,
                                             algorithm="eplb_plugin")


def _rank_ids(layer: int, rank: int) -> torch.Tensor:
    """[T, k] int32 logical ids of one rank's real rows: each rank leans to other experts
    (what DP attention's separate batches look like), some -1."""
    gen = torch.Generator().manual_seed(100 * layer + rank)
    weights = torch.ones(NUM_LOGICAL)
    weights[(3 * rank + layer) % NUM_LOGICAL] = 12.0
    weights[(3 * rank + layer + 1) % NUM_LOGICAL] = 6.0
    rows = ROWS[layer][rank]
    if rows == 0:
        return torch.empty(0, TOP_K, dtype=torch.int32)
    ids = torch.multinomial(weights, rows * TOP_K, replacement=True, generator=gen).view(rows, TOP_K)
    ids[torch.rand(rows, TOP_K, generator=gen) < 0.05] = -1
    return ids.to(torch.int32)


def _whole_pass(layer: int) -> tuple[torch.Tensor, list[int]]:
    """The pass's real rows in rank order, and each rank's first row in it."""
    parts = [_rank_ids(layer, r) for r in range(WORLD)]
    starts = [sum(p.shape[0] for p in parts[:r]) for r in range(WORLD)]
    return torch.cat(parts), starts


def _busiest_split_expert(layer: int) -> int:
    """The expert with the most tokens of the pass among those with slots on several GPUs
    (the ones minmax splits)."""
    phy2log = _placement().physical_to_logical_map[layer]
    gpus = phy2log.new_zeros(NUM_LOGICAL, WORLD, dtype=torch.bool)
    gpus[phy2log, torch.arange(NUM_PHYSICAL) // (NUM_PHYSICAL // WORLD)] = True
    whole, _ = _whole_pass(layer)
    tokens = torch.bincount(whole[whole >= 0].long(), minlength=NUM_LOGICAL)
    return int((tokens * (gpus.sum(1) > 1)).argmax())


def _one_dispatcher(ids: torch.Tensor, layer: int, *, whole_pass: bool) -> torch.Tensor:
    """What one dispatcher of ``ids`` picks (the torch reference): the whole pass's split
    (``whole_pass``: it stops once no step lowers the peak) or one rank's share's."""
    from eplb_plugin.dispatch import minmax_dispatch
    from eplb_plugin.integrations.sglang_dispatch import tables_for_map

    tables = tables_for_map(_placement().physical_to_logical_map, num_logical_experts=NUM_LOGICAL, ep_size=WORLD)
    return minmax_dispatch(ids, tables, layer=layer, num_slots=NUM_PHYSICAL, use_kernel=False, whole_pass=whole_pass)


def _slot_loads(physical: torch.Tensor) -> torch.Tensor:
    return torch.bincount(physical[physical >= 0].long(), minlength=NUM_PHYSICAL)


# ---------------------------------------------------------------------- 3 gloo ranks

_COORDINATOR: list = []  # this rank's SGLang GroupCoordinator, built once per process


def _sglang_rank(rank: int, *, setting: str, a2a_backend: str = "deepep") -> None:
    """This process as one SGLang rank: runtime flags, the MoE EP group as a real
    GroupCoordinator over gloo, a fresh global metadata (so the live tables and their exchange
    are resolved again) and the plugin's setting."""
    from eplb_plugin.integrations.sglang_common import CONFIG_ENV

    if str(STUBS_DIR) not in sys.path:  # a spawned rank of its own: the torchvision stand-in stays for its life
        sys.path.insert(0, str(STUBS_DIR))
    from sglang.srt import runtime_context as rc
    from sglang.srt.distributed.parallel_state import GroupCoordinator
    from sglang.srt.eplb import expert_location

    torch.set_num_threads(1)
    fake_runtime(ep_size=WORLD, tp_rank=rank, ep_dispatch_algorithm="minmax", moe_a2a_backend=a2a_backend,
                 ep_num_redundant_experts=NUM_PHYSICAL - NUM_LOGICAL)
    if not _COORDINATOR:
        _COORDINATOR.append(GroupCoordinator(
            group_ranks=[list(range(WORLD))], local_rank=rank, torch_distributed_backend="gloo", use_pynccl=False,
            use_mscclpp=False, use_custom_allreduce=False, use_torch_symm_mem_all_reduce=False,
            use_hpu_communicator=False, use_xpu_communicator=False, group_name="moe_ep"))
    rc._PARALLEL._stamp.update(moe_ep_group=_COORDINATOR[0], moe_ep_size=WORLD, moe_ep_rank=rank)
    location = _placement()
    metadata = expert_location.ExpertLocationMetadata._init_raw(
        ep_size=WORLD, physical_to_logical_map=location.physical_to_logical_map,
        logical_to_all_physical_map=location.logical_to_physical_map)
    expert_location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
    os.environ[CONFIG_ENV] = json.dumps({"eplb_dispatch_counts": setting})


def _map_own_tokens(rank: int) -> dict[int, torch.Tensor]:
    """Every layer as SGLang runs it on this rank: its real rows (plus padding rows past the
    forward context's bound in PADDED_LAYER on rank 0) through the hooked mapping, or the
    idle path (``empty_topk_output``) where it has no tokens. Returns layer -> [T, k] slots
    of the real rows."""
    from sglang.srt.eplb import expert_location_dispatch as eld
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    from eplb_plugin.integrations import sglang_dispatch

    init_new = eld.ExpertLocationDispatchInfo.init_new.__func__
    out = {}
    for layer in range(NUM_LAYERS):
        ids = _rank_ids(layer, rank)
        if ids.shape[0] == 0:
            sglang_dispatch.empty_topk_output_joins_exchange(None, SimpleNamespace(is_draft=False), torch.device("cpu"))
            out[layer] = ids.long()
            continue
        real_rows = ids.shape[0]
        if layer == PADDED_LAYER and rank == 0:  # padding rows all pick a replicated expert: counted, they would shift the split
            hot = _busiest_split_expert(layer)
            ids = torch.cat([ids, torch.full((PAD_ROWS, TOP_K), hot, dtype=torch.int32)])
        bound = torch.tensor([real_rows])
        with forward_context(ForwardContext(attn_backend=None, moe_num_token_non_padded=lambda bound=bound: bound)):
            info = sglang_dispatch.dispatch_info_init_new(init_new, eld.ExpertLocationDispatchInfo, layer)
            physical = sglang_dispatch.topk_ids_logical_to_physical(eld.topk_ids_logical_to_physical, ids, info)
        out[layer] = physical[:real_rows].long()
    return out


def _union_loads(mine: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    loads = _slot_loads(mine)
    dist.all_reduce(loads, group=group)
    return loads


def _ranks_with_global_counts_serve_what_one_dispatcher_serves(rank: int, group) -> None:
    from eplb_plugin.integrations.sglang_counts import GroupCountExchange
    from eplb_plugin.integrations.sglang_dispatch import LIVE_TABLES

    _sglang_rank(rank, setting="global")
    mapped = _map_own_tokens(rank)
    assert isinstance(LIVE_TABLES.exchange, GroupCountExchange)
    assert (LIVE_TABLES.exchange.world_size, LIVE_TABLES.exchange.rank) == (WORLD, rank)
    for layer in range(NUM_LAYERS):
        whole, starts = _whole_pass(layer)
        reference = _one_dispatcher(whole, layer, whole_pass=True)
        mine = reference[starts[rank]:starts[rank] + ROWS[layer][rank]]
        assert torch.equal(mapped[layer], mine), f"layer {layer}"  # its own rows' share of the one split
        assert torch.equal(_union_loads(mapped[layer], group), _slot_loads(reference)), f"layer {layer}"


def _ranks_with_local_counts_split_their_own_tokens(rank: int, group) -> None:
    from eplb_plugin.integrations.sglang_dispatch import LIVE_TABLES

    _sglang_rank(rank, setting="local")
    mapped = _map_own_tokens(rank)
    assert LIVE_TABLES.exchange is None and not LIVE_TABLES.whole_pass  # an all-to-all backend: its own rows
    differs = []
    for layer in range(NUM_LAYERS):
        own = _rank_ids(layer, rank)
        assert torch.equal(mapped[layer], _one_dispatcher(own, layer, whole_pass=False)), f"layer {layer}"
        whole, _ = _whole_pass(layer)
        differs.append(not torch.equal(_union_loads(mapped[layer], group),
                                       _slot_loads(_one_dispatcher(whole, layer, whole_pass=True))))
    assert any(differs), "local counts gave the whole pass's loads on every layer: the case shows nothing"


def _without_an_all_to_all_backend_global_runs_no_exchange(rank: int, group) -> None:
    """Every rank routes the same gathered rows there: the counts are the pass's already."""
    from eplb_plugin.integrations.sglang_dispatch import LIVE_TABLES

    _sglang_rank(rank, setting="global", a2a_backend="none")
    ids = _rank_ids(0, 0)  # the same rows on every rank
    from sglang.srt.eplb import expert_location_dispatch as eld

    from eplb_plugin.integrations import sglang_dispatch

    info = sglang_dispatch.dispatch_info_init_new(eld.ExpertLocationDispatchInfo.init_new.__func__,
                                                  eld.ExpertLocationDispatchInfo, 0)
    physical = sglang_dispatch.topk_ids_logical_to_physical(eld.topk_ids_logical_to_physical, ids, info)
    assert LIVE_TABLES.exchange is None and LIVE_TABLES.whole_pass  # every rank routes the whole pass
    assert torch.equal(physical.long(), _one_dispatcher(ids, 0, whole_pass=True))


def test_minmax_in_sglang_splits_the_whole_pass_with_global_counts_and_each_ranks_own_with_local():
    """3 gloo ranks, each routing different tokens through SGLang's hooked mapping (rank 1
    idle in one layer, rank 0 with padding rows in another), the MoE EP group a real SGLang
    GroupCoordinator: with --eplb-dispatch-counts global each rank's rows get exactly their
    share of one dispatcher's split of the whole pass, so the ranks' per-slot loads add up to
    that dispatcher's; with local each rank splits its own rows and the loads differ; without
    an all-to-all backend global runs no exchange."""
    from conftest import run_gloo_cases

    cases = [_ranks_with_global_counts_serve_what_one_dispatcher_serves, _ranks_with_local_counts_split_their_own_tokens,
             _without_an_all_to_all_backend_global_runs_no_exchange]
    results = run_gloo_cases(cases, world=WORLD)
    failed = {key: value for key, value in results.items() if value != "ok"}
    assert len(results) == WORLD * len(cases) and not failed, failed


# ---------------------------------------------------------------------- in process


def test_global_counts_are_refused_where_the_ep_group_is_not_the_placements(monkeypatch):
    """The all-gather runs over SGLang's MoE EP group; a group of another size than the
    placement's EP ranks is refused, naming the flag and the fix."""
    with stubs_on_path():
        import sglang.srt.layers.moe.utils  # noqa: F401  (imports a multimodal module that wants torchvision)
        from sglang.srt import runtime_context as rc

    from eplb_plugin.integrations.sglang_counts import resolve_count_exchange

    fake_runtime(ep_size=4, ep_dispatch_algorithm="minmax", moe_a2a_backend="deepep")
    monkeypatch.setitem(rc._PARALLEL._stamp, "moe_ep_group", SimpleNamespace(world_size=2, rank_in_group=0))
    with pytest.raises(ConfigError, match=r"--eplb-dispatch-counts global .*\(2 ranks\).*spans 4 EP ranks; use --eplb-dispatch-counts local"):
        resolve_count_exchange(ep_size=4, setting="global")
    assert resolve_count_exchange(ep_size=4, setting="local") is None


def test_the_split_may_stop_early_only_where_every_rank_routes_the_whole_pass(monkeypatch):
    """SGLang's own ``is_moe_input_scattered_across_dp_ranks``: without an all-to-all backend
    every rank routes the gathered rows (the whole pass: the split may stop once no step
    lowers the peak); with DeepEP each rank routes its own (every step, for the ranks' sum);
    an SGLang without the helper gets every step."""
    with stubs_on_path():
        import sglang.srt.layers.moe.utils  # noqa: F401  (imports a multimodal module that wants torchvision)

    from eplb_plugin.integrations.sglang_counts import routes_whole_pass

    fake_runtime(ep_size=4, ep_dispatch_algorithm="minmax", moe_a2a_backend="none")
    assert routes_whole_pass()
    fake_runtime(ep_size=4, ep_dispatch_algorithm="minmax", moe_a2a_backend="deepep")
    assert not routes_whole_pass()
    fake_runtime(ep_size=4, ep_dispatch_algorithm="minmax", moe_a2a_backend="none")
    monkeypatch.setitem(sys.modules, "sglang.srt.layers.moe.utils", None)  # the import fails
    assert not routes_whole_pass()


def test_a_bad_setting_in_the_plugins_config_names_the_valid_ones():
    from eplb_plugin.integrations.sglang_common import CONFIG_ENV
    from eplb_plugin.integrations.sglang_counts import dispatch_counts_setting

    assert dispatch_counts_setting({}) == "local"
    assert dispatch_counts_setting({CONFIG_ENV: '{"eplb-dispatch-counts": "global"}'}) == "global"
    with pytest.raises(ConfigError, match=r"key 'eplb_dispatch_counts' must be one of \['global', 'local'\], got 'both'"):
        dispatch_counts_setting({CONFIG_ENV: '{"eplb_dispatch_counts": "both"}'})


def test_the_minmax_steps_setting_is_read_from_the_plugins_config_and_checked():
    from eplb_plugin.integrations.sglang_common import CONFIG_ENV
    from eplb_plugin.integrations.sglang_dispatch import minmax_steps_setting

    assert minmax_steps_setting({}) is None  # the kernels' default
    assert minmax_steps_setting({CONFIG_ENV: '{"eplb-dispatch-minmax-steps": 4}'}) == 4
    with pytest.raises(ConfigError, match=r"--eplb-dispatch-minmax-steps must be an int in \[1, 64\]"):
        minmax_steps_setting({CONFIG_ENV: '{"eplb_dispatch_minmax_steps": 0}'})


# ---------------------------------------------------------------------- SGLang's ServerArgs

FLAG_SCRIPT = """
    out = {}
    _, out["before_plugins"] = parse(["--eplb-dispatch-counts", "global"])
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from eplb_plugin.integrations import sglang as plugin
    out["applied"] = plugin.applied_hooks()
    _, out["bad"] = parse(["--ep-dispatch-algorithm", "minmax", "--eplb-dispatch-counts", "both"])
    os.environ["EPLB_PLUGIN_CONFIG"] = json.dumps({"eplb_transfer_budget_mb": 512})
    args, _ = parse(["--ep-dispatch-algorithm", "minmax"])
    out["default_config"] = json.loads(os.environ["EPLB_PLUGIN_CONFIG"])
    args, _ = parse(["--ep-dispatch-algorithm", "minmax", "--eplb-dispatch-counts", "global"])
    out["config"] = json.loads(os.environ["EPLB_PLUGIN_CONFIG"])
    out["kept_by_sglang"] = hasattr(args, "eplb_dispatch_counts")
    print("RESULT " + json.dumps(out))
"""


def test_the_flag_parses_on_sglangs_server_args_and_reaches_the_children():
    """Stock SGLang has no --eplb-dispatch-counts; with the plugin its parser takes global or
    local (default local, which puts nothing in the children's config), refuses another
    value naming both, and a given value travels in $EPLB_PLUGIN_CONFIG. With global in the
    plugin's config (as SGLang's children see it) the idle-rank hooks are registered and
    applied on SGLang's TopK and HashTopK."""
    out = run_sglang_script(FLAG_SCRIPT, timeout_s=SUBPROCESS_TIMEOUT_S,
                            EPLB_PLUGIN_CONFIG='{"eplb_dispatch_counts": "global"}')
    assert "unrecognized arguments: --eplb-dispatch-counts global" in out["before_plugins"]
    assert all(out["applied"].values()), out["applied"]
    for target in ("sglang.srt.layers.moe.topk.TopK.empty_topk_output",
                   "sglang.srt.layers.moe.hash_topk.HashTopK.empty_topk_output"):
        assert out["applied"].get(target), target
    assert "argument --eplb-dispatch-counts: invalid choice: 'both' (choose from global, local)" in out["bad"] \
        or "invalid choice: 'both' (choose from 'global', 'local')" in out["bad"], out["bad"]
    assert out["default_config"] == {"eplb_transfer_budget_mb": 512}  # the default (local) adds nothing
    assert out["config"] == {"eplb_transfer_budget_mb": 512, "eplb_dispatch_counts": "global"}
    assert not out["kept_by_sglang"]
