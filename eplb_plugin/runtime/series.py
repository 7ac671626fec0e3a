"""One run's per-pass figures on one rank, and the per-pass stats vector the ranks all-reduce.

``PassSeries`` is sized by the run's pass count and made resident at start, so serving does
not grow memory (a run whose series would pass ``MAX_SERIES_BYTES`` per rank is refused).
``pack_pass_stats`` / ``unpack_pass_stats`` lay out the one SUM all-reduce of each pass:
the HTTP command from rank 0, every slot's received pairs, every rank's times, stop votes.
"""

from __future__ import annotations

import tracemalloc
from typing import NamedTuple

import numpy as np
import torch

from eplb_plugin.errors import ConfigError
from eplb_plugin.runtime.results import RSS_EVERY_PASSES, resident_mb

MAX_SERIES_BYTES = 4 << 30  # per-pass figures a run may keep (resident from its start)
SERIES = ("balancedness", "step_s", "compute_s", "stall_s", "gpu_load")  # one entry per pass
SAMPLED = ("rss_mb", "traced_mb")  # one entry per RSS_EVERY_PASSES passes


class PassSeries:
    """balancedness, step_s, compute_s, stall_s: [passes] float64 (stall_s: time outside the
    MoE step); gpu_load: [passes, L, W] float32 pairs each GPU computed; rss_mb, traced_mb:
    [ceil(passes / RSS_EVERY_PASSES)] this process's resident memory and the Python heap
    tracemalloc traces (0 when it is not tracing), MiB, sampled at passes 0, 250, ..."""

    def __init__(self, num_passes: int, *, num_layers: int, world_size: int):
        n = num_passes
        series_bytes = n * (4 * 8 + 4 * num_layers * world_size)
        if series_bytes > MAX_SERIES_BYTES:
            raise ConfigError(f"--num-passes {n} would keep {series_bytes / 2**30:.1f} GiB of per-pass figures on "
                              f"every rank (limit {MAX_SERIES_BYTES / 2**30:.0f} GiB); run fewer passes")
        self.balancedness = np.zeros(n)
        self.step_s = np.zeros(n)
        self.compute_s = np.zeros(n)
        self.stall_s = np.zeros(n)
        self.gpu_load = np.zeros((n, num_layers, world_size), dtype=np.float32)
        samples = (n + RSS_EVERY_PASSES - 1) // RSS_EVERY_PASSES
        self.rss_mb = np.zeros(samples)
        self.traced_mb = np.zeros(samples)
        for name in SERIES + SAMPLED:
            getattr(self, name).fill(0)  # touched now: the run's per-pass memory is resident from the start

    def sample_memory(self, p: int) -> None:
        """At every RSS_EVERY_PASSES-th pass, note this process's resident and traced memory."""
        if p % RSS_EVERY_PASSES == 0:
            self.rss_mb[p // RSS_EVERY_PASSES] = resident_mb()
            self.traced_mb[p // RSS_EVERY_PASSES] = tracemalloc.get_traced_memory()[0] / 2**20

    def truncate(self, done: int) -> None:
        """Keep the first ``done`` passes (a run that stopped early reports those)."""
        for name in SERIES:
            setattr(self, name, getattr(self, name)[:done])
        for name in SAMPLED:
            setattr(self, name, getattr(self, name)[: -(-done // RSS_EVERY_PASSES)])


class PassStats(NamedTuple):
    """One pass's all-reduced figures: the HTTP command (rank 0's), received pairs per slot
    [L, P] float64, the slowest rank's MoE step and expert compute seconds, and how many ranks
    asked to stop."""

    command: int
    slot_counts: torch.Tensor
    step_s: float
    compute_s: float
    stop_votes: int


def pack_pass_stats(received: torch.Tensor, *, command: int, rank: int, world_size: int, step_s: float,
                    compute_s: float, stop: bool) -> torch.Tensor:
    """This rank's share of the pass's SUM all-reduce: [1 + L * P + 2W + 1] float64 (command,
    received pairs [L, P] with this rank's slots filled, step times [W], compute times [W],
    stop votes). received: [L, S] this rank's slots' pairs. command: rank 0's, else ignored."""
    num_layers, num_local = received.shape
    w = world_size
    num_physical = num_local * w
    vec = torch.zeros(1 + num_layers * num_physical + 2 * w + 1, dtype=torch.float64)
    vec[-1] = float(stop)
    if rank == 0:
        vec[0] = command
    slots = vec[1 : 1 + num_layers * num_physical].view(num_layers, num_physical)
    slots[:, rank * num_local : (rank + 1) * num_local] = received.cpu().to(torch.float64)
    tail = 1 + num_layers * num_physical
    vec[tail + rank] = step_s
    vec[tail + w + rank] = compute_s
    return vec


def unpack_pass_stats(vec: torch.Tensor, *, num_layers: int, num_physical: int, world_size: int) -> PassStats:
    """The summed vector of ``pack_pass_stats`` -> PassStats."""
    w = world_size
    tail = 1 + num_layers * num_physical
    return PassStats(
        command=int(vec[0]),
        slot_counts=vec[1:tail].view(num_layers, num_physical),
        step_s=float(vec[tail : tail + w].max()),
        compute_s=float(vec[tail + w : tail + 2 * w].max()),
        stop_votes=int(vec[-1]),
    )
