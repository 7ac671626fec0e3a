"""Backend choice and launch geometry shared by the count kernels."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal, NamedTuple

import torch

from eplb_plugin.errors import ConfigError, CountsError

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")

MAX_BLOCK_IDS = 1024  # ids one program reads per loop iteration
MAX_PROGRAMS = 128  # about one program per SM on H100/H200; more programs only add atomics


class LaunchGeometry(NamedTuple):
    """How a count kernel splits ``num_ids`` ids: ``programs`` x ``iters`` x ``block``."""

    programs: int
    iters: int
    block: int
    num_bins: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def launch_geometry(num_ids: int, num_slots: int) -> LaunchGeometry:
    """Geometry for ``num_ids`` ids into ``num_slots`` slots (one trash bin past the slots)."""
    block = min(MAX_BLOCK_IDS, max(16, _next_pow2(num_ids)))
    blocks = max(1, -(-num_ids // block))
    programs = min(blocks, MAX_PROGRAMS)
    iters = -(-blocks // programs)
    programs = -(-blocks // iters)
    return LaunchGeometry(programs, iters, block, _next_pow2(num_slots + 1))


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def check_backend(backend: str) -> None:
    """ConfigError unless ``backend`` is one of ``BACKENDS``."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not one of {BACKENDS}")


def triton_unusable(device_type: str) -> str | None:
    """Why the Triton kernels cannot run on tensors of ``device_type`` (None: they can):
    triton missing, or off CUDA without the interpreter (TRITON_INTERPRET=1)."""
    if not triton_available():
        return "triton is not installed"
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"on {device_type} it needs TRITON_INTERPRET=1 set before the kernels are first used"
    return None


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    """Resolve ``backend`` for ``tensor``: ``auto`` = Triton on CUDA when triton is installed."""
    check_backend(backend)
    if backend == "torch":
        return False
    if backend == "auto":
        return tensor.is_cuda and triton_available()
    problem = triton_unusable(tensor.device.type)
    if problem is not None:
        raise ConfigError(f"backend='triton' but {problem}; use backend='torch' or 'auto'")
    return True


def check_counts(counts: torch.Tensor) -> None:
    """Raise unless ``counts`` is the recorder's [L, P] int32 count buffer."""
    if counts.dim() != 2 or counts.dtype != torch.int32:
        raise CountsError(f"counts must be an [L, P] int32 tensor (got {tuple(counts.shape)} {counts.dtype})")


def check_out_dtype(out_dtype: torch.dtype) -> None:
    """Raise unless ``out_dtype`` is a slot id dtype the kernels write (int32 or int64)."""
    if out_dtype not in (torch.int32, torch.int64):
        raise ConfigError(f"out_dtype must be torch.int32 or torch.int64 (got {out_dtype})")


def check_ids(name: str, ids: torch.Tensor) -> None:
    """Raise for ids that are not an integer tensor."""
    if ids.dtype not in (torch.int32, torch.int64):
        raise ConfigError(f"{name} must be int32 or int64 (got {ids.dtype})")
