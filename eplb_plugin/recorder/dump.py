"""Dump files: SGLang 0.5.23's names and formats, in a directory a file name cannot escape.

Directory: ``dump_dir`` if given, else ``$SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``, else
the system temp dir. ``stat`` / ``stat_approx``: rank 0 writes
``expert_distribution_recorder_{time}.pt``; ``per_pass`` / ``per_token``: every rank writes
``expert_distribution_recorder_{time}_{rank}.pt``. Files hold only tensors, numbers,
strings, lists and dicts, so ``torch.load(weights_only=True)`` reads them.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from eplb_plugin.errors import ConfigError

DUMP_DIR_ENV = "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"
FILE_PREFIX = "expert_distribution_recorder_"


def dump_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The dump directory: ``explicit``, else the env var, else the system temp dir."""
    return Path(explicit or os.environ.get(DUMP_DIR_ENV) or tempfile.gettempdir())


def safe_dump_path(name: str, directory: str | os.PathLike) -> Path:
    """``directory / name``, refusing any name that resolves outside ``directory``.

    Raises ConfigError for absolute names, ``..`` components and symlinks leading out.
    """
    base = Path(directory).resolve()
    if not name or Path(name).is_absolute():
        raise ConfigError(f"dump file name {name!r} must be a non-empty relative name inside {base}")
    target = (base / name).resolve()
    if target == base or base not in target.parents:
        raise ConfigError(f"dump file name {name!r} resolves to {target}, outside the dump directory {base}")
    return target


def default_name(rank: int | None) -> str:
    """SGLang's file name: with the rank for per-pass/per-token dumps, without for stat."""
    suffix = "" if rank is None else f"_{rank}"
    return f"{FILE_PREFIX}{time.time()}{suffix}.pt"


def write_dump(data: dict[str, Any], name: str, directory: str | os.PathLike | None = None) -> Path:
    """Save ``data`` with torch.save under the dump directory (created if missing).

    A file that cannot be written raises OSError naming it (torch.save's own failures are
    RuntimeErrors, which callers would take for a failed collective); a write that fails
    part way (torch.save's error, a full disk) leaves no partial file behind.
    """
    base = dump_dir(directory)
    base.mkdir(parents=True, exist_ok=True)
    path = safe_dump_path(name, base)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        try:
            torch.save(data, file)
        except (RuntimeError, OSError) as exc:
            path.unlink(missing_ok=True)
            raise OSError(f"cannot write the dump {path}: {exc}") from exc
    return path
