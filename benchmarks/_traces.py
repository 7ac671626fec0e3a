"""Where the benchmarks find the shared routing traces: ``$EPLB_TRACES_DIR``, else
``../shared/traces`` beside the repository (never copied into it)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ESFT_TRACES = ("esft_dsv2lite_intent_top6.npz", "esft_dsv2lite_law_top6.npz")  # intent, then law


def traces_dir() -> Path:
    return Path(os.environ.get("EPLB_TRACES_DIR", Path(__file__).resolve().parents[2] / "shared" / "traces"))


def esft_missing() -> bool:
    """Whether the ESFT traces are absent from ``traces_dir()`` (then it says so: the caller
    skips cleanly)."""
    if all((traces_dir() / name).exists() for name in ESFT_TRACES):
        return False
    print(f"skipped: the ESFT traces are not in {traces_dir()}")
    return True


def esft_topk_ids(directory: Path | None = None) -> np.ndarray:
    """[T, L, k] int64: the ESFT traces' routed ids, intent then law (``-1`` = padding)."""
    from eplb_plugin.runtime.workload import load_traces

    folder = directory or traces_dir()
    return load_traces([folder / name for name in ESFT_TRACES])[0].numpy()
