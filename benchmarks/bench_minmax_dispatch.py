"""minmax dispatch: its cost beside a table lookup and the recorder's count kernel, and its
quality against the exact optimum of the per-pass min-max problem.

GPU (costs):  python benchmarks/bench_minmax_dispatch.py
CPU (quality only):  python benchmarks/bench_minmax_dispatch.py --device cpu

Cost, per layer, ``--num-layers`` layers captured in one CUDA graph and replayed (and
eagerly, per call), for T tokens x top-8 onto DeepSeek-V3's 256 experts in 288 slots at EP8:
- static_lookup_and_count: the static table lookup fused with counting (the floor);
- count_only: the recorder's count kernel on physical ids;
- minmax_triton: the minmax kernels (totals + split, then choice and count), with the
  settings varied (the small passes' ticket kernels as two launches or as one, the ticket
  kernels or the per-chunk bases at every size, the chunk, no split steps); its graph's
  slot loads are checked against the torch path's after the replays;
- minmax_sglang / minmax_sglang_exchange: what SGLang's mapping runs per layer (int32 ids,
  a padding bound of 7/8 of the rows, int32 slots; with a one-rank count exchange of the
  split_gathered_counts kind, the all-gather left out); written so that this file also runs
  on checkouts whose minmax_dispatch has no out_dtype (it casts then, as SGLang's hook did);
- minmax_sglang_recorded_two_counts / minmax_sglang_recorded: that mapping, then the project
  recorder's ``on_select_experts`` on its slots (stat mode, inside a recorded pass), as SGLang
  runs them per layer with recording on: before, the mapping counted nothing and the hook ran
  its count kernel (two_counts); now the mapping counts into the recorder's
  ``select_counts_buffer`` in its own launch and the hook counts nothing. SGLang's padding
  mask between the two runs in both and is left out. On a checkout whose recorder does not
  skip a layer whose buffer was taken, minmax_sglang_recorded counts twice (and is wrong);
- minmax_torch: the dispatcher's torch path (the reference), graph-captured;
- dynamic_single_program: the earlier water-filling kernel (one program per layer, 6 steps).

Quality: the max GPU load of the pairs as dispatched (whole pairs) over the LP optimum
(scipy HiGHS) per layer: on the ESFT traces (256-token passes, a plan of the 8 passes
before) at EP8 / 72 slots and EP16 / 80, and on synthetic DeepSeek-V3-sized passes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _traces import ESFT_TRACES, esft_topk_ids, traces_dir  # benchmarks/_traces.py

from eplb_plugin.algorithms import plan
from eplb_plugin.algorithms.evaluate import exact_min_max_load, pass_counts
from eplb_plugin.balance import gpu_loads
from eplb_plugin.dispatch import ExpertDispatcher, minmax_dispatch, split_gathered_counts
from eplb_plugin.kernels import count_topk, map_and_count
from eplb_plugin.location import ExpertLocation
from eplb_plugin.recorder import ExpertDistributionRecorder

NUM_EXPERTS, NUM_SLOTS, EP, TOP_K = 256, 288, 8, 8  # DeepSeek-V3 at EP8 with 32 redundant experts


def quality(ids: np.ndarray, *, num_gpus: int, num_slots: int, num_logical: int, pass_tokens: int,
            passes: range, layers: range) -> dict:
    """Dispatched max GPU load / LP optimum over passes x layers (torch path, whole pairs)."""
    counts = pass_counts(ids, num_logical=num_logical, pass_tokens=pass_tokens)
    ratios = []
    for b in passes:
        phy2log = plan(counts[b - 8:b].sum(0), num_physical_experts=num_slots, num_gpus=num_gpus,
                       algorithm="eplb_plugin_equal").physical_to_logical_map
        loc = ExpertLocation.from_physical_to_logical_map(phy2log, num_logical_experts=num_logical, ep_size=num_gpus)
        dispatcher = ExpertDispatcher(loc, rank=0, algorithm="minmax")
        topk = torch.from_numpy(ids[b * pass_tokens:(b + 1) * pass_tokens].astype(np.int64))
        for layer in layers:
            out = dispatcher.dispatch(layer, topk[:, layer])
            peak = gpu_loads(torch.bincount(out.flatten(), minlength=num_slots), num_gpus).max().item()
            ratios.append(peak / exact_min_max_load(counts[b, layer], phy2log[layer].numpy(), num_gpus=num_gpus))
    r = np.array(ratios)
    return {"layers_scored": int(r.size), "max_load_over_lp_mean": float(r.mean()),
            "max_load_over_lp_p99": float(np.percentile(r, 99)), "max_load_over_lp_max": float(r.max())}


def synthetic_ids(num_passes: int, tokens: int, seed: int = 0) -> np.ndarray:
    """[num_passes * tokens, 1, TOP_K] skewed routing onto NUM_EXPERTS experts (one layer)."""
    gen = torch.Generator().manual_seed(seed)
    popularity = torch.distributions.Gamma(0.5, 1.0).sample((NUM_EXPERTS,))
    ids = torch.stack([torch.multinomial(popularity, TOP_K, generator=gen) for _ in range(num_passes * tokens)])
    return ids.view(-1, 1, TOP_K).numpy()


def capture_layers(fn, num_layers: int):
    """Warm ``fn(layer)`` up on every layer, then capture all layers in one CUDA graph."""
    for layer in range(num_layers):  # compile and warm up
        fn(layer)
    torch.cuda.synchronize()  # warm-up done before capture
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for layer in range(num_layers):
                fn(layer)
    torch.cuda.synchronize()  # capture done
    return graph


def replay_us(graph, *, replays: int, num_layers: int) -> float:
    """Microseconds per layer of ``graph`` (captured by ``capture_layers``), over ``replays``."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()  # read the events
    return start.elapsed_time(end) * 1e3 / (replays * num_layers)


def skewed_pass(tokens: int, *, num_layers: int, ep: int = EP) -> tuple[ExpertLocation, torch.Tensor]:
    """The timed workload: per-layer Gamma(0.5) expert popularity (seeded by ``tokens``), its
    equal-split placement over ``ep`` GPUs and one pass of ``tokens`` tokens drawn from it,
    [L, T, k] on CUDA."""
    gen = torch.Generator().manual_seed(tokens)
    popularity = torch.distributions.Gamma(0.5, 1.0).sample((num_layers, NUM_EXPERTS))
    loc = ExpertLocation.from_logical_count(popularity, num_physical_experts=NUM_SLOTS, ep_size=ep,
                                            algorithm="eplb_plugin_equal")
    ids = torch.stack([torch.multinomial(popularity[layer], tokens * TOP_K, replacement=True, generator=gen)
                       for layer in range(num_layers)]).view(num_layers, tokens, TOP_K).cuda()
    return loc, ids


def time_variants(tokens: int, *, num_layers: int, replays: int, skip: tuple[str, ...] = ()) -> dict:
    """Per-layer microseconds of every variant, graph-captured and eager (CUDA)."""
    from eplb_plugin.kernels.dynamic import dynamic_dispatch_triton, scratch_numel
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton, minmax_scratch

    loc, ids = skewed_pass(tokens, num_layers=num_layers)
    counts = torch.zeros(num_layers, NUM_SLOTS, dtype=torch.int32, device="cuda")
    triton_minmax = ExpertDispatcher(loc, rank=0, algorithm="minmax", backend="triton", device="cuda")
    torch_minmax = ExpertDispatcher(loc, rank=0, algorithm="minmax", backend="torch", device="cuda")
    static = triton_minmax.static_table
    physical = torch_minmax.dispatch(0, ids[0])
    out = torch.empty_like(ids[0])
    scratch = torch.empty(scratch_numel(*triton_minmax.logical_to_physical_map.shape[1:]), device="cuda")
    tables = triton_minmax.minmax
    assert tables is not None
    settings = {"minmax_triton_two_launches": {"fused": False},  # the ticket kernels of small passes: two launches
                "minmax_triton_fused": {"fused": True},  # ... one launch
                "minmax_triton_tickets": {"bases": False}, "minmax_triton_bases": {"bases": True},
                "minmax_triton_bases_chunk_128": {"bases": True, "chunk": 128},
                "minmax_triton_whole_pass": {"whole_pass": True},  # the pass seen whole: the split may stop early
                "minmax_triton_no_split_steps": {"iterations": 0}}  # equal shares: the rest's cost
    scratches = {name: minmax_scratch(tables) for name in settings}  # kept across calls, as the dispatcher does
    ids32 = ids.to(torch.int32)
    real_rows = tokens - tokens // 8  # 1/8 of the rows pad
    bound = torch.tensor([real_rows], dtype=torch.int32, device="cuda")
    int32_out = "out_dtype" in inspect.signature(minmax_dispatch).parameters
    sglang_scratches = [minmax_scratch(tables), minmax_scratch(tables)]

    def sglang_mapping(layer: int, exchange=None, scratch=sglang_scratches[0], counts_out=None) -> torch.Tensor:
        out = minmax_dispatch(ids32[layer], tables, layer=layer, num_slots=NUM_SLOTS, use_kernel=True,
                              num_valid_rows=bound, scratch=scratch, exchange=exchange, counts_out=counts_out,
                              **({"out_dtype": torch.int32} if int32_out else {}))
        return out if out.dtype == torch.int32 else out.to(torch.int32)

    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=loc.physical_to_logical_map.cuda(),
                                     num_logical_experts=NUM_EXPERTS, buffer_size=1)
    rec.start_record()

    def sglang_recorded(layer: int, *, fused: bool) -> None:
        counts = rec.select_counts_buffer(layer) if fused else None
        rec.on_select_experts(sglang_mapping(layer, counts_out=counts), layer_idx=layer)

    variants = {
        "static_lookup_and_count": lambda layer: map_and_count(ids[layer], static, counts, layer, out=out),
        "count_only": lambda layer: count_topk(physical, counts, layer),
        "minmax_triton": lambda layer: triton_minmax.dispatch(layer, ids[layer], counts_out=counts),
        **{name: (lambda layer, kw=kw, sc=scratches[name]: minmax_dispatch_triton(
            ids[layer], tables, layer=layer, num_slots=NUM_SLOTS, scratch=sc, counts_out=counts, **kw))
           for name, kw in settings.items()},
        "minmax_sglang": sglang_mapping,
        "minmax_sglang_exchange": lambda layer: sglang_mapping(
            layer, lambda local: split_gathered_counts(local.view(1, -1), 0), sglang_scratches[1]),
        "minmax_sglang_recorded_two_counts": lambda layer: sglang_recorded(layer, fused=False),
        "minmax_sglang_recorded": lambda layer: sglang_recorded(layer, fused=True),
        "minmax_torch": lambda layer: torch_minmax.dispatch(layer, ids[layer]),
        "dynamic_single_program": lambda layer: dynamic_dispatch_triton(
            ids[layer], triton_minmax.logical_to_physical_map[layer], num_local=NUM_SLOTS // EP, num_gpus=EP,
            iterations=6, scratch=scratch),
    }
    result = {}
    for name, fn in variants.items():
        if name in skip:
            continue
        with rec.with_forward_pass(0):  # the recorder's hooks count inside a recorded pass only
            result[name] = time_variant(fn, num_layers=num_layers, replays=replays)
        if name == "minmax_triton":  # one more replay on zeroed counts: the graph's slots vs the torch path's
            counts.zero_()
            result[name]["graph"].replay()
            want = torch.stack([torch.bincount(torch_minmax.dispatch(layer, ids[layer]).flatten(), minlength=NUM_SLOTS)
                                for layer in range(num_layers)])
            peak = gpu_loads(counts.long(), EP).amax(1).float() / gpu_loads(want, EP).amax(1).float()
            result[name].update(graph_slot_load_max_abs_diff_vs_torch=int((counts.long() - want).abs().max()),
                                graph_peak_over_torch_peak_max=float(peak.max()))
        if name == "minmax_sglang_recorded":  # one replay on zeroed counts: each real pair counted once
            rec.pass_counts.zero_()
            result[name]["graph"].replay()
            torch.cuda.synchronize()  # read the counts
            real_pairs = (ids32[:, :real_rows] >= 0).sum(dim=(1, 2)).to(torch.int32)
            result[name]["graph_counts_each_real_pair_once"] = torch.equal(rec.pass_counts.sum(1, dtype=torch.int32),
                                                                           real_pairs)
        del result[name]["graph"]
        print(f"{tokens:>6} tokens  {name:>34}: graph {result[name]['graph_us_per_layer']:8.2f} us/layer   "
              f"eager {result[name]['eager_us_per_layer']:8.1f} us/call")
    return result


def time_variant(fn, *, num_layers: int, replays: int) -> dict:
    """Graph-replayed and eager microseconds per layer of ``fn(layer)``; the graph is kept
    under "graph" for the caller's checks."""
    graph = capture_layers(fn, num_layers)
    graph_us = replay_us(graph, replays=replays, num_layers=num_layers)
    torch.cuda.synchronize()  # eager timing starts from an idle device
    t0 = time.perf_counter()
    for _ in range(3):
        for layer in range(num_layers):
            fn(layer)
    torch.cuda.synchronize()  # eager calls done
    eager_us = (time.perf_counter() - t0) * 1e6 / (3 * num_layers)
    return {"graph_us_per_layer": graph_us, "eager_us_per_layer": eager_us, "graph": graph}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", default="512,16384")
    ap.add_argument("--num-layers", type=int, default=58)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip", default="", help="variants not timed, comma-separated (e.g. dynamic_single_program)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    ns = ap.parse_args(argv)
    report: dict = {"benchmark": "minmax_dispatch", "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                    "torch": torch.__version__, "python": platform.python_version(), "device": ns.device}
    if ns.device == "cuda":
        import triton

        report.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__,
                      shape={"experts": NUM_EXPERTS, "slots": NUM_SLOTS, "ep": EP, "top_k": TOP_K,
                             "layers_per_graph": ns.num_layers},
                      cost={int(t): time_variants(int(t), num_layers=ns.num_layers, replays=ns.replays,
                                                  skip=tuple(filter(None, ns.skip.split(","))))
                            for t in ns.tokens.split(",")})
    if not ns.skip_quality:
        q = {}
        if all((traces_dir() / name).exists() for name in ESFT_TRACES):
            ids = esft_topk_ids()
            for gpus, slots in ((8, 72), (16, 80)):
                q[f"esft_ep{gpus}_{slots}slots_256tok"] = quality(
                    ids, num_gpus=gpus, num_slots=slots, num_logical=64, pass_tokens=256,
                    passes=range(8, 64, 4), layers=range(0, 26, 2))
        q["synthetic_dsv3_ep8_288slots_512tok"] = quality(
            synthetic_ids(12, 512), num_gpus=EP, num_slots=NUM_SLOTS, num_logical=NUM_EXPERTS, pass_tokens=512,
            passes=range(8, 12), layers=range(1))
        for name, v in q.items():
            print(f"{name:>36}: max load / LP optimum mean {v['max_load_over_lp_mean']:.4f}, "
                  f"p99 {v['max_load_over_lp_p99']:.4f}, max {v['max_load_over_lp_max']:.4f} ({v['layers_scored']} layers)")
        report["quality"] = q
    out = Path(ns.out)
    if ns.device == "cuda":
        out = out / torch.cuda.get_device_name().replace(" ", "_")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"minmax_dispatch_{ns.device}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
