"""``--ep-dispatch-algorithm minmax`` in SGLang through the plugin's hooks: the flag, SGLang's
logical -> physical mapping running the project's split, the recorder counting it once, and
the tables following the live placement."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from test_sglang_helpers import (
    fake_model_layout,
    fake_runtime,
    import_sglang_or_skip,
    run_sglang_script,
    stubs_on_path,
)

from eplb_plugin.errors import ConfigError
from eplb_plugin.kernels.minmax import build_minmax_tables, minmax_choose, minmax_gpu_shares
from eplb_plugin.location import ExpertLocation

from conftest import distinct_slot_weights

import_sglang_or_skip()
pytestmark = pytest.mark.sglang

NUM_LAYERS, NUM_LOGICAL, EP_SIZE, NUM_PHYSICAL = 3, 12, 4, 16
SUBPROCESS_TIMEOUT_S = 180
REAL_ROWS = 17  # of the 23 rows select_experts gets in the padded-batch case


def _placement(seed: int) -> ExpertLocation:
    gen = torch.Generator().manual_seed(seed)
    counts = torch.rand(NUM_LAYERS, NUM_LOGICAL, generator=gen) ** 4 * 1000  # a few hot experts per layer
    return ExpertLocation.from_logical_count(counts, num_physical_experts=NUM_PHYSICAL, ep_size=EP_SIZE,
                                             algorithm="eplb_plugin")


def _pass_ids(seed: int, tokens: int = 41, top_k: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(NUM_LOGICAL, generator=gen) ** 3 + 0.01
    ids = torch.multinomial(weights, tokens * top_k, replacement=True, generator=gen).view(tokens, top_k)
    ids[torch.rand(tokens, top_k, generator=gen) < 0.05] = -1  # padding
    return ids.to(torch.int32)


def _reference_minmax(phy2log: torch.Tensor, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """kernels/minmax.py's choice for one pass of one layer, occurrence order counted here (a
    whole pass: these runs have no all-to-all backend, so every rank routes every token and
    the split stops once no step lowers the peak)."""
    tables = build_minmax_tables(phy2log, NUM_LOGICAL, num_gpus=EP_SIZE)
    flat = ids.flatten().tolist()
    counts = torch.zeros(1, NUM_LOGICAL)
    seen = [0] * NUM_LOGICAL
    experts, positions = [], []
    for e in flat:
        if e >= 0:
            counts[0, e] += 1
            experts.append(e)
            positions.append(seen[e])
            seen[e] += 1
    shares, _ = minmax_gpu_shares(counts, tables.multi_experts[layer:layer + 1], tables.multi_gpus[layer:layer + 1],
                                  tables.single_slots[layer:layer + 1], stop=True)
    chosen = minmax_choose(torch.tensor(positions), torch.tensor(experts), shares[0], tables.multi_row[layer],
                           tables.slot_on_gpu[layer]).tolist()
    out = [chosen.pop(0) if e >= 0 else -1 for e in flat]
    return torch.tensor(out).view_as(ids)


def _gpu_loads(physical: torch.Tensor) -> torch.Tensor:
    valid = physical[physical >= 0].long()
    return torch.bincount(valid // (NUM_PHYSICAL // EP_SIZE), minlength=EP_SIZE)


SGLANG_SCRIPT = """
    from types import SimpleNamespace
    import torch

    out = {}
    _, out["before_plugins"] = parse(["--enable-eplb", "--ep-dispatch-algorithm", "minmax"])
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from eplb_plugin.integrations import sglang as plugin
    out["applied"] = plugin.applied_hooks()
    args, _ = parse(["--enable-eplb", "--ep-dispatch-algorithm", "minmax"])
    out["parsed"] = args.ep_dispatch_algorithm
    out["sglang_name"] = parse(["--enable-eplb", "--ep-dispatch-algorithm", "dynamic"])[0].ep_dispatch_algorithm
    _, out["unknown"] = parse(["--enable-eplb", "--ep-dispatch-algorithm", "waterfill"])
    from eplb_plugin.errors import ConfigError
    os.environ["SGLANG_OPT_DEEPGEMM_MEGA_GATE"] = "1"
    try:
        parse(["--enable-eplb", "--ep-dispatch-algorithm", "minmax"])
        out["mega_gate"] = "accepted"
    except ConfigError as exc:
        out["mega_gate"] = str(exc)
    del os.environ["SGLANG_OPT_DEEPGEMM_MEGA_GATE"]

    sys.path.insert(0, os.environ["EPLB_TESTS_DIR"])
    from test_sglang_helpers import fake_runtime
    case = json.loads(os.environ["MINMAX_CASE"])
    fake_runtime(ep_size=case["ep_size"], enable_eplb=True, ep_dispatch_algorithm="minmax",
                 expert_distribution_recorder_mode="stat", ep_num_redundant_experts=case["redundant"])
    from sglang.srt.eplb import expert_distribution, expert_location
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo
    from sglang.srt.layers.moe import topk
    phy2log = torch.tensor(case["phy2log"])
    metadata = expert_location.ExpertLocationMetadata._init_raw(
        ep_size=case["ep_size"], physical_to_logical_map=phy2log,
        logical_to_all_physical_map=torch.tensor(case["log2phy"]))
    expert_location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
    # SGLang's own entry points (the names its top-k code calls), patched by the hooks.
    out["mapped"] = []
    for layer, ids in enumerate(case["ids"]):
        info = ExpertLocationDispatchInfo.init_new(layer)
        out["mapped"].append(topk.topk_ids_logical_to_physical(torch.tensor(ids, dtype=torch.int32), info).tolist())
    out["dtype"] = str(topk.topk_ids_logical_to_physical(torch.tensor(case["ids"][0], dtype=torch.int32),
                                                         ExpertLocationDispatchInfo.init_new(0)).dtype)
    import dataclasses
    unknown = dataclasses.replace(ExpertLocationDispatchInfo.init_new(0), ep_dispatch_algorithm="waterfill")
    try:
        topk.topk_ids_logical_to_physical(torch.tensor(case["ids"][0], dtype=torch.int32), unknown)
        out["unknown_mapping"] = "mapped"
    except NotImplementedError as exc:
        out["unknown_mapping"] = str(exc)

    # A whole select_experts on CPU with the project's recorder: SGLang maps, then counts.
    recorder = expert_distribution.ExpertDistributionRecorder.init_new(metadata, 0)
    expert_distribution.set_global_expert_distribution_recorder(recorder)
    recorder.start_record()
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(23, phy2log.max().item() + 1, generator=gen)
    batch = SimpleNamespace(input_ids=torch.arange(23), positions=torch.arange(23), extend_seq_lens_cpu=[23],
                            forward_mode=SimpleNamespace(value=1))
    with recorder.with_forward_pass(0, batch):
        with recorder.with_current_layer(1):
            result = topk.select_experts(
                hidden_states=torch.zeros(23, 4), router_logits=logits,
                topk_config=topk.TopKConfig(top_k=3, torch_native=True), layer_id=1,
                expert_location_dispatch_info=ExpertLocationDispatchInfo.init_new(1))
            out["select_ids"] = result.topk_ids.tolist()
            out["logical_ids"] = torch.topk(logits, 3, dim=-1).indices.tolist()
            out["recorded"] = recorder.pass_counts[1].tolist()
    out["recorder"] = type(recorder).__module__

    # A padded batch (a CUDA graph's size): SGLang's forward context bounds the real rows.
    # The padding rows all pick a replicated expert, which would shift its split if counted.
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
    bound = torch.tensor([case["real_rows"]])
    logits[case["real_rows"]:, case["hot"]] = 50.0
    out["padded_logical_ids"] = torch.topk(logits, 3, dim=-1).indices.tolist()
    with forward_context(ForwardContext(attn_backend=None, moe_num_token_non_padded=lambda: bound)):
        with recorder.with_forward_pass(1, batch):
            with recorder.with_current_layer(2):
                result = topk.select_experts(
                    hidden_states=torch.zeros(23, 4), router_logits=logits,
                    topk_config=topk.TopKConfig(top_k=3, torch_native=True), layer_id=2,
                    num_token_non_padded=bound, expert_location_dispatch_info=ExpertLocationDispatchInfo.init_new(2))
                out["padded_select_ids"] = result.topk_ids.tolist()
                out["padded_recorded"] = recorder.pass_counts[2].tolist()

    # Each layer is counted once whoever counts it: the mapping (minmax, through the recorder's
    # buffer) or the hook (SGLang's own algorithms); per mode, off, and on the kernels.
    from eplb_plugin.integrations import sglang_dispatch
    from eplb_plugin.recorder import ExpertDistributionRecorder

    def select(rec, layer, info=None, bound=None, seed=6):
        logits = torch.randn(23, phy2log.max().item() + 1, generator=torch.Generator().manual_seed(seed))
        info = info or ExpertLocationDispatchInfo.init_new(layer)
        with rec.with_forward_pass(7, batch), rec.with_current_layer(layer):
            ids = topk.select_experts(hidden_states=torch.zeros(23, 4), router_logits=logits,
                                      topk_config=topk.TopKConfig(top_k=3, torch_native=True), layer_id=layer,
                                      num_token_non_padded=bound, expert_location_dispatch_info=info).topk_ids
            counts = getattr(rec, "pass_counts", None)  # SGLang's no-op recorder has none
            return ids.tolist(), None if counts is None else counts[layer].tolist()

    def recorder_of(mode):
        rec = ExpertDistributionRecorder.from_metadata(metadata, 0, mode=mode, max_tokens_per_pass=64, top_k=3)
        expert_distribution.set_global_expert_distribution_recorder(rec)
        rec.start_record()
        return rec

    out["by_mode"] = {}
    for mode in ("stat", "per_pass", "per_token", "stat_approx"):
        rec = recorder_of(mode)
        ids, _ = select(rec, 1)
        dumped = rec.dump_record("object")
        entry = {"ids": ids}
        if mode == "stat":
            entry["logical"] = dumped["logical_count"].tolist()
        elif mode in ("per_pass", "per_token"):
            entry["recorded"] = dumped["records"][0]["global_physical_count"][1].tolist()
        if mode == "per_token":
            entry["topk_ids"] = dumped["records"][0]["topk_ids_of_layer"][1].tolist()
        if mode == "stat_approx":
            entry["recorded"] = rec.pass_counts.tolist()
        out["by_mode"][mode] = entry
    rec = recorder_of("stat")
    rec.stop_record()
    out["stopped"] = select(rec, 1)
    expert_distribution.set_global_expert_distribution_recorder(None)  # SGLang's no-op recorder
    out["off_ids"] = select(expert_distribution.get_global_expert_distribution_recorder(), 1)[0]
    rec = recorder_of("stat")
    with rec.with_forward_pass(8, batch), rec.with_current_layer(2):  # the mapping alone, then SGLang's hook
        mapped = topk.topk_ids_logical_to_physical(torch.tensor(case["ids"][2], dtype=torch.int32),
                                                   ExpertLocationDispatchInfo.init_new(2))
        out["mapping_counted"] = rec.pass_counts[2].tolist()
        rec.on_select_experts(mapped)
        out["mapping_then_hook"] = [mapped.tolist(), rec.pass_counts[2].tolist()]
    out["dynamic"] = select(rec, 1, dataclasses.replace(ExpertLocationDispatchInfo.init_new(1),
                                                        ep_dispatch_algorithm="dynamic"))
    # The Triton kernels (interpreted on CPU), a padded batch: only the real rows count.
    sglang_dispatch.use_triton = lambda backend, tensor: True
    import eplb_plugin.kernels.minmax_triton as minmax_triton
    real_launch, bounds = minmax_triton.minmax_dispatch_triton, []

    def launch(*args, **kwargs):  # what the kernels were given: the padding bound they read
        bounds.append(None if kwargs["num_valid_rows"] is None else int(kwargs["num_valid_rows"].reshape(-1)[0]))
        return real_launch(*args, **kwargs)

    minmax_triton.minmax_dispatch_triton = launch
    with forward_context(ForwardContext(attn_backend=None, moe_num_token_non_padded=lambda: bound)):
        out["kernels"] = select(rec, 0, bound=bound)
    out["kernel_bounds"] = bounds
    print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def sglang_run():
    """One fresh process (hooks can be applied once per process) running SGLANG_SCRIPT."""
    location = _placement(0)
    ids = [_pass_ids(seed) for seed in range(NUM_LAYERS)]
    case = {"phy2log": location.physical_to_logical_map.tolist(),
            "log2phy": location.logical_to_physical_map.tolist(), "ep_size": EP_SIZE,
            "redundant": NUM_PHYSICAL - NUM_LOGICAL, "ids": [i.tolist() for i in ids], "real_rows": REAL_ROWS,
            "hot": int(location.logical_replica_count[2].argmax())}
    out = run_sglang_script(SGLANG_SCRIPT, timeout_s=SUBPROCESS_TIMEOUT_S, MINMAX_CASE=json.dumps(case),
                           TRITON_INTERPRET="1")
    return location, ids, out


def test_the_flag_accepts_minmax_only_with_the_plugin_and_still_refuses_unknown_names(sglang_run):
    """Stock SGLang refuses minmax; with the plugin's hooks it parses, SGLang's names keep
    parsing, an unknown name is refused naming every valid one, and minmax with SGLang's mega
    gate (which would bypass it) is refused when the launcher reads the flags."""
    _, _, out = sglang_run
    assert "invalid choice: 'minmax'" in out["before_plugins"]
    assert all(out["applied"].values()), out["applied"]
    assert out["parsed"] == "minmax" and out["sglang_name"] == "dynamic"
    assert "invalid choice: 'waterfill'" in out["unknown"]
    assert "'static', 'dynamic', 'fake', 'lp', 'minmax'" in out["unknown"], out["unknown"]
    assert "SGLANG_OPT_DEEPGEMM_MEGA_GATE=1" in out["mega_gate"]  # refused in the launcher


def test_sglangs_mapping_runs_the_projects_minmax_for_each_layer(sglang_run):
    """topk_ids_logical_to_physical under minmax returns slots of the same logical experts
    (padding kept), in SGLang's dtype, and exactly kernels/minmax.py's choice for that layer's
    pass, hence its per-GPU load."""
    location, ids, out = sglang_run
    phy2log = location.physical_to_logical_map
    for layer, (logical, mapped) in enumerate(zip(ids, out["mapped"])):
        physical = torch.tensor(mapped)
        valid = logical >= 0
        assert torch.equal(physical[~valid], torch.full_like(physical[~valid], -1))
        assert torch.equal(phy2log[layer][physical[valid]], logical[valid].long())
        expected = _reference_minmax(phy2log, layer, logical)
        assert torch.equal(physical, expected), f"layer {layer}"
        assert torch.equal(_gpu_loads(physical), _gpu_loads(expected))
    assert out["dtype"] == "torch.int32"
    assert "waterfill" in out["unknown_mapping"]  # a name neither SGLang nor the plugin knows: SGLang's error


def test_minmax_peak_gpu_load_is_the_fractional_split_to_within_a_token_per_replicated_expert(sglang_run):
    """The split follows the pass: the hottest GPU gets no more than the fractional split
    kernels/minmax.py computes for the layer's counts, plus one token per replicated expert."""
    location, ids, out = sglang_run
    phy2log = location.physical_to_logical_map
    tables = build_minmax_tables(phy2log, NUM_LOGICAL, num_gpus=EP_SIZE)
    for layer, (logical, mapped) in enumerate(zip(ids, out["mapped"])):
        counts = torch.bincount(logical[logical >= 0].long(), minlength=NUM_LOGICAL).unsqueeze(0)
        _, fractional = minmax_gpu_shares(counts, tables.multi_experts[layer:layer + 1],
                                          tables.multi_gpus[layer:layer + 1], tables.single_slots[layer:layer + 1])
        replicated = int((tables.multi_experts[layer] >= 0).sum())
        assert _gpu_loads(torch.tensor(mapped)).max() <= fractional.max() + replicated


def test_select_experts_maps_with_minmax_and_the_recorder_counts_each_slot_once(sglang_run):
    """SGLang's select_experts (CPU path) maps the router's choice with minmax, then hands the
    physical ids to the project's recorder, which counts each exactly once."""
    location, _, out = sglang_run
    assert out["recorder"].startswith("eplb_plugin.recorder")
    physical = torch.tensor(out["select_ids"])
    logical = torch.tensor(out["logical_ids"])
    phy2log = location.physical_to_logical_map
    assert torch.equal(phy2log[1][physical], logical)
    assert torch.equal(physical, _reference_minmax(phy2log, 1, logical))
    assert out["recorded"] == torch.bincount(physical.flatten(), minlength=NUM_PHYSICAL).tolist()



def test_rows_that_pad_the_batch_stay_out_of_the_split_and_the_counts(sglang_run):
    """Under a forward context whose bound says 17 of 23 rows are real (a CUDA graph's padded
    batch), the real rows get exactly the split of the real rows alone, SGLang masks the
    padding rows, and the recorder counts only the real rows."""
    location, _, out = sglang_run
    physical = torch.tensor(out["padded_select_ids"])
    logical = torch.tensor(out["padded_logical_ids"])
    phy2log = location.physical_to_logical_map
    assert torch.equal(physical[REAL_ROWS:], torch.full_like(physical[REAL_ROWS:], -1))
    assert torch.equal(physical[:REAL_ROWS], _reference_minmax(phy2log, 2, logical[:REAL_ROWS]))
    assert out["padded_recorded"] == torch.bincount(physical[:REAL_ROWS].flatten(), minlength=NUM_PHYSICAL).tolist()


def _slot_count(physical: list) -> list[int]:
    ids = torch.tensor(physical)
    return torch.bincount(ids[ids >= 0], minlength=NUM_PHYSICAL).tolist()


def test_the_mapping_counts_for_the_recorder_so_each_mode_sees_each_slot_once(sglang_run):
    """Under minmax the mapping adds its slots to the recorder's buffer and the recorder's
    hook adds nothing: stat, per_pass and per_token hold each slot once (per_token also the
    ids), stat_approx (counted from the dispatcher's receive counts) nothing from select_experts."""
    location, _, out = sglang_run
    modes = out["by_mode"]
    ids = modes["stat"]["ids"]
    assert all(m["ids"] == ids for m in modes.values())  # one split, whoever records it
    logical = torch.zeros(NUM_LOGICAL, dtype=torch.long)
    logical.index_add_(0, location.physical_to_logical_map[1], torch.tensor(_slot_count(ids)))
    assert modes["stat"]["logical"][0][1] == logical.tolist()
    assert modes["per_pass"]["recorded"] == _slot_count(ids)
    assert modes["per_token"]["recorded"] == _slot_count(ids) and modes["per_token"]["topk_ids"] == ids
    assert not any(any(row) for row in modes["stat_approx"]["recorded"])


def test_the_mapping_counts_in_its_own_launch_and_the_hook_then_adds_nothing(sglang_run):
    """topk_ids_logical_to_physical under minmax has already counted its slots into the
    recorder's buffer when it returns; SGLang's on_select_experts on them adds nothing."""
    _, _, out = sglang_run
    physical, after_hook = out["mapping_then_hook"]
    assert out["mapping_counted"] == _slot_count(physical) == after_hook
    assert sum(after_hook) > 0


def test_recording_off_or_stopped_leaves_the_mapping_alone_and_counts_nothing(sglang_run):
    """With SGLang's no-op recorder, or the project's stopped, the mapping asks for no buffer:
    the same slots, nothing counted."""
    _, _, out = sglang_run
    ids = out["by_mode"]["stat"]["ids"]
    stopped_ids, stopped_counts = out["stopped"]
    assert stopped_ids == ids and out["off_ids"] == ids
    assert not any(stopped_counts)


def test_sglangs_own_algorithms_are_still_counted_by_the_recorders_hook(sglang_run):
    """dynamic maps through SGLang's own code (no buffer taken), so the hook counts its slots, once."""
    location, _, out = sglang_run
    physical, recorded = out["dynamic"]
    assert torch.equal(location.physical_to_logical_map[1][torch.tensor(physical)],
                       torch.topk(torch.randn(23, NUM_LOGICAL, generator=torch.Generator().manual_seed(6)), 3).indices)
    assert recorded == _slot_count(physical)


def test_the_kernels_count_the_real_rows_of_a_padded_batch_once(sglang_run):
    """On the Triton kernels (interpreted here) the mapping's own count holds the real rows'
    slots once: the padding rows SGLang masks to -1 count nothing."""
    location, _, out = sglang_run
    physical, recorded = out["kernels"]
    assert out["kernel_bounds"] == [REAL_ROWS]  # one kernel launch, given the batch's bound
    ids = torch.tensor(physical)
    assert torch.equal(ids[REAL_ROWS:], torch.full_like(ids[REAL_ROWS:], -1))
    logical = torch.topk(torch.randn(23, NUM_LOGICAL, generator=torch.Generator().manual_seed(6)), 3).indices
    assert torch.equal(location.physical_to_logical_map[0][ids[:REAL_ROWS]], logical[:REAL_ROWS])
    assert recorded == _slot_count(physical)


# ---------------------------------------------------------------------- in process


@pytest.fixture
def sglang_location(monkeypatch):
    with stubs_on_path():
        from sglang.srt.eplb import expert_location
    fake_runtime(ep_size=EP_SIZE, ep_dispatch_algorithm="minmax", ep_num_redundant_experts=NUM_PHYSICAL - NUM_LOGICAL)
    fake_model_layout(monkeypatch, num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL)
    return expert_location


def _assert_tables_of(live, phy2log: torch.Tensor) -> None:
    from eplb_plugin.integrations.sglang_dispatch import tables_for_map

    for name, got, want in zip(live._fields, live, tables_for_map(phy2log, num_logical_experts=NUM_LOGICAL,
                                                                   ep_size=EP_SIZE)):
        assert torch.equal(got, want), name


def test_live_tables_follow_the_layers_a_rebalance_makes_live_in_place(sglang_location):
    """MetadataPublisher builds the target's minmax tables with its metadata off the serving
    thread; publish() copies the live layers' rows (and a partial layer's own) into the same
    tensors, so a captured graph reads the new placement."""
    from eplb_plugin.integrations.sglang_dispatch import LIVE_TABLES
    from eplb_plugin.integrations.sglang_metadata import MetadataPublisher

    start, target = _placement(1).physical_to_logical_map, _placement(2).physical_to_logical_map
    metadata = sglang_location.ExpertLocationMetadata.init_by_mapping(None, start, moe_ep_rank=0)
    sglang_location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
    live = LIVE_TABLES.for_metadata(metadata)
    addresses = [t.data_ptr() for t in live]
    _assert_tables_of(live, start)

    publisher = MetadataPublisher(None, rank=0, dispatch_algorithm="minmax")
    deadline = time.monotonic() + 60
    while not publisher.prepare(target):
        assert time.monotonic() < deadline, "the target's metadata was never built"
        time.sleep(0.01)
    partial = start.clone()
    partial[1] = target[1]
    partial[2, :4], partial[2, 4:8] = start[2, 4:8], start[2, :4]  # a layer a failed move left mixed
    assert publisher.publish(partial, target) == [1, 2]
    publisher.close()
    assert LIVE_TABLES.for_metadata(metadata) is live
    assert [t.data_ptr() for t in live] == addresses
    _assert_tables_of(live, partial)


def test_live_tables_follow_sglangs_own_metadata_update(sglang_location):
    """SGLang's updater rewriting rows (ExpertLocationMetadata.update, e.g. elastic EP) moves
    the live tables' rows with it (the AFTER hook's body)."""
    from eplb_plugin.integrations.sglang_dispatch import LIVE_TABLES, metadata_rows_updated

    start, other_map = _placement(3).physical_to_logical_map, _placement(4).physical_to_logical_map
    metadata = sglang_location.ExpertLocationMetadata.init_by_mapping(None, start, moe_ep_rank=0)
    other = sglang_location.ExpertLocationMetadata.init_by_mapping(None, other_map, moe_ep_rank=0)
    live = LIVE_TABLES.for_metadata(metadata)
    metadata.update(other, [0, 2])
    metadata_rows_updated(None, metadata, other, [0, 2])
    expected = start.clone()
    expected[[0, 2]] = other_map[[0, 2]]
    _assert_tables_of(live, expected)


def test_a_new_metadata_object_gets_tables_of_its_own(sglang_location):
    """Tables are keyed by SGLang's metadata object: a replaced global metadata is never
    served stale tables."""
    from eplb_plugin.integrations.sglang_dispatch import LIVE_TABLES

    first = sglang_location.ExpertLocationMetadata.init_by_mapping(None, _placement(5).physical_to_logical_map,
                                                                   moe_ep_rank=0)
    second_map = _placement(6).physical_to_logical_map
    second = sglang_location.ExpertLocationMetadata.init_by_mapping(None, second_map, moe_ep_rank=0)
    LIVE_TABLES.for_metadata(first)
    _assert_tables_of(LIVE_TABLES.for_metadata(second), second_map)


def test_the_live_tables_carry_the_plugins_split_steps(sglang_location, monkeypatch):
    """--eplb-dispatch-minmax-steps reaches SGLang's processes through the plugin's settings
    and is read with the tables (the mapping passes it to every call)."""
    from eplb_plugin.integrations import sglang_dispatch
    from eplb_plugin.integrations.sglang_common import CONFIG_ENV
    from eplb_plugin.integrations.sglang_dispatch import LIVE_TABLES

    monkeypatch.setenv(CONFIG_ENV, '{"eplb-dispatch-minmax-steps": 3}')
    metadata = sglang_location.ExpertLocationMetadata.init_by_mapping(None, _placement(7).physical_to_logical_map,
                                                                      moe_ep_rank=0)
    LIVE_TABLES.for_metadata(metadata)
    assert LIVE_TABLES.steps == 3
    sglang_location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
    calls = []
    monkeypatch.setattr(sglang_dispatch, "minmax_dispatch", lambda *a, **kw: calls.append(kw) or a[0])
    sglang_dispatch.map_topk_ids(torch.zeros(4, 2, dtype=torch.int32), 0, metadata.num_physical_experts)
    assert calls[0]["iterations"] == 3  # what the mapping runs with
    monkeypatch.delenv(CONFIG_ENV)
    other = sglang_location.ExpertLocationMetadata.init_by_mapping(None, _placement(8).physical_to_logical_map,
                                                                   moe_ep_rank=0)
    LIVE_TABLES.for_metadata(other)
    assert LIVE_TABLES.steps is None


def test_minmax_is_refused_at_start_up_where_sglangs_mega_gate_would_bypass_it():
    from eplb_plugin.integrations.sglang_checks import MEGA_GATE_ENV, check_dispatch_algorithm

    with pytest.raises(ConfigError, match=f"--ep-dispatch-algorithm minmax with {MEGA_GATE_ENV}=1"):
        check_dispatch_algorithm("minmax", {MEGA_GATE_ENV: "1"})
    check_dispatch_algorithm("minmax", {})
    check_dispatch_algorithm("static", {MEGA_GATE_ENV: "1"})  # SGLang's own names: SGLang's business


def test_the_manager_plans_for_an_equal_split_under_minmax(sglang_location):
    """The plugin's manager reads minmax from SGLang's resolved flags and plans for the split
    minmax works from (equal), as split_for_dispatch says."""
    from eplb_plugin.integrations.sglang_manager import eplb_args_from_sglang
    from eplb_plugin.manager.planning import PolicyChoice

    args = eplb_args_from_sglang()
    assert args.ep_dispatch_algorithm == "minmax"
    assert PolicyChoice.resolve(args, expert_weights=[]).split == "equal"  # what the manager asks the planner


def test_a_plugin_dispatch_info_without_a_layer_is_refused_clearly():
    """A dispatch info that did not come through the init_new hook names the missing hook."""
    from types import SimpleNamespace

    from eplb_plugin.integrations.sglang_dispatch import topk_ids_logical_to_physical

    info = SimpleNamespace(ep_dispatch_algorithm="minmax", num_physical_experts=NUM_PHYSICAL)
    with pytest.raises(ConfigError, match="no layer id.*init_new hook"):
        topk_ids_logical_to_physical(None, torch.zeros(2, 2, dtype=torch.int32), info)


def test_the_mapping_reads_no_tensor_data_on_the_host(sglang_location, monkeypatch):
    """No host synchronization: the whole minmax mapping runs on meta tensors (which hold no
    data, so any .item(), .tolist() or data-dependent shape would raise)."""
    from types import SimpleNamespace

    from eplb_plugin.integrations.sglang_dispatch import topk_ids_logical_to_physical

    phy2log = _placement(7).physical_to_logical_map
    metadata = SimpleNamespace(physical_to_logical_map=phy2log.to("meta"), physical_to_logical_map_cpu=phy2log,
                               num_logical_experts=NUM_LOGICAL, ep_size=EP_SIZE)
    monkeypatch.setattr(sglang_location, "get_global_expert_location_metadata", lambda: metadata)
    info = SimpleNamespace(ep_dispatch_algorithm="minmax", num_physical_experts=NUM_PHYSICAL, layer_id=1)
    ids = _pass_ids(8).to("meta")
    physical = topk_ids_logical_to_physical(None, ids, info)
    assert physical.device.type == "meta" and physical.shape == ids.shape and physical.dtype == torch.int32


def test_the_plugin_offers_only_project_algorithms_that_sglang_lacks():
    """Every name the plugin adds is in the project's dispatch registry and none is one of
    SGLang's (SGLang's names keep SGLang's meaning)."""
    import typing

    with stubs_on_path():
        from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

    from eplb_plugin.dispatch_info import DISPATCH_INFO
    from eplb_plugin.integrations.sglang_common import PLUGIN_DISPATCH_ALGORITHMS

    sglang_names = typing.get_args(ExpertLocationDispatchInfo.__dataclass_fields__["ep_dispatch_algorithm"].type)
    assert "dynamic" in sglang_names
    for name in PLUGIN_DISPATCH_ALGORITHMS:
        assert name in DISPATCH_INFO and name not in sglang_names


# ---------------------------------------------------------------------- a rebalance, 2 ranks

RB_WORLD, RB_LAYERS, RB_LOGICAL, RB_PHYSICAL = 2, 3, 6, 8  # layer 0 is dense (no routed experts)


def _rb_slot_weights(phy2log_row: torch.Tensor, rank: int) -> list[torch.Tensor]:
    return distinct_slot_weights(phy2log_row, rank, RB_PHYSICAL // RB_WORLD, with_int=False)


def _rebalance_case(rank: int, port: int) -> None:
    import threading

    import torch.distributed as dist
    from sglang.srt.eplb import expert_distribution, expert_location
    from sglang.srt.eplb import expert_location_dispatch as eld

    from eplb_plugin.integrations import sglang_dispatch, sglang_metadata
    from eplb_plugin.integrations.sglang import _recorder_init_new
    from eplb_plugin.integrations.sglang_manager import SGLangEPLBManager

    from conftest import destroy_process_group

    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool (hangs)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RB_WORLD)
    fake_runtime(ep_size=RB_WORLD, tp_rank=rank, enable_eplb=True, eplb_rebalance_num_iterations=1000,
                 expert_distribution_recorder_mode="stat", ep_num_redundant_experts=RB_PHYSICAL - RB_LOGICAL,
                 eplb_algorithm="eplb_plugin", eplb_rebalance_layers_per_chunk=1, ep_dispatch_algorithm="minmax")
    metadata = expert_location.ExpertLocationMetadata.init_trivial(None, moe_ep_rank=rank)
    expert_location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
    recorder = _recorder_init_new(expert_distribution.ExpertDistributionRecorder.init_new, metadata, rank)
    expert_distribution.set_global_expert_distribution_recorder(recorder)
    build_threads: list[str] = []  # where each minmax table build for the publisher ran
    build = sglang_metadata.tables_for_map

    def recorded_build(*args, **kwargs):
        build_threads.append(threading.current_thread().name)
        return build(*args, **kwargs)

    sglang_metadata.tables_for_map = recorded_build
    trivial = metadata.physical_to_logical_map_cpu.clone()
    model = SimpleNamespace(routed_experts_weights_of_layer={
        1: _rb_slot_weights(trivial[1], rank), 2: _rb_slot_weights(trivial[2], rank)})
    adapter = SGLangEPLBManager(model_config=None, get_model=lambda: model, get_expert_location_updater=lambda: None,
                                get_expert_backup_client=lambda: None, get_weight_updater=lambda: None)
    init_new = eld.ExpertLocationDispatchInfo.init_new.__func__

    def mapped(layer: int, ids: torch.Tensor) -> torch.Tensor:  # what SGLang's top-k runs, hooks applied
        info = sglang_dispatch.dispatch_info_init_new(init_new, eld.ExpertLocationDispatchInfo, layer)
        return sglang_dispatch.topk_ids_logical_to_physical(eld.topk_ids_logical_to_physical, ids, info)

    hot = torch.tensor([[2, 3], [2, 3], [3, 2], [4, 2], [2, 5]], dtype=torch.int32)
    for pass_id in range(3):
        with recorder.with_forward_pass(pass_id, None):
            for layer in (1, 2):
                with recorder.with_current_layer(layer):
                    recorder.on_select_experts(topk_ids=mapped(layer, hot))
        adapter.on_forward_pass_end()
    live = sglang_dispatch.LIVE_TABLES.for_metadata(metadata)
    addresses = [t.data_ptr() for t in live]
    for _ in adapter.rebalance():  # every layer now, one chunk per yield
        pass
    assert adapter.failures == []
    new = adapter.manager.location.physical_to_logical_map
    assert not torch.equal(new[1:], trivial[1:]), f"no rebalance happened: {adapter.manager.history}"
    assert expert_location.get_global_expert_location_metadata() is metadata
    assert [t.data_ptr() for t in sglang_dispatch.LIVE_TABLES.for_metadata(metadata)] == addresses
    for name, got, want in zip(live._fields, live, sglang_dispatch.tables_for_map(
            new, num_logical_experts=RB_LOGICAL, ep_size=RB_WORLD)):
        assert torch.equal(got, want), name
    assert build_threads == ["eplb-sglang-metadata"]  # once per rebalance, off the serving thread
    for layer in (1, 2):  # every token's slot holds its expert under the new placement
        assert torch.equal(new[layer][mapped(layer, hot).long()], hot.long()), f"layer {layer}"
    adapter.manager.close()
    dist.barrier()
    destroy_process_group()


def test_a_rebalance_under_minmax_moves_the_tables_with_the_weights(monkeypatch):
    """On 2 gloo ranks with --ep-dispatch-algorithm minmax: the plugin's manager rebalances
    (SGLang's rebalance() path), the target's minmax tables are built once, in the metadata
    thread, and copied into the live tensors as layers go live; afterwards SGLang's mapping
    sends every token to a slot holding its expert under the new placement."""

    from conftest import run_forked_ranks

    with stubs_on_path():
        import sglang.srt.eplb.eplb_manager  # noqa: F401  imported once; forked ranks share it
    fake_model_layout(monkeypatch, num_layers=RB_LAYERS, num_logical_experts=RB_LOGICAL)
    run_forked_ranks(_rebalance_case, RB_WORLD)
