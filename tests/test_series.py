"""Per-pass series and the per-pass stats vector (runtime/series.py)."""

from __future__ import annotations

import tracemalloc

import pytest
import torch

from eplb_plugin.errors import ConfigError
from eplb_plugin.runtime.results import RSS_EVERY_PASSES
from eplb_plugin.runtime.series import PassSeries, pack_pass_stats, unpack_pass_stats


def test_summed_vectors_of_every_rank_give_every_slot_and_the_slowest_rank():
    """Each rank fills its own slots and times; the SUM over ranks unpacks to the whole
    [L, P] counts, the slowest rank's step and compute times, rank 0's command and the stop votes."""
    received = [torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[7, 8, 9], [10, 11, 12]])]
    vecs = [
        pack_pass_stats(received[r], command=3, rank=r, world_size=2, step_s=[0.5, 0.75][r],
                        compute_s=[0.25, 0.125][r], stop=r == 1)
        for r in range(2)
    ]
    stats = unpack_pass_stats(vecs[0] + vecs[1], num_layers=2, num_physical=6, world_size=2)
    assert stats.slot_counts.tolist() == [[1, 2, 3, 7, 8, 9], [4, 5, 6, 10, 11, 12]]
    assert (stats.command, stats.step_s, stats.compute_s, stats.stop_votes) == (3, 0.75, 0.25, 1)


def test_truncating_keeps_the_passes_that_ran_and_their_memory_samples():
    """A run stopped after 251 passes keeps 251 entries per pass and the samples of passes 0 and 250."""
    series = PassSeries(3 * RSS_EVERY_PASSES, num_layers=2, world_size=4)
    series.truncate(RSS_EVERY_PASSES + 1)
    assert len(series.step_s) == len(series.gpu_load) == RSS_EVERY_PASSES + 1
    assert len(series.rss_mb) == len(series.traced_mb) == 2


def test_a_run_whose_series_would_not_fit_is_refused():
    """A pass count whose per-pass figures would pass the limit is refused, naming --num-passes."""
    with pytest.raises(ConfigError, match="--num-passes"):
        PassSeries(10**9, num_layers=64, world_size=64)


def test_memory_samples_hold_rss_and_the_heap_only_while_traced():
    """Passes 0 and RSS_EVERY_PASSES fill samples 0 and 1; the traced heap is 0 unless
    tracemalloc traces (then it counts what was allocated while tracing)."""
    series = PassSeries(2 * RSS_EVERY_PASSES, num_layers=1, world_size=1)
    series.sample_memory(0)
    tracemalloc.start()
    try:
        kept = [bytearray(1 << 16)]  # 64 KiB allocated while tracing
        series.sample_memory(RSS_EVERY_PASSES)
    finally:
        tracemalloc.stop()
    assert series.rss_mb[0] > 0 and series.rss_mb[1] > 0
    assert series.traced_mb[0] == 0 and series.traced_mb[1] >= len(kept[0]) / 2**20
