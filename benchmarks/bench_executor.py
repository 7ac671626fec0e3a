"""Benchmark the executor: expert-move bandwidth vs NCCL P2P, staging memory, serving pauses.

GPU (2 GPUs):  python benchmarks/bench_executor.py --out benchmarks/results
               (self-spawns 2 ranks; also runs under `torchrun --nproc-per-node 2`)
CPU smoke:     python benchmarks/bench_executor.py --device cpu --small

Measures, in one run: (1) P2P bandwidth for 88 MB and 1 GiB messages (one way, and both ways
at once); (2) moving N DeepSeek-V3-sized experts (w13 [S, 4096, 7168] and w2 [S, 7168, 2048],
bf16; and fp8 e4m3 with float32 block scales) swapped between the two ranks, per staging
budget: GB/s received per rank, ratio to the both-ways P2P bandwidth, peak extra memory;
(3) non-blocking mode: per-step time of a loop of MoE-sized matmuls, undisturbed vs while
layers move in the background, committed one chunk per step. Rank 0 prints a table and
writes JSON under --out/<device>/.
"""

from __future__ import annotations

import os

# Keep NVLink multicast (NVLS) off on the lent machines (see the device tool's KINDS.md).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eplb_plugin.executor import AsyncExpertMover, LayerMove, move_experts  # noqa: E402

HIDDEN, INTER, BLOCK = 7168, 2048, 128  # DeepSeek-V3 expert: hidden, intermediate, fp8 block


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="results folder")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny experts (smoke test)")
    ap.add_argument("--experts", type=int, default=8, help="experts each rank receives per move")
    ap.add_argument("--budgets", default="1,2,4,8", help="staging budgets, in experts")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement")
    ap.add_argument("--layers", type=int, default=4, help="layers moved in the non-blocking test")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="per-collective timeout")
    ap.add_argument("--total-timeout-s", type=float, default=540.0, help="abort the run after this")
    return ap.parse_args(argv)


def sizes(small: bool) -> tuple[int, int, int]:
    return (64, 32, 16) if small else (HIDDEN, INTER, BLOCK)


def make_weights(slots: int, fp8: bool, small: bool, device) -> list[torch.Tensor]:
    """Per-slot tensors of one layer: w13 [S, 2*I, H], w2 [S, H, I] (+ block scales for fp8)."""
    h, i, b = sizes(small)
    dt = torch.float8_e4m3fn if fp8 else torch.bfloat16
    w = [torch.empty(slots, 2 * i, h, dtype=torch.bfloat16, device=device).normal_().to(dt),
         torch.empty(slots, h, i, dtype=torch.bfloat16, device=device).normal_().to(dt)]
    if fp8:
        w += [torch.rand(slots, 2 * i // b, h // b, device=device),
              torch.rand(slots, h // b, i // b, device=device)]
    return w


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # host timing must include the GPU work


def p2p_bandwidth(nbytes: int, device, reps: int, both_ways: bool) -> float:
    """GB/s per direction of rank 0 <-> rank 1 messages of nbytes (median of reps)."""
    rank = dist.get_rank()
    send = torch.empty(nbytes, dtype=torch.uint8, device=device)
    recv = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for rep in range(reps + 1):
        dist.barrier()  # start together, so the timing measures the transfer only
        sync(device)
        t0 = time.perf_counter()
        ops = []
        if both_ways or rank == 0:
            ops.append(dist.P2POp(dist.isend, send, 1 - rank))
        if both_ways or rank == 1:
            ops.append(dist.P2POp(dist.irecv, recv, 1 - rank))
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        sync(device)
        if rep:  # the first is a warm-up (connection set-up)
            times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slower rank's time is the transfer's
    return nbytes / float(t) / 1e9


def swap_maps(slots: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[2*slots] maps: the first n slots of each rank swap experts with the other rank."""
    old = torch.arange(2 * slots)
    new = old.clone()
    new[:n], new[slots : slots + n] = old[slots : slots + n], old[:n]
    return old, new


def bench_moves(args, device, fp8: bool, p2p_both: float) -> list[dict]:
    slots = args.experts + 2
    weights = make_weights(slots, fp8, args.small, device)
    per = sum(t[0].numel() * t.element_size() for t in weights)
    old, new = swap_maps(slots, args.experts)
    rows = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        times, peaks, res = [], [], None
        for rep in range(args.reps + 1):
            a, b = (old, new) if rep % 2 == 0 else (new, old)  # move there and back
            dist.barrier()  # start together
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            res = move_experts(weights, a, b, layer=0, budget_bytes=budget * per, timeout_s=args.timeout_s)
            sync(device)
            if rep:
                times.append(time.perf_counter() - t0)
                if device.type == "cuda":
                    peaks.append(torch.cuda.max_memory_allocated() - base)
        secs = statistics.median(times)
        gbps = res.bytes_received / secs / 1e9
        rows.append(dict(dtype="fp8+scales" if fp8 else "bf16", experts=args.experts,
                         expert_bytes=per, budget_experts=budget, rounds=res.rounds,
                         seconds=secs, GBps=gbps, ratio_to_p2p=gbps / p2p_both,
                         peak_extra_bytes=max(peaks) if peaks else None,
                         peak_extra_over_budget=(max(peaks) / (budget * per)) if peaks else None))
    return rows


def bench_pause(args, device) -> dict:
    """Step times of a matmul loop, undisturbed vs while layers move in the background."""
    h, i, _ = sizes(args.small)
    tokens = 64 if args.small else 512
    experts_per_step = 8
    x = torch.randn(tokens, h, dtype=torch.bfloat16, device=device)
    w1 = torch.randn(experts_per_step, h, 2 * i, dtype=torch.bfloat16, device=device) / h**0.5
    w2 = torch.randn(experts_per_step, i, h, dtype=torch.bfloat16, device=device) / i**0.5

    def step():
        y = x
        for e in range(experts_per_step):
            g = y @ w1[e]
            y = (torch.nn.functional.silu(g[:, :i]) * g[:, i:]) @ w2[e]
        return y

    def timed(n, between=None):
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            if between is not None:
                between()
            sync(device)  # a decode loop waits for each step's result
            out.append(time.perf_counter() - t0)
        return out

    timed(20)
    base = timed(200)
    slots = args.experts + 2
    moves = []
    for layer in range(args.layers):
        old, new = swap_maps(slots, args.experts)
        moves.append(LayerMove(layer, make_weights(slots, False, args.small, device), old, new, old.clone()))
    per = sum(t[0].numel() * t.element_size() for t in moves[0].weights)
    mover = AsyncExpertMover(budget_bytes=2 * per, timeout_s=args.timeout_s)
    dist.barrier()  # start the move on both ranks at once
    t0 = time.perf_counter()
    mover.start(moves)
    during: list[float] = []
    while not mover.done:  # every rank leaves at the same commit (done is agreed)
        during += timed(1, between=lambda: mover.commit_ready(max_layers=1))
    move_s = time.perf_counter() - t0
    mover.close()
    during = during or [float("nan")]
    med = statistics.median(base)
    p99 = sorted(during)[int(0.99 * (len(during) - 1))]
    return dict(tokens=tokens, experts_per_step=experts_per_step, layers_moved=args.layers,
                undisturbed_median_s=med, undisturbed_max_s=max(base), steps_during_move=len(during),
                during_median_s=statistics.median(during), during_p99_s=p99, during_max_s=max(during),
                max_ratio=max(during) / med, p99_ratio=p99 / med, move_seconds=move_s)


def run(rank: int, world: int, args, init_method: str | None) -> None:
    faulthandler.dump_traceback_later(args.total_timeout_s, exit=True)  # never hang the machine
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = dict(init_method=init_method, rank=rank, world_size=world) if init_method else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout_s), **kw)
    try:
        if dist.get_world_size() != 2:
            raise SystemExit("bench_executor needs exactly 2 ranks")
        scale = 1 / 64 if args.small else 1
        p2p = {}
        for name, nbytes in [("88MB", int(88e6 * scale)), ("1GiB", int((1 << 30) * scale))]:
            p2p[name] = dict(one_way_GBps=p2p_bandwidth(nbytes, device, args.reps, False),
                             both_ways_GBps=p2p_bandwidth(nbytes, device, args.reps, True))
        if rank == 0:
            print("P2P GB/s per direction:", json.dumps(p2p), flush=True)
        ref = p2p["88MB"]["both_ways_GBps"]  # the swap moves ~88 MB experts both ways at once
        moves = bench_moves(args, device, False, ref) + bench_moves(args, device, True, ref)
        if rank == 0:
            print(f"{'dtype':>10} {'budget':>6} {'rounds':>6} {'ms':>8} {'GB/s':>7} {'vs P2P':>6} {'peak/budget':>11}")
            for r in moves:
                peak = f"{r['peak_extra_over_budget']:.2f}" if r["peak_extra_over_budget"] else "n/a"
                print(f"{r['dtype']:>10} {r['budget_experts']:>6} {r['rounds']:>6} {r['seconds'] * 1e3:8.2f} "
                      f"{r['GBps']:7.2f} {r['ratio_to_p2p']:6.2f} {peak:>11}", flush=True)
        pause = bench_pause(args, device)
        if rank == 0:
            print("non-blocking pause:", json.dumps({k: round(v, 6) if isinstance(v, float) else v
                                                     for k, v in pause.items()}), flush=True)
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            out = Path(args.out) / name.replace(" ", "_")
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"bench_executor_{'small_' if args.small else ''}{time.strftime('%Y%m%d_%H%M%S')}.json"
            path.write_text(json.dumps(dict(
                device=name, torch=torch.__version__, command=" ".join(sys.argv), world_size=2,
                backend=backend, small=args.small, p2p=p2p, moves=moves, pause=pause,
                env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                    "NVSHMEM_DISABLE_NVLS")},
                notes="GBps = bytes received per rank / seconds (swap: both ways at once); "
                      "ratio_to_p2p against the both-ways 88MB P2P figure of this run"), indent=1))
            print(f"wrote {path}", flush=True)
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, args, init_method: str) -> None:
    run(rank, world, args, init_method)


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:  # under torchrun
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(2, args, f"tcp://127.0.0.1:{port}"), nprocs=2, join=True)


if __name__ == "__main__":
    main()
