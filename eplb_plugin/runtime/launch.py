"""Start the EP ranks: in-process (one rank), local spawn, ``torchrun``, or several machines.

- ``torchrun``: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT are set; this
  process is one rank (``init_method="env://"``).
- Local spawn (default): ``--ep-size / --nnodes`` processes on this node through
  ``torch.multiprocessing.spawn``; with ``--nnodes 1`` the rendezvous is 127.0.0.1 on a
  port free at run time, else ``--dist-init-addr host:port`` with global rank
  ``node_rank * ranks_per_node + local_rank``.
- One rank (``--ep-size 1``): no process group, no communication.

Rank 0 serves HTTP (when asked), shows the progress bar, and writes the runs' results to
``cfg.result_path`` as JSON (``{"results": [...], "failure": line or null}``), which the
launching process reads back. Local spawn: the launcher hosts the ranks' store on
127.0.0.1, watches them (``runtime/supervise.py``): SIGINT / SIGTERM stop every rank at a
pass boundary with the results of the passes that ran; a rank that dies or stops answering
makes the others stop with one line naming it; either way ``launch`` raises LaunchError
carrying those results, after every rank was reaped and the temporary file removed.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import socket
import tempfile
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from eplb_plugin.args import EPLBArgs, dist_init_host_port
from eplb_plugin.errors import ConfigError, EPLBError
from eplb_plugin.runtime.agreement import check_nodes_agree
from eplb_plugin.runtime.config import RunSpec, RuntimeConfig
from eplb_plugin.runtime.http import ControlChannel, ControlServer, check_listen_address
from eplb_plugin.runtime.supervise import (
    ERROR_EXIT,
    PEER_GRACE_S,
    PEER_LOST_EXIT,
    RUNTIME_ERROR_EXIT,
    LaunchError,
    PeerLostError,
    RendezvousError,
    clear_stop,
    host_store,
    install_rank_handlers,
    mark_error,
    read_error_files,
    read_results,
    stop_exit_code,
    stop_on_signals,
    supervise,
)

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_rank(
    rank: int, world_size: int, local_rank: int, cfg: RuntimeConfig, runs: Sequence[RunSpec], *,
    init_method: str | None, local_world_size: int = 1, store: Any = None,
) -> list[dict[str, Any]] | None:
    """Run every RunSpec in order on this rank. Collective over all ranks; rank 0 returns results.

    store: the launcher's TCPStore (local spawn) for the process group and lost-peer marks;
    None: ``init_method``. A run that stops early (a stop request) ends the launch after it.
    Raises PeerLostError (its one line) when a peer died or stopped answering; rank 0 has
    then written the results of what ran to ``cfg.result_path``.
    """
    from eplb_plugin.runtime.engine import RankEngine
    from eplb_plugin.runtime.serving import RunLoop

    if cfg.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cfg.threads_per_rank or max(1, (os.cpu_count() or 1) // local_world_size))
    group = None
    if world_size > 1:
        import torch.distributed as dist

        backend = "nccl" if cfg.device == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, init_method=None if store is not None else init_method, store=store,
                                    rank=rank, world_size=world_size, timeout=timedelta(seconds=cfg.timeout_s))
        except RuntimeError as exc:  # DistStoreError (peers missing), a refused or unreachable address
            raise _rendezvous_error(exc, init_method, world_size=world_size, timeout_s=cfg.timeout_s) from None
        group = dist.group.WORLD
        check_nodes_agree(cfg, runs, rank=rank, ranks_per_node=local_world_size, group=group)
    if cfg.ready_file:
        Path(f"{cfg.ready_file}.rank{rank}.pid").write_text(str(os.getpid()))  # tests signal ranks by pid
    channel = server = metrics = None
    if rank == 0 and cfg.http_port is not None:
        channel = ControlChannel(stall_s=cfg.stall_s)
        metrics = _make_metrics()
        channel.render_metrics = metrics.render  # /metrics: loads, balancedness, rebalances
        server = ControlServer(channel, host=cfg.http_host, port=cfg.http_port).start()
        print(f"HTTP on {server.url} (/health /metrics /start|stop|dump_expert_distribution_record)", flush=True)
        if cfg.ready_file:
            Path(cfg.ready_file).write_text(server.url)
    results: list[dict[str, Any]] = []
    lost: PeerLostError | None = None
    try:
        for run in runs:
            run_metrics = metrics if rank == 0 else None
            if run_metrics is None and run.eplb.enable_expert_distribution_metrics:
                run_metrics = _make_metrics()
            engine = RankEngine(cfg, run, rank=rank, world_size=world_size, group=group, device=device,
                                channel=channel, metrics=run_metrics, store=store)
            try:
                result = RunLoop(engine).run()
            except PeerLostError as exc:
                lost = exc
                if exc.partial is not None:
                    results.append(exc.partial)
                break
            results.append(result)
            stopped = engine.stopped
            del engine  # free this run's weights before the next run allocates its own
            if stopped:
                break
        if group is not None and lost is None:
            import torch.distributed as dist

            dist.barrier(group=group)  # no rank tears gloo down while a peer still talks to it
    finally:
        if server is not None:
            server.close()
        if group is not None and lost is None:
            import torch.distributed as dist

            # Work objects and groups caught in reference cycles (errors keep frames alive) must
            # go before the group does: gloo aborts the process when they outlive it.
            gc.collect()
            dist.destroy_process_group()
    if rank == 0 and cfg.result_path:
        Path(cfg.result_path).write_text(json.dumps({"results": results, "failure": str(lost) if lost else None}))
    if lost is not None:
        raise lost
    return results if rank == 0 else None


def _rendezvous_error(exc: RuntimeError, init_method: str | None, *, world_size: int,
                      timeout_s: float) -> RendezvousError:
    """The process group did not form: one line saying where, how many ranks joined (when
    the store says) and within which timeout."""
    where = (init_method or "env://").removeprefix("tcp://")
    joined = re.search(r"(\d+)/(\d+) clients joined", str(exc))
    if joined:
        return RendezvousError(f"only {joined[1]} of {world_size} ranks joined at {where} "
                               f"within --dist-timeout-s {timeout_s}")
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return RendezvousError(f"could not join the {world_size} ranks at {where} within --dist-timeout-s "
                           f"{timeout_s} ({first})")


def _make_metrics() -> Any:
    from eplb_plugin.metrics import EPLBMetrics

    return EPLBMetrics()


def _spawn_entry(local_rank: int, node_rank: int, ranks_per_node: int, world_size: int, cfg: RuntimeConfig,
                 runs: Sequence[RunSpec], init_method: str, store_addr: tuple[str, int] | None,
                 launcher_pid: int) -> None:
    """A spawned rank: its signals (SIGTERM stops at a pass boundary, SIGINT is the
    launcher's), then ``run_rank``. A lost peer ends the process with its one line and
    PEER_LOST_EXIT, without tearing down the broken process group."""
    import sys

    install_rank_handlers(launcher_pid)
    import threading

    from tqdm import tqdm

    # tqdm's default lock holds a multiprocessing semaphore, which a rank that is killed (or
    # exits at once after a lost peer) would leak into the launcher's resource tracker.
    tqdm.set_lock(threading.RLock())
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank = node_rank * ranks_per_node + local_rank
    store = None
    if store_addr is not None:
        import torch.distributed as dist

        store = dist.TCPStore(store_addr[0], store_addr[1], world_size, False, timedelta(seconds=cfg.timeout_s))
    try:
        run_rank(rank, world_size, local_rank, cfg, runs, init_method=init_method,
                 local_world_size=ranks_per_node, store=store)
    except PeerLostError as exc:
        print(exc, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(PEER_LOST_EXIT)  # the group is broken: no teardown (gloo may abort in it)
    except RendezvousError as exc:  # the group never formed: a runtime failure, one line
        _exit_with_line(f"rank {rank}: {exc}", store=store, rank=rank, result_path=cfg.result_path,
                        code=RUNTIME_ERROR_EXIT)
    except EPLBError as exc:  # bad input found on this rank: one line, not a traceback
        _exit_with_line(f"rank {rank}: {exc}", store=store, rank=rank, result_path=cfg.result_path,
                        code=ERROR_EXIT)


def _exit_with_line(line: str, *, store: Any, rank: int, result_path: str | None, code: int) -> None:
    """End a spawned rank with its one line: the launcher prints it (from its store or the
    rank's error file); the rank prints it itself only where the launcher cannot."""
    import sys

    if not mark_error(store, rank, line, result_path=result_path):
        print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def launch(cfg: RuntimeConfig, runs: Sequence[RunSpec], dist_args: EPLBArgs) -> list[dict[str, Any]] | None:
    """Start the ranks as ``dist_args`` (ep_size, nnodes, node_rank, dist_init_addr) say.

    Returns the runs' results (rank 0's process / node 0's launcher), None elsewhere.
    Raises LaunchError (with the results of what ran) when a stop signal ended the runs
    early or a rank was lost.
    """
    ep_size = dist_args.ep_size
    check_runs(cfg, runs, ep_size)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    hosts_rank_zero = os.environ["RANK"] == "0" if torchrun else dist_args.node_rank == 0
    if cfg.http_port is not None and hosts_rank_zero:
        check_listen_address(cfg.http_host, cfg.http_port)  # rank 0 serves HTTP: a bad --port or --host stops here
    if torchrun:
        world = int(os.environ["WORLD_SIZE"])
        if world != ep_size:
            raise ConfigError(f"torchrun started {world} processes but --ep-size is {ep_size}; make them equal")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        install_rank_handlers(None)
        return _stopped_check(run_rank(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)), cfg,
                                       runs, init_method="env://", local_world_size=local_world))
    if ep_size == 1:
        clear_stop()
        with stop_on_signals():
            return _stopped_check(run_rank(0, 1, 0, cfg, runs, init_method=None))
    if cfg.device == "cuda" and torch.cuda.device_count() < dist_args.num_gpus_per_node:
        raise ConfigError(
            f"--ep-size {ep_size} over --nnodes {dist_args.nnodes} needs {dist_args.num_gpus_per_node} GPUs "
            f"per node; this one has {torch.cuda.device_count()}"
        )
    store = None
    store_addr = None
    if dist_args.nnodes > 1:
        host, port = dist_init_host_port(dist_args.dist_init_addr)
        init_method = f"tcp://{host}:{port}"
    else:
        # The launcher serves the ranks' store, on 127.0.0.1 only; it outlives any rank.
        store, store_port = host_store("127.0.0.1", timeout_s=cfg.timeout_s)
        store_addr = ("127.0.0.1", store_port)
        init_method = f"tcp://127.0.0.1:{store_port}"
    owns_result = cfg.result_path is None
    if owns_result:
        fd, result_path = tempfile.mkstemp(prefix="eplb_runtime_", suffix=".json")
        os.close(fd)
    else:
        result_path = cfg.result_path
    cfg = cfg.replace(result_path=result_path)
    import torch.multiprocessing as mp

    ranks_per_node = dist_args.num_gpus_per_node
    ctx = mp.get_context("spawn")
    processes = [
        ctx.Process(target=_spawn_entry, name=f"eplb-rank{dist_args.node_rank * ranks_per_node + i}",
                    args=(i, dist_args.node_rank, ranks_per_node, ep_size, cfg, tuple(runs), init_method,
                          store_addr, os.getpid()))
        for i in range(ranks_per_node)
    ]
    try:
        for p in processes:
            p.start()
        outcome = supervise(processes, store, grace_s=cfg.timeout_s + 2 * PEER_GRACE_S)
        if store is None:  # several nodes: the ranks' error lines are in files
            read_error_files(outcome, result_path, [dist_args.node_rank * ranks_per_node + i
                                                    for i in range(ranks_per_node)])
        if dist_args.node_rank != 0:
            if not outcome.ok:
                raise LaunchError(outcome.summary(), results=[], exit_code=outcome.exit_code)
            return None
        results, failure = read_results(result_path)
        if not outcome.ok:
            raise LaunchError(outcome.summary(), results=results, exit_code=outcome.exit_code)
        return _stopped_check(results)
    finally:
        for p in processes:  # only where the launcher itself failed: never leave a rank behind
            if p.is_alive():
                p.kill()
                p.join()
        if owns_result:
            Path(result_path).unlink(missing_ok=True)


def check_runs(cfg: RuntimeConfig, runs: Sequence[RunSpec], ep_size: int) -> None:
    """Check each run's slot count and load its ``--init-expert-location`` here, before any
    rank starts, so that a bad flag or file is one typed error (ConfigError,
    ExpertLocationFileError) from the launcher."""
    from eplb_plugin.algorithms import split_for_dispatch
    from eplb_plugin.location_files import load_init_expert_location

    model = cfg.model
    check_device_flags(cfg, runs)
    for run in runs:
        args = run.eplb
        if run.workload.kind == "trace":  # the files' shapes against the model's, as each rank would
            run.workload.build(model, cfg.batch_tokens)
        redundant = args.ep_num_redundant_experts
        num_slots = model.num_logical_experts + redundant
        if num_slots % ep_size:
            raise ConfigError(
                f"--ep-num-redundant-experts {redundant}: {model.num_logical_experts} experts + {redundant} "
                f"redundant = {num_slots} slots, not divisible by --ep-size {ep_size} "
                f"(use --ep-num-redundant-experts {redundant - num_slots % ep_size + ep_size})"
            )
        if args.init_expert_location == "trivial":
            continue
        load_init_expert_location(
            args.init_expert_location, num_layers=model.num_layers, num_logical_experts=model.num_logical_experts,
            num_physical_experts=model.num_logical_experts + args.ep_num_redundant_experts, ep_size=ep_size,
            num_nodes=args.nnodes, num_groups=model.num_groups,
            algorithm=args.policy(model.num_groups), split=split_for_dispatch(args.ep_dispatch_algorithm),
            dispatch=args.ep_dispatch_algorithm,
        )


def check_device_flags(cfg: RuntimeConfig, runs: Sequence[RunSpec]) -> None:
    """Refuse, before any rank starts, the flags that ``--device`` makes impossible and each
    rank would refuse on its own: a pull-only ``--eplb-transport`` (CUDA IPC) off CUDA, and
    ``--ep-dispatch-backend triton`` where triton is missing or, on CPU, without
    TRITON_INTERPRET=1 (``kernels/_launch.triton_unusable``, as the kernels decide)."""
    from eplb_plugin.kernels._launch import triton_unusable
    from eplb_plugin.transports import TRANSPORTS

    for run in runs:
        transport = TRANSPORTS.get(run.eplb.eplb_transport)
        if run.eplb.enable_eplb and transport.requires_pulls and cfg.device != "cuda":
            others = [name for name in TRANSPORTS if not TRANSPORTS.get(name).requires_pulls]
            raise ConfigError(f"--eplb-transport {transport.name} pulls weights through CUDA IPC, which "
                              f"--device {cfg.device} cannot do; use --eplb-transport {' or '.join(others)}")
    problem = triton_unusable(cfg.device) if cfg.dispatch_backend == "triton" else None
    if problem is not None:
        raise ConfigError(f"--ep-dispatch-backend triton with --device {cfg.device}: {problem}; use "
                          "--ep-dispatch-backend torch or auto")


def _stopped_check(results: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Results whose last run stopped early (a stop request) end in LaunchError."""
    if results and results[-1].get("stopped"):
        raise LaunchError(results[-1]["stopped"], results=results, exit_code=stop_exit_code())
    return results
