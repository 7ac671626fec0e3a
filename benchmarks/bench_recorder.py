"""Recorder cost: count kernels vs scatter_add_ / bincount, share of a decode MoE step, host syncs.

GPU (what the issue measures):  python benchmarks/bench_recorder.py
CPU smoke (torch path only):    python benchmarks/bench_recorder.py --device cpu

Per layer, for T tokens x top-k ids into P slots of an [L, P] int32 buffer:
- eager: per call, launch included; graph: L layers captured in one CUDA graph, time per layer.
- triton_count (eplb_plugin.kernels.count_topk), triton_fused (map_and_count: dispatch + count),
  torch_scatter_add (mask + scatter_add_, SGLang's way), torch_bincount (+ add; syncs, eager only).
Then: a decode-sized MoE layer step (DeepSeek-V3 expert FFNs, bf16) with and without the hook,
host syncs per recorded pass under torch.cuda.set_sync_debug_mode("error"), and counts after
CUDA-graph replay against the reference. Prints a table; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eplb_plugin.kernels import (  # noqa: E402
    count_reference,
    count_topk,
    count_topk_torch,
    map_and_count,
    triton_available,
)
from eplb_plugin.recorder import ExpertDistributionRecorder  # noqa: E402

TARGET_US_PER_LAYER = 5.0  # up to TARGET_MAX_TOKENS tokens, in a CUDA graph
TARGET_MAX_TOKENS = 512
TARGET_SPEEDUP_VS_SCATTER = 3.0
TARGET_STEP_SHARE = 0.01
PAD_SHARE = 0.1
HIDDEN, INTERMEDIATE = 7168, 2048  # DeepSeek-V3 expert FFN


def static_dispatch(rec: ExpertDistributionRecorder, layer: int, logical: torch.Tensor, table: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Static dispatch as the runtime runs it: the fused map+count kernel adds the slots to the
    recorder's buffer (``ExpertDispatcher.dispatch(counts_out=)``); a lookup when it is not counting."""
    counts = rec.select_counts_buffer(layer)
    if counts is None:
        return table[layer].long()[logical.long().clamp_min(0)].where(logical >= 0, -1)
    return map_and_count(logical, table, counts, layer, out=out)


def routed_ids(tokens: int, top_k: int, high: int, device, seed: int = 0) -> torch.Tensor:
    """[T, k] int32 skewed ids (a few hot experts), ~10% -1 padding."""
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, high + 1, dtype=torch.float64) ** 0.8
    ids = torch.multinomial(weights.expand(tokens, -1), top_k, generator=gen).to(torch.int32)
    ids = ids.masked_fill(torch.rand(tokens, top_k, generator=gen) < PAD_SHARE, -1)
    return ids.to(device)


def bincount_add(ids: torch.Tensor, counts: torch.Tensor, layer: int) -> None:
    flat = ids.reshape(-1).long()
    num_slots = counts.shape[1]
    flat = torch.where((flat >= 0) & (flat < num_slots), flat, num_slots)
    counts[layer].add_(torch.bincount(flat, minlength=num_slots + 1)[:num_slots])


def timed_us(fn, iters: int, device: torch.device) -> float:
    """Mean microseconds per fn() call (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(3):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters * 1e6
    torch.cuda.synchronize()  # a clean start for the timed loop
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()  # wait for the timed work (benchmark, not a hook)
    return begin.elapsed_time(end) * 1e3 / iters


def graph_us_per_layer(layer_fn, num_layers: int, replays: int) -> float:
    """Capture num_layers calls of layer_fn(layer) in one CUDA graph; microseconds per layer."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for layer in range(num_layers):  # warm-up (compiles Triton) outside capture
            layer_fn(layer)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(num_layers):
            layer_fn(layer)
    return timed_us(graph.replay, replays, torch.device("cuda")) / num_layers


def bench_kernels(args, device) -> list[dict]:
    rows = []
    num_logical = args.slots - args.redundant
    table = (torch.arange(num_logical) % args.slots).repeat(args.layers, 1).to(device=device, dtype=torch.int32)
    on_gpu = device.type == "cuda"
    methods = {"torch_scatter_add": lambda ids, c, layer, out: count_topk_torch(ids, c, layer),
               "torch_bincount": lambda ids, c, layer, out: bincount_add(ids, c, layer)}
    if on_gpu and triton_available():
        methods = {"triton_count": lambda ids, c, layer, out: count_topk(ids, c, layer, backend="triton"),
                   "triton_fused": lambda ids, c, layer, out: map_and_count(ids, table, c, layer, out=out, backend="triton"),
                   **methods}
    for tokens in args.tokens:
        physical = routed_ids(tokens, args.top_k, args.slots, device, seed=tokens)
        logical = routed_ids(tokens, args.top_k, num_logical, device, seed=tokens + 1)
        out = torch.empty_like(logical)
        row = {"tokens": tokens}
        for name, fn in methods.items():
            ids = logical if name == "triton_fused" else physical
            counts = torch.zeros(args.layers, args.slots, dtype=torch.int32, device=device)
            row[f"{name}_eager_us"] = timed_us(lambda fn=fn, ids=ids, c=counts, o=out: fn(ids, c, 0, o), args.iters, device)
            if on_gpu and name != "torch_bincount":  # bincount syncs the host: not capturable
                counts.zero_()
                row[f"{name}_graph_us"] = graph_us_per_layer(
                    lambda layer, fn=fn, ids=ids, c=counts, o=out: fn(ids, c, layer, o), args.layers, args.replays)
        if "triton_count_graph_us" in row:
            row["speedup_vs_scatter_add_graph"] = row["torch_scatter_add_graph_us"] / row["triton_count_graph_us"]
            row["speedup_vs_scatter_add_eager"] = row["torch_scatter_add_eager_us"] / row["triton_count_eager_us"]
        rows.append(row)
    return rows


def check_graph_replay(args, device) -> dict:
    """Recorder hooks captured in a CUDA graph keep counting on replay: window == ref * replays."""
    num_logical = args.slots - args.redundant
    phy2log = (torch.arange(args.slots) % num_logical).repeat(args.layers, 1)
    table = torch.arange(num_logical, dtype=torch.int32).repeat(args.layers, 1).to(device)
    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=phy2log.to(device), num_logical_experts=num_logical,
                                     buffer_size=args.replays_check + 1, device=device)
    ids = [routed_ids(64 + 3 * n, args.top_k, args.slots, device, seed=n) for n in range(args.layers)]
    logical = routed_ids(64, args.top_k, num_logical, device, seed=99)

    def forward():
        for layer in range(args.layers):
            with rec.with_current_layer(layer):
                rec.on_select_experts(ids[layer])
        static_dispatch(rec, 0, logical, table)

    rec.start_record()
    with rec.with_forward_pass(0):
        forward()  # warm-up: compiles the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    rec.start_record()  # forget warm-up and capture-time counts
    for p in range(args.replays_check):
        with rec.with_forward_pass(p):
            graph.replay()
    got = rec.physical_count_window().cpu()
    want = torch.stack([count_reference(i, args.slots) for i in ids])
    want[0] += count_reference(logical.long(), args.slots)  # identity table: logical id == slot
    ok = torch.equal(got, want * args.replays_check)
    return {"replays": args.replays_check, "counts_equal_reference_times_replays": ok}


def check_host_syncs(args, device) -> dict:
    """Run whole recorded passes (hooks + pass end) with sync debug mode 'error'."""
    num_logical = args.slots - args.redundant
    phy2log = (torch.arange(args.slots) % num_logical).repeat(args.layers, 1).to(device)
    table = torch.arange(num_logical, dtype=torch.int32).repeat(args.layers, 1).to(device)
    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=phy2log, num_logical_experts=num_logical, device=device, decay=0.9)
    ids = routed_ids(64, args.top_k, args.slots, device)
    out = torch.empty_like(ids)
    rec.start_record()
    for checked in (False, True):  # first pass compiles; the second is checked
        if checked:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for p in range(3):
                with rec.with_forward_pass(p):
                    for layer in range(args.layers):
                        with rec.with_current_layer(layer):
                            rec.on_select_experts(ids)
                        static_dispatch(rec, layer, ids, table, out=out)
        except RuntimeError as exc:
            return {"host_syncs_per_pass": "at least 1", "error": str(exc)}
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return {"host_syncs_per_pass": 0, "passes_checked": 3}


def bench_moe_step(args, device) -> dict:
    """One decode MoE layer on one GPU (local experts' FFNs), in a CUDA graph, +/- the hook."""
    tokens, local_experts = args.step_tokens, args.step_local_experts
    per_expert = max(1, tokens * args.top_k // args.slots)  # tokens each local expert gets
    w1 = torch.randn(local_experts, HIDDEN, 2 * INTERMEDIATE, device=device, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(local_experts, INTERMEDIATE, HIDDEN, device=device, dtype=torch.bfloat16) * 0.02
    x = torch.randn(local_experts, per_expert, HIDDEN, device=device, dtype=torch.bfloat16)
    ids = routed_ids(tokens, args.top_k, args.slots, device)
    counts = torch.zeros(args.layers, args.slots, dtype=torch.int32, device=device)

    def step(hook: bool):
        def run(layer):
            if hook:
                count_topk(ids, counts, layer)
            h = torch.bmm(x, w1)
            gate, up = h.chunk(2, dim=-1)
            torch.bmm(torch.nn.functional.silu(gate) * up, w2)
        return run

    layers = args.step_layers
    without = graph_us_per_layer(step(False), layers, args.replays)
    with_hook = graph_us_per_layer(step(True), layers, args.replays)
    hook_alone = graph_us_per_layer(lambda layer: count_topk(ids, counts, layer), args.layers, args.replays)
    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=(torch.arange(args.slots) % (args.slots - args.redundant)).repeat(args.layers, 1).to(device),
                                     num_logical_experts=args.slots - args.redundant, device=device)
    rec.start_record()

    def pass_end():
        with rec.with_forward_pass(0):
            pass
    pass_end_us = timed_us(pass_end, args.iters, device)
    share = (hook_alone * args.layers + pass_end_us) / (without * args.layers)
    return {"tokens": tokens, "top_k": args.top_k, "local_experts": local_experts, "tokens_per_expert": per_expert,
            "step_us_per_layer": without, "step_with_hook_us_per_layer": with_hook, "hook_us_per_layer": hook_alone,
            "pass_end_us_per_pass": pass_end_us, "recorder_share_of_step": share,
            "recorder_share_measured_diff": (with_hook - without) / without}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512, 4096, 16384])
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--slots", type=int, default=288)
    parser.add_argument("--redundant", type=int, default=32)
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--replays-check", type=int, default=5)
    parser.add_argument("--step-tokens", type=int, default=64)
    parser.add_argument("--step-local-experts", type=int, default=9, help="288 slots / 32 GPUs")
    parser.add_argument("--step-layers", type=int, default=8, help="MoE layers captured per step graph")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        args.tokens = [t for t in args.tokens if t <= 4096]
        args.iters = min(args.iters, 20)

    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "triton": None, "shape": {"top_k": args.top_k, "slots": args.slots, "layers": args.layers}}
    if triton_available():
        import triton
        result["triton"] = triton.__version__
    result["kernels"] = bench_kernels(args, device)
    if device.type == "cuda":
        result["graph_replay"] = check_graph_replay(args, device)
        result["host_sync"] = check_host_syncs(args, device)
        result["moe_step"] = bench_moe_step(args, device)
        small = [r for r in result["kernels"] if r["tokens"] <= TARGET_MAX_TOKENS and "triton_count_graph_us" in r]
        result["targets"] = {
            "us_per_layer_le_5_up_to_512": all(r["triton_count_graph_us"] <= TARGET_US_PER_LAYER for r in small),
            "speedup_ge_3_vs_scatter_add_up_to_512": all(r["speedup_vs_scatter_add_graph"] >= TARGET_SPEEDUP_VS_SCATTER for r in small),
            "share_le_1pct": result["moe_step"]["recorder_share_of_step"] <= TARGET_STEP_SHARE,
            "zero_host_syncs": result["host_sync"]["host_syncs_per_pass"] == 0,
            "correct_after_replay": result["graph_replay"]["counts_equal_reference_times_replays"],
        }

    cols = [c for c in result["kernels"][0] if c != "tokens"]
    print("tokens | " + " | ".join(cols))
    for r in result["kernels"]:
        print(f"{r['tokens']:6d} | " + " | ".join(f"{r.get(c, float('nan')):.2f}" for c in cols))
    for key in ("graph_replay", "host_sync", "moe_step", "targets"):
        if key in result:
            print(f"{key}: {json.dumps(result[key])}")
    out_dir = Path(args.out)
    if device.type == "cuda":
        out_dir = out_dir / result["device_name"].replace(" ", "_")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_recorder_{device.type}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
