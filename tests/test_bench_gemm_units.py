"""The EP8 compute part's GEMM-unit accounting (benchmarks/ep8_compute.py, run by
benchmarks/bench_end_to_end.py): the floor it reports is a true lower bound on the busiest
GPU's units, for any placement and split."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_end_to_end as bench  # noqa: E402
import ep8_compute  # noqa: E402


def test_gemm_units_counts_whole_tiles_per_gpu() -> None:
    per_slot = torch.tensor([[0, 1, 256, 257], [512, 0, 0, 100]])
    assert ep8_compute.gemm_units(per_slot, num_gpus=2, tile=256).tolist() == [[1.0, 3.0], [2.0, 1.0]]


def _brute_force_floor(rows: list[int], num_gpus: int, tile: int) -> int:
    """The fewest units of the busiest GPU over every assignment of whole experts to GPUs
    (splitting never saves a unit), and at least its share of the rows."""
    best = math.inf
    units = [math.ceil(r / tile) for r in rows]
    for owners in range(num_gpus ** len(rows)):
        per_gpu = [0] * num_gpus
        for u in units:
            per_gpu[owners % num_gpus] += u
            owners //= num_gpus
        best = min(best, max(per_gpu))
    return max(int(best), math.ceil(sum(rows) / num_gpus / tile))


@pytest.mark.parametrize("seed", range(6))
def test_floor_is_under_every_split_and_placement(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_experts, num_gpus, top_k, tile = 6, 2, 2, 8
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(40)]).view(40, 1, top_k)
    ids[:3] = -1  # padding rows count nowhere
    floor = float(ep8_compute.gemm_units_floor(ids, num_experts, num_gpus, tile)[0])
    rows = torch.bincount(ids[ids >= 0].flatten(), minlength=num_experts).tolist()
    # Never above the best whole-expert packing (which is itself a placement and split).
    assert floor <= _brute_force_floor(rows, num_gpus, tile)
    # Never above any split of the experts' rows over any two-replica placement.
    for _ in range(200):
        slots = torch.randperm(num_experts + 2, generator=gen) % num_experts  # 8 slots, 2 replicated
        per_slot = torch.zeros(1, num_experts + 2, dtype=torch.long)
        for e, r in enumerate(rows):
            where = (slots == e).nonzero().flatten()
            cut = sorted(torch.randint(0, r + 1, (len(where) - 1,), generator=gen).tolist())
            parts = [b - a for a, b in zip([0, *cut], [*cut, r])]
            per_slot[0, where] = torch.tensor(parts)
        assert float(ep8_compute.gemm_units(per_slot, num_gpus, tile).max()) >= floor


def test_floor_is_attained_when_experts_pack_evenly() -> None:
    # 4 experts of 10 rows each on 2 GPUs, 8-row tiles: 2 units each, 4 per GPU at best.
    ids = torch.arange(4).repeat_interleave(10).view(40, 1, 1)
    assert ep8_compute.gemm_units_floor(ids, 4, 2, 8).tolist() == [4.0]
    # One expert with all rows: the floor is the rows' share, not one expert's units.
    ids = torch.zeros(64, 1, 1, dtype=torch.long)
    assert ep8_compute.gemm_units_floor(ids, 4, 2, 8).tolist() == [4.0]


def test_units_only_run_reports_every_placement(tmp_path: Path) -> None:
    code = bench.main(["--ep8-only", "--ep8-units-only", "--workload", "synthetic", "--num-layers", "2",
                       "--batch-tokens", "512", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads(next(tmp_path.glob("end_to_end_ep8_cpu_*.json")).read_text())
    ep8 = report["ep8_compute_part"]
    assert set(ep8["placements"]) == set(ep8_compute.EP8_PLACEMENTS)
    for name, v in ep8["placements"].items():
        assert "step_ms_median" not in v, name
        assert v["gemm_units_busiest_mean"] >= ep8["gemm_units_floor"] - 1e-9 or not v["traffic"].startswith("trace"), name
    # The oracle is planned on the pass it serves: it balances that pass better than a plan of earlier passes.
    oracle, realized = ep8["placements"]["same_pass_perpass_minmax"], ep8["placements"]["eplb_perpass_minmax"]
    assert oracle["balancedness_mean"] > max(0.99, realized["balancedness_mean"])
    # Exactly uniform routing: 512 x 6 / 64 = 48 rows per expert, one unit each, 8 experts per GPU.
    assert ep8["placements"]["uniform"]["gemm_units_busiest_mean"] == 8.0


def test_units_only_needs_ep8_only() -> None:
    with pytest.raises(SystemExit, match="--ep8-only"):
        bench.main(["--ep8-units-only", "--workload", "synthetic"])
