"""Every node of a launch must be started with the same flags: the ranks compare them once the
process group forms, before any collective whose sizes or order depend on them.

A node started with another ``--ep-num-redundant-experts`` would make gloo abort on a size
mismatch; another ``--seed`` would build other weights and fail the final check. Flags that
are each node's own (``--node-rank``, ``--port``, ``--host``, ``--threads-per-rank``, where
files go, ``--dist-init-addr`` as that node spells it, timeouts) are left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

from eplb_plugin.errors import ConfigError
from eplb_plugin.flagspec import option_of
from eplb_plugin.runtime.config import RunSpec, RuntimeConfig

# Fields that are each node's (or rank 0's) own business.
PER_NODE_FIELDS = frozenset({
    "http_host", "http_port", "progress", "threads_per_rank", "ready_file", "result_path", "dump_dir",
    "profile_dir", "profile_passes", "capture_dir", "capture_passes", "stall_s", "timeout_s",
    "node_rank", "dist_init_addr", "eplb_rebalance_timeout_s",
})
MODEL_FLAGS = {"num_layers": "--num-layers", "hidden_size": "--hidden-size",
               "intermediate_size": "--moe-intermediate-size"}
DIGEST_CHARS = 12  # of a trace file's sha256


def flags_that_must_agree(cfg: RuntimeConfig, runs: Sequence[RunSpec]) -> dict[str, str]:
    """{option: value as text} for every flag all nodes must share. A flag whose value differs
    between the runs of one launch (``--compare``) reads ``label=value / label=value``;
    ``--trace`` and an ``--init-expert-location`` file are their contents (digests), not
    their paths."""
    model = cfg.model
    out = {flag: str(getattr(model, name)) for name, flag in MODEL_FLAGS.items()}
    out["--model-preset"] = f"{model.num_logical_experts} experts, top-{model.top_k}, groups {model.num_groups}"
    for f in dataclasses.fields(cfg):
        if "flag" in f.metadata and f.name not in PER_NODE_FIELDS:
            out[option_of(f)] = str(getattr(cfg, f.name))
    per_run: dict[str, list[str]] = {}
    for run in runs:
        values = {"--num-passes": str(run.num_passes), "--manager-factory": str(run.manager_factory)}
        for obj in (run.eplb, run.workload):
            for f in dataclasses.fields(obj):
                if "flag" in f.metadata and f.name not in PER_NODE_FIELDS:
                    values[option_of(f)] = str(getattr(obj, f.name))
        values["--trace"] = ", ".join(_digest(path) for path in run.workload.traces)
        if run.eplb.init_expert_location != "trivial":  # a file: its contents, wherever it lies
            values["--init-expert-location"] = _digest(run.eplb.init_expert_location)
        for key, value in values.items():
            per_run.setdefault(key, []).append(f"{run.label}={value}")
    for key, labelled in per_run.items():
        plain = {v.split("=", 1)[1] for v in labelled}
        out.setdefault(key, plain.pop() if len(plain) == 1 else " / ".join(labelled))
    return out


def _digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:DIGEST_CHARS]


def check_nodes_agree(cfg: RuntimeConfig, runs: Sequence[RunSpec], *, rank: int, ranks_per_node: int,
                      group: Any) -> None:
    """Compare this launch's flags with every rank's (one all-gather; every rank calls it
    identically, right after the group forms). ConfigError on every rank alike, naming each
    flag that differs and every node's value."""
    import torch.distributed as dist

    mine = flags_that_must_agree(cfg, runs)
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (rank // ranks_per_node, mine), group=group)
    diffs = []
    for key in mine:
        by_node = dict(sorted((node, flags.get(key)) for node, flags in gathered))
        if len(set(by_node.values())) > 1:
            diffs.append(f"{key} ({', '.join(f'node {n}: {v}' for n, v in by_node.items())})")
    if diffs:
        raise ConfigError(f"the nodes' flags differ: {'; '.join(diffs)}; start every node with the same flags")
