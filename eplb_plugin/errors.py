"""Typed exceptions for user errors.

Library code raises these for bad input (a user's flag, file, map or count; a caller's
wrong argument) and keeps ``assert`` for its own invariants. Every message names the argument, the value and the fix.
"""

from __future__ import annotations


class EPLBError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(EPLBError, ValueError):
    """Contradictory or out-of-range flags (names both flags where two disagree)."""


class UsageError(EPLBError, ValueError):
    """API misuse: a caller passed an argument of the wrong shape, value or kind to a function
    (not a user's flag or file: those are ConfigError, PlacementError, CountsError)."""


class PlacementError(EPLBError, ValueError):
    """A placement (physical_to_logical_map, replica weights) that cannot serve the model."""


class ExpertLocationFileError(PlacementError):
    """An ``--init-expert-location`` source that is unreadable or malformed.

    The message names the source (file or ``<inline JSON>``), the key and the problem.
    """

    def __init__(self, source: str, key: str | None, problem: str):
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}" + (f", key {key!r}" if key else "")
        super().__init__(f"--init-expert-location {where}: {problem}")


class CountsError(EPLBError, ValueError):
    """Load counts with a wrong shape, NaN, infinite or negative entries."""


class TransferError(EPLBError, RuntimeError):
    """A weight move that failed on some rank; the layer stays on its old map."""


class RebalanceError(EPLBError, RuntimeError):
    """A rebalance that failed in the manager's background thread (re-raised on serving)."""
