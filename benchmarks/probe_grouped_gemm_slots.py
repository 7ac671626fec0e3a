"""What a rank's grouped-GEMM expert step costs per local slot, at equal rows (one GPU).

The EP8 compute part (``bench_end_to_end.py --ep8-only``) runs 9 slots per rank with 72
slots where uniform routing on the 64 experts runs 8, and is about 9% slower at equal rows.
This times the runtime's expert path (``run_local_experts``: ``torch._grouped_mm`` on
Hopper, bf16, DeepSeek-V2-Lite's expert sizes) in a CUDA graph for one rank's rows (2048 and
8192 tokens x top-6 over 8 ranks) spread over 8 or 9 local slots in several ways: equal
rows, 7 full experts and a replicated one split in halves or at a 128-row boundary, and 8
full ones beside an empty 9th. Whether the cost follows rows, tiles or non-empty groups
says what a split between replicas costs.

``--sweep`` times the two grouped GEMMs alone (rows already sorted by slot) over many rows
per slot, to fit a cost model: rows, tiles of the largest group, non-empty groups; it also
names the kernels the profiler saw.

    python benchmarks/probe_grouped_gemm_slots.py --out benchmarks/results
    python benchmarks/probe_grouped_gemm_slots.py --sweep --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from bench_minmax_dispatch import capture_layers, replay_us  # benchmarks/bench_minmax_dispatch.py

from eplb_plugin.runtime.moe import _grouped_ffn, run_local_experts

HIDDEN, INTERMEDIATE = 2048, 1408  # DeepSeek-V2-Lite's routed experts
REPLAYS = 50


def layouts(rows: int) -> dict[str, list[int]]:
    """Rows per local slot for one rank's ``rows``."""
    full = rows // 8
    return {
        "8 slots, equal rows": [full] * 8,
        "9 slots, equal rows": [rows // 9] * 8 + [rows - 8 * (rows // 9)],
        "9 slots, 7 full + one expert split in halves": [full] * 7 + [full // 2, full - full // 2],
        "9 slots, 7 full + one expert split at 128 rows": [full] * 7 + [128, full - 128],
        "9 slots, 8 full + an empty one": [full] * 8 + [0],
    }


def time_layout(per_slot: list[int], device: torch.device) -> float:
    """Microseconds of one graph replay of the expert step over these rows per slot (best of 3)."""
    num_slots = len(per_slot)
    w13 = torch.randn(num_slots, 2 * INTERMEDIATE, HIDDEN, device=device, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(num_slots, HIDDEN, INTERMEDIATE, device=device, dtype=torch.bfloat16) * 0.02
    x = torch.randn(sum(per_slot), HIDDEN, device=device, dtype=torch.bfloat16)
    slot = torch.repeat_interleave(torch.arange(num_slots, device=device), torch.tensor(per_slot, device=device))
    graph = capture_layers(lambda _: run_local_experts(x, slot, w13, w2), 1)
    return min(replay_us(graph, replays=REPLAYS, num_layers=1) for _ in range(3))


def sweep_layouts() -> dict[str, list[int]]:
    """Rows per slot that tell the cost models apart (same total rows, different shapes)."""
    out: dict[str, list[int]] = {}
    for rows in (1536, 6144):
        full = rows // 8
        out[f"{rows}: 8 equal"] = [full] * 8
        out[f"{rows}: 9 equal"] = [rows // 9] * 8 + [rows - 8 * (rows // 9)]
        out[f"{rows}: 8, one +128 rows"] = [full + 128] + [full - 128 // 7] * 6 + [rows - full - 128 - 6 * (full - 128 // 7)]
        out[f"{rows}: 8, one x2, one empty"] = [2 * full] + [full] * 6 + [0]
        out[f"{rows}: 8: seven of 128 rows, one the rest"] = [rows - 7 * 128] + [128] * 7
        out[f"{rows}: 4 non-empty of 8"] = [rows // 4] * 4 + [0] * 4
        out[f"{rows}: 2 non-empty of 8"] = [rows // 2] * 2 + [0] * 6
        out[f"{rows}: 1 non-empty of 8"] = [rows] + [0] * 7
        out[f"{rows}: 16 equal"] = [rows // 16] * 16
        out[f"{rows}: 9, 8 equal + 64 rows"] = [(rows - 64) // 8] * 8 + [rows - 8 * ((rows - 64) // 8)]
        # Routing that is balanced but not exact (each expert within ~7% of the mean), and a
        # replicated expert split in halves or at a 256-row boundary beside such experts.
        jitter = [round(full * d / 100) for d in (5, -5, 3, -3, 1, -1, 7, -7)]
        out[f"{rows}: 8, within 7% of equal"] = [full + d for d in jitter]
        rest = [full + d for d in jitter[:7]]
        last = rows - sum(rest)
        out[f"{rows}: 9, 7 within 7% + one split in halves"] = rest + [last // 2, last - last // 2]
        if last > 256:
            out[f"{rows}: 9, 7 within 7% + one split at 256 rows"] = rest + [256, last - 256]
    for rows in (256, 512, 1024, 2048, 3072, 4096, 8192, 12288):
        out[f"{rows}: 8 equal"] = [rows // 8] * 8
    for per in (32, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 896, 1024):
        out[f"{per}: 1 group"] = [per]
    return out


def time_gemm(per_slot: list[int], device: torch.device) -> float:
    """Microseconds of one graph replay of the two grouped GEMMs alone over sorted rows."""
    num_slots = len(per_slot)
    w13 = torch.randn(num_slots, 2 * INTERMEDIATE, HIDDEN, device=device, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(num_slots, HIDDEN, INTERMEDIATE, device=device, dtype=torch.bfloat16) * 0.02
    x = torch.randn(sum(per_slot), HIDDEN, device=device, dtype=torch.bfloat16)
    ends = torch.tensor(per_slot, device=device).cumsum(0)
    graph = capture_layers(lambda _: _grouped_ffn(x, ends, w13, w2), 1)
    return min(replay_us(graph, replays=REPLAYS, num_layers=1) for _ in range(3))


def kernel_names(device: torch.device) -> list[str]:
    """The CUDA kernels one grouped-GEMM step launches, as the profiler names them."""
    w13 = torch.randn(8, 2 * INTERMEDIATE, HIDDEN, device=device, dtype=torch.bfloat16)
    w2 = torch.randn(8, HIDDEN, INTERMEDIATE, device=device, dtype=torch.bfloat16)
    x = torch.randn(1536, HIDDEN, device=device, dtype=torch.bfloat16)
    ends = torch.arange(1, 9, device=device) * 192
    _grouped_ffn(x, ends, w13, w2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _grouped_ffn(x, ends, w13, w2)
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def sweep(ns: argparse.Namespace, device: torch.device) -> int:
    results: dict[str, dict] = {}
    for name, per_slot in sweep_layouts().items():
        us = time_gemm(per_slot, device)
        results[name] = {"rows_per_slot": per_slot, "us": us}
        print(f"{name:44s} {us:8.1f} us", flush=True)
    names = kernel_names(device)
    print("kernels:", *names, sep="\n  ")
    return _write(ns, "grouped_gemm_sweep", {"timing": f"two grouped GEMMs alone, CUDA graph, mean of {REPLAYS} "
                                             "replays, best of 3", "kernels": names, "us_per_layout": results})


def _write(ns: argparse.Namespace, name: str, fields: dict) -> int:
    out = Path(ns.out) / torch.cuda.get_device_name().replace(" ", "_")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps({
        "benchmark": name, "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(), "torch_version": torch.__version__, "hidden": HIDDEN,
        "intermediate": INTERMEDIATE, "dtype": "bfloat16", **fields,
    }, indent=1))
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    ap.add_argument("--sweep", action="store_true", help="time the grouped GEMMs alone over many layouts")
    ns = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: needs a CUDA GPU")
        return 0
    torch.manual_seed(0)
    device = torch.device("cuda")
    if ns.sweep:
        return sweep(ns, device)
    results: dict[str, dict[str, float]] = {}
    for tokens in (2048, 8192):
        rows = tokens * 6 // 8
        results[f"{tokens} tokens ({rows} rows per rank)"] = row = {}
        for name, per_slot in layouts(rows).items():
            row[name] = time_layout(per_slot, device)
            print(f"{rows:5d} rows  {name:48s} {row[name]:8.1f} us", flush=True)
    return _write(ns, "grouped_gemm_slots", {"timing": f"CUDA graph, mean of {REPLAYS} replays, best of 3",
                                             "us_per_step": results})


if __name__ == "__main__":
    raise SystemExit(main())
