"""Inputs the ``eplb`` subcommands share: counts files and the slot count from the flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .algorithms.evaluate import pass_counts
from .errors import CountsError
from .location_files import read_counts


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


def num_physical_from_args(args, num_logical: int) -> int:
    """``--num-physical-experts`` if given, else the logical experts plus ``--redundant``."""
    return num_logical + args.redundant if args.num_physical_experts is None else args.num_physical_experts
