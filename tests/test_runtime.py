"""The reference EP runtime computes what a dense single-process MoE computes, across rebalances."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from eplb_plugin.args import EPLBArgs
from eplb_plugin.executor import move_experts
from eplb_plugin.location import ExpertLocation
from eplb_plugin.manager import RebalanceRecord
from eplb_plugin.runtime.config import ModelShape, RunSpec, RuntimeConfig, WorkloadSpec
from eplb_plugin.runtime.dense import dense_forward
from eplb_plugin.runtime.engine import make_hidden
from eplb_plugin.runtime.launch import launch
from eplb_plugin.runtime.weights import FFNShape, build_dense_weights
from eplb_plugin.runtime.workload import shard_tokens

MODEL = ModelShape(num_layers=3, num_logical_experts=16, top_k=4, hidden_size=24, intermediate_size=12)
FORCE_AT_PASS = 3  # the stand-in manager moves experts after this many passes


def hand_map(num_layers: int) -> torch.Tensor:
    """[L, 20] for 16 experts on 2 ranks: reversed order, expert 0 and 5 three times each on rank 1."""
    row = list(range(15, -1, -1)) + [0, 0, 5, 5]
    return torch.tensor([row] * num_layers)


class ForcedMoveManager:
    """Test double of EPLBManager: after FORCE_AT_PASS passes it moves every layer to ``hand_map``."""

    def __init__(self, args, *, location, recorder, expert_weights, group=None, rank=0, num_groups=None,
                 metrics=None, on_location_change=None):
        self.location, self.recorder, self.weights, self.group = location, recorder, expert_weights, group
        self.on_location_change = on_location_change
        self.history: list[RebalanceRecord] = []
        self.passes = 0

    def on_forward_pass_end(self) -> None:
        self.passes += 1
        if self.passes != FORCE_AT_PASS:
            return
        old, new = self.location.physical_to_logical_map, hand_map(self.location.num_layers)
        moved = 0
        for layer, tensors in enumerate(self.weights):
            moved += move_experts(tensors, old[layer], new[layer], self.group, layer=layer, verify=True).slots_changed
        self.location = ExpertLocation.from_physical_to_logical_map(
            new, num_logical_experts=self.location.num_logical_experts, ep_size=self.location.ep_size)
        self.on_location_change(self.location)
        self.history.append(RebalanceRecord(index=0, trigger="forced", start_pass=self.passes, end_pass=self.passes,
                                            slots_moved=moved))

    def close(self) -> None:
        pass


def dense_output(cfg: RuntimeConfig, workload: WorkloadSpec, pass_id: int) -> torch.Tensor:
    """[T, H] the dense reference's final hidden states of one pass (float64)."""
    batch = workload.build(cfg.model, cfg.batch_tokens).batch(pass_id)
    weights = build_dense_weights(cfg.model.num_layers, cfg.model.num_logical_experts,
                                  FFNShape(cfg.model.hidden_size, cfg.model.intermediate_size, torch.float64, seed=cfg.seed))
    hidden = make_hidden(pass_id, cfg.batch_tokens, cfg.model.hidden_size, seed=cfg.seed, dtype=torch.float64,
                         device=torch.device("cpu"))
    return dense_forward(hidden, batch.topk_ids, batch.topk_weights, weights)


@pytest.mark.parametrize(("exchange", "dispatch", "counts"), [
    ("alltoall", "static", "global"), ("gather", "static", "global"),
    ("gather", "minmax", "global"), ("alltoall", "minmax", "local")])
def test_ep_outputs_equal_dense_before_and_after_rebalances(tmp_path, exchange, dispatch, counts):
    """Two gloo ranks, float64, both exchanges, static and minmax dispatch (minmax on the whole
    pass's counts and on each rank's own; it counts for the recorder in the dispatcher, and
    the rebalances below need those counts): every captured pass equals the dense reference,
    before and after the real manager's rebalances and a forced move that puts 3 replicas of
    one expert on a rank. (37 tokens: the ranks hold 19 and 18, so gather pads one.)"""
    base = EPLBArgs(ep_size=2, ep_num_redundant_experts=4, enable_eplb=True, eplb_rebalance_num_iterations=4,
                    eplb_verify_weights=True, ep_dispatch_algorithm=dispatch)
    workload = WorkloadSpec(seed=3, drift_every_passes=5)
    runs = [
        RunSpec("real", base.resolve(), workload, num_passes=30),
        RunSpec("forced", base.resolve(), workload, num_passes=6, manager_factory="test_runtime:ForcedMoveManager"),
    ]
    cfg = RuntimeConfig(model=MODEL, batch_tokens=37, dtype="float64", seed=1, progress=False,
                        capture_passes=(0, 5, 13, 29), capture_dir=str(tmp_path), threads_per_rank=1,
                        exchange=exchange, dispatch_counts=counts)
    results = {r["label"]: r for r in launch(cfg, runs, runs[0].eplb)}

    real, forced = results["real"], results["forced"]
    assert real["exchange"] == forced["exchange"] == exchange
    assert real["num_rebalances"] >= 2 and real["slots_moved"] > 0
    assert real["final_physical_to_logical_map"] != real["initial_physical_to_logical_map"]
    assert forced["final_physical_to_logical_map"] == hand_map(MODEL.num_layers).tolist()
    for r in (real, forced):
        assert (r["slots_checked"], r["slots_failed"]) == (2 * 10 * MODEL.num_layers, 0)
    for label, passes in (("real", (0, 5, 13, 29)), ("forced", (0, 5))):
        for p in passes:
            want = dense_output(cfg, workload, p)
            for rank in range(2):
                got = torch.load(tmp_path / f"{label}_rank{rank}_pass{p}.pt", weights_only=True)
                tokens = shard_tokens(cfg.batch_tokens, rank=rank, world_size=2)
                assert tuple(got["tokens"]) == (tokens.start, tokens.stop)
                torch.testing.assert_close(got["out"], want[tokens], rtol=1e-11, atol=1e-12)


def test_single_rank_runs_without_process_group_and_matches_dense(tmp_path):
    """With ep_size 1 the runtime runs in-process, communicates nothing, and equals the dense model."""
    args = EPLBArgs(ep_size=1).resolve()
    workload = WorkloadSpec(kind="synthetic", seed=5)
    cfg = RuntimeConfig(model=MODEL, batch_tokens=20, dtype="float64", progress=False, capture_passes=(2,),
                        capture_dir=str(tmp_path), profile_passes=(1,), profile_dir=str(tmp_path / "prof"))
    (result,) = launch(cfg, [RunSpec("one", args, workload, num_passes=3)], args)
    assert result["balancedness_per_pass"] == [1.0, 1.0, 1.0]
    profile = (tmp_path / "prof" / "one_profile.txt").read_text()
    assert profile.startswith("=== one pass 1: wall ") and "aten::" in profile and "pass 2" not in profile
    got = torch.load(tmp_path / "one_rank0_pass2.pt", weights_only=True)["out"]
    torch.testing.assert_close(got, dense_output(cfg, workload, 2), rtol=1e-11, atol=1e-12)


@pytest.mark.slow
def test_five_thousand_passes_with_frequent_rebalances_keep_memory_flat_and_weights_intact():
    """5,000 passes, a rebalance every 50 (real manager, 2 gloo ranks, drifting load): RSS stays
    within a few MiB after warm-up and every slot holds its expert's weights at the end."""
    pytest.importorskip("eplb_plugin.manager")
    model = ModelShape(num_layers=1, num_logical_experts=16, top_k=4, hidden_size=16, intermediate_size=8)
    args = EPLBArgs(ep_size=2, ep_num_redundant_experts=4, enable_eplb=True,
                    eplb_rebalance_num_iterations=50).resolve()
    run = RunSpec("long", args, WorkloadSpec(seed=7, drift_every_passes=60), num_passes=5000)
    cfg = RuntimeConfig(model=model, batch_tokens=16, progress=False, threads_per_rank=1)
    (result,) = launch(cfg, [run], args)
    assert result["num_rebalances"] >= 50, result["num_rebalances"]
    assert result["slots_moved"] > 0
    assert (result["slots_checked"], result["slots_failed"]) == (2 * 10 * model.num_layers, 0)
    rss = result["rss_mb_max_over_ranks"]
    after_warmup = rss[2:]  # from pass 500 on
    assert max(after_warmup) - min(after_warmup) < 8.0, rss


def test_config_rejects_bad_values_with_the_flag_name():
    """Bad runtime settings raise ConfigError naming the flag."""
    from eplb_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match="--device"):
        RuntimeConfig(model=MODEL, device="tpu")
    with pytest.raises(ConfigError, match="--batch-tokens"):
        RuntimeConfig(model=MODEL, batch_tokens=0)
    with pytest.raises(ConfigError, match="--num-passes"):
        RunSpec("x", EPLBArgs(), num_passes=0)
    with pytest.raises(ConfigError, match="--workload"):
        dataclasses.replace(WorkloadSpec(), kind="nope").build(MODEL, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_gemm_expert_path_matches_the_per_slot_loop_on_gpu():
    """On CUDA bf16 the experts run as grouped GEMMs; they compute what the per-slot loop does."""
    from eplb_plugin.runtime import moe

    gen = torch.Generator(device="cuda").manual_seed(0)
    num_slots, hidden, inter, rows = 7, 256, 128, 1823
    w13 = (torch.randn(num_slots, 2 * inter, hidden, device="cuda", generator=gen) / 16).bfloat16()
    w2 = (torch.randn(num_slots, hidden, inter, device="cuda", generator=gen) / 16).bfloat16()
    x = torch.randn(rows, hidden, device="cuda", generator=gen).bfloat16()
    slot = torch.randint(0, num_slots - 1, (rows,), device="cuda", generator=gen)  # the last slot stays empty
    grouped, counts = moe.run_local_experts(x, slot, w13, w2)
    assert moe._grouped_mm_broken is None, moe._grouped_mm_broken
    expected = torch.stack([moe.expert_ffn(x[i : i + 1], w13[s], w2[s])[0] for i, s in enumerate(slot.tolist())])
    assert counts.tolist() == torch.bincount(slot, minlength=num_slots).tolist()
    torch.testing.assert_close(grouped.float(), expected.float(), rtol=2e-2, atol=2e-2)
    # The MoE forward passes rows past the last group (other ranks' pairs): they must not
    # change the groups' outputs.
    order = torch.argsort(slot, stable=True)
    ends = torch.cumsum(counts, 0)
    padded = torch.cat([x[order], torch.full((97, hidden), float("nan"), device="cuda").bfloat16()])
    out = moe._sorted_ffn(padded, ends, w13, w2)
    assert moe._grouped_mm_broken is None, moe._grouped_mm_broken
    torch.testing.assert_close(out[: rows].float(), expected[order].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("dispatch", ["static", "minmax"])
def test_cuda_graph_passes_compute_what_eager_passes_compute(tmp_path, dispatch):
    """On CUDA each pass runs as one captured graph; across a move (new tables copied into the
    captured ones, weights moved in place) it computes exactly what eager passes compute, and
    it is captured once. The move comes at a fixed pass (ForcedMoveManager), so both runs
    serve the same placements at the same passes."""
    args = EPLBArgs(ep_size=2, ep_num_redundant_experts=4, enable_eplb=True,
                    ep_dispatch_algorithm=dispatch).resolve()
    workload = WorkloadSpec(seed=3, drift_every_passes=5)
    model = dataclasses.replace(MODEL, hidden_size=64, intermediate_size=32)  # 16-byte rows for grouped GEMMs
    passes = (0, 2, FORCE_AT_PASS, 5)
    outputs, results = {}, {}
    for graph in (True, False):
        out = tmp_path / ("graph" if graph else "eager")
        out.mkdir()
        cfg = RuntimeConfig(model=model, batch_tokens=64, device="cuda", dtype="bfloat16", progress=False,
                            cuda_graph=graph, capture_passes=passes, capture_dir=str(out))
        run = RunSpec("run", args, workload, num_passes=6, manager_factory="test_runtime:ForcedMoveManager")
        (results[graph],) = launch(cfg, [run], args)
        outputs[graph] = {(r, p): torch.load(out / f"run_rank{r}_pass{p}.pt", weights_only=True)["out"]
                          for r in range(2) for p in passes}
    on, off = results[True], results[False]
    assert (on["cuda_graph"], on["graph_captures"], off["cuda_graph"]) == (True, 1, False)
    assert on["final_physical_to_logical_map"] == hand_map(MODEL.num_layers).tolist()
    assert on["slots_failed"] == 0 and on["slots_checked"] == 2 * 10 * MODEL.num_layers
    for key, want in outputs[False].items():
        torch.testing.assert_close(outputs[True][key], want, rtol=0, atol=0)


def test_nodes_must_agree_on_shared_flags_but_not_on_their_own_or_on_where_a_trace_lies(tmp_path):
    """flags_that_must_agree: node-own flags (--node-rank, --port, --threads-per-rank,
    --dist-init-addr) do not count; two copies of one trace at different paths agree; a
    different seed or redundancy does not."""
    from eplb_plugin.runtime.agreement import flags_that_must_agree

    for name in ("a.bin", "b.bin"):
        (tmp_path / name).write_bytes(b"same trace")
    model = ModelShape.from_preset("tiny")

    def flags(path: str, **changes) -> dict[str, str]:
        args = EPLBArgs(enable_eplb=True, ep_size=4, nnodes=2, dist_init_addr="h:1", ep_num_redundant_experts=4)
        args = dataclasses.replace(args, **{k: v for k, v in changes.items() if hasattr(args, k)})
        cfg = RuntimeConfig(model=model, **{k: v for k, v in changes.items() if hasattr(RuntimeConfig, k)})
        workload = WorkloadSpec(kind="trace", traces=(path,))
        return flags_that_must_agree(cfg, [RunSpec("eplb", args, workload, 10)])

    node0 = flags(str(tmp_path / "a.bin"))
    assert flags(str(tmp_path / "b.bin"), node_rank=1, dist_init_addr="other:1", http_port=0,
                 threads_per_rank=3) == node0
    assert flags(str(tmp_path / "a.bin"), seed=1)["--seed"] == "1" != node0["--seed"]
    assert flags(str(tmp_path / "a.bin"), ep_num_redundant_experts=8)["--ep-num-redundant-experts"] == "8"
    assert "--node-rank" not in node0 and "--port" not in node0
