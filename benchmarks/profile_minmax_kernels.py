"""The minmax kernels of large passes (``triton_kernels_minmax_bases``) per setting and in
parts, each timed inside a CUDA graph (58 layers, DeepSeek-V3 at EP8: 256 experts, 288
slots, top-8): the whole dispatch per setting (tile of the totals kernel, chunk of the
assign kernel, warps), and the totals kernel (with its split and counts) and the assign
kernel each alone. A tuning aid for ``kernels/minmax_triton.py`` (its defaults are the best
rows here); needs CUDA. ``--split-sweep``: the whole dispatch by the split's diffusion steps
instead (what a step costs, on the dense split table and on the list of replicas). ``--old DIR``: also time the kernels of an older checkout (DIR holds
its ``minmax_triton.py`` as ``old_minmax_triton.py``, importing ``old_triton_kernels_minmax``).
The results committed as ``minmax_kernel_settings_*.json`` also hold earlier designs (see
each file's note).

    python benchmarks/profile_minmax_kernels.py [--tokens 512,16384] [--split-sweep] [--old DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
from bench_minmax_dispatch import (
    NUM_SLOTS,
    capture_layers,
    replay_us,
    skewed_pass,
)

from eplb_plugin.dispatch import ExpertDispatcher
from eplb_plugin.kernels import count_topk, minmax_triton
from eplb_plugin.kernels.minmax import minmax_iterations
from eplb_plugin.kernels.minmax_triton import minmax_scratch

SETTINGS = (  # (totals_tile, chunk, num_warps, split_warps); None: by the pass's size
    (None, 64, 4, 4), (None, 128, 4, 4), (None, 64, 8, 4), (512, 64, 4, 4), (2048, 64, 4, 4), (128, 64, 4, 4),
)


def graph_us(fn, num_layers: int, replays: int) -> float:
    return replay_us(capture_layers(fn, num_layers), replays=replays, num_layers=num_layers)


def parts(ids, tables, counts, num_layers: int, replays: int) -> dict:
    """The totals kernel (and its split) alone and the assign kernel alone, at the defaults."""
    from eplb_plugin.kernels import triton_kernels_minmax_bases as k

    launches = {}
    real = {name: getattr(k, name) for name in ("bases_totals_kernel", "bases_assign_kernel")}

    class Recorder:  # stands in for a kernel: keeps its launch, runs nothing
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: launches.__setitem__(self.name, (grid, a, kw))

    scratch = minmax_scratch(tables)
    keep = []
    for layer in range(num_layers):  # record each layer's launches (buffers kept alive)
        for name in real:
            setattr(k, name, Recorder(name))
        try:
            keep.append(minmax_triton.minmax_dispatch_triton(ids[layer], tables, layer=layer, num_slots=NUM_SLOTS,
                                                             scratch=scratch, counts_out=counts, bases=True))
        finally:
            for name, fn in real.items():
                setattr(k, name, fn)
        keep.append(dict(launches))
    per_layer = keep[1::2]

    def run(name):
        return lambda layer: real[name][per_layer[layer][name][0]](*per_layer[layer][name][1],
                                                                    **per_layer[layer][name][2])

    totals = graph_us(run("bases_totals_kernel"), num_layers, replays)  # leaves each layer's bases and quotas
    return {"totals_and_split_only": totals, "assign_only": graph_us(run("bases_assign_kernel"), num_layers, replays)}


def _row_adder(rows: list[dict], *, num_layers: int, replays: int, **tags):
    """add(name, fn, **settings): ``fn(layer)`` timed per layer in a CUDA graph, appended to
    ``rows`` as one row with ``tags`` (the pass's size, the EP size) and the settings."""
    label = " ".join(f"{key}={value}" for key, value in tags.items())

    def add(name, fn, **settings):
        us = graph_us(fn, num_layers, replays)
        rows.append({**tags, "variant": name, **settings, "graph_us_per_layer": us})
        print(f"{label} {name} {settings}: {us:7.2f} us/layer", flush=True)

    return add


def _minmax_call(tables, ids, counts, module=None, **settings):
    """``fn(layer)``: the minmax kernels of ``module`` (this checkout's host module, or an
    older one's) on that layer's ids, with a scratch of their own kept across calls."""
    host = module if module is not None else minmax_triton
    scratch = host.minmax_scratch(tables)
    return lambda layer: host.minmax_dispatch_triton(ids[layer], tables, layer=layer, num_slots=NUM_SLOTS,
                                                     scratch=scratch, counts_out=counts, **settings)


def profile(tokens: int, *, num_layers: int, replays: int, old) -> list[dict]:
    """Rows of every variant at ``tokens`` tokens."""
    rows: list[dict] = []
    loc, ids = skewed_pass(tokens, num_layers=num_layers)
    dispatcher = ExpertDispatcher(loc, rank=0, algorithm="minmax", backend="triton", device="cuda")
    tables = dispatcher.minmax
    assert tables is not None
    counts = torch.zeros(num_layers, NUM_SLOTS, dtype=torch.int32, device="cuda")
    physical = dispatcher.dispatch(0, ids[0])
    add = _row_adder(rows, num_layers=num_layers, replays=replays, tokens=tokens)
    add("count_only", lambda layer: count_topk(physical, counts, layer))
    if old is not None:
        add("old_kernels", _minmax_call(tables, ids, counts, old))
    for totals_tile, chunk, warps, split_warps in SETTINGS:
        kw = dict(totals_tile=totals_tile, chunk=chunk, num_warps=warps, split_warps=split_warps, bases=True)
        add("minmax_triton", _minmax_call(tables, ids, counts, **kw), **kw)
    add("minmax_triton_no_split_steps", _minmax_call(tables, ids, counts, iterations=0, bases=True))
    for name, us in parts(ids, tables, counts, num_layers, replays).items():
        rows.append({"tokens": tokens, "variant": name, "graph_us_per_layer": us})
        print(f"{tokens:>6} tok {name}: {us:7.2f} us/layer", flush=True)
    return rows


# --warps-sweep: (num_warps, split_warps, search), each at the EP size's default steps
WARPS = ((4, 4, False), (4, 8, False), (4, 16, False), (8, 16, False), (4, 4, True), (4, 8, True), (8, 8, True))


def split_sweep(tokens: int, *, num_layers: int, replays: int, old, ep_sizes: tuple[int, ...] = (8,),
                warps: bool = False, dense_steps_ep8: bool = False, warps_rows=WARPS, steps: bool = True,
                stop: bool = False) -> list[dict]:
    """The whole dispatch (kernels by the pass's size, default settings) per number of the
    split's diffusion steps: what a step costs (``--old``: the older kernels beside them);
    at each of ``ep_sizes`` (288 slots over that many GPUs: the wider the table, the more a
    step costs), with the split on the dense table and on the list of replicas (``entries``;
    ``dense_steps_ep8``: the dense split at EP8 also at 10, 12, 14 and 20 steps; ``steps=False``:
    none of these, the warps rows alone; ``warps_rows``: those rows' settings). ``warps``: also each of ``WARPS`` at the EP size's default steps, and the
    large passes' kernels in parts (the wider the table, the more registers the split's [M, G] arrays take;
    the more quotas a pair compares unless it searches them). ``stop``: also the default
    settings as a rank's share of the pass (every step) and as the whole pass (``whole_pass``:
    the split stops once no step can lower the peak), side by side, at 8 and 16 steps."""
    rows: list[dict] = []
    for ep in ep_sizes:
        loc, ids = skewed_pass(tokens, num_layers=num_layers, ep=ep)
        tables = ExpertDispatcher(loc, rank=0, algorithm="minmax", backend="triton", device="cuda").minmax
        assert tables is not None
        counts = torch.zeros(num_layers, NUM_SLOTS, dtype=torch.int32, device="cuda")
        add = _row_adder(rows, num_layers=num_layers, replays=replays, tokens=tokens, ep=ep,
                         replicated=tables.multi_experts.shape[1])
        if old is not None:
            add("old_kernels", _minmax_call(tables, ids, counts, old))
        for entries in (False, True) if steps else ():  # the split on the dense table, then on the list of replicas
            for steps in (0, 8, 16) if entries or not dense_steps_ep8 or ep != 8 else (0, 8, 10, 12, 14, 16, 20):
                add("minmax_triton", _minmax_call(tables, ids, counts, iterations=steps, entries=entries),
                    iterations=steps, entries=entries)
        for iterations in (8, 16) if stop else ():
            for whole_pass in (False, True):
                add("minmax_triton", _minmax_call(tables, ids, counts, iterations=iterations, whole_pass=whole_pass),
                    iterations=iterations, whole_pass=whole_pass)
        if warps:
            for num_warps, split_warps, search in warps_rows:
                add("minmax_triton", _minmax_call(tables, ids, counts, num_warps=num_warps, split_warps=split_warps,
                                                  search=search),
                    iterations=minmax_iterations(ep), num_warps=num_warps, split_warps=split_warps, search=search)
            for part, us in parts(ids, tables, counts, num_layers, replays).items():
                rows.append({"tokens": tokens, "ep": ep, "variant": "bases_" + part, "graph_us_per_layer": us})
                print(f"tokens={tokens} ep={ep} bases {part}: {us:7.2f} us/layer", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="512,16384")
    ap.add_argument("--num-layers", type=int, default=58)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--old", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--split-sweep", action="store_true", help="time the split's steps instead")
    ap.add_argument("--ep-sizes", default="8", help="--split-sweep: the EP sizes (288 slots over that many GPUs)")
    ap.add_argument("--warps-sweep", action="store_true", help="--split-sweep: also by the kernels' warps")
    ap.add_argument("--warps", default=None,
                    help="--warps-sweep: its rows as num_warps:split_warps:search triples, comma-separated "
                         "(default: WARPS)")
    ap.add_argument("--no-steps", action="store_true", help="--split-sweep: the warps rows alone, not the steps")
    ap.add_argument("--stop", action="store_true",
                    help="--split-sweep: also the split on a rank's share (every step) beside the whole pass's "
                         "(stopping once no step lowers the peak), at 8 and 16 steps")
    ap.add_argument("--dense-steps-ep8", action="store_true",
                    help="--split-sweep: the dense split at EP8 also at 10, 12, 14 and 20 steps")
    ns = ap.parse_args(argv)
    old = None
    if ns.old:
        sys.path.insert(0, ns.old)
        old = importlib.import_module("old_minmax_triton")
    rows: list[dict] = []
    for tokens in (int(t) for t in ns.tokens.split(",")):
        if not ns.split_sweep:
            rows += profile(tokens, num_layers=ns.num_layers, replays=ns.replays, old=old)
            _write(ns, argv, rows)
            continue
        for ep in (int(e) for e in ns.ep_sizes.split(",")):
            rows += split_sweep(tokens, num_layers=ns.num_layers, replays=ns.replays, old=old, ep_sizes=(ep,),
                                warps=ns.warps_sweep, dense_steps_ep8=ns.dense_steps_ep8, steps=not ns.no_steps,
                                stop=ns.stop,
                                warps_rows=_warps_rows(ns.warps))
            _write(ns, argv, rows)  # after each EP size: a run cut short keeps what it timed
    return 0


def _warps_rows(spec: str | None) -> tuple[tuple[int, int, bool], ...]:
    """``--warps`` as (num_warps, split_warps, search) triples (None: ``WARPS``)."""
    if spec is None:
        return WARPS
    return tuple((int(a), int(b), c == "1") for a, b, c in (t.split(":") for t in spec.split(",")))


def _write(ns, argv, rows: list[dict]) -> None:
    """Prints the best setting per pass size (not for the split sweep, whose rows differ in
    quality too) and writes the rows under ``--out``."""
    best = {} if ns.split_sweep else {
        t: min((r for r in rows if r["tokens"] == t and r["variant"] == "minmax_triton"),
               key=lambda r: r["graph_us_per_layer"]) for t in {r["tokens"] for r in rows}}
    print("best:", json.dumps(best))
    if ns.out:
        out = Path(ns.out) / torch.cuda.get_device_name().replace(" ", "_")
        out.mkdir(parents=True, exist_ok=True)
        name = "minmax_split_sweep.json" if ns.split_sweep else "minmax_kernel_settings.json"
        (out / name).write_text(json.dumps(
            {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "gpu": torch.cuda.get_device_name(),
             "rows": rows, "best": best}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
