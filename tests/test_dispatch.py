"""Dispatch: logical ids to physical slots under each algorithm."""

import pytest
import torch

from eplb_plugin.dispatch import ExpertDispatcher, compute_static_dispatch_table
from eplb_plugin.errors import ConfigError, UsageError
from eplb_plugin.location import ExpertLocation

# 3 ranks x 2 slots. Expert 0 on every rank; experts 1, 2, 3 once each.
LOC = ExpertLocation.from_physical_to_logical_map([[0, 1, 0, 2, 0, 3]], num_logical_experts=4, ep_size=3)


def test_static_prefers_a_replica_on_the_same_rank():
    tables = [compute_static_dispatch_table(LOC, rank=r)[0].tolist() for r in range(3)]
    assert tables == [[0, 1, 3, 5], [2, 1, 3, 5], [4, 1, 3, 5]]


def test_static_spreads_ranks_without_a_local_copy_evenly_over_replicas():
    # Expert 0 lives on ranks 0 and 2 only; ranks 1 and 3 must pick different replicas.
    loc = ExpertLocation.from_physical_to_logical_map([[0, 1, 2, 3, 0, 4, 5, 6]], num_logical_experts=7, ep_size=4)
    picks = [int(compute_static_dispatch_table(loc, rank=r)[0, 0]) for r in range(4)]
    assert picks[0] == 0 and picks[2] == 4 and {picks[1], picks[3]} == {0, 4}


def test_static_prefers_the_same_node_before_a_remote_one():
    # 4 ranks, 2 per node; expert 0 on ranks 1 and 2 (slots 2 and 4).
    loc = ExpertLocation.from_physical_to_logical_map([[1, 2, 0, 3, 0, 4, 5, 6]], num_logical_experts=7, ep_size=4)
    picks = [int(compute_static_dispatch_table(loc, rank=r, num_gpus_per_node=2)[0, 0]) for r in range(4)]
    assert picks == [2, 2, 4, 4]


@pytest.mark.parametrize("algorithm", ["static", "random", "dynamic", "weighted", "minmax"])
def test_every_algorithm_keeps_padding_and_picks_a_replica_of_the_right_expert(algorithm):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 4, (1823, 6), generator=gen)
    out = ExpertDispatcher(LOC, rank=1, algorithm=algorithm, generator=gen).dispatch(0, ids)
    assert out.shape == ids.shape
    assert torch.equal(out == -1, ids == -1)
    phy2log = LOC.physical_to_logical_map[0]
    assert torch.equal(phy2log[out[ids >= 0]], ids[ids >= 0])


def test_weighted_splits_each_expert_in_planned_proportions():
    weights = torch.tensor([[0.5, 1.0, 0.25, 1.0, 0.25, 1.0]])
    loc = ExpertLocation.from_physical_to_logical_map(
        [[0, 1, 0, 2, 0, 3]], num_logical_experts=4, ep_size=3, replica_weights=weights
    )
    ids = torch.zeros(400, 2, dtype=torch.int64)
    out = ExpertDispatcher(loc, rank=0, algorithm="weighted").dispatch(0, ids)
    assert torch.bincount(out.flatten(), minlength=6).tolist() == [400, 0, 200, 0, 200, 0]


def test_weighted_choice_is_identical_on_every_rank():
    ids = torch.randint(0, 4, (257, 8), generator=torch.Generator().manual_seed(1))
    outs = [ExpertDispatcher(LOC, rank=r, algorithm="weighted").dispatch(0, ids) for r in range(3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


def test_minmax_fills_the_gpus_that_lack_other_work():
    # Tokens: expert 0 x 6, experts 1, 2, 3 x 1 each: each GPU should end with 3 tokens.
    ids = torch.tensor([[0, 1], [0, -1], [0, 2], [0, 0], [3, 0]])
    out = ExpertDispatcher(LOC, rank=0, algorithm="minmax").dispatch(0, ids)
    per_gpu = torch.bincount(out[out >= 0] // 2, minlength=3)
    assert per_gpu.tolist() == [3, 3, 3]


def test_minmax_moves_a_shared_expert_away_from_a_gpu_whose_own_expert_is_hot():
    # Expert 1 (on GPU 0 only) takes 5 tokens; expert 0's 6 tokens should all avoid GPU 0:
    # loads 5 / 3 / 3 + the one token each of experts 2 and 3 = 5 / 4 / 4.
    ids = torch.tensor([[1, 0]] * 5 + [[0, 2], [3, -1]])
    out = ExpertDispatcher(LOC, rank=0, algorithm="minmax").dispatch(0, ids)
    assert torch.bincount(out[out >= 0] // 2, minlength=3).tolist() == [5, 4, 4]


def test_minmax_leaves_rows_that_pad_the_batch_out_of_the_split_and_the_counts():
    """num_valid_rows: the first rows split alone (padding rows full of expert 0 would move
    expert 0's tokens), the padding rows get a slot of their own expert, and only the real
    rows are counted."""
    from eplb_plugin.dispatch import minmax_dispatch
    from eplb_plugin.kernels.minmax import build_minmax_tables

    tables = build_minmax_tables(LOC.physical_to_logical_map, 4, num_gpus=3)
    real = torch.tensor([[1, 0]] * 5 + [[0, 2], [3, -1]])
    ids = torch.cat([real, torch.tensor([[0, 0]] * 6)])
    counts = torch.zeros(1, 6, dtype=torch.int32)
    out = minmax_dispatch(ids, tables, layer=0, num_slots=6, use_kernel=False, counts_out=counts,
                          num_valid_rows=torch.tensor([len(real)]))
    alone = minmax_dispatch(real, tables, layer=0, num_slots=6, use_kernel=False)
    assert torch.equal(out[:len(real)], alone)
    assert not torch.equal(minmax_dispatch(ids, tables, layer=0, num_slots=6, use_kernel=False)[:len(real)], alone)
    assert (LOC.physical_to_logical_map[0][out[len(real):]] == 0).all()
    assert counts[0].tolist() == torch.bincount(alone[alone >= 0], minlength=6).tolist()


def test_dynamic_keeps_sglang_meaning_an_even_random_spread():
    """SGLang's ``dynamic`` picks a uniformly random replica per token: the same draws as
    ``random`` here, never a split that follows the loads."""
    ids = torch.zeros(3000, 1, dtype=torch.int64)
    dyn = ExpertDispatcher(LOC, rank=0, algorithm="dynamic", generator=torch.Generator().manual_seed(5)).dispatch(0, ids)
    rnd = ExpertDispatcher(LOC, rank=0, algorithm="random", generator=torch.Generator().manual_seed(5)).dispatch(0, ids)
    assert torch.equal(dyn, rnd)
    assert torch.bincount(dyn.flatten(), minlength=6)[[0, 2, 4]].min() > 900


def test_unknown_algorithm_lists_the_known_ones():
    with pytest.raises(ConfigError, match="static"):
        ExpertDispatcher(LOC, rank=0, algorithm="lp")


def test_update_takes_a_new_placement_in_place():
    """update_ writes a new placement's tables into the same tensors (what a captured CUDA
    graph reads), dispatching as a fresh dispatcher would; other shapes are refused."""
    counts = torch.tensor([[50.0, 1, 1, 30, 2, 2, 9, 5], [1.0, 40, 3, 3, 3, 20, 1, 1]])
    old = ExpertLocation.trivial(num_layers=2, num_logical_experts=8, num_physical_experts=10, ep_size=2)
    new = ExpertLocation.from_logical_count(counts, num_physical_experts=10, ep_size=2)
    ids = torch.randint(0, 8, (64, 3), generator=torch.Generator().manual_seed(1))
    for algorithm in ("static", "weighted", "minmax"):
        live = ExpertDispatcher(old, rank=1, algorithm=algorithm)
        tensors = [live.static_table, live.logical_to_physical_map, live.replica_count, live.replica_shares,
                   *(live.minmax or ())]
        addresses = [t.data_ptr() for t in tensors]
        assert live.update_(new)
        assert [t.data_ptr() for t in tensors] == addresses
        fresh = ExpertDispatcher(new, rank=1, algorithm=algorithm)
        for layer in range(2):
            assert torch.equal(live.dispatch(layer, ids), fresh.dispatch(layer, ids)), algorithm
    wider = ExpertLocation.trivial(num_layers=2, num_logical_experts=8, num_physical_experts=12, ep_size=2)
    live = ExpertDispatcher(old, rank=0)
    before = live.static_table.clone()
    assert not live.update_(wider)
    assert torch.equal(live.static_table, before) and live.location is old


def test_static_dispatch_maps_and_counts_into_the_recorders_buffer_in_one_kernel():
    """Given the recorder's buffer, static dispatch returns static_table[layer, id] (-1 kept),
    the same as without it, and adds those slots to the buffer; the recorder, told they were
    counted, does not count them again."""
    import numpy as np
    from test_recorder_helpers import np_slot_count, padded_ids, random_map

    from eplb_plugin.recorder import ExpertDistributionRecorder

    gen = torch.Generator().manual_seed(14)
    phy2log = random_map(gen, 3, 8, 12)
    loc = ExpertLocation.from_physical_to_logical_map(phy2log, num_logical_experts=8, ep_size=2)
    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=phy2log, num_logical_experts=8, backend="torch")
    rec.start_record()
    dispatcher = ExpertDispatcher(loc, rank=1, algorithm="static")
    ids = padded_ids(gen, 23, 6, 8)
    with rec.with_forward_pass(0), rec.with_current_layer(2):
        counts = rec.select_counts_buffer()
        physical = dispatcher.dispatch(2, ids, counts_out=counts)
        rec.on_select_experts(physical)
    expected = torch.where(ids >= 0, dispatcher.static_table[2][ids.clamp(min=0).long()], -1)
    assert counts is not None and torch.equal(physical, expected)
    assert torch.equal(dispatcher.dispatch(2, ids), expected)
    assert np.array_equal(rec.physical_count_window()[2].numpy(), np_slot_count(expected, 12))
    assert int(rec.physical_count_window()[:2].sum()) == 0


def test_gathered_counts_split_into_the_pass_and_the_lower_ranks_in_their_own_dtype():
    """split_gathered_counts keeps int32 (the kernels' exchange dtype; a plain sum would
    widen to int64 and cost a conversion per layer) and sums exactly."""
    from eplb_plugin.dispatch import split_gathered_counts

    per_rank = torch.tensor([[1, 0, 5], [2, 3, 0], [4, 4, 4]], dtype=torch.int32)
    total, offset = split_gathered_counts(per_rank, 2)
    assert total.dtype == offset.dtype == torch.int32
    assert total.tolist() == [7, 7, 9] and offset.tolist() == [3, 3, 5]
    total, offset = split_gathered_counts(per_rank, 0)
    assert offset.dtype == torch.int32 and offset.tolist() == [0, 0, 0]


@pytest.mark.parametrize("algorithm", ["static", "random", "dynamic", "weighted", "minmax"])
def test_every_algorithm_refuses_float_ids_and_a_layer_outside_the_map(algorithm):
    """Float ids would be truncated to other experts, and a layer of -1 would read the last
    layer's tables under one algorithm and fail deep inside another: both are refused alike."""
    dispatcher = ExpertDispatcher(LOC, rank=0, algorithm=algorithm, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UsageError, match="topk_ids has dtype torch.float32; expected integer expert ids"):
        dispatcher.dispatch(0, torch.tensor([[0.7, 1.2]]))
    for layer in (-1, 1):
        with pytest.raises(UsageError, match=f"layer {layer} is outside 0..0"):
            dispatcher.dispatch(layer, torch.tensor([[0, 1]]))
    assert dispatcher.dispatch(0, torch.tensor([[0, 1]])).shape == (1, 2)
