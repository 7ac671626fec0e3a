"""End-of-run report: a side-by-side text table, the results as JSON, and a PNG.

The PNG (matplotlib, Agg backend) has three rows: balancedness per pass with rebalances
marked, each run's GPU load share per layer over its first and last tenth of passes
(heatmaps; 1/W everywhere is perfect), and MoE step time per pass.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SMOOTH_PASSES = 10  # rolling mean width of the per-pass curves


def _rows(runs: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    def col(fn):
        return [fn(r) for r in runs]

    return [
        ("balancedness, mean per pass", col(lambda r: f"{r['balancedness_mean']:.3f}")),
        ("balancedness, last 10% of passes", col(lambda r: f"{np.mean(r['balancedness_per_pass'][-max(1, r['num_passes'] // 10):]):.3f}")),
        ("MoE step time, mean (ms)", col(lambda r: f"{r['moe_step_ms_mean']:.2f}")),
        ("expert compute, slowest rank (ms)", col(lambda r: f"{r['expert_compute_ms_mean']:.2f}")),
        ("rebalances done / skipped / failed / unfinished",
         col(lambda r: " / ".join(str(r[k]) for k in ("num_rebalances", "num_rebalances_skipped",
                                                       "num_rebalances_failed", "num_rebalances_unfinished")))),
        ("slots moved", col(lambda r: str(r["slots_moved"]))),
        ("bytes moved by rank 0 (MiB)", col(lambda r: f"{r['bytes_moved'] / 2**20:.1f}")),
        ("rebalance stall, total / max (ms)", col(lambda r: f"{1e3 * r['stall_s_total']:.1f} / {r['stall_ms_max']:.1f}")),
        ("weights verified (slots)", col(lambda r: f"{r['slots_checked'] - r['slots_failed']}/{r['slots_checked']}"
                                           if r["weights_verified"] else "off")),
        ("wall time (s)", col(lambda r: f"{r['wall_s']:.1f}")),
    ]


def text_report(runs: Sequence[dict[str, Any]]) -> str:
    """A table, one column per run. Step times exclude the first warm-up passes.

    "expert compute, slowest rank" is the CPU time of the expert FFNs on the busiest rank
    (thread CPU time, so it does not depend on how many cores the ranks share); on CUDA it is 0.
    Rebalance rows are the rank-0 manager's records summed (``results.rebalance_totals``):
    a stall is the serving-thread time of a rebalance, skipped and failed ones included.
    """
    rows = _rows(runs)
    width = max(len(name) for name, _ in rows) + 2
    cols = [max(len(r["label"]), *(len(v[i]) for _, v in rows)) + 2 for i, r in enumerate(runs)]
    lines = ["".ljust(width) + "".join(r["label"].rjust(c) for r, c in zip(runs, cols))]
    for name, values in rows:
        lines.append(name.ljust(width) + "".join(v.rjust(c) for v, c in zip(values, cols)))
    for r in runs:
        for failure in r.get("rebalance_failures", [])[:3]:
            lines.append(f"[{r['label']}] {failure}")
    first = runs[0]
    lines.append(
        f"({first['ep_size']} EP ranks, {first['num_physical_experts']} slots, {first['batch_tokens']} tokens/pass, "
        f"{first['num_passes']} passes; means skip {first['warmup_passes']} warm-up passes)"
    )
    return "\n".join(lines)


def _smooth(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if len(v) < SMOOTH_PASSES:
        return v
    kernel = np.ones(SMOOTH_PASSES) / SMOOTH_PASSES
    return np.convolve(v, kernel, mode="valid")


def plot_report(runs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write the three-row PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs)
    fig = plt.figure(figsize=(max(10, 3.2 * 2 * n), 11), constrained_layout=True)
    grid = fig.add_gridspec(3, 2 * n, height_ratios=[1.0, 1.1, 1.0])
    ax_bal = fig.add_subplot(grid[0, :])
    ax_step = fig.add_subplot(grid[2, :])
    for r in runs:
        x0 = SMOOTH_PASSES - 1 if r["num_passes"] >= SMOOTH_PASSES else 0
        (line,) = ax_bal.plot(np.arange(len(_smooth(r["balancedness_per_pass"]))) + x0,
                              _smooth(r["balancedness_per_pass"]), label=r["label"])
        for i, reb in enumerate(x for x in r["rebalances"] if not x.get("skipped") and not x.get("error")):
            at = reb.get("end_pass") or reb.get("start_pass")
            if at is not None:
                ax_bal.axvline(at, color=line.get_color(), alpha=0.3, ls="--", label="rebalance" if i == 0 else None)
        ax_step.plot(np.arange(len(_smooth(r["moe_step_s_per_pass"]))) + x0,
                     1e3 * _smooth(r["moe_step_s_per_pass"]), label=f"{r['label']} (wall)", color=line.get_color())
        if any(r["expert_compute_s_per_pass"]):
            ax_step.plot(np.arange(len(_smooth(r["expert_compute_s_per_pass"]))) + x0,
                         1e3 * _smooth(r["expert_compute_s_per_pass"]), ls=":", color=line.get_color(),
                         label=f"{r['label']} (expert compute, slowest rank)")
    ax_bal.set(title=f"Balancedness per pass (mean/max GPU load, {SMOOTH_PASSES}-pass mean)", xlabel="pass",
               ylabel="balancedness", ylim=(0, 1.02))
    ax_bal.legend(loc="lower right")
    ax_step.set(title=f"MoE step time ({SMOOTH_PASSES}-pass mean)", xlabel="pass", ylabel="ms")
    ax_step.legend(loc="upper right")
    vmax = max(max(max(row) for row in r[k]) for r in runs for k in ("gpu_load_share_first", "gpu_load_share_last"))
    for i, r in enumerate(runs):
        for j, (key, name) in enumerate((("gpu_load_share_first", "first"), ("gpu_load_share_last", "last"))):
            ax = fig.add_subplot(grid[1, 2 * i + j])
            share = np.asarray(r[key])
            im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
            ax.set(title=f"{r['label']}: GPU load share, {name} 10%", xlabel="EP rank", ylabel="MoE layer")
            ax.set_xticks(range(share.shape[1]))
            ax.set_yticks(range(0, share.shape[0], max(1, share.shape[0] // 8)))
        fig.colorbar(im, ax=ax, fraction=0.05)
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(runs: Sequence[dict[str, Any]], report_dir: str | Path, *, meta: dict[str, Any] | None = None,
                 plot: bool = True) -> dict[str, Path]:
    """Write ``report.txt``, ``report.json`` and (unless ``plot=False``) ``report.png``."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"text": out / "report.txt", "json": out / "report.json"}
    paths["text"].write_text(text_report(runs) + "\n")
    paths["json"].write_text(json.dumps({**(meta or {}), "runs": list(runs)}, indent=1))
    if plot:
        paths["png"] = plot_report(runs, out / "report.png")
    return paths
