"""The ``eplb`` command: plan, simulate, inspect.

Add a subcommand by writing ``_add_<name>(subparsers)`` and one line in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .algorithms import ALGORITHMS, plan
from .algorithms.evaluate import DISPATCHES, pass_counts, simulate
from .balance import placement_balancedness
from .errors import CountsError, EPLBError
from .location import ExpertLocation, weights_sidecar
from .location_files import load_placement, read_counts, save_placement


def load_counts(path: str | Path, *, pass_tokens: int | None = None) -> np.ndarray:
    """Counts from an SGLang stat dump ``.pt``, a JSON with ``logical_count``/``counts``, or a
    per-token ``.npz`` (``topk_ids [T, L, k]``). Returns [L, E], or [B, L, E] when
    ``pass_tokens`` cuts a per-token trace into passes."""
    path = Path(path)
    if not path.exists():
        raise CountsError(f"counts file {path} does not exist")
    if path.suffix == ".npz":
        ids = np.load(path)["topk_ids"]
        num_logical = int(ids.max()) + 1
        counts = pass_counts(ids, num_logical=num_logical, pass_tokens=pass_tokens or len(ids))
        return counts if pass_tokens else counts.sum(0)
    return read_counts(str(path)).numpy()  # the loaders' checks: size, shape, NaN, negative


def redundant_memory_bytes(preset, *, num_physical: int, num_gpus: int) -> int:
    """GPU memory each rank spends on redundant experts over all MoE layers.

    preset: an ``eplb_plugin.configs.ModelPreset`` (num_layers, num_logical_experts, expert_bytes).
    """
    redundant_per_rank = (num_physical - preset.num_logical_experts) / num_gpus
    return int(redundant_per_rank * preset.num_layers * preset.expert_bytes)


def _num_physical(args, num_logical: int) -> int:
    return num_logical + args.redundant if args.num_physical_experts is None else args.num_physical_experts


def _save_map(path: Path, phy2log: torch.Tensor, *, ep_size: int, num_logical_experts: int) -> None:
    """The map file (what stock SGLang loads) and its meta sidecar (EP size, shape)."""
    save_placement(path, phy2log, ep_size=ep_size, num_logical_experts=num_logical_experts)


def _cmd_plan(args) -> int:
    if args.preset:
        from .configs import get_preset

        get_preset(args.preset)  # an unknown name fails here, before the solver runs
    counts = load_counts(args.counts)
    num_logical = counts.shape[1]
    num_physical = _num_physical(args, num_logical)
    placement = plan(counts, num_physical_experts=num_physical, num_gpus=args.ep_size, num_nodes=args.nodes,
                     num_groups=args.groups, algorithm=args.algorithm)
    c = torch.from_numpy(counts)
    trivial = ExpertLocation.trivial(num_layers=counts.shape[0], num_logical_experts=num_logical,
                                     num_physical_experts=num_physical, ep_size=args.ep_size).physical_to_logical_map
    phy2log, weights = placement.physical_to_logical_map, placement.replica_weights
    before = placement_balancedness(c, trivial, args.ep_size)
    after = placement_balancedness(c, phy2log, args.ep_size)
    print(f"balancedness before (trivial): {before:.4f}")
    print(f"balancedness after, equal split: {after:.4f}")
    if weights is not None:
        print(f"balancedness after, replica weights: {placement_balancedness(c, phy2log, args.ep_size, weights):.4f}")
    if placement.cross_node_share is not None:
        print(f"cross-node traffic share: {placement.cross_node_share:.3f}")
    print(f"solver: {1e3 * placement.solver_seconds:.1f} ms")
    if args.preset:
        from .configs import get_preset

        mem = redundant_memory_bytes(get_preset(args.preset), num_physical=num_physical, num_gpus=args.ep_size)
        print(f"redundant experts per rank ({args.preset}): {mem / 2**30:.2f} GiB")
    out = Path(args.out)
    _save_map(out, phy2log, ep_size=args.ep_size, num_logical_experts=num_logical)
    if weights is not None:
        weights_sidecar(out).write_text(json.dumps(
            {"replica_weights": weights.tolist(), "physical_to_logical_map": phy2log.tolist()}))
    print(f"wrote {out}" + (f" and {weights_sidecar(out)}" if weights is not None else ""))
    return 0


def _cmd_simulate(args) -> int:
    counts = np.concatenate([load_counts(t, pass_tokens=args.pass_tokens) for t in args.trace])
    num_physical = _num_physical(args, counts.shape[2])
    res = simulate(counts, num_physical=num_physical, num_gpus=args.ep_size, interval=args.interval,
                   window=args.window, algorithm=args.algorithm, dispatches=tuple(args.dispatch), decay=args.decay)
    summary = res.summary()
    for d, v in summary["balancedness_mean"].items():
        print(f"realized per-pass balancedness, {d}: {v:.4f}")
    print(f"slots moved per rebalance: {summary['slots_moved_share_mean']:.1%} mean, "
          f"{summary['slots_moved_share_max']:.1%} max; solver {summary['solver_ms_mean']:.1f} ms")
    report = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "summary": summary,
              "per_pass": {d: v.tolist() for d, v in res.balancedness.items()},
              "rebalance_passes": res.rebalance_passes, "slots_moved": res.slots_moved,
              "solver_seconds": res.solver_seconds}
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1))
    if args.plot:
        _plot(res, counts, Path(args.plot))
    print(f"wrote {out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _plot(res, counts: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7))
    for d, v in res.balancedness.items():
        ax1.plot(v, label=d)
    for b in res.rebalance_passes:
        ax1.axvline(b, color="grey", lw=0.5, ls="--")
    ax1.set(xlabel="pass", ylabel="balancedness", title="per-pass balancedness (dashed: rebalance)")
    ax1.legend()
    load = counts.sum(1)  # [B, E] summed over layers
    ax2.imshow(load.T / load.sum(1).clip(min=1), aspect="auto", cmap="viridis")
    ax2.set(xlabel="pass", ylabel="logical expert", title="expert load share (all layers)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cmd_inspect(args) -> int:
    counts = torch.from_numpy(load_counts(args.counts))
    # The loaders' validation: shape against the counts, ids, replicas, EP size (and what
    # the file's meta sidecar says it was made for), replica weights.
    location = load_placement(args.placement, ep_size=args.ep_size, num_layers=counts.shape[0],
                              num_logical_experts=counts.shape[1])
    phy2log, weights = location.physical_to_logical_map, location.replica_weights
    print(f"balancedness, equal split: {placement_balancedness(counts, phy2log, args.ep_size):.4f}")
    if weights is not None:
        print(f"balancedness, replica weights: {placement_balancedness(counts, phy2log, args.ep_size, weights):.4f}")
    share = counts.sum(0) / counts.sum().clamp_min(1)
    top = torch.topk(share, min(args.top, share.numel()))
    print("hottest experts (share of tokens, all layers): " +
          ", ".join(f"{int(i)}: {float(v):.3f}" for v, i in zip(top.values, top.indices)))
    return 0


def _common(p) -> None:
    p.add_argument("--ep-size", type=int, required=True, help="number of GPUs (EP ranks)")
    p.add_argument("--redundant", type=int, default=0, help="redundant experts (P = E + redundant)")
    p.add_argument("--num-physical-experts", type=int, default=None, help="P, overrides --redundant")
    p.add_argument("--algorithm", default="auto", choices=["auto", *ALGORITHMS])


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="counts -> placement file for --init-expert-location")
    p.add_argument("counts", help="SGLang stat dump .pt, JSON with logical_count/counts, or per-token .npz")
    _common(p)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--groups", type=int, default=None)
    p.add_argument("--preset", default=None, help="model preset for the memory estimate")
    p.add_argument("--out", required=True, help=".json or .pt; weights go to <out>.weights.json")
    p.set_defaults(func=_cmd_plan)


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="replay per-token traces through window -> planner -> migration")
    p.add_argument("trace", nargs="+", help="per-token .npz traces, concatenated in order")
    _common(p)
    p.add_argument("--pass-tokens", type=int, default=256)
    p.add_argument("--interval", type=int, default=8, help="passes between rebalances")
    p.add_argument("--window", type=int, default=8, help="passes the planner sees")
    p.add_argument("--decay", type=float, default=None, help="use all history weighted decay**age instead")
    p.add_argument("--dispatch", nargs="+", default=list(DISPATCHES), choices=DISPATCHES)
    p.add_argument("--out", default="simulate.json")
    p.add_argument("--plot", default=None, help="PNG path")
    p.set_defaults(func=_cmd_simulate)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="balancedness and hottest experts of a placement on counts")
    p.add_argument("placement")
    p.add_argument("counts")
    p.add_argument("--ep-size", type=int, required=True)
    p.add_argument("--top", type=int, default=8)
    p.set_defaults(func=_cmd_inspect)


SUBCOMMANDS = {"plan": _add_plan, "simulate": _add_simulate, "inspect": _add_inspect}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="eplb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EPLBError as exc:  # ConfigError, CountsError, PlacementError...
        print(f"eplb {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
