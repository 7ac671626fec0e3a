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
