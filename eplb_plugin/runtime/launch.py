"""Start the EP ranks: in-process (one rank), local spawn, ``torchrun``, or several machines.

- ``torchrun``: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT are set; this
  process is one rank (``init_method="env://"``).
- Local spawn (default): ``--ep-size / --nnodes`` processes on this node through
  ``torch.multiprocessing.spawn``; with ``--nnodes 1`` the rendezvous is 127.0.0.1 on a
  port free at run time, else ``--dist-init-addr host:port`` with global rank
  ``node_rank * ranks_per_node + local_rank``.
- One rank (``--ep-size 1``): no process group, no communication.

Rank 0 serves HTTP (when asked), shows the progress bar, and writes the runs' results to
``cfg.result_path`` as JSON, which the launching process reads back.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import tempfile
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from eplb_plugin.args import EPLBArgs
from eplb_plugin.errors import ConfigError
from eplb_plugin.runtime.config import RunSpec, RuntimeConfig
from eplb_plugin.runtime.http import ControlChannel, ControlServer

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_rank(
    rank: int, world_size: int, local_rank: int, cfg: RuntimeConfig, runs: Sequence[RunSpec], *,
    init_method: str | None, local_world_size: int = 1,
) -> list[dict[str, Any]] | None:
    """Run every RunSpec in order on this rank. Collective over all ranks; rank 0 returns results."""
    from eplb_plugin.runtime.engine import RankEngine

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
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=cfg.timeout_s))
        group = dist.group.WORLD
    channel = server = metrics = None
    if rank == 0 and cfg.http_port is not None:
        channel = ControlChannel()
        metrics = _make_metrics()
        channel.render_metrics = metrics.render  # /metrics: loads, balancedness, rebalances
        server = ControlServer(channel, host=cfg.http_host, port=cfg.http_port).start()
        print(f"HTTP on {server.url} (/health /metrics /start|stop|dump_expert_distribution_record)", flush=True)
        if cfg.ready_file:
            Path(cfg.ready_file).write_text(server.url)
    results = []
    try:
        for run in runs:
            run_metrics = metrics if rank == 0 else None
            if run_metrics is None and run.eplb.enable_expert_distribution_metrics:
                run_metrics = _make_metrics()
            engine = RankEngine(cfg, run, rank=rank, world_size=world_size, group=group, device=device,
                                channel=channel, metrics=run_metrics)
            results.append(engine.run())
            del engine  # free this run's weights before the next run allocates its own
        if group is not None:
            import torch.distributed as dist

            dist.barrier(group=group)  # no rank tears gloo down while a peer still talks to it
    finally:
        if server is not None:
            server.close()
        if group is not None:
            import torch.distributed as dist

            # Work objects and groups caught in reference cycles (errors keep frames alive) must
            # go before the group does: gloo aborts the process when they outlive it.
            gc.collect()
            dist.destroy_process_group()
    if rank != 0:
        return None
    if cfg.result_path:
        Path(cfg.result_path).write_text(json.dumps(results))
    return results


def _make_metrics() -> Any:
    from eplb_plugin.metrics import EPLBMetrics

    return EPLBMetrics()


def _spawn_entry(local_rank: int, node_rank: int, ranks_per_node: int, world_size: int, cfg: RuntimeConfig,
                 runs: Sequence[RunSpec], init_method: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank = node_rank * ranks_per_node + local_rank
    run_rank(rank, world_size, local_rank, cfg, runs, init_method=init_method, local_world_size=ranks_per_node)


def launch(cfg: RuntimeConfig, runs: Sequence[RunSpec], dist_args: EPLBArgs) -> list[dict[str, Any]] | None:
    """Start the ranks as ``dist_args`` (ep_size, nnodes, node_rank, dist_init_addr) say.

    Returns the runs' results (rank 0's process / node 0's launcher), None elsewhere.
    """
    ep_size = dist_args.ep_size
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        world = int(os.environ["WORLD_SIZE"])
        if world != ep_size:
            raise ConfigError(f"torchrun started {world} processes but --ep-size is {ep_size}; make them equal")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return run_rank(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)), cfg, runs,
                        init_method="env://", local_world_size=local_world)
    if ep_size == 1:
        return run_rank(0, 1, 0, cfg, runs, init_method=None)
    if cfg.device == "cuda" and torch.cuda.device_count() < dist_args.num_gpus_per_node:
        raise ConfigError(
            f"--ep-size {ep_size} over --nnodes {dist_args.nnodes} needs {dist_args.num_gpus_per_node} GPUs "
            f"per node; this one has {torch.cuda.device_count()}"
        )
    if dist_args.nnodes > 1:
        host, _, port = (dist_args.dist_init_addr or "").rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--dist-init-addr {dist_args.dist_init_addr!r} must be host:port")
        init_method = f"tcp://{host}:{port}"
    else:
        init_method = f"tcp://127.0.0.1:{free_port()}"
    owns_result = cfg.result_path is None
    result_path = cfg.result_path or tempfile.mkstemp(prefix="eplb_runtime_", suffix=".json")[1]
    cfg = cfg.replace(result_path=result_path)
    import torch.multiprocessing as mp

    ranks_per_node = dist_args.num_gpus_per_node
    try:
        mp.spawn(_spawn_entry, args=(dist_args.node_rank, ranks_per_node, ep_size, cfg, tuple(runs), init_method),
                 nprocs=ranks_per_node, join=True)
        if dist_args.node_rank != 0:
            return None
        return json.loads(Path(result_path).read_text())
    finally:
        if owns_result:
            Path(result_path).unlink(missing_ok=True)
