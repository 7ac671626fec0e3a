"""Shared test helpers: where the real traces live, and a free TCP port for gloo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def traces_dir() -> Path:
    """``$EPLB_TRACES_DIR`` or ``../shared/traces`` beside the repository."""
    return Path(os.environ.get("EPLB_TRACES_DIR", REPO_ROOT.parent / "shared" / "traces"))


def trace_path(name: str) -> Path:
    """Path of a shared trace file; skips the test cleanly where it is absent."""
    path = traces_dir() / name
    if not path.exists():
        pytest.skip(f"trace {name} not found in {traces_dir()}")
    return path


def free_port() -> int:
    """A TCP port that is free right now (picked by the OS, never fixed)."""
    from eplb_plugin.runtime.launch import free_port as pick

    return pick()


def destroy_process_group() -> None:
    """Tear down the default process group after collecting reference cycles: gloo aborts the
    process when Work objects or groups kept alive by caught errors outlive the group."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.destroy_process_group()
