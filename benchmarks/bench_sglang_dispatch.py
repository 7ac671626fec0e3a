"""Per-pass balance of SGLang's dispatch algorithms and the plugin's ``minmax`` through SGLang's
own mapping (``topk_ids_logical_to_physical``, CPU, sglang 0.5.23).

ESFT intent then law (DeepSeek-V2-Lite's routing, 64 experts, top-6; ``../shared/traces`` or
``$EPLB_TRACES_DIR``), cut into passes of ``--pass-tokens`` tokens. The placement is the
project's equal-split plan (``eplb_plugin``) on the first ``--window`` passes; every later
pass (``--passes`` of them) is mapped layer by layer by SGLang's function with the plugin's
hook bodies in place (``ExpertLocationDispatchInfo.init_new`` and ``topk_ids_logical_to_physical``,
what ``load_plugins()`` patches), and scored by balancedness (mean over layers of mean / max
GPU load of the pass), then averaged over passes:

- no all-to-all backend (every rank sees the whole pass and must pick the same slots):
  SGLang's ``dynamic`` (its rank-invariant row-index spread) and ``minmax`` on the whole pass;
- an all-to-all backend with the pass's tokens split over the EP ranks (DP attention):
  SGLang's ``static`` (each rank's table), ``dynamic`` (a random replica per token) and
  ``minmax`` on each rank's own tokens.

Also the mapping's time per call (one layer of one pass, this machine's CPU, torch path).
Writes ``benchmarks/results/sglang_dispatch_cpu.json``; exits cleanly where the traces are absent.

    python benchmarks/bench_sglang_dispatch.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import torch
from _sglang_cpu import use_sglang_stubs  # benchmarks/_sglang_cpu.py
from _traces import ESFT_TRACES, esft_topk_ids, traces_dir  # benchmarks/_traces.py

from eplb_plugin.balance import layer_balancedness
from eplb_plugin.location import ExpertLocation

NUM_LOGICAL = 64  # DeepSeek-V2-Lite's routed experts
RESULTS = Path(__file__).resolve().parent / "results" / "sglang_dispatch_cpu.json"


def _sglang_runtime(*, ep_size: int, algorithm: str, a2a: str, num_layers: int, num_redundant: int) -> None:
    """SGLang's runtime context as a launch with these flags publishes it."""
    from sglang.srt import runtime_context as rc
    from sglang.srt.eplb.expert_location import ModelConfigForExpertLocation

    moe = SimpleNamespace(ep_num_redundant_experts=num_redundant, ep_dispatch_algorithm=algorithm,
                          moe_a2a_backend=a2a, ep_join_mode=None, eplb_algorithm="auto")
    rc._CONTEXT._config_bags = {"exec": SimpleNamespace(moe=moe), "device": SimpleNamespace(device="cpu")}
    rc._PARALLEL._stamp.update(ep_size=ep_size, nnodes=1, tp_size=ep_size, tp_rank=0, pp_size=1,
                               elastic_ep_initial_size=None, ep_join_rank_offset=0)
    layout = ModelConfigForExpertLocation(num_layers=num_layers, num_logical_experts=NUM_LOGICAL)
    ModelConfigForExpertLocation.from_model_config = staticmethod(lambda _cfg: layout)


def _mapper(metadata, rank_metadata=None):
    """SGLang's mapping for one rank, the plugin's hook bodies in place. metadata: SGLang's
    metadata of the placement; rank_metadata: this rank's own (``static``'s table is per rank)."""
    from sglang.srt.eplb import expert_location
    from sglang.srt.eplb import expert_location_dispatch as eld

    from eplb_plugin.integrations.sglang_dispatch import (
        dispatch_info_init_new,
        topk_ids_logical_to_physical,
    )

    metadata = rank_metadata or metadata
    init_new = eld.ExpertLocationDispatchInfo.init_new.__func__
    original = eld.topk_ids_logical_to_physical

    def run(layer: int, ids: torch.Tensor) -> torch.Tensor:
        expert_location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
        info = dispatch_info_init_new(init_new, eld.ExpertLocationDispatchInfo, layer)
        return topk_ids_logical_to_physical(original, ids, info)

    return run


def _gpu_loads(physical: torch.Tensor, slots_per_gpu: int, ep_size: int) -> torch.Tensor:
    valid = physical[physical >= 0].long()
    return torch.bincount(valid // slots_per_gpu, minlength=ep_size)


def measure(passes: torch.Tensor, location: ExpertLocation, *, ep_size: int) -> dict:
    """passes: [N, T, L, k] int32 logical ids. Returns balancedness and time per call."""
    phy2log = location.physical_to_logical_map
    slots_per_gpu = location.num_physical_experts // ep_size
    num_layers = phy2log.shape[0]
    shard = passes.shape[1] // ep_size
    cases = {
        "no_a2a/dynamic": ("dynamic", "none", False),
        "no_a2a/minmax": ("minmax", "none", False),
        "a2a/static": ("static", "deepep", True),
        "a2a/dynamic": ("dynamic", "deepep", True),
        "a2a/minmax_local": ("minmax", "deepep", True),
    }
    out = {}
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    for name, (algorithm, a2a, sharded) in cases.items():
        _sglang_runtime(ep_size=ep_size, algorithm=algorithm, a2a=a2a, num_layers=num_layers,
                        num_redundant=location.num_physical_experts - NUM_LOGICAL)
        shared = ExpertLocationMetadata.init_by_mapping(None, phy2log, moe_ep_rank=0)
        per_rank = algorithm == "static"  # SGLang's static table differs per rank
        mappers = [_mapper(shared, ExpertLocationMetadata.init_by_mapping(None, phy2log, moe_ep_rank=r)
                           if per_rank else None) for r in (range(ep_size) if sharded else [0])]
        torch.manual_seed(0)
        scores, times = [], []
        for ids in passes:
            loads = torch.zeros(num_layers, ep_size, dtype=torch.int64)
            for layer in range(num_layers):
                for r, run in enumerate(mappers):
                    rows = ids[r * shard:(r + 1) * shard, layer] if sharded else ids[:, layer]
                    start = time.perf_counter()
                    physical = run(layer, rows.contiguous())
                    times.append(time.perf_counter() - start)
                    loads[layer] += _gpu_loads(physical, slots_per_gpu, ep_size)
            scores.append(float(layer_balancedness(loads).mean()))
        out[name] = {"balancedness": statistics.fmean(scores), "ms_per_call": 1e3 * statistics.median(times),
                     "tokens_per_call": shard if sharded else passes.shape[1]}
        print(name, json.dumps(out[name]), flush=True)
    return out


def main() -> None:
    use_sglang_stubs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pass-tokens", type=int, default=256)
    parser.add_argument("--window", type=int, default=24, help="passes the placement is planned on")
    parser.add_argument("--passes", type=int, default=40, help="later passes scored")
    parser.add_argument("--ep-size", type=int, default=8)
    parser.add_argument("--num-physical-experts", type=int, default=72)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    folder = traces_dir()
    if not all((folder / name).exists() for name in ESFT_TRACES):
        print(f"ESFT traces not found in {folder}; set $EPLB_TRACES_DIR. Nothing measured.")
        sys.exit(0)
    torch.set_num_threads(1)
    ids = torch.from_numpy(esft_topk_ids(folder)).to(torch.int32)  # [T, L, k]
    num_passes = ids.shape[0] // args.pass_tokens
    passes = ids[: num_passes * args.pass_tokens].view(num_passes, args.pass_tokens, *ids.shape[1:])
    window = passes[: args.window]
    counts = torch.zeros(ids.shape[1], NUM_LOGICAL, dtype=torch.float64)
    for layer in range(ids.shape[1]):
        flat = window[:, :, layer].flatten().long()
        counts[layer] = torch.bincount(flat[flat >= 0], minlength=NUM_LOGICAL).double()
    location = ExpertLocation.from_logical_count(counts, num_physical_experts=args.num_physical_experts,
                                                 ep_size=args.ep_size, algorithm="eplb_plugin")
    scored = passes[args.window: args.window + args.passes]
    results = measure(scored, location, ep_size=args.ep_size)
    record = {
        "benchmark": "bench_sglang_dispatch",
        "command": "python benchmarks/bench_sglang_dispatch.py",
        "sglang": version("sglang"), "torch": torch.__version__, "machine": platform.machine(),
        "note": "CPU, 1 torch thread, shared 2-core machine; torch path of minmax (Triton on CUDA)",
        "traces": list(ESFT_TRACES), "pass_tokens": args.pass_tokens, "window_passes": args.window,
        "scored_passes": int(scored.shape[0]), "ep_size": args.ep_size,
        "num_physical_experts": args.num_physical_experts, "placement": "eplb_plugin (equal split) on the window",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
