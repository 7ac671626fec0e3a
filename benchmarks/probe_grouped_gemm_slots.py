"""What a rank's grouped-GEMM expert step costs per local slot, at equal rows (one GPU).

The EP8 compute part (``bench_end_to_end.py --ep8-only``) runs 9 slots per rank with 72
slots where uniform routing on the 64 experts runs 8, and is about 9% slower at equal rows.
This times the runtime's expert path (``run_local_experts``: ``torch._grouped_mm`` on
Hopper, bf16, DeepSeek-V2-Lite's expert sizes) in a CUDA graph for one rank's rows (2048 and
8192 tokens x top-6 over 8 ranks) spread over 8 or 9 local slots in several ways: equal
rows, 7 full experts and a replicated one split in halves or at a 128-row boundary, and 8
full ones beside an empty 9th. Whether the cost follows rows, tiles or non-empty groups
says what a split between replicas costs.

    python benchmarks/probe_grouped_gemm_slots.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from bench_minmax_dispatch import capture_layers, replay_us  # benchmarks/bench_minmax_dispatch.py

from eplb_plugin.runtime.moe import run_local_experts

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    ns = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: needs a CUDA GPU")
        return 0
    torch.manual_seed(0)
    device = torch.device("cuda")
    results: dict[str, dict[str, float]] = {}
    for tokens in (2048, 8192):
        rows = tokens * 6 // 8
        results[f"{tokens} tokens ({rows} rows per rank)"] = row = {}
        for name, per_slot in layouts(rows).items():
            row[name] = time_layout(per_slot, device)
            print(f"{rows:5d} rows  {name:48s} {row[name]:8.1f} us", flush=True)
    out = Path(ns.out) / torch.cuda.get_device_name().replace(" ", "_")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"grouped_gemm_slots_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps({
        "benchmark": "grouped_gemm_slots", "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "device": torch.cuda.get_device_name(), "torch_version": torch.__version__, "hidden": HIDDEN,
        "intermediate": INTERMEDIATE, "dtype": "bfloat16", "timing": f"CUDA graph, mean of {REPLAYS} replays, best of 3",
        "us_per_step": results,
    }, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
