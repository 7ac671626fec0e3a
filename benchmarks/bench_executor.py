"""Benchmark the executor: expert-move bandwidth vs NCCL P2P, staging memory, serving pauses.

GPU (2 GPUs):  python benchmarks/bench_executor.py --out benchmarks/results
               (self-spawns 2 ranks; also runs under `torchrun --nproc-per-node 2`)
CPU smoke:     python benchmarks/bench_executor.py --device cpu --small

Measures, in one run:
(1) NCCL P2P baselines. Context: single 88 MB and 1 GiB messages, one way and both ways.
    Reference for the moves ("same bytes"): the bytes a move sends, both ways at once, in one
    ``batch_isend_irecv`` of one message per tensor (the experts' slots are consecutive);
    also, for context, one message per tensor per expert.
(2) Moving N DeepSeek-V3-sized experts (w13 [S, 4096, 7168] and w2 [S, 7168, 2048], bf16;
    and fp8 e4m3 with float32 block scales) swapped between the two ranks, per staging
    budget: GB/s, ratio to the same-bytes P2P figure, peak extra memory over the budget.
    Both (1) and (2) are timed alike: barrier, host clock around the call and a device
    sync, warm-up excluded, the median of --reps per rank, then the slower rank's median;
    GB/s = bytes received per rank / seconds (the swap sends as many bytes as it receives).
(3) Non-blocking mode: per-step time of a loop of MoE-sized matmuls (eager, and replayed as
    a CUDA graph), undisturbed vs while layers move in the background (one mover per
    variant, reused for a move there and back), committed at most one unit per step; host
    and GPU step times, and the move's duration.
(2b) The same moves as a manager pays for them: schedules computed ahead (off the timed
    path) and one staging pool made before (``moves_precomputed`` in the JSON), per
    transport in --transports: NCCL P2P, and pulls by copy engines through CUDA IPC
    (``executor/peers.py``).
(4) Whole rebalance: --rebalance-layers layers of --experts swapped experts each, one
    move_experts call per layer back to back, timed end to end (per-call costs amortized as
    in a real rebalance step), per budget; ratio against the same per-layer P2P reference.
    Also one move_layers call for all layers (``whole_rebalance_move_layers``), its own pool
    and schedules, or a shared pool and precomputed schedules, per transport.
Rank 0 prints a table and writes JSON under --out/<device>/.
"""

from __future__ import annotations

import os

# Keep NVLink multicast (NVLS) off on the lent machines (see the device tool's KINDS.md).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import gc  # noqa: E402
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
from eplb_plugin.executor import (  # noqa: E402
    AsyncExpertMover,
    LayerMove,
    LayerMoveSchedule,
    PeerViews,
    move_experts,
    move_layers,
)
from eplb_plugin.executor.transfer import prepare_staging  # noqa: E402

HIDDEN, INTER, BLOCK = 7168, 2048, 128  # DeepSeek-V3 expert: hidden, intermediate, fp8 block


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="results folder")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny experts (smoke test)")
    ap.add_argument("--experts", type=int, default=8, help="experts each rank receives per move")
    ap.add_argument("--budgets", default="1,2,4,8", help="staging budgets, in experts (pipeline=True)")
    ap.add_argument("--serial-budgets", default="2,4,8",
                    help="budgets also timed with pipeline=False (move_experts' default; budget 1 is the same either way)")
    ap.add_argument("--rebalance-layers", type=int, default=4, help="layers in the whole-rebalance figure")
    ap.add_argument("--rebalance-budgets", default="8,2,1", help="whole-rebalance staging budgets, in experts")
    ap.add_argument("--transports", default="nccl,ipc",
                    help="transports timed for precomputed moves and move_layers rebalances: nccl (P2P "
                         "kernels) and ipc (copy-engine pulls through CUDA IPC; CUDA only)")
    ap.add_argument("--reps", type=int, default=9, help="timed repetitions per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    ap.add_argument("--layers", type=int, default=8, help="layers moved in the non-blocking test")
    ap.add_argument("--pause-budget", type=int, default=2, help="non-blocking staging budget, in experts")
    ap.add_argument("--pause-variants", default="bf16:none,bf16:8,bf16:8:free,fp8:none,fp8:8",
                    help="non-blocking variants dtype:max_ctas[:free][:ipc] (none = NCCL's default; free = "
                         "pace_with_passes=False, the mover's default; ipc = copy-engine pulls)")
    ap.add_argument("--steps", type=int, default=400, help="undisturbed steps timed (before and after)")
    ap.add_argument("--pause-step-layers", type=int, default=1,
                    help="MoE layers per step of the serving loop (1: one layer's matmuls per step; "
                         "58: a DeepSeek-V3 forward pass, commits once per pass)")
    ap.add_argument("--pause-only", action="store_true", help="only the non-blocking pause measurement")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="per-collective timeout")
    ap.add_argument("--total-timeout-s", type=float, default=280.0, help="abort the run after this")
    return ap.parse_args(argv)


def sizes(small: bool) -> tuple[int, int, int]:
    return (64, 32, 16) if small else (HIDDEN, INTER, BLOCK)


def make_weights(slots: int, fp8: bool, small: bool, device, seed: int = 0) -> list[torch.Tensor]:
    """Per-slot tensors of one layer: w13 [S, 2*I, H], w2 [S, H, I] (+ block scales for fp8).

    Random, reproducible from seed (so a rank can rebuild its peer's weights to check a move)."""
    h, i, b = sizes(small)
    g = torch.Generator(device=device).manual_seed(seed)
    dt = torch.float8_e4m3fn if fp8 else torch.bfloat16
    w = [torch.empty(slots, 2 * i, h, dtype=torch.bfloat16, device=device).normal_(generator=g).to(dt),
         torch.empty(slots, h, i, dtype=torch.bfloat16, device=device).normal_(generator=g).to(dt)]
    if fp8:
        w += [torch.rand(slots, 2 * i // b, h // b, device=device, generator=g),
              torch.rand(slots, h // b, i // b, device=device, generator=g)]
    return w


def same_bytes(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(as_bytes(x), as_bytes(y)) for x, y in zip(a, b))


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # host timing must include the GPU work


def timed(fn, device, reps: int, warmup: int) -> dict:
    """Median seconds of fn(rep) over reps (after warmup), the slower rank's; plus spread.

    Each rep: barrier (both ranks start together), device sync, host clock around fn and a
    device sync. The same for P2P baselines and moves, so their ratio is like for like.
    """
    times = []
    for rep in range(warmup + reps):
        dist.barrier()  # start together: the timing measures the operation, not rank skew
        sync(device)
        t0 = time.perf_counter()
        fn(rep)
        sync(device)
        if rep >= warmup:
            times.append(time.perf_counter() - t0)
    stats = torch.tensor([statistics.median(times), min(times), max(times)], dtype=torch.float64)
    stats = stats.to(device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slower rank's time is the transfer's
    med, lo, hi = stats.tolist()
    return dict(seconds=med, min_seconds=lo, max_seconds=hi, reps=reps)


def p2p(sends: list[torch.Tensor], recvs: list[torch.Tensor]) -> None:
    """One batch_isend_irecv with the other rank: every send, then every receive."""
    peer = 1 - dist.get_rank()
    ops = [dist.P2POp(dist.isend, x, peer) for x in sends] + [dist.P2POp(dist.irecv, x, peer) for x in recvs]
    for w in dist.batch_isend_irecv(ops):
        w.wait()


def p2p_single(size: int, device, args, both_ways: bool) -> dict:
    """GB/s per direction of one message of size bytes (one way: rank 0 -> rank 1)."""
    rank = dist.get_rank()
    send = torch.empty(size, dtype=torch.uint8, device=device)
    recv = torch.empty(size, dtype=torch.uint8, device=device)
    s = [send] if both_ways or rank == 0 else []
    r = [recv] if both_ways or rank == 1 else []
    t = timed(lambda rep: p2p(s, r), device, args.reps, args.warmup)
    return dict(bytes=size, GBps=size / t["seconds"] / 1e9, **t)


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).view(torch.uint8)


def p2p_same_traffic(weights, n: int, device, args, per_expert: bool) -> dict:
    """The move's bytes, both ways, in one batch: GB/s received per rank.

    per_expert=False: one message per tensor holding all n experts (their slots are
    consecutive), the fewest messages these bytes can take: the reference for the ratio.
    per_expert=True: one message per tensor per expert, for context."""
    if per_expert:
        sends = [as_bytes(t[e]) for e in range(n) for t in weights]
    else:
        sends = [as_bytes(t[:n]) for t in weights]
    recvs = [torch.empty_like(x) for x in sends]
    t = timed(lambda rep: p2p(sends, recvs), device, args.reps, args.warmup)
    got = nbytes(recvs)
    return dict(bytes_received=got, messages_each_way=len(sends), GBps=got / t["seconds"] / 1e9, **t)


def cuda_mallocs(device) -> int:
    """cudaMalloc calls so far (the caching allocator's segments), to show none per move."""
    return torch.cuda.memory_stats(device).get("segment.all.allocated", 0) if device.type == "cuda" else 0


def swap_maps(slots: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[2*slots] maps: the first n slots of each rank swap experts with the other rank."""
    old = torch.arange(2 * slots)
    new = old.clone()
    new[:n], new[slots : slots + n] = old[slots : slots + n], old[:n]
    return old, new


def diagnostics(weights, device, args) -> dict:
    """Costs a move is built from: one expert's commit copy, one agreement round trip."""
    out = {}
    if device.type == "cuda":
        src, dst = [t[0] for t in weights], [t[1] for t in weights]
        for _ in range(3):
            for a, b in zip(dst, src):
                a.copy_(b)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ms = []
        for _ in range(10):
            start.record()
            for a, b in zip(dst, src):
                a.copy_(b)
            end.record()
            end.synchronize()  # read this copy's time
            ms.append(start.elapsed_time(end))
        per = nbytes(src)
        out["commit_one_expert_us"] = statistics.median(ms) * 1e3
        out["copy_GBps_read_plus_write"] = 2 * per / (statistics.median(ms) / 1e3) / 1e9
    flag = torch.ones(1, dtype=torch.int32, device=device)
    t = timed(lambda rep: dist.all_reduce(flag, op=dist.ReduceOp.MIN) or bool(flag.item()),
              device, max(args.reps, 20), args.warmup)
    out["agreement_roundtrip_us"] = t["seconds"] * 1e6
    return out


def traced(fn, device) -> list:
    """Run fn (one move) with the executor's timeline hook: [label, host ms, GPU ms or None]
    from the move's start; GPU times are when that stream reached the mark."""
    from eplb_plugin.executor import transfer

    dist.barrier()  # start together, as in the timed reps
    sync(device)
    transfer._TRACE = []
    try:
        fn()
        sync(device)  # every mark's event has completed
        marks = transfer._TRACE
    finally:
        transfer._TRACE = None
    (_, h0, e0) = marks[0]
    return [[label, round((h - h0) * 1e3, 3), round(e0.elapsed_time(e), 3) if e is not None and e0 is not None else None]
            for label, h, e in marks]


def bench_moves(args, device, fp8: bool) -> dict:
    slots, n, rank = args.experts + 2, args.experts, dist.get_rank()
    weights = make_weights(slots, fp8, args.small, device, seed=rank)
    per = nbytes([t[0] for t in weights])
    old, new = swap_maps(slots, n)
    # Exact check: after the swap, slots [0, n) hold the peer's original experts.
    original = [t.clone() for t in weights]
    peer = make_weights(slots, fp8, args.small, device, seed=1 - rank)
    swapped = [torch.cat([p[:n], t[n:]]) for p, t in zip(peer, original)]
    del peer
    ref = p2p_same_traffic(weights, n, device, args, per_expert=False)
    ref_per_expert = p2p_same_traffic(weights, n, device, args, per_expert=True)
    rows, rows_precomputed = [], []
    serial = {int(b) for b in args.serial_budgets.split(",") if b}
    configs = [(int(b), True) for b in args.budgets.split(",")] + [(b, False) for b in sorted(serial)]
    views = peer_views(args, [weights])
    for budget, pipeline, precomputed, transport in (
            [(b, p, False, "nccl") for b, p in configs]
            + [(b, p, True, t) for t in views for b, p in configs]):
        peaks, res = [], []
        peers = views.get(transport)
        schedules, pool = [None, None], None
        if precomputed:
            # As a manager pays: schedules (and their plans) computed ahead, off the timed path,
            # and one staging pool for the rebalance (prepare_staging), made before it.
            schedules = [LayerMoveSchedule(a, b, ep_size=2, max_staged_experts=budget, pipeline=pipeline)
                         for a, b in [(old, new), (new, old)]]
            for sched in schedules:
                for k in range(len(sched)):
                    sched.plan(k)
            pool = prepare_staging(weights, budget_bytes=budget * per, timeout_s=args.timeout_s)

        def once(rep, budget=budget, pipeline=pipeline, res=res, peaks=peaks, schedules=schedules, pool=pool,
                 peers=peers):
            a, b = (old, new) if rep % 2 == 0 else (new, old)  # move there and back
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            res.append(move_experts(weights, a, b, layer=0, budget_bytes=budget * per,
                                    timeout_s=args.timeout_s, pipeline=pipeline,
                                    staging=pool, schedule=schedules[rep % 2], peers=peers))
            if device.type == "cuda":
                sync(device)  # the last commit's copies count in the peak too
                peaks.append(torch.cuda.max_memory_allocated() - base)

        once(0)
        once(1)  # warm the allocator's cache for this pool size, then count cudaMallocs
        mallocs = cuda_mallocs(device)
        t = timed(once, device, args.reps, args.warmup)
        mallocs = cuda_mallocs(device) - mallocs
        if len(res) % 2 == 0:  # back on the old map: one more move (untimed) to check both states
            once(0)
        ok = same_bytes(weights, swapped)
        once(1)
        ok = ok and same_bytes(weights, original)
        assert ok, (f"rank {rank}: move with budget {budget} (pipeline={pipeline}, precomputed={precomputed}, "
                    f"{transport}) left wrong weights")
        trace = traced(lambda: once(0), device)  # one more move, with a timeline of its steps
        once(1)
        r = res[-1]
        gbps = r.bytes_received / t["seconds"] / 1e9
        extra = dict(precomputed_schedule=True, shared_pool=True, transport=transport) if precomputed else {}
        (rows_precomputed if precomputed else rows).append(dict(
                         dtype="fp8+scales" if fp8 else "bf16", experts=args.experts, expert_bytes=per,
                         budget_experts=budget, pipeline=pipeline, rounds=r.rounds, **extra,
                         bytes_received=r.bytes_received, weights_exact=ok, cuda_mallocs_in_timed_reps=mallocs,
                         GBps=gbps, ratio_to_p2p=gbps / ref["GBps"],
                         pool_bytes=r.peak_staging_bytes,
                         peak_extra_bytes=max(peaks) if peaks else None,
                         peak_extra_over_budget=(max(peaks) / (budget * per)) if peaks else None,
                         trace=trace, **t))
        del pool
    whole = bench_rebalance(args, device, fp8, weights, old, new, per, ref)
    return dict(p2p_same_traffic=ref, p2p_same_traffic_per_expert_messages=ref_per_expert, moves=rows,
                moves_precomputed=rows_precomputed, whole_rebalance=whole["move_experts"],
                whole_rebalance_move_layers=whole["move_layers"], diagnostics=diagnostics(weights, device, args))


def peer_views(args, layers) -> dict:
    """Per transport in --transports, the ``peers`` argument of the moves: None for nccl, the
    exchanged PeerViews for ipc (skipped, with a note, where pulls are impossible)."""
    views = {}
    for transport in args.transports.split(","):
        if transport == "nccl":
            views["nccl"] = None
        elif transport == "ipc":
            got = PeerViews.exchange([t for w in layers for t in w], dist.group.WORLD)
            if got.active:
                views["ipc"] = got
            elif dist.get_rank() == 0:
                print(f"ipc transport skipped: {got.reason}", flush=True)
        else:
            raise SystemExit(f"--transports: unknown transport {transport!r}")
    return views


def bench_rebalance(args, device, fp8: bool, weights, old, new, per: int, ref: dict) -> dict:
    """A whole rebalance: --rebalance-layers layers, each swapping --experts experts, timed end
    to end (barrier, host clock, device sync), so per-call costs are amortized over the layers
    as they are in use. GB/s = all layers' bytes received per rank / seconds; ratio against
    the same per-layer P2P reference (one layer's bytes in one batch).

    "move_experts": one move_experts call per layer back to back (as a serving engine's
    rebalance step did), a pool per call or one shared pool (made inside the timed call).
    "move_layers": one move_layers call for every layer (layer i's commit overlaps layer
    i+1's transfer where the pool holds both): its own pool and schedules, or a shared pool
    (made inside the timed call) and schedules computed ahead (off the timed path)."""
    layers = [weights] + [make_weights(len(weights[0]), fp8, args.small, device, seed=10 + k)
                          for k in range(args.rebalance_layers - 1)]
    originals = [[t.clone() for t in w] for w in layers]
    out = dict(move_experts=[], move_layers=[])
    views = peer_views(args, layers)
    budgets = [int(b) for b in args.rebalance_budgets.split(",") if b]
    variants = [("move_experts", b, sh, "nccl") for b in budgets for sh in (False, True)]
    variants += [("move_layers", b, sh, t) for t in views for b in budgets for sh in (False, True)]
    for entry, budget, shared, transport in variants:
        res = []
        peers = views[transport]
        schedules = [None, None]
        if entry == "move_layers" and shared:
            schedules = [[LayerMoveSchedule(a, b, ep_size=2, max_staged_experts=budget, pipeline=False)
                          for _ in layers] for a, b in [(old, new), (new, old)]]
            for sched in schedules[0] + schedules[1]:
                for k in range(len(sched)):
                    sched.plan(k)

        def once(rep, budget=budget, res=res, shared=shared, entry=entry, schedules=schedules, peers=peers):
            a, b = (old, new) if rep % 2 == 0 else (new, old)
            # shared: one pool for the rebalance, made (and agreed) inside the timed call
            pool = prepare_staging(layers[0], budget_bytes=budget * per, timeout_s=args.timeout_s) if shared else None
            if entry == "move_layers":
                res.append(move_layers([(w, a, b) for w in layers], budget_bytes=budget * per,
                                       timeout_s=args.timeout_s, staging=pool, schedules=schedules[rep % 2],
                                       peers=peers))
            else:
                res.append([move_experts(w, a, b, layer=k, budget_bytes=budget * per, timeout_s=args.timeout_s,
                                         staging=pool) for k, w in enumerate(layers)])

        once(0)
        once(1)
        t = timed(once, device, args.reps + (args.reps + args.warmup) % 2, args.warmup)  # ends on the old map
        exact = all(same_bytes(w, o) for w, o in zip(layers, originals))
        assert exact, (f"rank {dist.get_rank()}: whole rebalance ({entry}, budget {budget}, shared {shared}, "
                       f"{transport}) left wrong weights")
        got = sum(r.bytes_received for r in res[-1])
        gbps = got / t["seconds"] / 1e9
        row = dict(dtype="fp8+scales" if fp8 else "bf16", layers=len(layers), experts_per_layer=args.experts,
                   budget_experts=budget, pipeline=False, shared_pool=shared, rounds_per_layer=res[-1][0].rounds,
                   weights_exact=exact,
                   bytes_received=got, GBps=gbps, ratio_to_p2p=gbps / ref["GBps"], **t)
        if entry == "move_layers":
            row.update(entry=entry, precomputed_schedules=shared, transport=transport,
                       trace=traced(lambda once=once: once(0), device))  # one more rebalance, with a timeline
            once(1)  # back on the old map
        out[entry].append(row)
    return out


def checks(args, device) -> dict:
    """Correctness on this backend: verify mode, a failure injected mid-move (pipelined),
    and the non-blocking mover with verify. Weights are checked exactly against the maps."""
    from eplb_plugin.executor import LayerMoveError
    from eplb_plugin.executor.rounds import schedule_layer_move

    slots, n, rank = args.experts + 2, args.experts, dist.get_rank()
    mine = make_weights(slots, False, args.small, device, seed=rank)
    peer = make_weights(slots, False, args.small, device, seed=1 - rank)
    weights = [t.clone() for t in mine]
    per = nbytes([t[0] for t in weights])
    old, new = swap_maps(slots, n)

    def exact(m: torch.Tensor) -> bool:
        """Slot j of this rank holds expert m[rank*S+j], originally at rank e // S, slot e % S."""
        want = [torch.stack([(mine if e // slots == rank else peer)[i][e % slots]
                             for e in m[rank * slots : (rank + 1) * slots].tolist()]) for i in range(len(mine))]
        return same_bytes(weights, want)

    out = {}
    move_experts(weights, old, new, budget_bytes=2 * per, verify=True, timeout_s=args.timeout_s)
    out["verify_mode_exact"] = exact(new)
    move_experts(weights, new, old, budget_bytes=2 * per, timeout_s=args.timeout_s)

    def failing_move(src, dst, expect, *, fail_rank: int, fail_round: int, **kw) -> tuple[dict, torch.Tensor]:
        """Move src -> dst with ``fail_rank`` failing after staging round ``fail_round``; every
        rank must raise, stay on ``expect`` (error and live_map), with weights exact for it.
        Returns (raised, left_expected, weights_exact) and the live map."""
        calls = []

        def hook(point, r, layer):
            calls.append(point)
            if point == "after_staging" and calls.count(point) == fail_round and r == fail_rank:
                raise RuntimeError("injected")

        live = src.clone()
        try:
            move_experts(weights, src, dst, live_map=live, fault_hook=hook, timeout_s=args.timeout_s, **kw)
            return {"raised": False}, live
        except LayerMoveError as exc:
            left = bool(torch.equal(exc.live_physical_to_logical_map, expect) and torch.equal(live, expect))
            sync(device)
            return {"raised": True, "left": left, "exact": exact(expect)}, live

    # Pipelined rounds of two experts: rank 0 fails in round 2; every rank stays on round 1's map.
    sched = schedule_layer_move(old, new, ep_size=2, max_staged_experts=2)
    got, live = failing_move(old, new, sched.maps[0], fail_rank=0, fail_round=2, budget_bytes=2 * per, pipeline=True)
    out["failure_raised"] = got["raised"]
    if got["raised"]:
        out["failure_left_round1_map"], out["failure_weights_exact"] = got["left"], got["exact"]
    move_experts(weights, live, new, budget_bytes=2 * per, timeout_s=args.timeout_s)
    out["retry_exact"] = exact(new)
    # Deferred votes (rounds of one expert, one at a time): rank 1 fails in round 3; every
    # rank must stay on round 2's map, with exact weights, and a retry must complete.
    sched1 = schedule_layer_move(new, old, ep_size=2, max_staged_experts=1, pipeline=False)
    got, live = failing_move(new, old, sched1.maps[1], fail_rank=1, fail_round=3, budget_bytes=per)
    out["deferred_failure_raised"] = got["raised"]
    if got["raised"]:
        out["deferred_failure_left_round2_map"], out["deferred_failure_weights_exact"] = got["left"], got["exact"]
    move_experts(weights, live, old, budget_bytes=per, timeout_s=args.timeout_s)
    out["deferred_retry_exact"] = exact(old)
    move_experts(weights, old, new, budget_bytes=per, timeout_s=args.timeout_s)
    out["deferred_there_exact"] = exact(new)
    mover = AsyncExpertMover(budget_bytes=2 * per, verify=True, timeout_s=args.timeout_s)
    for a, b in [(new, old), (old, new)]:
        mover.start([LayerMove(0, weights, a, b, a.clone())])
        while not mover.done:
            mover.commit_ready(max_layers=1)
        mover.close()
        sync(device)
        out[f"nonblocking_verify_exact_{'back' if b is old else 'there'}"] = exact(b)
    return out


def bench_pause(args, device) -> dict:
    """Step times of a matmul loop, undisturbed vs while layers move in the background.

    A step: ``--pause-step-layers`` layers of 8 experts' MoE matmuls on 512 tokens (1: one
    layer, the strictest; a model's MoE layer count: a forward pass), launched eagerly or
    replayed as a CUDA graph (as a decode loop runs), then ``commit_ready`` (the pass
    boundary), then a wait for the serving stream (a decode loop waits for its step's
    result, not for other streams). Host time per step, and GPU time (events on the serving
    stream)."""
    h, i, _ = sizes(args.small)
    tokens = 64 if args.small else 512
    experts_per_step = 8
    layers_per_step = args.pause_step_layers
    x = torch.randn(tokens, h, dtype=torch.bfloat16, device=device)
    w1 = torch.randn(experts_per_step, h, 2 * i, dtype=torch.bfloat16, device=device) / h**0.5
    w2 = torch.randn(experts_per_step, i, h, dtype=torch.bfloat16, device=device) / i**0.5
    cuda = device.type == "cuda"

    def step():
        y = x
        for _ in range(layers_per_step):
            for e in range(experts_per_step):
                g = y @ w1[e]
                y = (torch.nn.functional.silu(g[:, :i]) * g[:, i:]) @ w2[e]
        return y

    graph = None
    if cuda:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())  # capture after the inputs exist
        with torch.cuda.stream(side):
            for _ in range(3):
                step()  # warm up cuBLAS outside the capture
        torch.cuda.current_stream().wait_stream(side)  # capture after the warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()

    def loop(mode, n=None, mover=None):
        """Per step: host s, GPU s, units committed; n steps, or until the mover is done."""
        run_step = graph.replay if mode == "graph" else step
        host, gpu, commits, events = [], [], [], []
        while (mover is None and len(host) < n) or (mover is not None and not mover.done):
            t0 = time.perf_counter()
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            run_step()
            if mover is not None:  # the pass boundary, after the pass's kernels are queued
                commits.append(len(mover.commit_ready(max_layers=1)))
            if cuda:
                e1.record()
                torch.cuda.current_stream().synchronize()  # the step's result (serving stream only)
                events.append((e0, e1))
            host.append(time.perf_counter() - t0)
        gpu = [a.elapsed_time(b) / 1e3 for a, b in events] if cuda else list(host)
        return host, gpu, commits

    def stats(times, med):
        s = sorted(times)
        return dict(steps=len(s), median_ratio=statistics.median(s) / med,
                    p99_ratio=s[int(0.99 * (len(s) - 1))] / med, max_ratio=s[-1] / med)

    modes = ["eager", "graph"] if cuda else ["eager"]
    gc.disable()  # Python's collector pauses are not the mover's; off for every loop alike
    try:
        undisturbed = {}
        for mode in modes:
            loop(mode, max(3, 50 // layers_per_step))  # warm-up
            undisturbed[mode] = [loop(mode, args.steps)]
        slots = args.experts + 2
        variants = []
        for spec in args.pause_variants.split(","):
            dtype, ctas, *flags = spec.split(":")
            max_ctas = None if ctas == "none" else int(ctas)
            paced = "free" not in flags
            transport = "ipc" if "ipc" in flags else "nccl"
            rank, n = dist.get_rank(), args.experts
            layers = [make_weights(slots, dtype == "fp8", args.small, device, seed=k * 2 + rank)
                      for k in range(args.layers)]
            peer = make_weights(slots, dtype == "fp8", args.small, device, seed=1 - rank)
            swapped = [torch.cat([p[:n], t[n:]]) for p, t in zip(peer, layers[0])]
            del peer
            per = nbytes([t[0] for t in layers[0]])
            old, new = swap_maps(slots, args.experts)
            try:
                mover = AsyncExpertMover(budget_bytes=args.pause_budget * per, timeout_s=args.timeout_s,
                                         transfer_max_ctas=max_ctas, pace_with_passes=paced, transport=transport)
            except Exception as exc:  # e.g. NCCL config unsupported: record, go on
                variants.append(dict(dtype=dtype, transfer_max_ctas=max_ctas, error=f"{type(exc).__name__}: {exc}"))
                continue
            for mode in modes:
                row = dict(mode=mode, dtype=dtype, transfer_max_ctas=max_ctas, paced=paced, transport=transport,
                           budget_experts=args.pause_budget,
                           layers=args.layers, experts_per_layer=args.experts, expert_bytes=per)
                runs = []
                for a, b in [(old, new), (new, old)]:  # one mover, two rebalances
                    moves = [LayerMove(k, w, a, b, a.clone()) for k, w in enumerate(layers)]
                    dist.barrier()  # start the move on both ranks at once
                    t0 = time.perf_counter()
                    mover.start(moves)
                    res = loop(mode, mover=mover)
                    move_s = time.perf_counter() - t0
                    mover.close()
                    assert all(torch.equal(m.live_map, b) for m in moves)
                    if a is old:  # exact weights after the first rebalance, layer 0
                        sync(device)
                        row["weights_exact"] = same_bytes(layers[0], swapped)
                    runs.append((res, move_s))
                moved = 2 * args.layers * args.experts * per
                row.update(move_seconds=[r[1] for r in runs], move_GBps_received=moved / sum(r[1] for r in runs) / 1e9,
                           _host=[t for r in runs for t in r[0][0]], _gpu=[t for r in runs for t in r[0][1]],
                           _commits=[c for r in runs for c in r[0][2]])
                variants.append(row)
            del mover, layers, swapped
            torch.cuda.empty_cache() if cuda else None
        for mode in modes:
            undisturbed[mode].append(loop(mode, args.steps))
    finally:
        gc.enable()
    base = {}
    for mode in modes:
        (h0, g0, _), (h1, g1, _) = undisturbed[mode]
        base[mode] = dict(host_median_s=statistics.median(h0 + h1), gpu_median_s=statistics.median(g0 + g1))
        base[mode].update(host=stats(h0 + h1, base[mode]["host_median_s"]),
                          gpu=stats(g0 + g1, base[mode]["gpu_median_s"]))
    for row in variants:
        if "_host" not in row:
            continue
        host, gpu, commits = row.pop("_host"), row.pop("_gpu"), row.pop("_commits")
        b = base[row["mode"]]
        for name, times, med in [("host", host, b["host_median_s"]), ("gpu", gpu, b["gpu_median_s"])]:
            row[name] = stats(times, med)
            quiet = [t for t, c in zip(times, commits) if c == 0]
            busy = [t for t, c in zip(times, commits) if c > 0]
            row[name]["max_ratio_steps_without_commit"] = max(quiet) / med if quiet else None
            row[name]["p99_ratio_steps_without_commit"] = (sorted(quiet)[int(0.99 * (len(quiet) - 1))] / med
                                                           if quiet else None)
            row[name]["max_ratio_steps_with_commit"] = max(busy) / med if busy else None
        row["steps_with_commit"] = sum(c > 0 for c in commits)
    return dict(tokens=tokens, experts_per_step=experts_per_step, layers_per_step=layers_per_step,
                undisturbed=base, variants=variants)


def bench_transfers(args, device, rank: int, scale: float) -> tuple[dict, dict, dict]:
    """P2P baselines, moves, whole rebalances and the failure checks (printed on rank 0)."""
    single = {}
    for name, size in [("88MB", int(88e6 * scale)), ("1GiB", int((1 << 30) * scale))]:
        single[name] = dict(one_way=p2p_single(size, device, args, False),
                            both_ways=p2p_single(size, device, args, True))
    if rank == 0:
        print("P2P single message GB/s per direction:",
              {k: {d: round(v[d]["GBps"], 1) for d in v} for k, v in single.items()}, flush=True)
    moves = {"bf16": bench_moves(args, device, False), "fp8+scales": bench_moves(args, device, True)}
    if rank == 0:
        for name, m in moves.items():
            ref = m["p2p_same_traffic"]
            pe = m["p2p_same_traffic_per_expert_messages"]
            print(f"{name}: same-bytes P2P {ref['GBps']:.1f} GB/s ({ref['seconds'] * 1e3:.2f} ms, "
                  f"{ref['messages_each_way']} messages each way); per-expert messages {pe['GBps']:.1f} GB/s "
                  f"({pe['messages_each_way']}); diagnostics "
                  f"{json.dumps({k: round(v, 1) for k, v in m['diagnostics'].items()})}", flush=True)
        print(f"{'dtype':>10} {'budget':>6} {'pipe':>5} {'rounds':>6} {'ms':>8} {'GB/s':>7} {'vs P2P':>6} "
              f"{'peak/budget':>11}", flush=True)
        for m in moves.values():
            for r in m["moves"]:
                if r["budget_experts"] in (1, 8) and not r["pipeline"] or r["budget_experts"] == 1:
                    print(f"  trace {r['dtype']} budget {r['budget_experts']}:",
                          " ".join(f"{a}={b}/{c}" for a, b, c in r["trace"]), flush=True)
        for m in moves.values():
            for r in m["moves"]:
                peak = f"{r['peak_extra_over_budget']:.4f}" if r["peak_extra_over_budget"] else "n/a"
                print(f"{r['dtype']:>10} {r['budget_experts']:>6} {str(r['pipeline']):>5} {r['rounds']:>6} "
                      f"{r['seconds'] * 1e3:8.2f} {r['GBps']:7.1f} {r['ratio_to_p2p']:6.3f} {peak:>11}",
                      flush=True)
        for m in moves.values():
            for r in m["moves_precomputed"]:
                print(f"precomputed schedule + shared pool, {r['transport']}: {r['dtype']:>10} budget {r['budget_experts']} "
                      f"pipe {str(r['pipeline']):>5} rounds {r['rounds']}: {r['seconds'] * 1e3:8.2f} ms "
                      f"{r['GBps']:7.1f} GB/s {r['ratio_to_p2p']:6.3f} of P2P", flush=True)
        for m in moves.values():
            for r in m["whole_rebalance"]:
                print(f"whole rebalance {r['dtype']:>10} {r['layers']} layers x {r['experts_per_layer']} experts, "
                      f"budget {r['budget_experts']} {'one pool ' if r['shared_pool'] else 'pool/layer'}: {r['seconds'] * 1e3:8.2f} ms {r['GBps']:7.1f} GB/s "
                      f"{r['ratio_to_p2p']:6.3f} of P2P", flush=True)
            for r in m["whole_rebalance_move_layers"]:
                how = "shared pool, precomputed schedules" if r["shared_pool"] else "own pool and schedules"
                print(f"whole rebalance move_layers, {r['transport']}: {r['dtype']:>10} {r['layers']} layers x {r['experts_per_layer']} "
                      f"experts, budget {r['budget_experts']} ({how}): {r['seconds'] * 1e3:8.2f} ms "
                      f"{r['GBps']:7.1f} GB/s {r['ratio_to_p2p']:6.3f} of P2P", flush=True)
    checked = checks(args, device)
    if rank == 0:
        print("checks:", json.dumps(checked), flush=True)
    return single, moves, checked


def run(rank: int, world: int, args, init_method: str | None) -> None:
    faulthandler.dump_traceback_later(args.total_timeout_s, exit=True)  # never hang the machine
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = dict(init_method=init_method, rank=rank, world_size=world) if init_method else {}
    if device.type == "cuda":
        kw["device_id"] = device  # create the communicator now: out of every timing
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout_s), **kw)
    t_start = time.perf_counter()
    try:
        if dist.get_world_size() != 2:
            raise SystemExit("bench_executor needs exactly 2 ranks")
        scale = 1 / 64 if args.small else 1
        single, moves, checked = ({}, {}, {}) if args.pause_only else bench_transfers(args, device, rank, scale)
        pause = bench_pause(args, device)
        if rank == 0:
            print("undisturbed:", json.dumps(pause["undisturbed"], default=lambda x: x), flush=True)

            def short(x):
                if isinstance(x, float):
                    return round(x, 3)
                if isinstance(x, list):
                    return [short(y) for y in x]
                if isinstance(x, dict):
                    return {k: short(v) for k, v in x.items() if v is not None}
                return x

            for v in pause["variants"]:
                print("non-blocking:", json.dumps(short({k: x for k, x in v.items()
                                                         if k not in ("layers", "experts_per_layer", "expert_bytes")})),
                      flush=True)
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            out = Path(args.out) / name.replace(" ", "_")
            out.mkdir(parents=True, exist_ok=True)
            kind = ("small_" if args.small else "") + ("pause_" if args.pause_only else "")
            path = out / f"bench_executor_{kind}{time.strftime('%Y%m%d_%H%M%S')}.json"
            path.write_text(json.dumps(dict(
                device=name, torch=torch.__version__, nccl=".".join(map(str, torch.cuda.nccl.version()))
                if device.type == "cuda" else None, command=" ".join(sys.argv), world_size=2,
                backend=backend, small=args.small, wall_seconds=time.perf_counter() - t_start,
                p2p_single=single, moves=moves, checks=checked, pause=pause,
                env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                    "NVSHMEM_DISABLE_NVLS")},
                notes="GBps = bytes received per rank / seconds (swap: as many bytes sent as received, "
                      "both ways at once); ratio_to_p2p = move GBps / p2p_same_traffic GBps of its dtype "
                      "(the same bytes both ways in one batch, one message per tensor: the fewest messages); "
                      "all timings: median of reps after warm-up, slower rank, communicator creation "
                      "excluded; pause ratios over the undisturbed median step of the same mode (host "
                      "clock, and GPU events on the serving stream)"), indent=1))
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
