"""Rank 0's progress display: a live tqdm bar on a terminal, a few plain lines in a log.

Redirected to a file or a pipe, a tqdm bar rewrites itself with carriage returns at every
refresh, which floods the log; there the display prints one line per tenth of the run
instead (the latest live figures), and rebalance lines as they come.
"""

from __future__ import annotations

import sys
from typing import Any

LOG_LINES_PER_RUN = 10  # plain progress lines a run prints when stderr is not a terminal


class Progress:
    """The tqdm surface the serving loop uses (``update``, ``set_postfix``, ``write``, ``close``).

    label: the run's name; total: its passes; enabled: show anything at all (rank 0 with
    progress on); interactive: a live bar (default: whether stderr is a terminal).
    """

    def __init__(self, label: str, total: int, *, enabled: bool, interactive: bool | None = None):
        from tqdm import tqdm

        self.label, self.total, self.enabled = label, total, enabled
        self.interactive = enabled and (sys.stderr.isatty() if interactive is None else interactive)
        self._bar = tqdm(total=total, desc=f"{label:>8}", disable=not self.interactive, dynamic_ncols=True, leave=True)
        self._done = 0
        self._every = max(1, total // LOG_LINES_PER_RUN)
        self._next_line = self._every

    def update(self, n: int = 1) -> None:
        self._done += n
        self._bar.update(n)

    def set_postfix(self, *, refresh: bool = False, **stats: Any) -> None:
        """The live figures: on the bar, or (not interactive) in a line once per tenth of the run."""
        self._bar.set_postfix(refresh=refresh, **stats)
        if self.enabled and not self.interactive and (self._done >= self._next_line or self._done == self.total):
            figures = ", ".join(f"{k} {v}" for k, v in stats.items())
            print(f"[{self.label}] pass {self._done}/{self.total}: {figures}", flush=True)
            self._next_line = (self._done // self._every + 1) * self._every

    def write(self, line: str) -> None:
        """A line above the bar (stdout), whatever the display."""
        self._bar.write(line)

    def close(self) -> None:
        self._bar.close()
