"""``eplb simulate``: replay per-token traces through window -> planner -> migration.

Every figure is printed beside the no-EPLB baseline (the trivial placement, slot ``p``
holding expert ``p % E``, tokens split equally over replicas), over all passes and over the
passes after the first plan (the passes before it run on the trivial placement whatever the
policy). Where one trace file ends and the next begins, the traffic changes: the JSON lists
those passes and the plot marks them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from .algorithms.evaluate import DISPATCHES, per_pass_balancedness, simulate
from .cli_inputs import (
    check_output_file,
    check_slots,
    decay_factor,
    load_traces,
    num_physical_from_args,
    positive_int,
)
from .errors import ConfigError

DEFAULT_OUT = "eplb_runs/simulate.json"  # eplb_runs/ is git-ignored
DEFAULT_WINDOW = 8  # past passes the planner sees without --decay
BASELINE = "no EPLB"
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def add_simulate(sub: Any, common: Any, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "simulate", formatter_class=formatter,
        help="replay per-token traces through window -> planner -> migration, against no EPLB",
        description=__doc__.splitlines()[0] + " " + " ".join(__doc__.split("\n\n")[1].split()),
    )
    p.add_argument("trace", nargs="+", help="per-token .npz traces (topk_ids [T, L, k]), served in this order")
    common(p)
    p.add_argument("--pass-tokens", type=positive_int, default=256,
                   help="tokens per forward pass when cutting the traces (a trace's tokens past its last whole "
                        "pass are left out)")
    p.add_argument("--interval", type=positive_int, default=8, help="passes between rebalances")
    p.add_argument("--window", type=positive_int, default=None,
                   help=f"past passes the planner sees (default: {DEFAULT_WINDOW}; not with --decay)")
    p.add_argument("--decay", type=decay_factor, default=None,
                   help="plan on every past pass weighted decay**age instead of a --window (0 < decay <= 1)")
    p.add_argument("--dispatch", nargs="+", default=list(DISPATCHES), choices=DISPATCHES,
                   help="token splits to score: static, random and dynamic (SGLang's even random spread) "
                        "split equally, weighted follows the plan's replica weights, minmax splits each pass "
                        "to even out its GPU loads")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON report (its folder is created)")
    p.add_argument("--plot", default=None, help=f"image path ({', '.join(PLOT_SUFFIXES)}; default: no plot)")
    p.set_defaults(func=run_simulate)


def baseline_balancedness(counts: np.ndarray, *, num_physical: int, num_gpus: int) -> np.ndarray:
    """[B, L] per-pass, per-layer balancedness of the trivial placement under an equal split.

    counts: [B, L, E]. The trivial placement puts expert ``p % E`` in slot ``p``.
    """
    num_passes, num_layers, num_logical = counts.shape
    trivial = (np.arange(num_physical) % num_logical)[None, :]
    return np.stack([per_pass_balancedness(counts[:, layer:layer + 1], trivial, num_gpus=num_gpus, dispatch="static")
                     for layer in range(num_layers)], axis=1)


def _write(flag: str, path: Path, write) -> None:
    """``write(path)`` after making its folder; ConfigError naming the flag where that fails."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot be written ({exc.strerror or exc})") from exc


def run_simulate(args: argparse.Namespace) -> int:
    if args.decay is not None and args.window is not None:
        raise ConfigError(f"--decay {args.decay} plans on every past pass, so --window {args.window} would go "
                          "unused; give one of them")
    if args.decay is None and args.window is None:
        args.window = DEFAULT_WINDOW
    out, plot = Path(args.out), None if args.plot is None else Path(args.plot)
    check_output_file("--out", out, make_folder=True)  # before the replay; the folders are made when written
    if plot is not None:
        check_output_file("--plot", plot, suffixes=PLOT_SUFFIXES, make_folder=True)
    parts = load_traces(args.trace, pass_tokens=args.pass_tokens, num_logical=args.num_logical_experts)
    counts = np.concatenate(parts)
    if len(counts) <= args.interval:
        raise ConfigError(f"the traces give {len(counts)} passes of --pass-tokens {args.pass_tokens} tokens, but the "
                          f"first rebalance is at pass --interval {args.interval}: give more tokens, a smaller "
                          "--pass-tokens or a smaller --interval")
    changes = [int(x) for x in np.cumsum([len(p) for p in parts])[:-1]]  # first pass of each later trace
    num_physical = num_physical_from_args(args, counts.shape[2])
    check_slots(args, num_physical=num_physical, num_logical=counts.shape[2])
    res = simulate(counts, num_physical=num_physical, num_gpus=args.ep_size, interval=args.interval,
                   window=args.window, algorithm=args.algorithm, dispatches=tuple(args.dispatch), decay=args.decay)
    baseline_layers = baseline_balancedness(counts, num_physical=num_physical, num_gpus=args.ep_size)
    per_pass = {BASELINE: baseline_layers.mean(1), **res.balancedness}
    first = res.rebalance_passes[0] if res.rebalance_passes else len(counts)
    summary = res.summary()
    summary["balancedness_mean"][BASELINE] = float(per_pass[BASELINE].mean())
    summary["balancedness_mean_after_first_plan"][BASELINE] = float(per_pass[BASELINE][first:].mean())
    print(f"{len(counts)} passes of {args.pass_tokens} tokens, {counts.shape[1]} layers x {counts.shape[2]} experts "
          f"on {args.ep_size} GPUs, {num_physical} slots; traffic changes at pass {changes or 'none'}")
    print(f"realized per-pass balancedness (mean/max GPU load), all passes | after the first plan (pass {first}):")
    for name, values in per_pass.items():
        label = f"{BASELINE} (trivial placement)" if name == BASELINE else f"EPLB, {name} dispatch"
        print(f"  {label:<34} {values.mean():.4f} | {values[first:].mean():.4f}")
    print(f"slots moved per rebalance: {summary['slots_moved_share_mean']:.1%} mean, "
          f"{summary['slots_moved_share_max']:.1%} max; solver {summary['solver_ms_mean']:.1f} ms; "
          f"{summary['rebalances']} rebalances")
    report = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "summary": summary,
              "first_plan_pass": first, "traffic_change_passes": changes,
              "per_pass": {d: v.tolist() for d, v in per_pass.items()},
              "baseline_per_layer": baseline_layers.round(5).tolist(),
              "rebalance_passes": res.rebalance_passes, "slots_moved": res.slots_moved,
              "solver_seconds": res.solver_seconds}
    _write("--out", out, lambda path: path.write_text(json.dumps(report, indent=1)))
    if plot is not None:
        _write("--plot", plot, lambda path: plot_simulation(per_pass, baseline_layers, rebalances=res.rebalance_passes,
                                                            changes=changes, path=path))
    print(f"wrote {out}" + (f" and {plot}" if plot is not None else ""))
    return 0


def plot_simulation(per_pass: dict[str, np.ndarray], baseline_layers: np.ndarray, *, rebalances: list[int],
                    changes: list[int], path: Path) -> None:
    """Top: balancedness per pass, no-EPLB baseline and each dispatch, rebalances dashed, traffic
    changes solid. Bottom: the baseline's balancedness per MoE layer and pass (how skewed each
    layer's traffic is), with a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8), constrained_layout=True)
    for name, values in per_pass.items():
        ax1.plot(values, label=name if name == BASELINE else f"EPLB, {name}", color="black" if name == BASELINE else None,
                 lw=1.5 if name == BASELINE else 1.0)
    for i, b in enumerate(rebalances):
        ax1.axvline(b, color="grey", lw=0.5, ls="--", label="rebalance" if i == 0 else None)
    for ax in (ax1, ax2):
        for i, c in enumerate(changes):
            ax.axvline(c, color="magenta", lw=1.5, ls="-.",
                       label="traffic changes (next trace)" if i == 0 and ax is ax1 else None)
    ax1.set(xlabel="pass", ylabel="balancedness (mean/max GPU load)", title="Per-pass balancedness", ylim=(0, 1.02))
    ax1.legend(loc="lower right", fontsize="small")
    im = ax2.imshow(baseline_layers.T, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower",
                    interpolation="nearest")
    ax2.set(xlabel="pass", ylabel="MoE layer", title="No EPLB: balancedness per layer (traffic skew of each layer)")
    fig.colorbar(im, ax=ax2, label="balancedness (mean/max GPU load)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
