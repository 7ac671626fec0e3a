"""Realized per-pass balancedness of static dispatch, replaying the runtime's pass sequence.

The reference runtime replays a trace in passes of ``--batch-tokens`` tokens, cycling over
it, shards each pass's tokens over the EP ranks (contiguous shares) and sends each rank's
tokens through its static dispatch table (``dispatch.compute_static_dispatch_table``);
the manager re-plans every ``--rebalance-every`` passes on the passes since the last plan.
This replays exactly that on CPU (no weights, no timing), scores every pass after the
first half, and compares it with variants: more redundant slots, more frequent rebalances,
and an oracle that plans on each pass itself (the bound for any placement that cannot
change within a pass). Reads the ESFT traces from ``../shared/traces`` (or
``$EPLB_TRACES_DIR``); exits cleanly where they are absent.

    python benchmarks/bench_realized_balance.py --ep-size 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _traces import ESFT_TRACES, esft_missing, esft_topk_ids  # benchmarks/_traces.py

from eplb_plugin.algorithms import plan
from eplb_plugin.balance import balancedness, gpu_loads
from eplb_plugin.dispatch import compute_static_dispatch_table
from eplb_plugin.location import ExpertLocation
from eplb_plugin.runtime.workload import shard_tokens

NUM_LOGICAL = 64  # DeepSeek-V2-Lite's routed experts


def rank_counts(ids: np.ndarray, pass_id: int, batch_tokens: int, ep: int) -> np.ndarray:
    """[W, L, E] tokens of pass ``pass_id`` per rank, as the runtime shards them (cycling)."""
    idx = (np.arange(batch_tokens) + pass_id * batch_tokens) % ids.shape[0]
    num_layers = ids.shape[1]
    out = np.zeros((ep, num_layers, NUM_LOGICAL))
    for r in range(ep):
        sub = ids[idx[shard_tokens(batch_tokens, rank=r, world_size=ep)]]  # [t, L, k], the rank's share
        offset = (np.arange(num_layers) * NUM_LOGICAL)[None, :, None]
        flat = np.where(sub >= 0, sub + offset, -1).ravel()
        out[r] = np.bincount(flat[flat >= 0], minlength=num_layers * NUM_LOGICAL).reshape(num_layers, NUM_LOGICAL)
    return out


def static_gpu_loads(per_rank: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """[L, G] loads of one pass under every rank's static table. per_rank: [R, L, E]."""
    loc = ExpertLocation.from_physical_to_logical_map(torch.from_numpy(phy2log), num_logical_experts=NUM_LOGICAL,
                                                      ep_size=num_gpus)
    num_layers, num_slots = phy2log.shape
    slot = np.zeros((num_layers, num_slots))
    for r in range(per_rank.shape[0]):
        table = compute_static_dispatch_table(loc, rank=r).numpy()  # [L, E]
        for layer in range(num_layers):
            np.add.at(slot[layer], table[layer], per_rank[r, layer])
    return gpu_loads(torch.from_numpy(slot), num_gpus).numpy()


def realized(counts: list[np.ndarray], ep: int, redundant: int, every: int, oracle: bool = False) -> np.ndarray:
    """Per-pass balancedness of static dispatch tables under the replanned placements."""
    num_layers = counts[0].shape[1]
    slots = NUM_LOGICAL + redundant
    phy = torch.arange(slots).remainder(NUM_LOGICAL).repeat(num_layers, 1)
    out = []
    for p, per_rank in enumerate(counts):
        if oracle or (p > 0 and p % every == 0):
            window = per_rank.sum(0) if oracle else sum(c.sum(0) for c in counts[max(0, p - every) : p])
            phy = plan(window, num_physical_experts=slots, num_gpus=ep, algorithm="eplb_plugin_equal",
                       previous=None if oracle else phy).physical_to_logical_map
        out.append(balancedness(torch.from_numpy(static_gpu_loads(per_rank, phy.numpy(), ep))))
    return np.array(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep-size", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--num-passes", type=int, default=300)
    ap.add_argument("--rebalance-every", type=int, default=30)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    ns = ap.parse_args(argv)
    if esft_missing():
        return 0
    start = time.perf_counter()
    ids = esft_topk_ids()
    counts = [rank_counts(ids, p, ns.batch_tokens, ns.ep_size) for p in range(ns.num_passes)]
    half = ns.num_passes // 2
    ep = ns.ep_size
    variants = {
        f"redundant {ep}, rebalance every {ns.rebalance_every}": (ep, ns.rebalance_every, False),
        f"redundant {2 * ep}, rebalance every {ns.rebalance_every}": (2 * ep, ns.rebalance_every, False),
        f"redundant {4 * ep}, rebalance every {ns.rebalance_every}": (4 * ep, ns.rebalance_every, False),
        f"redundant {ep}, rebalance every {max(1, ns.rebalance_every // 3)}": (ep, max(1, ns.rebalance_every // 3), False),
        f"redundant {ep}, oracle (plans on each pass itself)": (ep, 1, True),
    }
    results = {}
    for name, (redundant, every, oracle) in variants.items():
        bal = realized(counts, ep, redundant, every, oracle)
        results[name] = {"balancedness_second_half": float(bal[half:].mean()), "balancedness_all": float(bal.mean())}
        print(f"{name:>48}: {results[name]['balancedness_second_half']:.4f} (passes {half}-{ns.num_passes - 1})")
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"realized_balance_esft_ep{ep}_cpu.json"
    path.write_text(json.dumps({
        "benchmark": "realized_balance", "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "traces": list(ESFT_TRACES), "ep_size": ep, "batch_tokens": ns.batch_tokens, "num_passes": ns.num_passes,
        "rebalance_every": ns.rebalance_every, "dispatch": "static (per-rank tables, as SGLang)",
        "planner": "eplb_plugin_equal", "results": results, "wall_s": time.perf_counter() - start,
    }, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
