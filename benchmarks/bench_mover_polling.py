"""How much a mover thread's polling slows a host-bound serving loop (CPU, the GIL).

The non-blocking mover's thread waits for each unit's agreement by polling a CUDA event
(``agreement.wait_event``) with a sleep between polls (``AsyncExpertMover(poll_s=...)``).
Each wake takes the GIL from the serving thread. When the serving loop is host-bound (eager
launches), that shows up in every step. This runs the real ``wait_event`` on an event that
never completes during the loop, beside a loop of small torch ops, and reports the loop's
median step per longest sleep (sleeps start at ``agreement.FIRST_SLEEP_S`` and double up to
it, so a wait this long polls at the longest sleep), against the same loop with no thread,
all in one run.

    python benchmarks/bench_mover_polling.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eplb_plugin.executor.agreement import Stopped, wait_event  # noqa: E402


class _Pending:
    """An event that stays pending until released (a vote still in flight)."""

    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ops", type=int, default=400, help="small torch ops per step (host-bound)")
    ap.add_argument("--sleeps", default="0.0001,0.0005,0.001,0.002", help="poll sleeps to compare, seconds")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(64, 64)

    def loop() -> float:
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            y = x
            for _ in range(args.ops):
                y = y + 1.0
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    loop()  # warm-up
    rows = [dict(poll_s=None, median_step_s=loop())]
    for sleep_s in [float(s) for s in args.sleeps.split(",")]:
        event, stop = _Pending(), threading.Event()

        def poll(event=event, stop=stop, sleep_s=sleep_s):
            try:
                wait_event(event, 3600.0, "a vote", sleep_s=sleep_s, stop=stop.is_set)
            except Stopped:
                pass

        thread = threading.Thread(target=poll)
        thread.start()
        rows.append(dict(poll_s=sleep_s, median_step_s=loop()))
        stop.set()
        thread.join()
    rows.append(dict(poll_s=None, median_step_s=loop(), note="no thread, again"))
    base = statistics.mean([rows[0]["median_step_s"], rows[-1]["median_step_s"]])
    for r in rows:
        r["ratio_to_no_thread"] = r["median_step_s"] / base
        print(f"poll_s={r['poll_s']}: median step {r['median_step_s'] * 1e3:.3f} ms, "
              f"{r['ratio_to_no_thread']:.3f}x", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mover_polling_cpu.json"
    path.write_text(json.dumps(dict(
        benchmark="mover_polling", command="python " + " ".join(["benchmarks/bench_mover_polling.py", *(argv or sys.argv[1:])]),
        python=platform.python_version(), torch=torch.__version__, cpu=platform.processor() or platform.machine(),
        steps=args.steps, ops_per_step=args.ops, rows=rows), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
