"""The eplb command: plan, simulate, inspect."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eplb_plugin.cli import load_counts, main, redundant_memory_bytes
from eplb_plugin.cli_simulate import baseline_balancedness
from eplb_plugin.configs import get_preset

from conftest import trace_path


def _counts_json(tmp_path, key="logical_count"):
    counts = (np.random.default_rng(0).random((3, 16)) ** 3 * 1000).tolist()
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({key: counts}))
    return path


def test_plan_writes_map_only_file_and_weights_sidecar_only_for_a_weighted_split(tmp_path, capsys):
    """By default (equal split, what stock SGLang does) only the map is written; with --split
    weighted the replica weights go to a sidecar, and the output says stock SGLang ignores it."""
    out = tmp_path / "placement.json"
    assert main(["plan", str(_counts_json(tmp_path)), "--ep-size", "4", "--redundant", "4", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data) == ["physical_to_logical_map"]
    assert np.array(data["physical_to_logical_map"]).shape == (3, 20)
    assert not Path(str(out) + ".weights.json").exists()
    assert "balancedness before" in capsys.readouterr().out
    assert main(["plan", str(_counts_json(tmp_path)), "--ep-size", "4", "--redundant", "4", "--split", "weighted",
                 "--out", str(out)]) == 0
    side = json.loads(Path(str(out) + ".weights.json").read_text())
    assert np.array(side["replica_weights"]).shape == (3, 20)
    assert "stock SGLang ignores this file" in capsys.readouterr().out


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
    main(["plan", str(counts), "--ep-size", "4", "--split", "weighted", "--out", str(out)])
    assert main(["inspect", str(out), str(counts), "--ep-size", "4", "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "hottest experts" in text and "replica weights" in text


def test_simulate_reports_a_no_eplb_baseline_and_where_the_traffic_changes(tmp_path, capsys, monkeypatch):
    """Two traces served in turn: the JSON and the printout carry the no-EPLB baseline beside
    each dispatch, over all passes and after the first plan; the pass where the second trace
    starts is listed; by default the JSON goes under the git-ignored eplb_runs/."""
    monkeypatch.chdir(tmp_path)
    first, second = trace_path("esft_dsv2lite_intent_top6.npz"), trace_path("esft_dsv2lite_law_top6.npz")
    png = tmp_path / "sim.png"
    assert main(["simulate", str(first), str(second), "--ep-size", "8", "--redundant", "8", "--interval", "8",
                 "--dispatch", "static", "dynamic", "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "eplb_runs" / "simulate.json").read_text())
    passes = len(load_counts(first, pass_tokens=256))
    assert report["traffic_change_passes"] == [passes] and report["first_plan_pass"] == 8
    for key in ("balancedness_mean", "balancedness_mean_after_first_plan"):
        assert set(report["summary"][key]) == {"no EPLB", "static", "dynamic"}
    baseline = np.array(report["per_pass"]["no EPLB"])
    assert report["summary"]["balancedness_mean_after_first_plan"]["no EPLB"] == baseline[8:].mean()
    assert np.array(report["baseline_per_layer"]).shape == (2 * passes, 26)
    assert f"traffic changes at pass [{passes}]" in printed and "after the first plan (pass 8)" in printed
    assert f"no EPLB (trivial placement)        {baseline.mean():.4f} | {baseline[8:].mean():.4f}" in printed
    assert png.stat().st_size > 0
    assert load_counts(first).shape == (26, 64)


def test_baseline_is_the_trivial_placement_under_an_equal_split():
    """Hand example, 2 GPUs, one layer of loads (3, 1, 0, 0): with 4 slots GPU 0 holds experts
    0 and 1 (4 tokens, GPU 1 none): 0.5; with 6 slots experts 0 and 1 get a second slot on GPU 1
    and both GPUs take 2 tokens: 1.0."""
    counts = np.array([[[3.0, 1.0, 0.0, 0.0]]])
    assert baseline_balancedness(counts, num_physical=4, num_gpus=2).tolist() == [[0.5]]
    assert baseline_balancedness(counts, num_physical=6, num_gpus=2).tolist() == [[1.0]]


def test_help_shows_defaults_policies_with_their_hosts_and_presets(capsys):
    """`eplb plan --help` and `eplb simulate --help` show defaults, every policy with the host it
    suits, and every model preset."""
    from eplb_plugin.algorithms import ALGORITHMS
    from eplb_plugin.cli import POLICY_HELP
    from eplb_plugin.configs import PRESET_NAMES

    for command in ("plan", "simulate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: auto)" in text and "(default: 0)" in text
        for name in ALGORITHMS:
            assert " ".join(f"{name} {POLICY_HELP[name]}".split()) in text
        assert ", ".join(PRESET_NAMES) in text
    assert "(default: eplb_runs/simulate.json)" in text


def test_synthetic_trace_example_writes_a_trace_plan_reads(tmp_path):
    """examples/synthetic_trace.py (the README's input for the worked example) writes a per-token
    trace of the preset's shape that `eplb plan` turns into a placement."""
    import runpy

    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "synthetic_trace.py"))
    trace, out = tmp_path / "day.npz", tmp_path / "placement.json"
    assert example["main"](["--model-preset", "tiny", "--passes", "3", "--tokens-per-pass", "8", "--out", str(trace)]) == 0
    tiny = get_preset("tiny")
    assert np.load(trace)["topk_ids"].shape == (24, tiny.num_layers, tiny.top_k)
    assert main(["plan", str(trace), "--ep-size", "2", "--redundant", "2", "--out", str(out)]) == 0
    assert np.array(json.loads(out.read_text())["physical_to_logical_map"]).shape[0] == tiny.num_layers


def _topk_npz(tmp_path, *, tokens=2048, layers=2, experts=16, top_k=2, seed=0):
    """A per-token trace [T, L, k] whose hot experts shift halfway (written here, not a shared trace)."""
    gen = np.random.default_rng(seed)
    ids = np.empty((tokens, layers, top_k), dtype=np.int64)
    for layer in range(layers):
        popularity = gen.gamma(0.5, 1.0, experts)
        popularity /= popularity.sum()
        for t in range(tokens):
            ids[t, layer] = gen.choice(experts, top_k, replace=False, p=popularity)
    path = tmp_path / "trace.npz"
    np.savez(path, topk_ids=ids)
    return path


def test_plan_sizing_prints_held_out_balance_for_each_count_of_redundant_experts(tmp_path, capsys):
    """--sizing with per-pass counts plans on the first half of the passes and scores the
    second half under the given dispatch, one row per redundant count (one more per GPU)."""
    src = _topk_npz(tmp_path)
    assert main(["plan", str(src), "--ep-size", "4", "--redundant", "4", "--sizing", "--dispatch", "minmax",
                 "--pass-tokens", "128", "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "under minmax dispatch, held-out passes" in out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 4, 8, 12, 16] and [int(r[1]) for r in rows] == [0, 1, 2, 3, 4]
    assert all(0 < float(r[2]) <= 1 for r in rows) and float(rows[-1][2]) > float(rows[0][2])


def test_plan_memory_budget_takes_the_redundant_experts_that_fit_or_says_none_fit(tmp_path, capsys):
    """--gpu-memory-budget-gib with a preset plans with the most redundant experts whose
    weights fit on every GPU; a budget below one expert per GPU says so and plans with none;
    without a preset, with --redundant too, or negative, it is refused in one line."""
    preset = get_preset("deepseek-v2-lite")
    per_slot_gib = preset.expert_bytes * preset.num_layers / 2**30
    src, out = _counts_json(tmp_path), tmp_path / "p.json"
    args = ["plan", str(src), "--ep-size", "4", "--preset", "deepseek-v2-lite", "--out", str(out)]
    assert main([*args, "--gpu-memory-budget-gib", str(2.5 * per_slot_gib)]) == 0
    assert np.array(json.loads(out.read_text())["physical_to_logical_map"]).shape == (3, 16 + 8)
    assert "8 redundant experts (2 per GPU" in capsys.readouterr().out
    assert main([*args, "--gpu-memory-budget-gib", str(0.5 * per_slot_gib)]) == 0
    assert np.array(json.loads(out.read_text())["physical_to_logical_map"]).shape == (3, 16)
    assert "below one redundant expert per GPU" in capsys.readouterr().out
    for bad, why in ((["--gpu-memory-budget-gib", "1", "--redundant", "4"], "not both"),
                     (["--gpu-memory-budget-gib", "-1"], "must be >= 0")):
        assert main([*args, *bad]) == 2
        assert why in capsys.readouterr().err
    assert main(["plan", str(src), "--ep-size", "4", "--gpu-memory-budget-gib", "1", "--out", str(out)]) == 2
    assert "needs --preset" in capsys.readouterr().err
