"""Bad input to the public API (dispatcher, recorder hooks, ExpertLocation) gets the project's
typed errors, naming the bad value, instead of raw IndexErrors or silent drops."""

import numpy as np
import pytest
import torch

from eplb_plugin.dispatch import ExpertDispatcher
from eplb_plugin.errors import ConfigError, CountsError, UsageError
from eplb_plugin.location import ExpertLocation
from eplb_plugin.recorder import ExpertDistributionRecorder

ALGORITHMS = ["static", "random", "dynamic", "weighted", "minmax"]
# 2 layers, 8 slots over 2 ranks, 4 logical experts.
LOC = ExpertLocation.from_physical_to_logical_map(
    [[0, 1, 2, 3, 0, 0, 3, 1], [0, 1, 2, 3, 3, 3, 3, 1]], num_logical_experts=4, ep_size=2
)


def _counts(*shape, dtype=torch.int32):
    return torch.zeros(*shape, dtype=dtype)


# ------------------------------------------------------------------ dispatcher: ids


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("with_counts", [False, True])
@pytest.mark.parametrize("bad", [4, 100, -2])
def test_dispatch_refuses_a_logical_id_outside_minus_one_to_e_on_cpu(algorithm, with_counts, bad):
    """An id outside [-1, E) is refused with UsageError naming the id and the layer, on both
    the counting and the plain path; nothing is counted."""
    d = ExpertDispatcher(LOC, rank=1, algorithm=algorithm)
    counts = _counts(2, 8) if with_counts else None
    with pytest.raises(UsageError, match=rf"id {bad}\b.*layer 1"):
        d.dispatch(1, torch.tensor([[0, bad], [1, -1]]), counts_out=counts)
    if counts is not None:
        assert counts.sum() == 0


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dispatch_keeps_padding_minus_one_with_counts_out(algorithm):
    """-1 (SGLang's padding) stays allowed and stays uncounted."""
    d = ExpertDispatcher(LOC, rank=1, algorithm=algorithm)
    counts = _counts(2, 8)
    out = d.dispatch(0, torch.tensor([[0, -1], [3, -1]]), counts_out=counts)
    assert out[:, 1].tolist() == [-1, -1]
    assert counts.sum() == (2 if d.info.counts_slots else 0)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("shape", [(2, 4), (1, 8), (2, 9), (16,)])
def test_dispatch_refuses_counts_out_not_shaped_l_by_p(algorithm, shape):
    """counts_out must be [L, P] = [2, 8]: any other shape is refused, naming it."""
    d = ExpertDispatcher(LOC, rank=1, algorithm=algorithm)
    with pytest.raises(UsageError, match=re_shape(shape)):
        d.dispatch(0, torch.tensor([[0, 1]]), counts_out=_counts(*shape))


def re_shape(shape):
    return r"\[" + r", ".join(str(s) for s in shape) + r"\]"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_dispatch_refuses_counts_out_not_int32_for_every_algorithm(algorithm, dtype):
    """One dtype rule for every algorithm: the recorder's buffer is int32."""
    d = ExpertDispatcher(LOC, rank=1, algorithm=algorithm)
    with pytest.raises(CountsError, match=rf"int32.*{dtype}"):
        d.dispatch(0, torch.tensor([[0, 1]]), counts_out=_counts(2, 8, dtype=dtype))


def test_dispatch_refuses_a_numpy_topk_ids():
    d = ExpertDispatcher(LOC, rank=1, algorithm="weighted")
    with pytest.raises(UsageError, match=r"topk_ids must be a torch\.Tensor.*ndarray"):
        d.dispatch(0, np.array([[0, 1]]))


# ------------------------------------------------------------------ dispatcher: construction


@pytest.mark.parametrize("rank", [True, False, 1.0])
def test_dispatcher_refuses_a_rank_that_is_not_an_int(rank):
    with pytest.raises(ConfigError, match=rf"rank {rank!r}.*int"):
        ExpertDispatcher(LOC, rank=rank)


@pytest.mark.parametrize("num_gpus_per_node", [0, -1, True, 2.0])
def test_dispatcher_refuses_a_num_gpus_per_node_that_is_not_a_positive_int(num_gpus_per_node):
    with pytest.raises(ConfigError, match=rf"num_gpus_per_node={num_gpus_per_node!r}"):
        ExpertDispatcher(LOC, rank=0, num_gpus_per_node=num_gpus_per_node)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dispatcher_refuses_an_unknown_backend_at_construction(algorithm):
    with pytest.raises(ConfigError, match=r"backend='bogus'.*'auto', 'triton', 'torch'"):
        ExpertDispatcher(LOC, rank=0, algorithm=algorithm, backend="bogus")


# ------------------------------------------------------------------ recorder hooks


def _recording(mode="stat"):
    rec = ExpertDistributionRecorder(
        mode, physical_to_logical_map=torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 3, 3]]),
        num_logical_experts=4, ep_size=2,
    )
    rec.start_record()
    return rec


@pytest.mark.parametrize("layer_idx", [-1, 2, 5, True])
def test_on_select_experts_refuses_a_layer_outside_zero_to_l(layer_idx):
    rec = _recording()
    with rec.with_forward_pass(0), pytest.raises(UsageError, match=rf"layer_idx={layer_idx!r}"):
        rec.on_select_experts(torch.tensor([[0, 1]]), layer_idx=layer_idx)
    assert rec.dump_record("object")["logical_count"].sum() == 0


def test_with_current_layer_outside_zero_to_l_is_refused_when_a_hook_counts():
    rec = _recording()
    with rec.with_forward_pass(0), rec.with_current_layer(-1), pytest.raises(UsageError, match=r"layer_idx=-1"):
        rec.on_select_experts(torch.tensor([[0, 1]]))


@pytest.mark.parametrize("bad", [6, 100, -2])
def test_on_select_experts_refuses_a_slot_outside_minus_one_to_p_on_cpu(bad):
    rec = _recording()
    with rec.with_forward_pass(0), pytest.raises(UsageError, match=rf"slot id {bad}\b.*layer 0"):
        rec.on_select_experts(torch.tensor([[bad, 1], [-1, 0]]), layer_idx=0)
    assert rec.dump_record("object")["logical_count"].sum() == 0


def test_on_select_experts_still_counts_padding_as_nothing():
    rec = _recording()
    with rec.with_forward_pass(0):
        rec.on_select_experts(torch.tensor([[5, -1]]), layer_idx=0)
    assert rec.dump_record("object")["logical_count"].tolist() == [[[0, 1, 0, 0], [0, 0, 0, 0]]]


@pytest.mark.parametrize("layer_idx", [-1, 2])
def test_dispatch_count_hooks_refuse_a_layer_outside_zero_to_l(layer_idx):
    rec = _recording("stat_approx")
    with rec.with_forward_pass(0):
        with pytest.raises(UsageError, match=rf"layer_idx={layer_idx}"):
            rec.on_deepep_dispatch_normal([1, 2, 3], layer_idx=layer_idx)
        with pytest.raises(UsageError, match=rf"layer_idx={layer_idx}"):
            rec.on_deepep_dispatch_low_latency(torch.tensor([1, 2, 3], dtype=torch.int32), layer_idx=layer_idx)


@pytest.mark.parametrize("length", [2, 4])
def test_dispatch_count_hooks_refuse_counts_not_one_per_local_slot(length):
    """P / ep_size = 3 local slots: a longer or shorter count list is refused, naming its length."""
    rec = _recording("stat_approx")
    with rec.with_forward_pass(0):
        with pytest.raises(UsageError, match=rf"{length} counts.*3 local slots"):
            rec.on_deepep_dispatch_normal([1] * length, layer_idx=0)
        with pytest.raises(UsageError, match=rf"{length} counts.*3 local slots"):
            rec.on_deepep_dispatch_low_latency(torch.ones(length, dtype=torch.int32), layer_idx=0)


def test_dispatch_count_hooks_refuse_a_negative_count_on_cpu():
    rec = _recording("stat_approx")
    with rec.with_forward_pass(0):
        with pytest.raises(CountsError, match=r"negative count -5 for layer 1"):
            rec.on_deepep_dispatch_normal([1, -5, 0], layer_idx=1)
        with pytest.raises(CountsError, match=r"negative count -5 for layer 1"):
            rec.on_deepep_dispatch_low_latency(torch.tensor([1, -5, 0], dtype=torch.int32), layer_idx=1)
    assert rec.dump_record("object")["logical_count"].sum() == 0


def test_get_current_pass_count_buffer_refuses_a_layer_outside_zero_to_l():
    rec = _recording()
    with pytest.raises(UsageError, match=r"layer_idx=-1"):
        rec.get_current_pass_count_buffer(-1)


# ------------------------------------------------------------------ ExpertLocation


@pytest.mark.parametrize("rank", [-1, 2, 5])
def test_location_per_rank_views_refuse_a_rank_outside_zero_to_ep_size(rank):
    for view in (LOC.local_physical_to_logical_map, LOC.local_slots):
        with pytest.raises(ConfigError, match=rf"rank {rank} is outside \[0, ep_size=2\)"):
            view(rank)


def test_location_per_rank_views_refuse_a_bool_rank():
    with pytest.raises(ConfigError, match=r"rank True.*int"):
        LOC.local_physical_to_logical_map(True)


@pytest.mark.parametrize("arg", ["num_layers", "num_logical_experts", "num_physical_experts", "ep_size"])
@pytest.mark.parametrize("value", [True, 4.0, "4"])
def test_trivial_refuses_an_int_argument_that_is_not_an_int(arg, value):
    kwargs = {"num_layers": 2, "num_logical_experts": 4, "num_physical_experts": 8, "ep_size": 2, arg: value}
    with pytest.raises(UsageError, match=rf"{arg}={value!r}.*int"):
        ExpertLocation.trivial(**kwargs)


@pytest.mark.parametrize("arg", ["num_logical_experts", "ep_size", "num_layers", "num_physical_experts"])
def test_from_physical_to_logical_map_refuses_an_int_argument_that_is_not_an_int(arg):
    kwargs = {"num_logical_experts": 4, "ep_size": 2, arg: 2.0}
    with pytest.raises(UsageError, match=rf"{arg}=2\.0.*int"):
        ExpertLocation.from_physical_to_logical_map([[0, 1, 2, 3]], **kwargs)


@pytest.mark.parametrize("arg", ["num_physical_experts", "ep_size", "num_nodes", "num_groups", "num_layers"])
def test_from_logical_count_refuses_an_int_argument_that_is_not_an_int(arg):
    kwargs = {"num_physical_experts": 4, "ep_size": 2, arg: True}
    with pytest.raises(UsageError, match=rf"{arg}=True.*int"):
        ExpertLocation.from_logical_count([[1.0, 2.0, 3.0, 4.0]], **kwargs)


# ------------------------------------------------------------------ CUDA: checks never sync


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dispatch_and_recorder_hooks_do_not_sync_the_host_on_cuda(algorithm):
    """On CUDA the value checks are skipped: dispatch with counts_out and the recorder's hooks
    run with torch's sync debug mode set to error (any host sync raises)."""
    d = ExpertDispatcher(LOC, rank=1, algorithm=algorithm, device="cuda")
    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=LOC.physical_to_logical_map.cuda(),
                                     num_logical_experts=4, ep_size=2)
    rec.start_record()
    ids = torch.tensor([[0, 3], [1, -1]], device="cuda")
    counts = torch.zeros(2, 8, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with rec.with_forward_pass(0):
            slots = d.dispatch(1, ids, counts_out=counts)
            rec.on_select_experts(slots, layer_idx=1)
            rec.on_dispatch_receive_counts(torch.ones(4, dtype=torch.int32, device="cuda"), layer_idx=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert slots[1, 1].item() == -1
    assert counts.sum().item() == (3 if d.info.counts_slots else 0)
