"""SGLang's recorder construction returns the project's recorder, which counts and dumps as SGLang's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from test_sglang_helpers import fake_runtime, import_sglang_or_skip, stubs_on_path

from eplb_plugin.recorder import ExpertDistributionRecorder

from conftest import free_port

import_sglang_or_skip()
pytestmark = pytest.mark.sglang

NUM_LAYERS, NUM_LOGICAL, EP_SIZE = 3, 8, 1
NUM_PHYSICAL = 12  # 4 redundant slots on one rank


@pytest.fixture(scope="module")
def sglang_modules():
    """SGLang's recorder module (torchvision stand-in on the path) and a one-rank gloo group."""
    with stubs_on_path():
        from sglang.srt.eplb import expert_distribution, expert_location
    original_get_device = expert_distribution.get_device
    expert_distribution.get_device = lambda *_: "cpu"  # SGLang's own recorder asks for an accelerator
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield expert_distribution, expert_location
    expert_distribution.get_device = original_get_device
    if started:
        dist.destroy_process_group()


def _metadata(expert_location):
    p2l = torch.tensor([[(p * 5 + layer) % NUM_LOGICAL for p in range(NUM_PHYSICAL)] for layer in range(NUM_LAYERS)])
    p2l[:, :NUM_LOGICAL] = torch.arange(NUM_LOGICAL)  # every expert keeps a replica
    l2p = torch.full((NUM_LAYERS, NUM_LOGICAL, NUM_PHYSICAL), -1)
    for layer in range(NUM_LAYERS):
        for e in range(NUM_LOGICAL):
            slots = (p2l[layer] == e).nonzero().flatten()
            l2p[layer, e, : len(slots)] = slots
    return expert_location.ExpertLocationMetadata._init_raw(
        ep_size=EP_SIZE, physical_to_logical_map=p2l, logical_to_all_physical_map=l2p)


def _build_both(expert_distribution, metadata):
    from eplb_plugin.integrations.sglang import _recorder_init_new

    original = expert_distribution.ExpertDistributionRecorder.init_new
    ours = _recorder_init_new(original, metadata, 0)
    theirs = original(metadata, 0)
    return ours, theirs


def _drive(recorder, passes):
    """The hook calls SGLang's model runner and MoE layers make, identically for both recorders."""
    recorder.start_record()
    for pass_id, per_layer in enumerate(passes):
        batch = SimpleNamespace(input_ids=torch.arange(per_layer[0].shape[0]),
                                positions=torch.arange(per_layer[0].shape[0]),
                                extend_seq_lens_cpu=[per_layer[0].shape[0]], forward_mode=SimpleNamespace(value=1))
        with recorder.with_forward_pass(pass_id, batch):
            for layer, topk_ids in enumerate(per_layer):
                with recorder.with_current_layer(layer):
                    recorder.on_select_experts(topk_ids=topk_ids)
                    with recorder.disable_this_region():
                        recorder.on_select_experts(topk_ids=topk_ids)  # must not count


def _passes(seed: int, num_passes: int = 4):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_passes):
        per_layer = []
        for _layer in range(NUM_LAYERS):
            ids = torch.randint(0, NUM_PHYSICAL, (17, 2), generator=gen, dtype=torch.int32)
            ids[0, 1] = -1  # padding is not counted
            per_layer.append(ids)
        out.append(per_layer)
    return out


def _assert_same_window(mine: torch.Tensor, sglang: torch.Tensor) -> None:
    """Same per-pass [B, L, E] rows and the same sum. SGLang's ring buffer returns every slot
    (unfilled ones as zeros) in slot order, the project's the held passes oldest first."""
    mine, sglang = mine.to(torch.int64).cpu(), sglang.to(torch.int64).cpu()
    assert torch.equal(mine.sum(0), sglang.sum(0))

    def rows(t: torch.Tensor) -> list:
        return sorted(r for r in map(tuple, t.flatten(1).tolist()) if any(r))

    assert rows(mine) == rows(sglang)


@pytest.mark.parametrize("mode", ["stat", "stat_approx", "per_pass", "per_token"])
def test_init_new_builds_the_projects_recorder_in_every_mode(sglang_modules, mode):
    expert_distribution, expert_location = sglang_modules
    fake_runtime(ep_size=EP_SIZE, expert_distribution_recorder_mode=mode, moe_a2a_backend="deepep",
                 deepep_mode="normal")
    from eplb_plugin.integrations.sglang import _recorder_init_new

    recorder = _recorder_init_new(expert_distribution.ExpertDistributionRecorder.init_new,
                                  _metadata(expert_location), 0)
    assert isinstance(recorder, ExpertDistributionRecorder) and recorder.mode == mode


def test_init_new_keeps_sglangs_noop_recorder_when_recording_is_off(sglang_modules):
    expert_distribution, expert_location = sglang_modules
    fake_runtime(ep_size=EP_SIZE, expert_distribution_recorder_mode=None)
    from eplb_plugin.integrations.sglang import _recorder_init_new

    recorder = _recorder_init_new(expert_distribution.ExpertDistributionRecorder.init_new,
                                  _metadata(expert_location), 0)
    assert type(recorder).__name__ == "_ExpertDistributionRecorderNoop"


def test_stat_dumps_match_sglangs_recorder(sglang_modules, tmp_path, monkeypatch):
    """Same hook calls: the stat dump's logical_count equals SGLang's, as object and as file."""
    expert_distribution, expert_location = sglang_modules
    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(tmp_path))
    fake_runtime(ep_size=EP_SIZE, expert_distribution_recorder_mode="stat", expert_distribution_recorder_buffer_size=3)
    ours, theirs = _build_both(expert_distribution, _metadata(expert_location))
    passes = _passes(0)
    for rec in (ours, theirs):
        _drive(rec, passes)
    mine, sglang = ours.dump_record("object"), theirs.dump_record("object")
    assert mine["logical_count"].shape == (3, NUM_LAYERS, NUM_LOGICAL)  # the window keeps 3 passes
    _assert_same_window(mine["logical_count"], sglang["logical_count"])
    assert mine["average_utilization_rate_over_window"] == sglang["average_utilization_rate_over_window"]
    for rec in (ours, theirs):
        _drive(rec, passes)
        rec.dump_record()  # the HTTP endpoint's call: rank 0 writes a file
    files = sorted(tmp_path.glob("expert_distribution_recorder_*.pt"))
    assert len(files) == 2
    a, b = (torch.load(f, weights_only=True) for f in files)
    _assert_same_window(a["logical_count"], b["logical_count"])


def test_per_pass_records_match_sglangs_recorder(sglang_modules, tmp_path, monkeypatch):
    """per_pass / per_token files: one record per pass with the same global physical counts."""
    expert_distribution, expert_location = sglang_modules
    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(tmp_path))
    for mode in ("per_pass", "per_token"):
        fake_runtime(ep_size=EP_SIZE, expert_distribution_recorder_mode=mode)
        ours, theirs = _build_both(expert_distribution, _metadata(expert_location))
        passes = _passes(1, num_passes=3)
        dumps = []
        for rec in (ours, theirs):
            _drive(rec, passes)
            before = set(tmp_path.iterdir())
            rec.dump_record()
            (path,) = set(tmp_path.iterdir()) - before
            assert path.name.startswith("expert_distribution_recorder_") and path.name.endswith("_0.pt")
            dumps.append(torch.load(path, weights_only=False))
        mine, sglang = dumps
        assert len(mine["records"]) == len(sglang["records"]) == 3
        for r_mine, r_sglang in zip(mine["records"], sglang["records"]):
            assert r_mine["forward_pass_id"] == r_sglang["forward_pass_id"]
            assert torch.equal(torch.as_tensor(r_mine["global_physical_count"]).to(torch.int64),
                               r_sglang["global_physical_count"].to(torch.int64))
        assert torch.equal(torch.as_tensor(mine["last_physical_to_logical_map"]).cpu(),
                           sglang["last_physical_to_logical_map"].cpu())


def test_stat_approx_counts_deepep_receive_counts_as_sglang(sglang_modules):
    """stat_approx: DeepEP normal-dispatch receive counts give SGLang's logical_count."""
    expert_distribution, expert_location = sglang_modules
    fake_runtime(ep_size=EP_SIZE, expert_distribution_recorder_mode="stat_approx", moe_a2a_backend="deepep",
                 deepep_mode="normal")
    ours, theirs = _build_both(expert_distribution, _metadata(expert_location))
    gen = torch.Generator().manual_seed(2)
    for rec in (ours, theirs):
        rec.start_record()
    for pass_id in range(3):
        counts = [torch.randint(0, 30, (NUM_PHYSICAL,), generator=gen).tolist() for _ in range(NUM_LAYERS)]
        for rec in (ours, theirs):
            with rec.with_forward_pass(pass_id, None):
                for layer in range(NUM_LAYERS):
                    with rec.with_current_layer(layer):
                        rec.on_deepep_dispatch_normal(counts[layer], num_tokens_per_rank=None,
                                                      num_tokens_per_rdma_rank=None, num_tokens_per_expert=None)
    mine, sglang = ours.dump_record("object"), theirs.dump_record("object")
    _assert_same_window(mine["logical_count"], sglang["logical_count"])



def _dump(rec, mode, directory):
    """A recorder's dump as a dict: an object for stat modes, the file it wrote otherwise
    (SGLang's per_pass / per_token dumps only write files)."""
    if mode in ("stat", "stat_approx"):
        return rec.dump_record("object")
    before = set(directory.iterdir())
    rec.dump_record()
    (path,) = set(directory.iterdir()) - before
    return torch.load(path, weights_only=False)


def _capture_like_sglang(recorder, topk_ids_of_layer):
    """SGLang's CUDA-graph capture of one batch size (``capture_one`` in the graph backends):
    two eager warm-ups that call the model directly, outside ``with_forward_pass``; the MoE
    layers' hooks fire as in a real pass."""
    for _warm_up in range(2):
        for layer, topk_ids in enumerate(topk_ids_of_layer):
            with recorder.with_current_layer(layer):
                recorder.on_select_experts(topk_ids=topk_ids)


@pytest.mark.parametrize("mode", ["stat", "per_pass", "per_token"])
def test_graph_capture_warm_ups_are_not_counted_as_traffic(sglang_modules, mode, tmp_path, monkeypatch):
    """Two warm-ups of 128 identical tokens per captured batch size, then one recorded pass of
    10 tokens: the dump holds exactly the 10 tokens' counts, as SGLang's own recorder's."""
    expert_distribution, expert_location = sglang_modules
    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(tmp_path))
    fake_runtime(ep_size=EP_SIZE, expert_distribution_recorder_mode=mode)
    ours, theirs = _build_both(expert_distribution, _metadata(expert_location))
    dummy = [torch.zeros(128, 2, dtype=torch.int32)] * NUM_LAYERS
    real = [torch.tensor([[layer, 5]] * 10, dtype=torch.int32) for layer in range(NUM_LAYERS)]
    expected = torch.zeros(NUM_LAYERS, NUM_PHYSICAL, dtype=torch.int64)
    for layer in range(NUM_LAYERS):
        expected[layer, layer] += 10
        expected[layer, 5] += 10
    dumps = []
    for rec in (ours, theirs):
        rec.start_record()
        for _batch_size in range(2):
            _capture_like_sglang(rec, dummy)
        batch = SimpleNamespace(input_ids=torch.arange(10), positions=torch.arange(10),
                                extend_seq_lens_cpu=[10], forward_mode=SimpleNamespace(value=1))
        with rec.with_forward_pass(0, batch):
            for layer, topk_ids in enumerate(real):
                with rec.with_current_layer(layer):
                    rec.on_select_experts(topk_ids=topk_ids)
        dumps.append(_dump(rec, mode, tmp_path))
    mine, sglang = dumps
    if mode == "stat":
        _assert_same_window(mine["logical_count"], sglang["logical_count"])
        assert int(mine["logical_count"].sum()) == 2 * 10 * NUM_LAYERS
    else:
        (record,) = mine["records"]
        assert torch.equal(record["global_physical_count"].to(torch.int64), expected)
        assert torch.equal(sglang["records"][0]["global_physical_count"].to(torch.int64).cpu(), expected)


def test_per_token_records_follow_sglangs_contract(sglang_modules, tmp_path, monkeypatch):
    """per_token: capacity chunked_prefill_size * 8 tokens per pass (SGLang's), records carry
    SGLang's extend_seq_lens and forward_mode keys, and two-batch overlap is refused."""
    from eplb_plugin.errors import ConfigError
    from eplb_plugin.integrations.sglang import _recorder_init_new

    expert_distribution, expert_location = sglang_modules
    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(tmp_path))
    fake_runtime(ep_size=EP_SIZE, expert_distribution_recorder_mode="per_token", chunked_prefill_size=1500)
    ours, theirs = _build_both(expert_distribution, _metadata(expert_location))
    assert ours.max_tokens_per_pass == 1500 * 8 > 8192
    big = torch.randint(0, NUM_PHYSICAL, (9000, 2), dtype=torch.int32)
    dumps = []
    for rec in (ours, theirs):
        _drive(rec, [[big] * NUM_LAYERS])
        dumps.append(_dump(rec, "per_token", tmp_path))
    mine, sglang = (d["records"][0] for d in dumps)
    for key in ("extend_seq_lens", "forward_mode"):
        assert mine[key] == sglang[key], key
    assert torch.equal(mine["topk_ids_of_layer"], sglang["topk_ids_of_layer"])
    fake_runtime(ep_size=EP_SIZE, expert_distribution_recorder_mode="per_token", enable_two_batch_overlap=True)
    with pytest.raises(ConfigError, match="two-batch-overlap"):
        _recorder_init_new(expert_distribution.ExpertDistributionRecorder.init_new, _metadata(expert_location), 0)
