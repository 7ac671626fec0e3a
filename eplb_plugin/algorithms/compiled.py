"""Which planner steps run compiled (numba), and from what size.

The compiled forms (``balanced_jit``, ``deepseek_jit``, ``nodes_jit``) plan exactly what the numpy forms
plan. Loading them costs once per process: importing numba and reading its disk cache
(the first run on a machine compiles everything: 10-20 s). Plans smaller than ``COMPILED_MIN_SLOTS`` layer-slots stay in
numpy, where they take milliseconds anyway; so does everything where numba is not installed.
"""

from __future__ import annotations

import functools
from types import ModuleType

COMPILED_MIN_SLOTS = 4096  # layers x physical slots from which a plan takes the compiled forms


def worth_compiling(num_layers: int, num_slots: int) -> bool:
    """A plan of this size takes the compiled forms (where numba is installed)."""
    return num_layers * num_slots >= COMPILED_MIN_SLOTS


def wanted(compiled: bool | None, num_layers: int, num_slots: int) -> bool:
    """``compiled`` as the planners take it: True / False, or None = by size (``worth_compiling``)."""
    return worth_compiling(num_layers, num_slots) if compiled is None else compiled


@functools.cache
def balanced_kernels() -> ModuleType | None:
    """``balanced_jit`` (the equal-split plan's steps 1-4), or None without numba."""
    try:
        from . import balanced_jit
    except ImportError:
        return None
    return balanced_jit


@functools.cache
def recipe_kernels() -> ModuleType | None:
    """``deepseek_jit`` (the recipe's two loops), or None without numba."""
    try:
        from . import deepseek_jit
    except ImportError:
        return None
    return deepseek_jit


@functools.cache
def node_kernels() -> ModuleType | None:
    """``nodes_jit`` (the node-aware policy's GPU-to-node assignment), or None without numba."""
    try:
        from . import nodes_jit
    except ImportError:
        return None
    return nodes_jit
