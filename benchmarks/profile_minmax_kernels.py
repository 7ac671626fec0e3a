"""The minmax kernels' settings, each timed inside a CUDA graph (58 layers, DeepSeek-V3 at
EP8: 256 experts, 288 slots, top-8): how the cost splits between the totals, the split and
the assign, per warp count and tile size. A tuning aid for ``kernels/minmax_triton.py``
(its defaults are the best rows here); needs CUDA. The results committed as
``minmax_kernel_settings_*.json`` also hold variants measured slower and since removed:
totals by one atomic per pair (``per_pair_totals``) and tickets per expert per sorted tile
(``tile_tickets``); iterations 0 is the cost without the split's steps.

    python benchmarks/profile_minmax_kernels.py [--tokens 512,16384]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from bench_minmax_dispatch import EP, NUM_EXPERTS, NUM_SLOTS, TOP_K, capture_layers, replay_us

from eplb_plugin.dispatch import ExpertDispatcher
from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton, minmax_scratch
from eplb_plugin.location import ExpertLocation


def graph_us(fn, num_layers: int, replays: int) -> float:
    return replay_us(capture_layers(fn, num_layers), replays=replays, num_layers=num_layers)


def _variant(ids, tables, counts, kw):
    scratch = minmax_scratch(tables)
    return lambda layer: minmax_dispatch_triton(ids[layer], tables, layer=layer, num_slots=NUM_SLOTS, scratch=scratch,
                                                counts_out=counts, **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="512,16384")
    ap.add_argument("--num-layers", type=int, default=58)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--out", default=None)
    ns = ap.parse_args(argv)
    rows = []
    for tokens in (int(t) for t in ns.tokens.split(",")):
        gen = torch.Generator().manual_seed(tokens)
        popularity = torch.distributions.Gamma(0.5, 1.0).sample((ns.num_layers, NUM_EXPERTS))
        loc = ExpertLocation.from_logical_count(popularity, num_physical_experts=NUM_SLOTS, ep_size=EP,
                                                algorithm="eplb_plugin_equal")
        ids = torch.stack([torch.multinomial(popularity[layer], tokens * TOP_K, replacement=True, generator=gen)
                           for layer in range(ns.num_layers)]).view(ns.num_layers, tokens, TOP_K).cuda()
        tables = ExpertDispatcher(loc, rank=0, algorithm="minmax", backend="triton", device="cuda").minmax
        assert tables is not None
        counts = torch.zeros(ns.num_layers, NUM_SLOTS, dtype=torch.int32, device="cuda")
        grid = itertools.product((2, 4), (4, 8), (0, 8, 16), (256, 1024), (1024, 2048))
        for split_warps, warps, iterations, totals_tile, assign_elems in grid:
            if iterations == 0 and (split_warps, totals_tile) != (4, 256):
                continue
            kw = dict(num_warps=warps, split_warps=split_warps, iterations=iterations, totals_tile=totals_tile,
                      assign_tile_elements=assign_elems)
            us = graph_us(_variant(ids, tables, counts, kw), ns.num_layers, ns.replays)
            rows.append({"tokens": tokens, **kw, "graph_us_per_layer": us})
            print(f"{tokens:>6} tok {kw}: {us:7.2f} us/layer", flush=True)
    best = {t: min((r for r in rows if r["tokens"] == t and r["iterations"] > 0), key=lambda r: r["graph_us_per_layer"])
            for t in {r["tokens"] for r in rows}}
    print("best:", json.dumps(best))
    if ns.out:
        out = Path(ns.out) / torch.cuda.get_device_name().replace(" ", "_")
        out.mkdir(parents=True, exist_ok=True)
        (out / "minmax_kernel_settings.json").write_text(json.dumps(
            {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "gpu": torch.cuda.get_device_name(),
             "rows": rows, "best": best}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
