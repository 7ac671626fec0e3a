"""ExpertLocation: maps, validation, and every --init-expert-location format."""

import json

import pytest
import torch

from eplb_plugin.errors import ExpertLocationFileError, PlacementError
from eplb_plugin.location import (
    ExpertLocation,
    compute_logical_to_physical_map,
    weights_sidecar,
)
from eplb_plugin.location_files import load_init_expert_location

SHAPE = dict(num_layers=2, num_logical_experts=4, num_physical_experts=6, ep_size=2)
MAP = [[0, 1, 2, 3, 0, 0], [3, 2, 1, 0, 1, 3]]


def load(source, **overrides):
    return load_init_expert_location(source, **{**SHAPE, **overrides})


def test_trivial_placement_puts_expert_p_mod_e_in_slot_p():
    loc = load("trivial")
    assert loc.physical_to_logical_map.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    assert loc.logical_replica_count.tolist() == [[2, 2, 1, 1]] * 2
    assert loc.local_physical_to_logical_map(1).tolist() == [[3, 0, 1]] * 2


def test_logical_to_physical_map_lists_slots_ascending_with_fixed_width():
    l2p = compute_logical_to_physical_map(torch.tensor(MAP), 4)
    assert l2p.shape == (2, 4, 3)  # width P - E + 1, whatever the replica counts are
    assert l2p[0].tolist() == [[0, 4, 5], [1, -1, -1], [2, -1, -1], [3, -1, -1]]
    assert l2p[1].tolist() == [[3, -1, -1], [2, 4, -1], [1, -1, -1], [0, 5, -1]]


def test_equal_split_weights_are_one_over_replica_count():
    loc = ExpertLocation.from_physical_to_logical_map(MAP, num_logical_experts=4, ep_size=2)
    assert loc.equal_split_weights()[0].tolist() == pytest.approx([1 / 3, 1, 1, 1, 1 / 3, 1 / 3])


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_maps_and_replica_weights_round_trip_through_files(tmp_path, suffix):
    weights = torch.tensor([[0.5, 1, 1, 1, 0.25, 0.25], [0.5, 1, 0.5, 1, 0.5, 0.5]])
    loc = ExpertLocation.from_physical_to_logical_map(MAP, num_logical_experts=4, ep_size=2, replica_weights=weights)
    path = loc.save(tmp_path / f"placement{suffix}")
    back = load(str(path))
    assert back.physical_to_logical_map.tolist() == MAP
    assert torch.equal(back.replica_weights, weights)
    # The SGLang-facing file holds the map alone (SGLang passes other keys on as kwargs).
    raw = torch.load(path, weights_only=True) if suffix == ".pt" else json.loads(path.read_text())
    assert set(raw) == {"physical_to_logical_map"}
    assert weights_sidecar(path).exists()


def test_inline_json_map_loads():
    assert load(json.dumps({"physical_to_logical_map": MAP})).physical_to_logical_map.tolist() == MAP


def test_sglang_stat_dump_format_loads_as_logical_count(tmp_path):
    # What SGLang's stat recorder writes: {"rank", "logical_count" [B, L, E] int32, "average_utilization_rate_over_window"}.
    path = tmp_path / "expert_distribution_recorder_1.pt"
    count = torch.tensor([[[50, 1, 1, 1], [1, 1, 1, 50]], [[40, 2, 2, 2], [2, 2, 2, 40]]], dtype=torch.int32)
    torch.save({"rank": 0, "logical_count": count, "average_utilization_rate_over_window": 0.5}, path)
    loc = load(str(path), algorithm="deepseek")
    # The hot expert of each layer gets the two redundant slots.
    assert loc.logical_replica_count.tolist() == [[3, 1, 1, 1], [1, 1, 1, 3]]


def test_per_pass_counts_are_planned_for_the_dispatch_that_will_run(tmp_path):
    """--init-expert-location with a [B, L, E] logical_count (an SGLang stat dump's) and a
    per-pass policy: planned on the passes, not their sum (SGLang's init hands deepseek_vec the
    passes too), and for the host's dispatch (plan(dispatch=)), which the runtime passes."""
    import numpy as np

    from eplb_plugin.algorithms import plan

    gen = np.random.default_rng(0)
    count = gen.poisson(gen.gamma(0.5, 1.0, size=(6, 2, 8)) * 40).astype(float)
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"logical_count": count.tolist()}))
    shape = dict(num_layers=2, num_logical_experts=8, num_physical_experts=12, ep_size=4)
    maps = {}
    for dispatch in ("static", "minmax"):
        loc = load_init_expert_location(str(path), algorithm="eplb_plugin_perpass", dispatch=dispatch, **shape)
        expected = plan(count, num_physical_experts=12, num_gpus=4, algorithm="eplb_plugin_perpass", dispatch=dispatch)
        assert torch.equal(loc.physical_to_logical_map, expected.physical_to_logical_map)
        maps[dispatch] = loc.physical_to_logical_map
    assert not torch.equal(maps["static"], maps["minmax"])
    for algorithm in ("deepseek_vec", "eplb_plugin_perpass"):
        loc = load_init_expert_location(str(path), algorithm=algorithm, **shape)
        on_passes = plan(count, num_physical_experts=12, num_gpus=4, algorithm=algorithm)
        on_sum = plan(count.sum(0), num_physical_experts=12, num_gpus=4, algorithm=algorithm)
        assert torch.equal(loc.physical_to_logical_map, on_passes.physical_to_logical_map)
        assert not torch.equal(loc.physical_to_logical_map, on_sum.physical_to_logical_map)


def test_logical_count_json_with_two_dims_loads(tmp_path):
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"logical_count": [[9, 1, 1, 1], [1, 9, 1, 1]]}))
    loc = load(str(path), algorithm="deepseek")
    assert loc.logical_replica_count[:, :2].tolist() == [[3, 1], [1, 3]]


@pytest.mark.parametrize(
    "data, key, fragment",
    [
        ({"physical_to_logical_map": [[0, 1, 2, 3, 0, 9], MAP[1]]}, "physical_to_logical_map", "outside [0, 4)"),
        ({"physical_to_logical_map": [[0, 1, 2, 0, 0, 0], MAP[1]]}, "physical_to_logical_map", "no replica"),
        ({"physical_to_logical_map": [MAP[0]]}, "physical_to_logical_map", "1 layers"),
        ({"physical_to_logical_map": [[0, 1, 2, 3], [0, 1, 2, 3]]}, "physical_to_logical_map", "4 slots"),
        ({"physical_to_logical_map": [MAP[0], [3, 0]]}, "physical_to_logical_map", "rectangular"),
        ({"physical_to_logical_map": MAP, "rank": 0}, "physical_to_logical_map", "unexpected keys"),
        ({"logical_count": [[1, 2, 3, -4], [1, 1, 1, 1]]}, "logical_count", "negative"),
        ({"logical_count": [[1, 2, 3, float("nan")], [1, 1, 1, 1]]}, "logical_count", "NaN"),
        ({"logical_count": [[1, 2, 3], [1, 1, 1]]}, "logical_count", "3 experts"),
        ({"logical_count": [1, 2, 3, 4]}, "logical_count", "[L, E]"),
        ({"counts": [[1]]}, None, "neither"),
    ],
)
def test_malformed_files_name_the_file_the_key_and_the_problem(tmp_path, data, key, fragment):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ExpertLocationFileError) as info:
        load(str(path))
    err = info.value
    assert err.source == str(path) and err.key == key and fragment in str(err)


def test_slots_must_divide_over_ranks():
    with pytest.raises(PlacementError, match="divisible by ep_size 4"):
        load("trivial", ep_size=4)


def test_unreadable_sources_raise_the_documented_error(tmp_path):
    bad_pt = tmp_path / "broken.pt"
    bad_pt.write_bytes(b"not a zip")
    for source, fragment in [(str(bad_pt), "not a loadable"), (str(tmp_path / "x.json"), "not found"),
                             ("{oops", "valid JSON"), ("[1, 2]", "expected a dict")]:
        with pytest.raises(ExpertLocationFileError, match=fragment.replace("[", r"\[")):
            load(source)


class Payload:
    """A pickled object that weights_only loading must refuse."""


def test_pt_files_are_loaded_with_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"physical_to_logical_map": MAP, "x": Payload()}, path)
    with pytest.raises(ExpertLocationFileError, match="not a loadable"):
        load(str(path))


def test_replica_weights_must_sum_to_one_per_expert():
    with pytest.raises(PlacementError, match="sum to 1"):
        ExpertLocation.from_physical_to_logical_map(
            MAP, num_logical_experts=4, ep_size=2, replica_weights=torch.ones(2, 6)
        )
