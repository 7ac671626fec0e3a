"""Recorder dumps (SGLang 0.5.23 formats, safe directory), utilization, and the no-op recorder."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_recorder_helpers import np_logical, np_slot_count, padded_ids, random_map
from torch.utils._python_dispatch import TorchDispatchMode

from eplb_plugin.errors import ConfigError
from eplb_plugin.location_files import load_init_expert_location
from eplb_plugin.recorder import (
    DUMP_DIR_ENV,
    ExpertDistributionRecorder,
    NoopRecorder,
    create_recorder,
    safe_dump_path,
)

from conftest import destroy_process_group, free_port, run_gloo_cases

NUM_LAYERS, NUM_LOGICAL, NUM_PHYSICAL = 3, 13, 16


def _recorded(mode, gen, *, passes=2, **kwargs):
    phy2log = random_map(gen, NUM_LAYERS, NUM_LOGICAL, NUM_PHYSICAL)
    rec = ExpertDistributionRecorder(mode, physical_to_logical_map=phy2log, num_logical_experts=NUM_LOGICAL, **kwargs)
    rec.start_record()
    physical = np.zeros((passes, NUM_LAYERS, NUM_PHYSICAL), dtype=np.int64)
    for p in range(passes):
        with rec.with_forward_pass(p):
            for layer in range(NUM_LAYERS):
                ids = padded_ids(gen, 29, 6, NUM_PHYSICAL)
                with rec.with_current_layer(layer):
                    rec.on_select_experts(ids)
                physical[p, layer] = np_slot_count(ids, NUM_PHYSICAL)
    return rec, phy2log, physical


def test_stat_dump_file_has_sglangs_name_and_keys_and_loads_weights_only(tmp_path, monkeypatch):
    """Rank 0 writes expert_distribution_recorder_{time}.pt into $SGLANG_..._DIR; it loads safely."""
    monkeypatch.setenv(DUMP_DIR_ENV, str(tmp_path))
    rec, phy2log, physical = _recorded("stat", torch.Generator().manual_seed(1))
    path = rec.dump_record()
    assert path.parent == tmp_path.resolve()
    assert re.fullmatch(r"expert_distribution_recorder_[0-9.]+\.pt", path.name)
    data = torch.load(path, weights_only=True)
    assert set(data) == {"rank", "logical_count", "average_utilization_rate_over_window"}
    assert data["logical_count"].dtype == torch.int32
    assert np.array_equal(data["logical_count"].numpy(), np_logical(physical, phy2log.numpy(), NUM_LOGICAL))
    assert rec.num_passes_in_window == 0  # dumping resets


def test_stat_dump_written_by_rank_zero_only(tmp_path):
    """Other ranks return None and write nothing."""
    rec, _, _ = _recorded("stat", torch.Generator().manual_seed(2), rank=1, ep_size=2, dump_dir=tmp_path)
    assert rec.dump_record() is None and not list(tmp_path.iterdir())


@pytest.mark.parametrize("mode", ["per_pass", "per_token"])
def test_detail_dumps_are_written_by_every_rank_and_load_weights_only(tmp_path, mode):
    """per_pass / per_token write ..._{time}_{rank}.pt = {records, last_physical_to_logical_map}."""
    rec, phy2log, physical = _recorded(mode, torch.Generator().manual_seed(3), rank=1, ep_size=2, dump_dir=tmp_path)
    path = rec.dump_record("file")
    assert re.fullmatch(r"expert_distribution_recorder_[0-9.]+_1\.pt", path.name)
    data = torch.load(path, weights_only=True)
    assert {"records", "last_physical_to_logical_map"} <= set(data)
    assert torch.equal(data["last_physical_to_logical_map"], phy2log)
    got = np.stack([r["global_physical_count"].numpy() for r in data["records"]])
    assert np.array_equal(got, physical)
    assert all(r["rank"] == 1 for r in data["records"])


@pytest.mark.parametrize("name", ["../escape.pt", "/etc/passwd", "a/../../b.pt", ""])
def test_dump_names_that_leave_the_dump_directory_are_refused(tmp_path, name):
    """A file name cannot put the dump outside its directory."""
    rec, _, _ = _recorded("stat", torch.Generator().manual_seed(4), dump_dir=tmp_path)
    with pytest.raises(ConfigError, match="dump"):
        rec.dump_record(name=name)


def test_symlink_out_of_the_dump_directory_is_refused(tmp_path):
    """A name through a symlink pointing outside resolves outside and is refused."""
    inside, outside = tmp_path / "dumps", tmp_path / "elsewhere"
    inside.mkdir(), outside.mkdir()
    (inside / "link").symlink_to(outside)
    with pytest.raises(ConfigError, match="outside"):
        safe_dump_path("link/x.pt", inside)
    assert safe_dump_path("sub/x.pt", inside) == inside.resolve() / "sub" / "x.pt"


def test_stat_dump_feeds_back_as_init_expert_location(tmp_path):
    """The stat dump is a valid --init-expert-location source (logical_count [B, L, E])."""
    rec, _, _ = _recorded("stat", torch.Generator().manual_seed(5), dump_dir=tmp_path)
    path = rec.dump_record()
    loc = load_init_expert_location(str(path), num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL,
                                             num_physical_experts=NUM_PHYSICAL, ep_size=2)
    assert tuple(loc.physical_to_logical_map.shape) == (NUM_LAYERS, NUM_PHYSICAL)


def test_average_utilization_is_mean_per_pass_balancedness_with_several_gpus():
    """Hand example: 2 GPUs, loads (3, 1) and (2, 2) in one layer -> mean(2/3, 1) = 5/6."""
    phy2log = torch.tensor([[0, 1, 2, 3]])
    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=phy2log, num_logical_experts=4, ep_size=2)
    rec.start_record()
    for ids in ([[0, 1], [0, 2]], [[0, 2], [1, 3]]):
        with rec.with_forward_pass(0), rec.with_current_layer(0):
            rec.on_select_experts(torch.tensor(ids, dtype=torch.int32))
    assert rec.dump_record("object")["average_utilization_rate_over_window"] == pytest.approx(5 / 6, abs=1e-12)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_noop_recorder_allocates_and_launches_nothing():
    """With recording off, building the recorder and every hook and context are free: no
    tensor op runs at all."""
    ids = torch.zeros(4, 2, dtype=torch.int32)
    with _OpCounter() as counter:
        rec = create_recorder(None)
        assert isinstance(rec, NoopRecorder) and not rec.recording
        with rec.with_forward_pass(0, None) as outputs, rec.with_current_layer(0), rec.disable_this_region():
            rec.on_select_experts(ids)
            rec.on_deepep_dispatch_normal([1, 2], None, None, None)
            rec.on_deepep_dispatch_low_latency(ids)
            assert rec.get_current_pass_count_buffer(0) is None
    assert counter.ops == [] and outputs == {}
    with pytest.raises(ConfigError, match="recorder-mode"):
        rec.start_record()



def _two_rank_worker(rank, port, tmp, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        phy2log = torch.tensor([[0, 1, 2, 3]])
        rec = ExpertDistributionRecorder(
            "stat", physical_to_logical_map=phy2log, num_logical_experts=4, rank=rank, ep_size=2,
            group=dist.group.WORLD, dump_dir=tmp,
        )
        rec.start_record()
        with rec.with_forward_pass(0), rec.with_current_layer(0):
            rec.on_select_experts(torch.tensor([[0, 1]] if rank == 0 else [[0, 3]], dtype=torch.int32))
        obj = rec.dump_record("object")
        rec.start_record()
        with rec.with_forward_pass(1), rec.with_current_layer(0):
            rec.on_select_experts(torch.tensor([[2, 2]], dtype=torch.int32))
        path = rec.dump_record("file")
        results[rank] = (obj["logical_count"].tolist(), obj["average_utilization_rate_over_window"], path is not None)
    finally:
        destroy_process_group()


def test_stat_dump_sums_over_ranks_and_only_rank_zero_writes(tmp_path):
    """Two gloo ranks: logical counts are all-reduced; the utilization uses summed GPU loads."""
    results = mp.Manager().dict()
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path), results), nprocs=2)
    assert results[0][0] == results[1][0] == [[[2, 1, 0, 1]]]
    assert results[0][1] == pytest.approx(2 / 3)  # slots 0,1 | 2,3 summed over ranks: loads (3, 1)
    assert [results[r][2] for r in (0, 1)] == [True, False]
    assert len(os.listdir(tmp_path)) == 1


@pytest.mark.parametrize("mode", ["stat", "per_pass"])
def test_a_dump_that_cannot_be_written_raises_oserror_and_keeps_the_session(tmp_path, mode):
    """A file that cannot be opened (here: the name is a directory) is an OSError naming the
    path, and the refused dump resets nothing."""
    (tmp_path / "taken").mkdir()
    rec, _, _ = _recorded(mode, torch.Generator().manual_seed(6), dump_dir=tmp_path)
    with pytest.raises(OSError, match="taken"):
        rec.dump_record(name="taken")
    assert rec.num_passes_in_window == 2
    assert rec.dump_record(name="ok.pt") == tmp_path.resolve() / "ok.pt"


def test_a_dump_whose_write_fails_part_way_leaves_no_partial_file(tmp_path, monkeypatch):
    """torch.save failing after it wrote some bytes (its own RuntimeError, as from a full
    disk's zip writer) is an OSError naming the path, and the partial file is removed."""
    from eplb_plugin.recorder import dump as dump_io

    def half_written(data, file):
        file.write(b"PK partial")
        raise RuntimeError("write failed")

    monkeypatch.setattr(dump_io.torch, "save", half_written)
    with pytest.raises(OSError, match="cannot write the dump .*half.pt: write failed"):
        dump_io.write_dump({"x": 1}, "half.pt", tmp_path)
    assert not (tmp_path / "half.pt").exists()


def _refused_then_written_case(rank, group):
    """Rank 0 cannot write the stat dump (its directory is a file): every rank raises OSError
    and keeps its window; once the directory is valid the next dump sums both passes."""
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp())
    (tmp / "file").write_text("x")
    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=torch.tensor([[0, 1, 2, 3]]), num_logical_experts=4,
                                     rank=rank, ep_size=2, group=group)
    os.environ[DUMP_DIR_ENV] = str(tmp / "file" / "dumps")
    rec.start_record()
    for p in range(2):
        with rec.with_forward_pass(p), rec.with_current_layer(0):
            rec.on_select_experts(torch.tensor([[rank, 2]], dtype=torch.int32))
    with pytest.raises(OSError, match="rank 0" if rank else "file"):
        rec.dump_record()
    assert rec.num_passes_in_window == 2
    os.environ[DUMP_DIR_ENV] = str(tmp / "dumps")
    dumped = rec.dump_record()
    assert rec.num_passes_in_window == 0
    if rank == 0:
        assert torch.load(dumped, weights_only=True)["logical_count"].tolist() == [[[1, 1, 2, 0]]] * 2
    else:
        assert dumped is None


def test_a_refused_stat_dump_leaves_every_ranks_window_and_the_next_dump_works():
    """A stat dump rank 0 could not write resets no rank, so the ranks stay in step."""
    results = run_gloo_cases([_refused_then_written_case])
    assert set(results.values()) == {"ok"}, results
