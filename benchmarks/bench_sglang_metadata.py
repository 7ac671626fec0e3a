"""Serving-thread cost of making one chunk of a rebalance live in SGLang's expert-location metadata.

DeepSeek-V3's shape (61 layers, 256 routed experts, 32 redundant slots, DeepEP so static
dispatch tables) at EP 8 / 16 / 32, on CPU with SGLang 0.5.23's own ``expert_location``:

- before: what the adapter did per chunk (``ExpertLocationMetadata.init_by_mapping`` of the
  whole live map, then ``update`` of the chunk's layers);
- after: the target's metadata built once per rebalance in a background thread
  (``MetadataPublisher.prepare``; the serving thread only starts it and polls it once per
  pass), then per chunk ``publish`` copies only the live layers' rows.

One layer per chunk (``--eplb-rebalance-layers-per-chunk 1``). Writes
``benchmarks/results/sglang_metadata_cpu.json``. Run: ``python benchmarks/bench_sglang_metadata.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from _sglang_cpu import use_sglang_stubs  # benchmarks/_sglang_cpu.py

NUM_LAYERS, NUM_LOGICAL, NUM_REDUNDANT = 61, 256, 32  # DeepSeek-V3 (MoE layers 3..60)
FIRST_MOE_LAYER = 3
POLL_INTERVAL_S = 0.01  # a 10 ms forward pass between the manager's polls of the build
RESULTS = Path(__file__).resolve().parent / "results" / "sglang_metadata_cpu.json"


def _sglang_runtime(ep_size: int) -> None:
    """SGLang's runtime context as a DeepEP launch with --enable-eplb publishes it."""
    from sglang.srt import runtime_context as rc
    from sglang.srt.eplb.expert_location import ModelConfigForExpertLocation

    moe = SimpleNamespace(ep_num_redundant_experts=NUM_REDUNDANT, ep_dispatch_algorithm="static",
                          moe_a2a_backend="deepep", ep_join_mode=None, eplb_algorithm="auto")
    rc._CONTEXT._config_bags = {"exec": SimpleNamespace(moe=moe), "device": SimpleNamespace(device="cpu")}
    rc._PARALLEL._stamp.update(ep_size=ep_size, nnodes=1, tp_size=ep_size, tp_rank=0, pp_size=1,
                               elastic_ep_initial_size=None, ep_join_rank_offset=0)
    layout = ModelConfigForExpertLocation(num_layers=NUM_LAYERS, num_logical_experts=NUM_LOGICAL)
    ModelConfigForExpertLocation.from_model_config = staticmethod(lambda _cfg: layout)


def _target_map(seed: int) -> torch.Tensor:
    """[L, P]: every expert once, the redundant slots on random experts, shuffled per layer."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(NUM_LAYERS):
        row = torch.cat([torch.arange(NUM_LOGICAL), torch.randint(0, NUM_LOGICAL, (NUM_REDUNDANT,), generator=gen)])
        rows.append(row[torch.randperm(row.numel(), generator=gen)])
    return torch.stack(rows)


def _chunks(live: torch.Tensor, target: torch.Tensor, num_chunks: int):
    """The live map after each of the first ``num_chunks`` one-layer chunks."""
    for layer in range(FIRST_MOE_LAYER, FIRST_MOE_LAYER + num_chunks):
        live = live.clone()
        live[layer] = target[layer]
        yield layer, live


def measure(ep_size: int, num_chunks: int) -> dict:
    from sglang.srt.eplb.expert_location import (
        ExpertLocationMetadata,
        set_global_expert_location_metadata,
    )

    from eplb_plugin.integrations.sglang_metadata import MetadataPublisher

    _sglang_runtime(ep_size)
    trivial = ExpertLocationMetadata.init_trivial(None, moe_ep_rank=0)
    target = _target_map(ep_size)

    set_global_expert_location_metadata(ExpertLocationMetadata.init_trivial(None, moe_ep_rank=0), allow_overwrite=True)
    before = []
    current = trivial
    for layer, live in _chunks(trivial.physical_to_logical_map_cpu, target, num_chunks):
        start = time.perf_counter()
        new = ExpertLocationMetadata.init_by_mapping(None, live, moe_ep_rank=0)
        current.update(new, update_layer_ids=[layer])
        before.append(time.perf_counter() - start)

    fresh = ExpertLocationMetadata.init_trivial(None, moe_ep_rank=0)
    set_global_expert_location_metadata(fresh, allow_overwrite=True)
    publisher = MetadataPublisher(None, rank=0, dispatch_algorithm="static")
    start = time.perf_counter()
    publisher.prepare(target)  # the pass the plan arrives: starts the build
    start_s = time.perf_counter() - start
    polls = []
    while True:
        time.sleep(POLL_INTERVAL_S)  # a pass of serving between two polls
        start = time.perf_counter()
        ready = publisher.prepare(target)
        polls.append(time.perf_counter() - start)
        if ready:
            break
    build_s = start_s + sum(polls) + POLL_INTERVAL_S * len(polls)
    after = []
    for _layer, live in _chunks(fresh.physical_to_logical_map_cpu, target, num_chunks):
        start = time.perf_counter()
        publisher.prepare(target)
        publisher.publish(live, target)
        after.append(time.perf_counter() - start)
    sglang_built = ExpertLocationMetadata.init_by_mapping(None, target, moe_ep_rank=0)  # as SGLang's rebalance
    done = slice(FIRST_MOE_LAYER, FIRST_MOE_LAYER + num_chunks)
    if not torch.equal(fresh.logical_to_rank_dispatch_physical_map[done],
                       sglang_built.logical_to_rank_dispatch_physical_map[done]):
        raise RuntimeError("the row-copy path's dispatch tables differ from SGLang's own build")
    moe_layers = NUM_LAYERS - FIRST_MOE_LAYER
    return {
        "ep_size": ep_size,
        "num_physical_experts": NUM_LOGICAL + NUM_REDUNDANT,
        "chunks_measured": num_chunks,
        "before_per_chunk_s": statistics.median(before),
        "before_rebalance_total_s_estimate": statistics.median(before) * moe_layers,
        "after_per_chunk_s": statistics.median(after),
        "after_max_chunk_s": max(after),
        "after_serving_thread_s_to_start_and_poll_the_build": start_s + sum(polls),
        "after_background_build_s_approx": build_s,
        "after_rebalance_total_serving_thread_s_estimate": start_s + sum(polls) + statistics.median(after) * moe_layers,
        "metadata_builds_after": publisher.builds,
    }


def main() -> None:
    use_sglang_stubs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ep-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--chunks", type=int, default=4, help="one-layer chunks timed per EP size")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(ep, args.chunks) for ep in args.ep_sizes]
    for row in rows:
        print(json.dumps(row))
    import sglang

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "bench_sglang_metadata", "command": "python benchmarks/bench_sglang_metadata.py",
        "sglang": sglang.__version__, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "note": "CPU, 1 torch thread, shared 2-core machine; serving-thread seconds per one-layer chunk",
        "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
