"""ExpertDistributionRecorder: every mode's counts against numpy, map epochs, EMA, hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_recorder_helpers import np_logical, np_slot_count, padded_ids, random_map

from eplb_plugin.args import RECORDER_MODES
from eplb_plugin.errors import ConfigError, PlacementError
from eplb_plugin.recorder import MODES, ExpertDistributionRecorder, create_recorder
from eplb_plugin.recorder import window as window_module

NUM_LAYERS = 3
NUM_REDUNDANT = 5


def _run_passes(rec, gen, num_passes, tokens, top_k):
    """Record passes of random physical ids; returns numpy [passes, L, P] counts and the ids."""
    per_pass, all_ids = [], []
    for pass_id in range(num_passes):
        counts = np.zeros((rec.num_layers, rec.num_physical_experts), dtype=np.int64)
        ids_of_layer = []
        with rec.with_forward_pass(pass_id, None):
            for layer in range(rec.num_layers):
                ids = padded_ids(gen, tokens, top_k, rec.num_physical_experts)
                with rec.with_current_layer(layer):
                    rec.on_select_experts(ids)
                counts[layer] = np_slot_count(ids, rec.num_physical_experts)
                ids_of_layer.append(ids)
        per_pass.append(counts)
        all_ids.append(ids_of_layer)
    return np.stack(per_pass), all_ids


def _recorder(mode, gen, num_logical, **kwargs):
    phy2log = random_map(gen, NUM_LAYERS, num_logical, num_logical + NUM_REDUNDANT)
    rec = ExpertDistributionRecorder(mode, physical_to_logical_map=phy2log, num_logical_experts=num_logical, backend="torch", **kwargs)
    rec.start_record()
    return rec, phy2log


@pytest.mark.parametrize("tokens", [1, 7, 1823])
@pytest.mark.parametrize("top_k", [1, 6, 8])
@pytest.mark.parametrize("num_logical", [8, 64, 257])
def test_stat_logical_count_equals_numpy(tokens, top_k, num_logical):
    """stat dumps per-pass logical counts equal to numpy's, oldest pass first."""
    gen = torch.Generator().manual_seed(tokens + 31 * top_k + num_logical)
    rec, phy2log = _recorder("stat", gen, num_logical, buffer_size=4)
    physical, _ = _run_passes(rec, gen, 3, tokens, top_k)
    expected = np_logical(physical, phy2log.numpy(), num_logical)
    assert np.array_equal(rec.physical_count_window().numpy(), physical.sum(0))
    assert np.array_equal(rec.logical_count_window().numpy(), expected.sum(0))
    out = rec.dump_record("object")
    assert out["logical_count"].dtype == torch.int32
    assert np.array_equal(out["logical_count"].numpy(), expected)
    assert out["rank"] == 0 and out["average_utilization_rate_over_window"] is None


@pytest.mark.parametrize("tokens,top_k,num_logical", [(1, 8, 257), (7, 6, 64), (1823, 1, 8)])
def test_per_pass_records_equal_numpy(tokens, top_k, num_logical):
    """per_pass keeps each pass's [L, P] slot counts exactly."""
    gen = torch.Generator().manual_seed(tokens * top_k)
    rec, phy2log = _recorder("per_pass", gen, num_logical)
    physical, _ = _run_passes(rec, gen, 3, tokens, top_k)
    out = rec.dump_record("object")
    assert [r["forward_pass_id"] for r in out["records"]] == [0, 1, 2]
    got = np.stack([r["global_physical_count"].numpy() for r in out["records"]])
    assert np.array_equal(got, physical)
    assert torch.equal(out["last_physical_to_logical_map"], phy2log)


@pytest.mark.parametrize("tokens,top_k,num_logical", [(1, 8, 257), (7, 6, 64), (1823, 1, 8)])
def test_per_token_keeps_each_layers_ids(tokens, top_k, num_logical):
    """per_token keeps the physical ids per layer and their counts, and reuses its buffer."""
    gen = torch.Generator().manual_seed(tokens + top_k)
    rec, _ = _recorder("per_token", gen, num_logical, max_tokens_per_pass=2048)
    physical, ids = _run_passes(rec, gen, 2, tokens, top_k)
    out = rec.dump_record("object")
    for record, pass_ids, counts in zip(out["records"], ids, physical):
        kept = record["topk_ids_of_layer"]
        assert kept.shape == (NUM_LAYERS, tokens, 8)
        assert torch.equal(kept[:, :, :top_k], torch.stack(pass_ids))
        assert (kept[:, :, top_k:] == -1).all()
        assert np.array_equal(record["global_physical_count"].numpy(), counts)


def test_per_token_refuses_more_tokens_than_its_buffer():
    """A pass larger than max_tokens_per_pass is a clear error, not a silent truncation."""
    rec, _ = _recorder("per_token", torch.Generator().manual_seed(0), 8, max_tokens_per_pass=4)
    with rec.with_forward_pass(0), rec.with_current_layer(0), pytest.raises(ConfigError, match="max_tokens_per_pass"):
        rec.on_select_experts(torch.zeros(5, 8, dtype=torch.int32))


def test_counts_across_a_map_change_go_to_the_right_logical_experts():
    """Passes before and after set_physical_to_logical_map are each mapped by their own map."""
    gen = torch.Generator().manual_seed(7)
    num_logical = 13
    rec, map_a = _recorder("stat", gen, num_logical, buffer_size=6)
    before, _ = _run_passes(rec, gen, 2, 37, 6)
    map_b = random_map(gen, NUM_LAYERS, num_logical, num_logical + NUM_REDUNDANT)
    rec.set_physical_to_logical_map(map_b)
    after, _ = _run_passes(rec, gen, 3, 37, 6)
    expected = np.concatenate([np_logical(before, map_a.numpy(), num_logical), np_logical(after, map_b.numpy(), num_logical)])
    with_current_map_only = np_logical(np.concatenate([before, after]), map_b.numpy(), num_logical)
    assert not np.array_equal(expected, with_current_map_only)  # the test can tell them apart
    assert np.array_equal(rec.logical_count_window().numpy(), expected.sum(0))
    assert np.array_equal(rec.dump_record("object")["logical_count"].numpy(), expected)


def test_old_map_epochs_are_dropped_once_no_pass_refers_to_them():
    """The recorder keeps only the maps its window can still reference."""
    gen = torch.Generator().manual_seed(3)
    rec, _ = _recorder("stat", gen, 8, buffer_size=2)
    for _ in range(4):
        _run_passes(rec, gen, 1, 5, 2)
        rec.set_physical_to_logical_map(random_map(gen, NUM_LAYERS, 8, 8 + NUM_REDUNDANT))
    assert set(rec.maps_by_epoch) == {2, 3, 4}  # the two held passes' maps + the live one


def test_ring_buffer_keeps_the_last_buffer_size_passes_in_order():
    """With buffer_size=3, five passes leave passes 2, 3, 4, oldest first."""
    gen = torch.Generator().manual_seed(11)
    rec, phy2log = _recorder("stat", gen, 8, buffer_size=3)
    physical, _ = _run_passes(rec, gen, 5, 9, 4)
    out = rec.dump_record("object")["logical_count"].numpy()
    assert np.array_equal(out, np_logical(physical[2:], phy2log.numpy(), 8))


def test_unbounded_buffer_grows_and_keeps_every_pass(monkeypatch):
    """buffer_size=-1 keeps every pass, growing past its first allocation."""
    monkeypatch.setattr(window_module, "INITIAL_UNBOUNDED_ROWS", 2)
    gen = torch.Generator().manual_seed(12)
    rec, phy2log = _recorder("stat", gen, 8, buffer_size=-1)
    physical, _ = _run_passes(rec, gen, 5, 9, 4)
    out = rec.dump_record("object")["logical_count"].numpy()
    assert np.array_equal(out, np_logical(physical, phy2log.numpy(), 8))


def test_exponential_decay_tracks_logical_counts():
    """logical_count_ema follows ema = d * ema + (1 - d) * pass count, exactly in float."""
    gen = torch.Generator().manual_seed(13)
    rec, phy2log = _recorder("stat", gen, 8, decay=0.5)
    physical, _ = _run_passes(rec, gen, 2, 17, 6)
    logical = np_logical(physical, phy2log.numpy(), 8).astype(np.float32)
    expected = 0.5 * (0.5 * logical[0]) + 0.5 * logical[1]
    assert np.array_equal(rec.logical_count_ema.numpy(), expected)


def test_stat_approx_counts_dispatch_receive_counts_into_this_ranks_slots():
    """stat_approx takes DeepEP's per-local-slot counts (list or masked_m), not select_experts."""
    phy2log = torch.arange(8).repeat(2, 1)
    rec = ExpertDistributionRecorder("stat_approx", physical_to_logical_map=phy2log, num_logical_experts=8, rank=1, ep_size=2)
    rec.start_record()
    with rec.with_forward_pass(0):
        with rec.with_current_layer(0):
            rec.on_select_experts(torch.zeros(3, 2, dtype=torch.int32))  # ignored in this mode
            rec.on_deepep_dispatch_normal([1, 2, 3, 4], None, None, None)
        with rec.with_current_layer(1):
            rec.on_deepep_dispatch_low_latency(torch.tensor([5, 0, 0, 7], dtype=torch.int32))
    out = rec.dump_record("object")["logical_count"]
    assert out.tolist() == [[[0, 0, 0, 0, 1, 2, 3, 4], [0, 0, 0, 0, 5, 0, 0, 7]]]


def test_hooks_count_nothing_while_not_recording_or_disabled():
    """Outside start/stop and inside disable_this_region the hooks leave the counts alone."""
    gen = torch.Generator().manual_seed(15)
    rec, _ = _recorder("stat", gen, 8)
    ids = padded_ids(gen, 5, 2, 8)
    with rec.with_forward_pass(0), rec.with_current_layer(0), rec.disable_this_region():
        rec.on_select_experts(ids)
    rec.stop_record()
    with rec.with_forward_pass(1), rec.with_current_layer(0):
        rec.on_select_experts(ids)
    assert rec.num_passes_in_window == 1 and not rec.physical_count_window().any()
    assert not rec.recording


def test_unknown_mode_lists_the_known_ones_and_registry_matches_flags():
    """The registry holds exactly the flag's modes; an unknown one is a ConfigError naming them."""
    assert set(MODES) == set(RECORDER_MODES)
    with pytest.raises(ConfigError, match="per_token"):
        create_recorder("stats", physical_to_logical_map=torch.zeros(1, 2, dtype=torch.long), num_logical_experts=1)


def test_bad_maps_and_sizes_raise_typed_errors():
    """Out-of-range maps, wrong shapes and bad buffer sizes are typed errors."""
    phy2log = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(PlacementError, match="outside"):
        ExpertDistributionRecorder("stat", physical_to_logical_map=phy2log + 3, num_logical_experts=2)
    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=phy2log, num_logical_experts=2)
    with pytest.raises(PlacementError, match="shape"):
        rec.set_physical_to_logical_map(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ConfigError, match="buffer_size"):
        ExpertDistributionRecorder("stat", physical_to_logical_map=phy2log, num_logical_experts=2, buffer_size=0)
    with pytest.raises(ConfigError, match="ep_size"):
        ExpertDistributionRecorder("stat", physical_to_logical_map=phy2log, num_logical_experts=2, ep_size=3)


def test_counts_discarded_drops_only_what_the_block_counted():
    """Passes run to warm up or capture a CUDA graph: the hooks count inside the block, and
    the buffer is back to what it held before once the block ends."""
    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=torch.arange(4).repeat(2, 1),
                                     num_logical_experts=4, backend="torch")
    rec.start_record()
    with rec.with_forward_pass(0):  # the runtime captures its graph inside a pass
        with rec.with_current_layer(0):
            rec.on_select_experts(torch.tensor([[0, 1]]))
        before = rec.pass_counts.clone()
        with rec.counts_discarded(), rec.with_current_layer(1):
            rec.on_select_experts(torch.tensor([[2, 3], [3, -1]]))
            assert int(rec.pass_counts.sum()) == 5
        assert torch.equal(rec.pass_counts, before)


def test_eplb_window_records_every_pass_whatever_the_users_session_does():
    """Once kept for EPLB, the window holds every pass while the user's session starts, stops
    and dumps; the session's dump holds only the passes it recorded."""
    gen = torch.Generator().manual_seed(16)
    phy2log = random_map(gen, NUM_LAYERS, 8, 8 + NUM_REDUNDANT)
    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=phy2log, num_logical_experts=8,
                                     buffer_size=10, backend="torch")
    rec.keep_window_for_eplb()
    assert rec.recording and not rec.session_recording
    before, _ = _run_passes(rec, gen, 2, 9, 4)
    rec.start_record()
    during, _ = _run_passes(rec, gen, 2, 9, 4)
    rec.stop_record()
    assert rec.recording  # the hooks still count, for EPLB
    after, _ = _run_passes(rec, gen, 3, 9, 4)
    dumped = rec.dump_record("object")["logical_count"].numpy()
    assert np.array_equal(dumped, np_logical(during, phy2log.numpy(), 8))
    rec.start_record()
    every_pass = np.concatenate([before, during, after])
    assert rec.num_passes_in_window == 7
    assert np.array_equal(rec.physical_count_window().numpy(), every_pass.sum(0))
    assert np.array_equal(rec.logical_count_window().numpy(), np_logical(every_pass, phy2log.numpy(), 8).sum(0))


def test_eplb_window_needs_a_stat_mode():
    """Keeping an EPLB window on a per_pass recorder is a ConfigError naming the flag."""
    rec = ExpertDistributionRecorder("per_pass", physical_to_logical_map=torch.arange(4).repeat(2, 1),
                                     num_logical_experts=4)
    with pytest.raises(ConfigError, match="--expert-distribution-recorder-mode stat"):
        rec.keep_window_for_eplb()


def test_a_layer_whose_buffer_a_dispatcher_took_is_counted_once_by_the_dispatcher():
    """select_counts_buffer(layer) notes the layer: its next on_select_experts adds nothing, so the dispatcher's own count is the only one;
    the next layer's hook, with no buffer taken, counts as before."""
    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=torch.arange(4).repeat(3, 1),
                                     num_logical_experts=4, backend="torch")
    rec.start_record()
    ids = torch.tensor([[0, 1], [1, -1], [3, 1]])
    with rec.with_forward_pass(0):
        with rec.with_current_layer(1):
            counts = rec.select_counts_buffer(1)
            assert counts is rec.pass_counts
            counts[1].index_add_(0, ids[ids >= 0], torch.ones(5, dtype=torch.int32))  # the dispatcher's count
            rec.on_select_experts(ids)
        with rec.with_current_layer(2):
            rec.on_select_experts(ids)
    assert rec.physical_count_window().tolist() == [[0, 0, 0, 0], [1, 3, 0, 1], [1, 3, 0, 1]]


def test_a_buffer_taken_without_its_hook_never_skips_another_hooks_count():
    """A noted layer is forgotten at the next hook (whatever its layer) and at pass
    boundaries; a buffer asked for another row than the current layer's is refused."""
    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=torch.arange(4).repeat(2, 1),
                                     num_logical_experts=4, backend="torch")
    rec.start_record()
    ids = torch.tensor([[0, 1]])
    with rec.with_forward_pass(0):
        with rec.with_current_layer(0):
            assert rec.select_counts_buffer(1) is None  # the hook would count row 0, not 1
            assert rec.select_counts_buffer(0) is rec.pass_counts  # ...then no hook of layer 0
        with rec.with_current_layer(1):
            rec.on_select_experts(ids)  # counts: the note was layer 0's
        with rec.with_current_layer(0):
            rec.on_select_experts(ids)  # counts: the note went with the last hook
        with rec.with_current_layer(1):
            rec.select_counts_buffer()
    with rec.with_forward_pass(1), rec.with_current_layer(1):
        rec.on_select_experts(ids)  # counts: last pass's note is gone
    assert rec.physical_count_passes().tolist() == [[[1, 1, 0, 0], [1, 1, 0, 0]], [[0, 0, 0, 0], [1, 1, 0, 0]]]


def test_no_buffer_is_handed_out_where_the_hook_would_not_count():
    """Outside a recorded pass, with recording stopped, inside disable_this_region and under
    stat_approx (counts from the dispatcher's receive counts) there is no buffer, so a
    dispatcher counts nothing, as the hook would."""
    phy2log = torch.arange(4).repeat(2, 1)
    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=phy2log, num_logical_experts=4, backend="torch")
    rec.start_record()
    assert rec.select_counts_buffer(0) is None
    with rec.with_forward_pass(0), rec.with_current_layer(0), rec.disable_this_region():
        assert rec.select_counts_buffer(0) is None
    rec.stop_record()
    with rec.with_forward_pass(1), rec.with_current_layer(0):
        assert rec.select_counts_buffer(0) is None
    approx = ExpertDistributionRecorder("stat_approx", physical_to_logical_map=phy2log, num_logical_experts=4)
    approx.start_record()
    with approx.with_forward_pass(0), approx.with_current_layer(0):
        assert approx.select_counts_buffer(0) is None


@pytest.mark.parametrize("mode", ["per_pass", "per_token"])
def test_detail_modes_keep_every_pass_until_the_dump_whatever_the_buffer_size(mode):
    """per_pass / per_token keep every recorded pass, as SGLang's detail accumulator does
    (its buffer size bounds only the stat window): five passes with buffer_size=2 dump five."""
    gen = torch.Generator().manual_seed(8)
    rec, _ = _recorder(mode, gen, 8, buffer_size=2)
    physical, _ = _run_passes(rec, gen, 5, 7, 2)
    out = rec.dump_record("object")
    assert [r["forward_pass_id"] for r in out["records"]] == [0, 1, 2, 3, 4]
    assert np.array_equal(np.stack([r["global_physical_count"].numpy() for r in out["records"]]), physical)
