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


def _preset_counts_json(tmp_path, preset, name="preset_counts.json"):
    """Counts of the preset's shape [MoE layers, experts]."""
    counts = (np.random.default_rng(0).random((preset.num_layers, preset.num_logical_experts)) ** 3 * 1000).tolist()
    path = tmp_path / name
    path.write_text(json.dumps({"logical_count": counts}))
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


def test_plan_algorithm_auto_is_sglangs_choice_and_the_default_is_the_projects_policy(tmp_path):
    """``--algorithm auto`` plans what SGLang's auto picks (deepseek_hierarchical where --groups
    divide over --nodes, else deepseek); no --algorithm plans with eplb_plugin."""
    from eplb_plugin.algorithms import plan

    src = _counts_json(tmp_path)
    counts = torch.tensor(json.loads(src.read_text())["logical_count"])
    for extra, policy in (([], "deepseek"), (["--nodes", "2", "--groups", "4"], "deepseek_hierarchical"),
                          (["--nodes", "2", "--groups", "3"], "deepseek")):  # 3 groups do not divide over 2 nodes
        out = tmp_path / "auto.json"
        code = main(["plan", str(src), "--ep-size", "4", "--redundant", "4", "--algorithm", "auto", *extra,
                     "--out", str(out)])
        assert code == 0  # deepseek plans without groups, so 16 experts in 3 groups are not refused
        kw = dict(num_physical_experts=20, num_gpus=4, num_nodes=int(extra[1]) if extra else 1,
                  num_groups=int(extra[3]) if extra else None)
        assert json.loads(out.read_text())["physical_to_logical_map"] == plan(
            counts, algorithm=policy, **kw).physical_to_logical_map.tolist()
    out = tmp_path / "default.json"
    assert main(["plan", str(src), "--ep-size", "4", "--redundant", "4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["physical_to_logical_map"] == plan(
        counts, num_physical_experts=20, num_gpus=4, algorithm="eplb_plugin").physical_to_logical_map.tolist()


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
    counts = (np.random.default_rng(0).random((preset.num_layers, preset.num_logical_experts)) * 100).tolist()
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
    """`eplb plan --help` and `eplb simulate --help` show defaults and every policy with the host
    it suits; plan's also every model preset (simulate takes no --preset)."""
    from eplb_plugin.algorithms import ALGORITHMS
    from eplb_plugin.cli import POLICY_HELP, SIMULATE_POLICY_HELP
    from eplb_plugin.configs import PRESET_NAMES

    for command, policy_help in (("plan", POLICY_HELP), ("simulate", SIMULATE_POLICY_HELP)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: eplb_plugin)" in text and "(default: 0)" in text
        for name in ALGORITHMS:
            assert " ".join(f"{name} {policy_help[name]}".split()) in text
        # plan takes --preset; simulate has none, so its help lists no presets
        assert (", ".join(PRESET_NAMES) in text) == (command == "plan")
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
    src, out = _preset_counts_json(tmp_path, preset), tmp_path / "p.json"
    args = ["plan", str(src), "--ep-size", "4", "--preset", "deepseek-v2-lite", "--out", str(out)]
    assert main([*args, "--gpu-memory-budget-gib", str(2.5 * per_slot_gib)]) == 0
    assert np.array(json.loads(out.read_text())["physical_to_logical_map"]).shape == (26, 64 + 8)
    assert "8 redundant experts (2 per GPU" in capsys.readouterr().out
    assert main([*args, "--gpu-memory-budget-gib", str(0.5 * per_slot_gib)]) == 0
    assert np.array(json.loads(out.read_text())["physical_to_logical_map"]).shape == (26, 64)
    assert "below one redundant expert per GPU" in capsys.readouterr().out
    for bad, why in ((["--gpu-memory-budget-gib", "1", "--redundant", "4"], "not both"),
                     (["--gpu-memory-budget-gib", "-1"], "must be >= 0")):
        assert main([*args, *bad]) == 2
        assert why in capsys.readouterr().err
    assert main(["plan", str(src), "--ep-size", "4", "--gpu-memory-budget-gib", "1", "--out", str(out)]) == 2
    assert "needs --preset" in capsys.readouterr().err


# ---------------------------------------------------------------------- per-token .npz inputs


def _npz(tmp_path, name="t.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_trace_padding_is_not_counted_as_another_layers_expert(tmp_path):
    """A negative id (SGLang's -1) is padding: dropped, never counted as the last expert of
    the layer before (the bincount offset) nor a crash when it opens the trace."""
    ids = np.zeros((4, 2, 1), np.int64)
    ids[:, 0, 0], ids[:, 1, 0], ids[0, 1, 0] = 1, -1, 2
    assert load_counts(_npz(tmp_path, topk_ids=ids)).tolist() == [[0, 4, 0], [0, 0, 1]]
    ids[0, 0, 0] = -1  # padding in pass 0, layer 0 (bincount refused the negative index)
    assert load_counts(_npz(tmp_path, topk_ids=ids)).tolist() == [[0, 3, 0], [0, 0, 1]]
    assert load_counts(_npz(tmp_path, topk_ids=ids), pass_tokens=2).tolist() == [[[0, 1, 0], [0, 0, 1]],
                                                                               [[0, 2, 0], [0, 0, 0]]]


def test_plan_and_simulate_serve_a_trace_with_padding(tmp_path):
    ids = np.asarray(np.load(_topk_npz(tmp_path))["topk_ids"])
    ids[::3, :, -1] = -1
    src = _npz(tmp_path, "padded.npz", topk_ids=ids)
    assert main(["plan", str(src), "--ep-size", "4", "--redundant", "4", "--out", str(tmp_path / "p.json")]) == 0
    assert main(["simulate", str(src), "--ep-size", "4", "--pass-tokens", "128", "--dispatch", "static",
                 "--out", str(tmp_path / "s.json")]) == 0


@pytest.mark.parametrize("arrays, fragment", [
    ({"ids": np.zeros((4, 2, 1), np.int64)}, "no 'topk_ids' key (keys: ['ids'])"),
    ({"topk_ids": np.zeros((4, 2), np.int64)}, "topk_ids has shape [4, 2]; expected [tokens, layers, top_k]"),
    ({"topk_ids": np.zeros((0, 2, 1), np.int64)}, "nothing to count"),
    ({"topk_ids": np.full((4, 2, 1), 1.5)}, "holds float64 values; expected integer expert ids"),
    ({"topk_ids": -np.ones((4, 2, 1), np.int64)}, "only padding"),
])
def test_a_malformed_trace_is_one_line_naming_the_file_and_key(tmp_path, capsys, arrays, fragment):
    src = _npz(tmp_path, **arrays)
    assert main(["plan", str(src), "--ep-size", "1", "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(src) in err and fragment in err, err


def test_pass_tokens_is_refused_out_of_range_or_for_a_counts_file(tmp_path, capsys):
    """--pass-tokens 0 or -5 (argparse), more than the trace holds, or given for a counts file:
    refused naming the flag (0 was taken as not given, -5 and too many raised from reshape)."""
    src, out = _topk_npz(tmp_path, tokens=64), str(tmp_path / "p.json")
    for bad in ("0", "-5"):
        with pytest.raises(SystemExit):
            main(["plan", str(src), "--ep-size", "4", "--pass-tokens", bad, "--out", out])
        assert f"argument --pass-tokens: must be >= 1 (got {bad})" in capsys.readouterr().err
    assert main(["plan", str(src), "--ep-size", "4", "--pass-tokens", "65", "--out", out]) == 2
    assert "64 tokens, fewer than one pass of --pass-tokens 65" in capsys.readouterr().err
    assert main(["plan", str(_counts_json(tmp_path)), "--ep-size", "4", "--pass-tokens", "8", "--out", out]) == 2
    assert "--pass-tokens cuts a per-token .npz trace" in capsys.readouterr().err


def test_num_logical_experts_counts_the_experts_a_trace_never_routed_to(tmp_path, capsys):
    """A trace's E is its largest id + 1 unless --num-logical-experts says otherwise: a
    16-expert trace whose expert 15 got no token plans for 16 experts with the flag, and an id
    at or above the flag is refused."""
    ids = np.random.default_rng(0).integers(0, 15, (64, 2, 2))
    src, out = _npz(tmp_path, topk_ids=ids), tmp_path / "p.json"
    assert load_counts(src).shape == (2, 15)
    assert load_counts(src, num_logical=16).shape == (2, 16) and load_counts(src, num_logical=16)[:, 15].sum() == 0
    assert main(["plan", str(src), "--ep-size", "4", "--num-logical-experts", "16", "--out", str(out)]) == 0
    assert np.array(json.loads(out.read_text())["physical_to_logical_map"]).shape == (2, 16)
    assert main(["plan", str(src), "--ep-size", "4", "--out", str(out)]) == 2
    assert "15 experts (the .npz's largest expert id + 1; --num-logical-experts sets it)" in capsys.readouterr().err
    assert main(["plan", str(src), "--ep-size", "2", "--num-logical-experts", "14", "--out", str(out)]) == 2
    assert "holds expert id 14, but --num-logical-experts is 14" in capsys.readouterr().err


# ---------------------------------------------------------------------- plan


def test_per_pass_policies_plan_on_the_passes_pass_tokens_cuts(tmp_path):
    """With --pass-tokens the per-pass policies get the trace's passes [B, L, E] (what
    plan() of the API plans from), so the cut changes their plan; without it, the sum."""
    from eplb_plugin.algorithms import plan

    src = _topk_npz(tmp_path)
    ids = np.load(src)["topk_ids"]

    def from_cli(*flags):
        out = tmp_path / "p.json"
        assert main(["plan", str(src), "--ep-size", "4", "--redundant", "4", *flags, "--out", str(out)]) == 0
        return json.loads(out.read_text())["physical_to_logical_map"]

    for policy in ("eplb_plugin_perpass", "deepseek_vec"):
        for pass_tokens in (128, 512):
            passes = load_counts(src, pass_tokens=pass_tokens)
            assert passes.shape == (len(ids) // pass_tokens, 2, 16)
            for dispatch in ("static", "minmax"):  # --dispatch: the host's, static unless told (as the server's)
                expected = plan(passes, num_physical_experts=20, num_gpus=4, algorithm=policy, dispatch=dispatch)
                flags = ("--dispatch", dispatch) if dispatch != "static" else ()
                assert from_cli("--algorithm", policy, "--pass-tokens", str(pass_tokens), *flags) == \
                    expected.physical_to_logical_map.tolist()
    summed = from_cli("--algorithm", "eplb_plugin_perpass")
    assert from_cli("--algorithm", "eplb_plugin_perpass", "--pass-tokens", "128") != summed


def test_a_counts_file_of_passes_is_planned_on_its_passes_by_a_per_pass_policy(tmp_path, capsys):
    """A stat dump's [B, L, E] logical_count: a per-pass policy plans on its passes (as SGLang
    hands deepseek_vec the passes), for --dispatch, and says which dispatch it planned for."""
    from eplb_plugin.algorithms import plan

    gen = np.random.default_rng(1)
    count = gen.poisson(gen.gamma(0.5, 1.0, size=(6, 2, 16)) * 40).astype(np.int32)
    src, out = tmp_path / "dump.pt", tmp_path / "p.json"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(count)}, src)
    for policy, dispatch in (("deepseek_vec", "static"), ("eplb_plugin_perpass", "minmax")):
        assert main(["plan", str(src), "--ep-size", "4", "--redundant", "4", "--algorithm", policy,
                     "--dispatch", dispatch, "--out", str(out)]) == 0
        expected = plan(count.astype(np.float64), num_physical_experts=20, num_gpus=4, algorithm=policy,
                        dispatch=dispatch)
        assert json.loads(out.read_text())["physical_to_logical_map"] == expected.physical_to_logical_map.tolist()
    assert "planned per pass for minmax dispatch" in capsys.readouterr().out


def test_plan_checks_out_before_the_solver_runs(tmp_path, capsys, monkeypatch):
    """--out with another suffix, in a folder that does not exist or takes no file, or naming a
    folder: one line, exit 2, and the solver never ran."""
    import eplb_plugin.cli as cli

    monkeypatch.setattr(cli, "plan", lambda *a, **k: pytest.fail("the solver ran"))
    src = _counts_json(tmp_path)
    for out, fragment in ((tmp_path / "o.txt", "must end in .json or .pt"),
                          (tmp_path / "nodir" / "o.json", f"folder {tmp_path / 'nodir'} does not exist")):
        assert main(["plan", str(src), "--ep-size", "4", "--out", str(out)]) == 2
        assert fragment in capsys.readouterr().err
    (tmp_path / "d.json").mkdir()
    assert main(["plan", str(src), "--ep-size", "4", "--out", str(tmp_path / "d.json")]) == 2
    assert "is a folder" in capsys.readouterr().err

    def read_only(**kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr("eplb_plugin.cli_inputs.tempfile.TemporaryFile", read_only)  # what root meets on a ro mount
    assert main(["plan", str(src), "--ep-size", "4", "--out", str(tmp_path / "o.json")]) == 2
    assert f"folder {tmp_path} takes no file (Read-only file system)" in capsys.readouterr().err


def test_plan_refuses_slots_that_do_not_divide_before_sizing(tmp_path, capsys, monkeypatch):
    import eplb_plugin.cli as cli

    monkeypatch.setattr(cli, "_print_sizing", lambda *a, **k: pytest.fail("sizing ran"))
    out = str(tmp_path / "p.json")
    assert main(["plan", str(_counts_json(tmp_path)), "--ep-size", "3", "--sizing", "--out", out]) == 2
    assert "16 experts + --redundant 0 = 16 slots is not divisible by --ep-size 3; --redundant values that " \
           "divide: 2, 5, 8, 11" in capsys.readouterr().err
    assert main(["plan", str(_counts_json(tmp_path)), "--ep-size", "4", "--num-physical-experts", "12",
                 "--out", out]) == 2
    assert "--num-physical-experts 12 is below the 16 experts" in capsys.readouterr().err


def test_a_memory_budget_is_capped_where_every_gpu_holds_every_expert(tmp_path, capsys):
    """A budget above E * (G - 1) redundant experts (every GPU holding every expert; more buys
    no balance), inf included, plans with that many and says so; NaN is refused."""
    src, out = _preset_counts_json(tmp_path, get_preset("tiny")), tmp_path / "p.json"
    args = ["plan", str(src), "--ep-size", "2", "--preset", "tiny", "--out", str(out)]
    for budget in ("1e6", "inf"):
        assert main([*args, "--gpu-memory-budget-gib", budget, "--sizing"]) == 0
        printed = capsys.readouterr().out
        assert "16 redundant experts (8 per GPU" in printed and "every GPU holds all 16 experts" in printed
        assert "the budget holds more" in printed
        assert np.array(json.loads(out.read_text())["physical_to_logical_map"]).shape == (4, 32)
        rows = [line.split() for line in printed.splitlines() if line.strip() and line.split()[0].isdigit()]
        assert [int(r[0]) for r in rows] == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert main([*args, "--gpu-memory-budget-gib", "nan"]) == 2
    assert "--gpu-memory-budget-gib must be >= 0 (got nan)" in capsys.readouterr().err


def test_sizing_rows_are_thinned_to_at_most_sixteen_keeping_the_first_and_the_planned():
    from eplb_plugin.cli import MAX_SIZING_ROWS, _sizing_choices

    assert _sizing_choices(16, 4, 16) == [0, 4, 8, 12, 16]
    rows = _sizing_choices(64, 4, 192)
    assert len(rows) == MAX_SIZING_ROWS and rows[0] == 0 and rows[-1] == 192 and all(r % 4 == 0 for r in rows)


def test_a_budget_below_one_expert_per_gpu_plans_the_fewest_slots_that_divide(tmp_path, capsys):
    """Where the experts do not divide over the GPUs (tiny's 16 over 3), a budget too small for
    one redundant expert per GPU plans with the fewest that divide (2, P = 18) and says so;
    --sizing prints that row instead of crashing on an empty curve."""
    src, out = _preset_counts_json(tmp_path, get_preset("tiny")), tmp_path / "p.json"
    assert main(["plan", str(src), "--ep-size", "3", "--preset", "tiny", "--gpu-memory-budget-gib", "0",
                 "--sizing", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "below one redundant expert per GPU" in printed
    assert "planning with 2 redundant experts, the fewest that divide 16 experts over 3 GPUs" in printed
    rows = [line.split() for line in printed.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(2, 1)]
    assert np.array(json.loads(out.read_text())["physical_to_logical_map"]).shape == (4, 18)


def test_a_preset_of_another_shape_than_the_counts_is_refused(tmp_path, capsys, monkeypatch):
    """--preset deepseek-v3 on 3 x 16 counts: one line naming the preset and both shapes
    (it printed a negative GiB figure); a .npz whose last experts got no token is pointed
    to --num-logical-experts."""
    import eplb_plugin.cli as cli

    monkeypatch.setattr(cli, "plan", lambda *a, **k: pytest.fail("the solver ran"))
    out = str(tmp_path / "p.json")
    assert main(["plan", str(_counts_json(tmp_path)), "--ep-size", "8", "--preset", "deepseek-v3",
                 "--gpu-memory-budget-gib", "1", "--out", out]) == 2
    assert "--preset deepseek-v3 has 58 MoE layers x 256 experts, but " in (err := capsys.readouterr().err)
    assert "holds counts of 3 layers x 16 experts" in err and "--num-logical-experts" not in err
    ids = np.random.default_rng(0).integers(0, 15, (64, 4, 2))  # tiny: 4 layers x 16 experts
    assert main(["plan", str(_npz(tmp_path, topk_ids=ids)), "--ep-size", "4", "--preset", "tiny", "--out", out]) == 2
    assert "give --num-logical-experts 16 if its last experts got no tokens" in capsys.readouterr().err


# ---------------------------------------------------------------------- simulate


@pytest.mark.parametrize("flags, fragment", [
    (["--window", "0"], "argument --window: must be >= 1 (got 0)"),
    (["--interval", "0"], "argument --interval: must be >= 1 (got 0)"),
    (["--pass-tokens", "0"], "argument --pass-tokens: must be >= 1 (got 0)"),
    (["--decay", "nan"], "argument --decay: must be in (0, 1] (got nan)"),
    (["--decay", "-1"], "argument --decay: must be in (0, 1] (got -1)"),
    (["--decay", "1.5"], "argument --decay: must be in (0, 1] (got 1.5)"),
    (["--ep-size", "0"], "argument --ep-size: must be >= 1 (got 0)"),
    (["--redundant", "-4"], "argument --redundant: must be >= 0 (got -4)"),
])
def test_simulate_refuses_out_of_range_numbers_naming_the_flag(tmp_path, capsys, flags, fragment):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", str(tmp_path / "t.npz"), "--ep-size", "4", *flags])
    assert exc.value.code == 2 and fragment in capsys.readouterr().err


def test_simulate_refuses_too_short_traces_and_counts_files_up_front(tmp_path, capsys):
    src, out = _topk_npz(tmp_path, tokens=256), str(tmp_path / "s.json")
    args = ["--ep-size", "4", "--out", out]
    assert main(["simulate", str(src), *args, "--pass-tokens", "512"]) == 2
    assert "256 tokens, fewer than one pass of --pass-tokens 512" in capsys.readouterr().err
    assert main(["simulate", str(src), *args, "--pass-tokens", "32"]) == 2  # 8 passes, first rebalance at 8
    assert "the traces give 8 passes of --pass-tokens 32 tokens, but the first rebalance is at pass " \
           "--interval 8" in capsys.readouterr().err
    assert main(["simulate", str(_counts_json(tmp_path)), *args]) == 2
    assert "expected a per-token .npz" in capsys.readouterr().err
    assert main(["simulate", str(src), *args, "--pass-tokens", "16", "--plot", str(tmp_path / "s.txt")]) == 2
    assert "--plot" in capsys.readouterr().err and not Path(out).exists()


def test_simulate_takes_traces_whose_largest_ids_differ(tmp_path, capsys):
    """Two traces served in turn where the second never routes to expert 15: one E for both
    (it failed to concatenate [B, L, 16] and [B, L, 15])."""
    first = _topk_npz(tmp_path)
    ids = np.load(first)["topk_ids"]
    second = _npz(tmp_path, "second.npz", topk_ids=np.where(ids == 15, 14, ids))
    assert main(["simulate", str(first), str(second), "--ep-size", "4", "--pass-tokens", "128",
                 "--dispatch", "static", "--out", str(tmp_path / "s.json")]) == 0
    assert "2 layers x 16 experts" in capsys.readouterr().out


# ---------------------------------------------------------------------- inspect


def test_inspect_names_a_missing_placement_as_its_argument_not_a_flag(tmp_path, capsys):
    counts = _counts_json(tmp_path)
    assert main(["inspect", str(tmp_path / "nonexist.json"), str(counts), "--ep-size", "4"]) == 2
    err = capsys.readouterr().err
    assert f"eplb inspect: error: placement {tmp_path / 'nonexist.json'}: file not found" in err
    assert "--init-expert-location" not in err


# ---------------------------------------------------------------------- trace ids


def _neg_trace(tmp_path) -> Path:
    """A 16-expert trace whose ids reach 15, with -1 padding and the bad ids -2 and -3."""
    ids = np.asarray(np.load(_topk_npz(tmp_path))["topk_ids"])
    ids[0, 0, 0], ids[1, 1, 1], ids[2, 0, 1] = -1, -3, -2
    return _npz(tmp_path, "neg.npz", topk_ids=ids)


@pytest.mark.parametrize("command", [["plan", "--out", "p.json"], ["simulate", "--pass-tokens", "128"]])
def test_cli_refuses_trace_ids_below_the_padding_id_naming_the_smallest(tmp_path, capsys, command):
    """-1 is padding; -3 is no expert id: one line naming -3, rc 2 (it was dropped as padding)."""
    src = _neg_trace(tmp_path)
    name, *flags = command
    assert main([name, str(src), "--ep-size", "4", *(str(tmp_path / f) if f.endswith(".json") else f
                                                      for f in flags)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expert id -3 is below -1" in err and str(src) in err


def test_runtime_trace_refuses_ids_below_padding_naming_the_smallest_not_the_largest(tmp_path):
    """The runtime's trace reader names -3 too (it said ids 'reach 15, outside [0, 16)')."""
    from eplb_plugin.errors import ConfigError
    from eplb_plugin.runtime.workload import TraceWorkload, read_npz_trace

    ids, weights = read_npz_trace(_neg_trace(tmp_path))
    with pytest.raises(ConfigError, match="expert id -3 is below -1") as exc:
        TraceWorkload(ids, weights, num_layers=2, num_logical_experts=16, tokens_per_pass=8, source="neg.npz")
    assert "15" not in str(exc.value)
    with pytest.raises(ConfigError, match=r"expert id 15 is outside \[0, 8\)"):
        TraceWorkload(ids.clamp_min(-1), weights, num_layers=2, num_logical_experts=8, tokens_per_pass=8)


# ---------------------------------------------------------------------- simulate's flags


def test_simulate_help_names_only_flags_simulate_takes(capsys):
    """simulate plans on one node, without expert groups, with an equal split: its help names
    no --nodes, --groups or --split (which it refuses), and its prog is `eplb simulate`."""
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: eplb simulate ")
    for flag in ("--nodes", "--groups", "--split"):
        assert flag not in text, flag
    assert "migration. Every figure" in text  # one full stop after the first sentence (there were two)


def test_simulate_names_itself_when_refusing_a_flag_it_does_not_take(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", str(tmp_path / "t.npz"), "--ep-size", "4", "--nodes", "2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "eplb simulate: error: unrecognized arguments: --nodes 2" in err
    assert err.startswith("usage: eplb simulate ")


def test_simulate_refuses_decay_with_window(tmp_path, capsys):
    """--decay plans on every past pass, so a --window would go unused: refused naming both."""
    src = _topk_npz(tmp_path)
    assert main(["simulate", str(src), "--ep-size", "4", "--pass-tokens", "128", "--decay", "0.5",
                 "--window", "4", "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--decay 0.5" in err and "--window 4" in err
    assert main(["simulate", str(src), "--ep-size", "4", "--pass-tokens", "128", "--decay", "0.5",
                 "--dispatch", "static", "--out", str(tmp_path / "s.json")]) == 0


def test_simulate_refuses_traces_of_different_top_k_naming_both(tmp_path, capsys):
    four = _npz(tmp_path, "four.npz", topk_ids=np.load(_topk_npz(tmp_path, top_k=4))["topk_ids"])
    two = _npz(tmp_path, "two.npz", topk_ids=np.load(_topk_npz(tmp_path, top_k=2))["topk_ids"])
    assert main(["simulate", str(four), str(two), "--ep-size", "4", "--pass-tokens", "128",
                 "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "top_k" in err and f"{four}: 4" in err and f"{two}: 2" in err
