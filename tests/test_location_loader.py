"""Every placement and counts input goes through one validation path and ends in a typed
error naming the file, the key and the problem; nothing is allocated past what the model's
shape justifies; ``eplb inspect`` validates as the loader does."""

from __future__ import annotations

import json

import pytest
import torch

from eplb_plugin import cli
from eplb_plugin import location as location_module
from eplb_plugin.errors import ExpertLocationFileError, PlacementError
from eplb_plugin.location import ExpertLocation, weights_sidecar
from eplb_plugin.location_files import (
    load_init_expert_location,
    max_source_bytes,
    meta_sidecar,
    save_placement,
)

SHAPE = dict(num_layers=2, num_logical_experts=4, num_physical_experts=6, ep_size=2)
MAP = [[0, 1, 2, 3, 0, 0], [3, 2, 1, 0, 1, 3]]
WEIGHTS = [[0.5, 1, 1, 1, 0.25, 0.25], [0.5, 1, 0.5, 1, 0.5, 0.5]]


def load(source, **overrides):
    return load_init_expert_location(str(source), **{**SHAPE, **overrides})


def refused(source, fragment, key=None, **overrides) -> ExpertLocationFileError:
    with pytest.raises(ExpertLocationFileError) as info:
        load(source, **overrides)
    assert fragment in str(info.value), str(info.value)
    assert info.value.key == key, str(info.value)
    return info.value


# ---------------------------------------------------------------------- bounds


def test_a_file_larger_than_the_model_can_need_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A JSON or .pt bigger than the model's shape justifies is refused by its size alone."""
    path = tmp_path / "huge.json"
    cap = max_source_bytes(num_layers=2, num_logical_experts=4, num_physical_experts=6, binary=False)
    path.write_text('{"physical_to_logical_map": [' + ",".join(["0"] * (cap // 2)) + "]}")
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("the file was parsed"))
    err = refused(path, f"more than the model's shape can need ({cap})")
    assert err.source == str(path)
    pt = tmp_path / "huge.pt"
    torch.save({"physical_to_logical_map": torch.zeros(2, 400_000, dtype=torch.int64)}, pt)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the file was loaded"))
    refused(pt, "more than the model's shape can need")


def test_a_small_compressed_pt_that_unpacks_past_the_cap_is_refused_before_it_is_loaded(tmp_path, monkeypatch):
    """A .pt is a zip archive: its entries' unpacked sizes count against the cap, so a few
    KiB of deflated zeros cannot make torch.load allocate what the model's shape never needs."""
    import zipfile

    raw, bomb = tmp_path / "raw.pt", tmp_path / "bomb.pt"
    torch.save({"logical_count": torch.zeros(4, 1024, 1024, dtype=torch.int32)}, raw)  # 16 MiB
    with zipfile.ZipFile(raw) as zin, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            zout.writestr(item.filename, zin.read(item.filename))
    cap = max_source_bytes(num_layers=2, num_logical_experts=4, num_physical_experts=6, binary=True)
    assert bomb.stat().st_size < cap
    with zipfile.ZipFile(bomb) as archive:
        unpacked = sum(item.file_size for item in archive.infolist())
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the archive was loaded"))
    err = refused(bomb, f"unpacks to {unpacked} bytes")
    assert err.source == str(bomb) and f"more than the model's shape can need ({cap})" in str(err)


def test_a_map_of_the_wrong_slot_count_is_refused_before_any_view_is_derived(tmp_path, monkeypatch):
    """A map with far more slots than the model ([L, E, P-E+1] would be huge) is refused on
    its shape; the logical-to-physical view is never built."""
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[i % 4 for i in range(600)]] * 2}))
    monkeypatch.setattr(location_module, "compute_logical_to_physical_map",
                        lambda *a, **k: pytest.fail("a view was derived from a map of the wrong shape"))
    refused(path, "has shape [2, 600] (600 slots); the model needs [2, 6]", key="physical_to_logical_map")


# ---------------------------------------------------------------------- malformed inputs


def test_deeply_nested_json_is_a_typed_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    refused(path, "nested too deeply")
    refused(json.dumps({"physical_to_logical_map": [[[[0]]]]}), "nested deeper than 2 levels",
            key="physical_to_logical_map")


def test_undecodable_bytes_and_a_directory_are_typed_errors(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes(b'{"physical_to_logical_map": "\xff\xfe"}')
    refused(path, "is not UTF-8 text")
    folder = tmp_path / "x.json"
    folder.mkdir()
    refused(folder, "is not a regular file")


@pytest.mark.parametrize("tensor, fragment", [
    (torch.tensor(MAP).bool(), "dtype torch.bool"),
    (torch.empty(2, 6, dtype=torch.int64, device="meta"), "meta tensor"),
    (torch.tensor(MAP).to_sparse(), "torch.sparse_coo tensor"),
    (torch.tensor(MAP, dtype=torch.complex64) + 5j, "dtype torch.complex64"),
])
def test_bool_meta_sparse_and_complex_tensors_are_refused(tmp_path, tensor, fragment):
    """A complex map no longer becomes its real part (3+5j was expert 3)."""
    path = tmp_path / "odd.pt"
    torch.save({"physical_to_logical_map": tensor}, path)
    refused(path, fragment, key="physical_to_logical_map")


def test_a_pt_dict_with_int_keys_is_a_typed_error(tmp_path):
    path = tmp_path / "ints.pt"
    torch.save({0: torch.tensor(MAP), "physical_to_logical_map": torch.tensor(MAP)}, path)
    refused(path, "keys must be strings, got [0]")


def test_true_false_and_fractional_ids_are_refused():
    refused(json.dumps({"physical_to_logical_map": [[True] * 6] * 2}), "true/false", key="physical_to_logical_map")
    refused(json.dumps({"physical_to_logical_map": [[0.5] * 6] * 2}), "non-integer ids", key="physical_to_logical_map")


def test_an_unused_slot_marked_minus_one_is_a_placement_error():
    """-1 (vLLM's unused slot) gets the project's PlacementError, not an index error."""
    with pytest.raises(PlacementError, match="-1 marks an unused slot"):
        ExpertLocation.from_physical_to_logical_map([[0, 1, 2, 3, 0, -1]] * 2, num_logical_experts=4, ep_size=2)
    refused(json.dumps({"physical_to_logical_map": [[0, 1, 2, 3, 0, -1]] * 2}), "unused slot",
            key="physical_to_logical_map")


@pytest.mark.parametrize("sidecar, key, fragment", [
    ("{not json", None, "invalid JSON"),
    (json.dumps([1, 2]), None, "must be a dict with 'replica_weights'"),
    (json.dumps({"replica_weights": WEIGHTS}), None, "must be a dict with 'replica_weights'"),
    (json.dumps({"physical_to_logical_map": MAP, "replica_weights": [[1.0] * 5] * 2}), "replica_weights",
     "has shape [2, 5]"),
    (json.dumps({"physical_to_logical_map": MAP, "replica_weights": [["a"] * 6] * 2}), "replica_weights",
     "not an array of numbers"),
    (json.dumps({"physical_to_logical_map": [MAP[1], MAP[0]], "replica_weights": WEIGHTS}),
     "physical_to_logical_map", "belongs to another map"),
    (json.dumps({"physical_to_logical_map": MAP, "replica_weights": [[-0.5, 1, 1, 1, 0.75, 0.75], WEIGHTS[1]]}),
     "replica_weights", "must be finite and non-negative"),
    (json.dumps({"physical_to_logical_map": MAP, "replica_weights": [[float("nan"), 1, 1, 1, 0.5, 0.5], WEIGHTS[1]]}),
     "replica_weights", "must be finite and non-negative"),
    (json.dumps({"physical_to_logical_map": MAP, "replica_weights": [[0.0] * 6] * 2}), "replica_weights",
     "of an expert's slots must sum to 1"),
])
def test_malformed_sidecars_name_the_sidecar(tmp_path, sidecar, key, fragment):
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"physical_to_logical_map": MAP}))
    weights_sidecar(path).write_text(sidecar)
    err = refused(path, fragment, key=key)
    assert err.source == str(weights_sidecar(path))


@pytest.mark.parametrize("sidecar_of", [weights_sidecar, meta_sidecar])
def test_a_sidecar_that_is_a_dangling_symlink_is_refused_naming_it(tmp_path, sidecar_of):
    """A sidecar link whose target is gone is an error naming it, not a placement loaded
    without its replica weights (or without the check of what it was made for)."""
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"physical_to_logical_map": MAP}))
    sidecar_of(path).symlink_to(tmp_path / "gone.json")
    err = refused(path, "a symbolic link to a missing file")
    assert err.source == str(sidecar_of(path))


# ---------------------------------------------------------------------- what a file was made for


def test_saving_records_the_ep_size_and_shape_and_a_mismatch_is_refused(tmp_path):
    """The map file stays what stock SGLang loads (the map alone); the meta sidecar records
    EP size and shape, and loading for another EP size or model is refused."""
    loc = ExpertLocation.from_physical_to_logical_map(MAP, num_logical_experts=4, ep_size=2)
    path = loc.save(tmp_path / "placement.json")
    assert set(json.loads(path.read_text())) == {"physical_to_logical_map"}
    assert json.loads(meta_sidecar(path).read_text()) == {"eplb_placement": {
        "ep_size": 2, "num_layers": 2, "num_logical_experts": 4, "num_physical_experts": 6}}
    assert load(path).physical_to_logical_map.tolist() == MAP
    refused(path, "was made for ep_size 2 but --ep-size is 3", key="eplb_placement", ep_size=3)
    refused(path, "was made for num_logical_experts 4 but num_logical_experts is 3", key="eplb_placement",
            num_logical_experts=3)


def test_saving_without_weights_over_a_weighted_file_removes_the_stale_sidecar(tmp_path):
    path = tmp_path / "placement.pt"
    save_placement(path, torch.tensor(MAP), ep_size=2, num_logical_experts=4, replica_weights=torch.tensor(WEIGHTS))
    assert weights_sidecar(path).exists()
    other = [[1, 0, 2, 3, 1, 1], MAP[1]]
    save_placement(path, torch.tensor(other), ep_size=2, num_logical_experts=4)
    assert not weights_sidecar(path).exists()
    assert load(path).physical_to_logical_map.tolist() == other


# ---------------------------------------------------------------------- eplb inspect


def _inspect(tmp_path, capsys, placement, counts, ep_size=2) -> tuple[int, str]:
    p = tmp_path / "placement.json"
    p.write_text(json.dumps({"physical_to_logical_map": placement}))
    c = tmp_path / "counts.json"
    c.write_text(json.dumps({"logical_count": counts}))
    code = cli.main(["inspect", str(p), str(c), "--ep-size", str(ep_size)])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("placement, counts, ep_size, fragment", [
    ([[0, 1, 2, 0, 0, 0], MAP[1]], [[1, 2, 3, 4]] * 2, 2, "logical expert 3 has no replica in layer 0"),
    ([[0, 1, 2, 3, 0.5, 0], MAP[1]], [[1, 2, 3, 4]] * 2, 2, "non-integer ids"),
    ([MAP[0]], [[1, 2, 3, 4]] * 2, 2, "has shape [1, 6] (1 layers); the model needs [2, *]"),
    (MAP, [[1, 2, 3, float("nan")]] * 2, 2, "NaN"),
    (MAP, [[1, 2, 3, -4]] * 2, 2, "is negative"),
    (MAP, [[1, 2, 3, 4]] * 2, 4, "6 slots are not divisible by ep_size 4"),
    ([[0, 1, 2, 3, 0, -1], MAP[1]], [[1, 2, 3, 4]] * 2, 2, "unused slot"),
])
def test_inspect_refuses_what_the_loader_refuses_with_one_line(tmp_path, capsys, placement, counts, ep_size, fragment):
    """A missing replica, fractional ids, fewer layers than the counts, NaN or negative
    counts, a wrong EP size, -1 slots: exit 2 and one line, never a number or a traceback."""
    code, err = _inspect(tmp_path, capsys, placement, counts, ep_size)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("eplb inspect: error: ")
    assert fragment in err, err


def test_inspect_refuses_a_placement_made_for_another_ep_size(tmp_path, capsys):
    path = ExpertLocation.from_physical_to_logical_map(MAP, num_logical_experts=4, ep_size=2).save(
        tmp_path / "p.json")
    counts = tmp_path / "c.json"
    counts.write_text(json.dumps({"logical_count": [[1, 2, 3, 4]] * 2}))
    assert cli.main(["inspect", str(path), str(counts), "--ep-size", "3"]) == 2
    assert "was made for ep_size 2 but --ep-size is 3" in capsys.readouterr().err
    assert cli.main(["inspect", str(path), str(counts), "--ep-size", "2"]) == 0


def test_plan_checks_the_preset_before_the_solver_runs(tmp_path, capsys, monkeypatch):
    counts = tmp_path / "c.json"
    counts.write_text(json.dumps({"logical_count": [[1, 2, 3, 4]] * 2}))
    monkeypatch.setattr(cli, "plan", lambda *a, **k: pytest.fail("the solver ran"))
    code = cli.main(["plan", str(counts), "--ep-size", "2", "--redundant", "2", "--preset", "nope",
                     "--out", str(tmp_path / "o.json")])
    assert code == 2 and "unknown model preset 'nope'" in capsys.readouterr().err


def test_a_stat_dump_of_no_passes_is_refused_rather_than_planned_from_zeros(tmp_path):
    """A stat dump taken before any pass was recorded holds logical_count [0, L, E]: planning
    from it would place every expert as if none got a token. One pass of zeros still plans."""
    empty = tmp_path / "empty_dump.pt"
    torch.save({"logical_count": torch.zeros(0, 2, 4)}, empty)
    refused(empty, "holds no passes", key="logical_count")
    one = tmp_path / "one_pass.pt"
    torch.save({"logical_count": torch.zeros(1, 2, 4)}, one)
    assert load(one).physical_to_logical_map.shape == (2, 6)


def test_a_path_that_exists_is_never_reported_as_inline_json(tmp_path):
    """A directory or an existing file of another type names the path and what is wrong with it
    (both were '<inline JSON>: ... nor valid JSON')."""
    folder = tmp_path / "placements"
    folder.mkdir()
    error = refused(folder, "is a directory; expected a .pt or .json file")
    assert error.source == str(folder)
    trace = tmp_path / "t2.npz"
    trace.write_bytes(b"PK")
    error = refused(trace, "unsupported file type (.npz); expected a .pt or .json file")
    assert error.source == str(trace) and "inline JSON" not in str(error)


def test_inspect_says_why_it_takes_no_trivial_placement_and_lists_only_what_it_takes(tmp_path, capsys):
    """'trivial' is refused with its reason, and the inline-JSON message of inspect does not list
    'trivial' as allowed (it did while refusing it)."""
    counts = tmp_path / "c.json"
    counts.write_text(json.dumps({"logical_count": [[1, 2, 3, 4]] * 2}))
    assert cli.main(["inspect", "trivial", str(counts), "--ep-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "placement trivial: " in err and "slot count" in err
    assert cli.main(["inspect", "{oops", str(counts), "--ep-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a .pt/.json path nor valid JSON" in err and "trivial" not in err
