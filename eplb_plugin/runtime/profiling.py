"""Profile chosen forward passes of a run (``RuntimeConfig.profile_passes``), rank 0 only.

Each profiled pass appends to ``<profile_dir>/<run>_profile.txt``: the pass's wall time,
the host time spent inside torch ops, the device time of its kernels (summed; on CUDA),
and the top ops by device and by host time. A pass whose kernels' summed time is far
below its wall time is host-bound (launch and Python overhead, host synchronizations).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch

TOP_OPS = 25


@contextlib.contextmanager
def profile_pass(path: Path, label: str, pass_id: int, cuda: bool) -> Iterator[None]:
    """Run the body under torch.profiler and append its summary to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    # Device time: the kernels themselves (an op's row also shows its kernels' time).
    device_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA)
    host_us = sum(e.self_cpu_time_total for e in events)
    lines = [
        f"=== {label} pass {pass_id}: wall {1e3 * wall:.2f} ms, host time in ops {host_us / 1e3:.2f} ms, "
        f"device time of kernels {device_us / 1e3:.2f} ms",
    ]
    if cuda:
        lines.append(events.table(sort_by="self_cuda_time_total", row_limit=TOP_OPS))
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=TOP_OPS))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")
