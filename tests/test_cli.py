"""The eplb command: plan, simulate, inspect."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from eplb_plugin.cli import load_counts, main, redundant_memory_bytes

from conftest import trace_path


def _counts_json(tmp_path, key="logical_count"):
    counts = (np.random.default_rng(0).random((3, 16)) ** 3 * 1000).tolist()
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({key: counts}))
    return path


def test_plan_writes_map_only_file_and_weights_sidecar(tmp_path, capsys):
    out = tmp_path / "placement.json"
    assert main(["plan", str(_counts_json(tmp_path)), "--ep-size", "4", "--redundant", "4", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data) == ["physical_to_logical_map"]
    assert np.array(data["physical_to_logical_map"]).shape == (3, 20)
    side = json.loads(Path(str(out) + ".weights.json").read_text())
    assert np.array(side["replica_weights"]).shape == (3, 20)
    assert "balancedness before" in capsys.readouterr().out


def test_plan_reads_pt_stat_dump_and_writes_pt(tmp_path):
    src = tmp_path / "dump.pt"
    torch.save({"logical_count": torch.rand(5, 2, 8) * 10}, src)
    out = tmp_path / "p.pt"
    assert main(["plan", str(src), "--ep-size", "2", "--out", str(out), "--algorithm", "deepseek"]) == 0
    assert torch.load(out, weights_only=True)["physical_to_logical_map"].shape == (2, 8)


def test_plan_bad_shape_exits_with_message(tmp_path, capsys):
    src = _counts_json(tmp_path, key="counts")
    assert main(["plan", str(src), "--ep-size", "3", "--out", str(tmp_path / "x.json")]) == 2
    assert "not divisible" in capsys.readouterr().err


def test_redundant_memory_per_rank():
    preset = SimpleNamespace(num_layers=2, num_logical_experts=8, expert_bytes=48)
    # 8 redundant over 4 GPUs = 2 per rank per layer, 2 layers, 48 bytes each
    assert redundant_memory_bytes(preset, num_physical=16, num_gpus=4) == 2 * 2 * 48


def test_plan_preset_prints_memory_from_the_real_preset(tmp_path, capsys):
    """--preset reads eplb_plugin.configs.get_preset; an unknown name exits 2 listing presets."""
    from eplb_plugin.configs import PRESET_NAMES, get_preset

    name = PRESET_NAMES[0]
    preset = get_preset(name)
    counts = (np.random.default_rng(0).random((2, preset.num_logical_experts)) * 100).tolist()
    src = tmp_path / "c.json"
    src.write_text(json.dumps({"counts": counts}))
    args = ["plan", str(src), "--ep-size", "4", "--redundant", "4", "--out", str(tmp_path / "p.json")]
    assert main([*args, "--preset", name]) == 0
    expected = redundant_memory_bytes(preset, num_physical=preset.num_logical_experts + 4, num_gpus=4)
    assert f"{expected / 2**30:.2f} GiB" in capsys.readouterr().out
    assert main([*args, "--preset", "no-such-model"]) == 2
    assert "known presets" in capsys.readouterr().err


def test_inspect_prints_balancedness_and_hottest(tmp_path, capsys):
    counts = _counts_json(tmp_path)
    out = tmp_path / "p.json"
    main(["plan", str(counts), "--ep-size", "4", "--out", str(out)])
    assert main(["inspect", str(out), str(counts), "--ep-size", "4", "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "hottest experts" in text and "replica weights" in text


def test_simulate_writes_json_and_plot(tmp_path):
    trace = trace_path("esft_dsv2lite_law_top6.npz")
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    assert main(["simulate", str(trace), "--ep-size", "8", "--redundant", "8", "--interval", "8",
                 "--out", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert set(report["summary"]["balancedness_mean"]) == {"static", "random", "dynamic", "weighted", "minmax"}
    assert png.stat().st_size > 0
    assert load_counts(trace).shape == (26, 64)
