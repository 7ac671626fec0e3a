"""Workloads: synthetic skew and drift, uniform balance, trace replay (ESFT .npz, SGLang dumps)."""

from __future__ import annotations

import torch

from eplb_plugin.args import EPLBArgs
from eplb_plugin.runtime.config import ModelShape, RunSpec, RuntimeConfig, WorkloadSpec
from eplb_plugin.runtime.dense import dense_forward
from eplb_plugin.runtime.engine import make_hidden
from eplb_plugin.runtime.launch import launch
from eplb_plugin.runtime.weights import FFNShape, build_dense_weights
from eplb_plugin.runtime.workload import (
    SyntheticWorkload,
    TraceWorkload,
    UniformWorkload,
    load_traces,
    read_sglang_per_token_dump,
    shard_tokens,
)

from conftest import trace_path


def counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, L, k] -> [L, E] tokens per expert."""
    return torch.stack([torch.bincount(ids[:, layer].flatten(), minlength=num_experts) for layer in range(ids.shape[1])])


def test_synthetic_is_deterministic_skewed_and_drifts():
    """The same pass gives the same batch; ids are distinct per token; the hottest expert takes
    several times the mean; after a drift the hot experts change."""

    def make():
        return SyntheticWorkload(num_layers=3, num_logical_experts=16, top_k=4, tokens_per_pass=400, seed=2,
                                 drift_every_passes=10)

    a, b = make(), make()
    assert torch.equal(a.batch(7).topk_ids, b.batch(7).topk_ids)
    ids = a.batch(0).topk_ids
    assert ids.shape == (400, 3, 4)
    assert all(len(set(row.tolist())) == 4 for row in ids[:, 0])
    c = counts(ids, 16).double()
    assert (c.max(1).values / c.mean(1)).min() > 2.5
    hot_before = a.popularity(9).argmax(1)
    hot_after = a.popularity(10).argmax(1)
    assert not torch.equal(hot_before, hot_after)
    torch.testing.assert_close(a.batch(3).topk_weights.sum(-1), torch.ones(400, 3))


def test_synthetic_keeps_a_bounded_cache_over_many_drift_epochs():
    """A long run crosses thousands of drift epochs: the workload keeps a fixed number of
    epoch orders (not one per epoch), and an epoch asked for again, earlier or later, gives
    the same order as a fresh workload's."""
    def make():
        return SyntheticWorkload(num_layers=2, num_logical_experts=16, top_k=4, tokens_per_pass=8, seed=3,
                                 drift_every_passes=1)

    long_run, fresh = make(), make()
    for pass_id in range(5000):
        long_run.popularity(pass_id)
    assert len(long_run._perms) <= SyntheticWorkload.CACHED_EPOCHS
    for pass_id in (4999, 17, 0, 2500, 5001):
        assert torch.equal(long_run.popularity(pass_id), fresh.popularity(pass_id)), pass_id


def test_uniform_gives_every_expert_the_same_tokens():
    """Token t picks (t * k + j) % E: with T * k divisible by E every expert gets T * k / E."""
    ids = UniformWorkload(num_layers=2, num_logical_experts=16, top_k=4, tokens_per_pass=64).batch(5).topk_ids
    assert torch.equal(counts(ids, 16), torch.full((2, 16), 16))


def test_shards_cover_every_token_once():
    """Uneven splits: the first ranks take one more token."""
    shards = [shard_tokens(10, rank=r, world_size=4) for r in range(4)]
    assert [(s.start, s.stop) for s in shards] == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_esft_traces_replay_in_passes_and_match_the_dense_model(tmp_path):
    """The ESFT intent+law traces replay cycling in fixed passes, and a one-rank run over them
    (DeepSeek-V2-Lite's 64 experts, shrunk FFNs) equals the dense reference."""
    paths = (str(trace_path("esft_dsv2lite_intent_top6.npz")), str(trace_path("esft_dsv2lite_law_top6.npz")))
    ids, weights = load_traces(paths)
    assert ids.shape[1:] == (26, 6) and weights is not None and ids.dtype == torch.int64
    replay = TraceWorkload(ids, weights, num_layers=4, num_logical_experts=64, tokens_per_pass=512)
    first = replay.batch(0)
    assert torch.equal(first.topk_ids, ids[:512, :4])
    model = ModelShape.from_preset("deepseek-v2-lite", num_layers=2, hidden_size=16, intermediate_size=8)
    workload = WorkloadSpec(kind="trace", traces=paths)
    cfg = RuntimeConfig(model=model, batch_tokens=64, dtype="float64", progress=False, capture_passes=(1,),
                        capture_dir=str(tmp_path))
    args = EPLBArgs(ep_size=1).resolve()
    (result,) = launch(cfg, [RunSpec("trace", args, workload, num_passes=2)], args)
    assert result["slots_failed"] == 0
    batch = workload.build(model, 64).batch(1)
    dense_w = build_dense_weights(2, 64, FFNShape(16, 8, torch.float64))
    hidden = make_hidden(1, 64, 16, seed=0, dtype=torch.float64, device=torch.device("cpu"))
    want = dense_forward(hidden, batch.topk_ids, batch.topk_weights, dense_w)
    got = torch.load(tmp_path / "trace_rank0_pass1.pt", weights_only=True)["out"]
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_sglang_per_token_dump_maps_physical_ids_back_with_the_map(tmp_path):
    """SGLang's format (records of topk_ids_of_layer [L, T, k] physical, last_physical_to_logical_map):
    records are read in pass order, mapped to logical ids, -1 kept."""
    phy2log = torch.tensor([[3, 2, 1, 0, 0], [0, 1, 2, 3, 3]])  # [L=2, P=5]
    def rec(pid, ids):
        return {"forward_pass_id": pid, "rank": 0, "topk_ids_of_layer": torch.tensor(ids)}
    dump = {
        "records": [rec(2, [[[4, 1]], [[4, -1]]]), rec(1, [[[0, 3], [2, 1]], [[0, 3], [2, 1]]])],
        "last_physical_to_logical_map": phy2log,
    }
    path = tmp_path / "expert_distribution_recorder_1.0_0.pt"
    torch.save(dump, path)
    got = read_sglang_per_token_dump(path)
    assert got.tolist() == [[[3, 0], [0, 3]], [[1, 2], [2, 1]], [[0, 2], [3, -1]]]
