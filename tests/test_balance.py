"""The one balancedness definition, on hand-computed examples."""

import numpy as np
import pytest
import torch

from eplb_plugin.balance import (
    balancedness,
    gpu_loads,
    layer_balancedness,
    placement_balancedness,
    slot_loads,
)
from eplb_plugin.errors import EPLBError, UsageError
from eplb_plugin.maps import replica_count


def test_balancedness_is_mean_over_layers_of_mean_over_max_gpu_load():
    # Layer 0: GPU loads 10, 30 -> mean 20 / max 30 = 2/3. Layer 1: 5, 5 -> 1.
    slot = torch.tensor([[4.0, 6.0, 30.0, 0.0], [2.0, 3.0, 1.0, 4.0]])
    loads = gpu_loads(slot, 2)
    assert loads.tolist() == [[10.0, 30.0], [5.0, 5.0]]
    assert layer_balancedness(loads).tolist() == pytest.approx([2 / 3, 1.0])
    assert balancedness(loads) == pytest.approx((2 / 3 + 1) / 2)


def test_a_layer_without_tokens_counts_as_balanced():
    assert balancedness(torch.zeros(1, 4)) == 1.0


def test_replicas_split_equally_unless_weighted():
    # Expert 0 (load 12) has slots 0 and 2; expert 1 (load 4) has slot 1; expert 2 (8) slot 3.
    count = torch.tensor([[12.0, 4.0, 8.0]])
    phy2log = torch.tensor([[0, 1, 0, 2]])
    assert slot_loads(count, phy2log).tolist() == [[6.0, 4.0, 6.0, 8.0]]
    weights = torch.tensor([[0.75, 1.0, 0.25, 1.0]])
    assert slot_loads(count, phy2log, weights).tolist() == [[9.0, 4.0, 3.0, 8.0]]
    # GPU loads 13 / 11 -> 12/13; with equal split 10 / 14 -> 12/14.
    assert placement_balancedness(count, phy2log, 2, weights) == pytest.approx(12 / 13)
    assert placement_balancedness(count, phy2log, 2) == pytest.approx(12 / 14)


def test_gpu_count_must_divide_slots():
    with pytest.raises(ValueError, match="divide"):
        gpu_loads(torch.ones(1, 6), 4)


def test_replica_count_gives_the_same_int64_counts_for_numpy_and_torch_maps():
    phy2log = [[0, 1, 0, 2, 3, 0], [3, 3, 1, 2, 0, 1]]
    from_torch = replica_count(torch.tensor(phy2log), 4)
    from_numpy = replica_count(np.array(phy2log, dtype=np.int32), 4)
    assert from_torch.dtype == torch.int64 and from_numpy.dtype == np.int64
    assert from_numpy.tolist() == from_torch.tolist() == [[3, 1, 1, 1], [1, 2, 1, 2]]


def test_gpu_loads_sums_numpy_slot_loads_like_tensors_and_stays_numpy():
    slot = [[1.0, 2.0, 3.0, 4.0], [0.0, 5.0, 5.0, 0.0]]
    from_numpy = gpu_loads(np.array(slot), 2)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float64
    assert from_numpy.tolist() == gpu_loads(torch.tensor(slot), 2).tolist() == [[3.0, 7.0], [5.0, 5.0]]
    with pytest.raises(ValueError, match="divide"):
        gpu_loads(np.ones((1, 6)), 4)


def test_a_caller_passing_a_gpu_count_that_does_not_divide_the_slots_gets_a_usage_error_that_is_a_value_error():
    with pytest.raises(UsageError, match="divide") as info:
        gpu_loads(torch.ones(2, 6), 4)
    assert isinstance(info.value, ValueError) and isinstance(info.value, EPLBError)
