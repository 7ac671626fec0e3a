"""Workloads: which logical experts each token of each forward pass is routed to.

Every workload is a pure function of the pass index: ``batch(pass_id)`` returns the same
global batch on every rank, so ranks need no communication to agree on it; each rank then
takes its shard of the tokens (``shard_tokens``).

- ``SyntheticWorkload`` (the default): per layer a Zipf-like popularity over the experts
  (``p_e ~ 1 / (rank_e + 1) ** zipf_s``), top-k drawn without replacement; the hot set
  drifts every ``drift_every_passes`` passes (the hottest experts swap places with random
  others), seeded, so an online balancer has something to follow.
- ``TraceWorkload``: replays recorded routing, cut into passes of ``tokens_per_pass`` and
  cycled; reads per-token ``.npz`` files (``topk_ids [T, L, k]``, optional
  ``topk_weights`` / ``topk_scores``) and SGLang ``per_token`` recorder dumps (``.pt``).
- ``UniformWorkload``: perfectly balanced routing of the same token count (token t picks
  experts ``(t * k + j) % E``), the yardstick a balancer aims for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from eplb_plugin.counts import trace_id_problem
from eplb_plugin.errors import ConfigError

WORKLOAD_KINDS = ("synthetic", "trace", "uniform")
DEFAULT_ZIPF_S = 1.0
DEFAULT_DRIFT_EVERY_PASSES = 100
_SEED_STRIDE = 1_000_003  # mixes (seed, layer, epoch / pass) into one generator seed


@dataclass(frozen=True)
class RoutingBatch:
    """One forward pass's routing, for all tokens of the pass (global, every rank alike).

    topk_ids: [T, L, k] int64 logical expert ids; -1 = padding (no expert).
    topk_weights: [T, L, k] float32 combine weights.
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


class Workload(Protocol):
    num_layers: int
    num_logical_experts: int
    top_k: int
    tokens_per_pass: int

    def batch(self, pass_id: int) -> RoutingBatch: ...


def shard_tokens(num_tokens: int, *, rank: int, world_size: int) -> slice:
    """The contiguous token range of ``rank`` (the first ``num_tokens % world_size`` get one more)."""
    base, extra = divmod(num_tokens, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * _SEED_STRIDE + int(p)) % (1 << 62)
    return torch.Generator().manual_seed(seed)


class SyntheticWorkload:
    """Skewed, drifting routing. Deterministic in (seed, pass_id); see the module docstring."""

    CACHED_EPOCHS = 4  # drift epochs whose expert order is kept (the most recently used)

    def __init__(
        self,
        *,
        num_layers: int,
        num_logical_experts: int,
        top_k: int,
        tokens_per_pass: int,
        seed: int = 0,
        zipf_s: float = DEFAULT_ZIPF_S,
        drift_every_passes: int = DEFAULT_DRIFT_EVERY_PASSES,
    ):
        if not 0 < top_k <= num_logical_experts:
            raise ConfigError(f"top_k={top_k} must be in [1, num_logical_experts={num_logical_experts}]")
        if tokens_per_pass < 1 or drift_every_passes < 1 or zipf_s < 0:
            raise ConfigError(
                f"tokens_per_pass={tokens_per_pass} and drift_every_passes={drift_every_passes} must be >= 1, "
                f"zipf_s={zipf_s} >= 0"
            )
        self.num_layers, self.num_logical_experts, self.top_k = num_layers, num_logical_experts, top_k
        self.tokens_per_pass, self.seed = tokens_per_pass, seed
        self.drift_every_passes = drift_every_passes
        ranks = torch.arange(num_logical_experts, dtype=torch.float64)
        self._zipf = (1.0 / (ranks + 1.0) ** zipf_s).to(torch.float32)  # [E], by popularity rank
        self._num_swaps = max(1, num_logical_experts // 8)  # hot experts replaced per drift
        self._perms: dict[int, torch.Tensor] = {}  # drift epoch -> [L, E] expert of each rank (newest used last)

    def popularity(self, pass_id: int) -> torch.Tensor:
        """[L, E] float32: each expert's sampling weight in this pass's drift epoch."""
        perm = self._epoch_perm(pass_id // self.drift_every_passes)
        probs = torch.empty(self.num_layers, self.num_logical_experts)
        probs.scatter_(1, perm, self._zipf.expand(self.num_layers, -1))
        return probs

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        # Epoch e's order is epoch e-1's with its hottest experts swapped with random others,
        # so it is computed from the nearest cached epoch at or before e (from scratch when
        # none is). Only the CACHED_EPOCHS most recently used orders are kept: a run crosses
        # num_passes / drift_every_passes epochs and must not keep one [L, E] tensor each.
        if epoch in self._perms:
            perm = self._perms.pop(epoch)
        else:
            start = max((e for e in self._perms if e < epoch), default=None)
            if start is None:
                g = _generator(self.seed, 0)
                start, perm = 0, torch.stack(
                    [torch.randperm(self.num_logical_experts, generator=g) for _ in range(self.num_layers)]
                )
            else:
                perm = self._perms[start]
            for e in range(start + 1, epoch + 1):
                perm = perm.clone()
                g = _generator(self.seed, e)
                for layer in range(self.num_layers):
                    for hot in range(self._num_swaps):
                        other = int(torch.randint(self._num_swaps, self.num_logical_experts, (1,), generator=g))
                        perm[layer, [hot, other]] = perm[layer, [other, hot]]
        self._perms[epoch] = perm  # now the most recently used
        while len(self._perms) > self.CACHED_EPOCHS:
            del self._perms[next(iter(self._perms))]  # the least recently used
        return perm

    def batch(self, pass_id: int) -> RoutingBatch:
        g = _generator(self.seed, 1_000_000 + pass_id)
        probs = self.popularity(pass_id)
        t, k = self.tokens_per_pass, self.top_k
        # k experts without replacement, each draw proportional to popularity among those
        # left: the top k of log(p) + Gumbel noise (the Gumbel-top-k trick), for every token
        # and layer in one op (a per-layer multinomial took ~0.7 s per 2048-token pass).
        u = torch.rand(t, self.num_layers, self.num_logical_experts, generator=g).clamp_(min=1e-20)
        keys = probs.log().unsqueeze(0) - torch.log(-torch.log(u))
        ids = keys.topk(k, dim=-1).indices  # [T, L, k]
        weights = torch.softmax(torch.randn(t, self.num_layers, k, generator=g), dim=-1)
        return RoutingBatch(topk_ids=ids.to(torch.int64), topk_weights=weights)


class UniformWorkload:
    """Perfectly uniform routing: token t picks experts ``(t * k + j) % E``, equal weights."""

    def __init__(self, *, num_layers: int, num_logical_experts: int, top_k: int, tokens_per_pass: int):
        if not 0 < top_k <= num_logical_experts:
            raise ConfigError(f"top_k={top_k} must be in [1, num_logical_experts={num_logical_experts}]")
        self.num_layers, self.num_logical_experts, self.top_k = num_layers, num_logical_experts, top_k
        self.tokens_per_pass = tokens_per_pass
        flat = torch.arange(tokens_per_pass * top_k).view(tokens_per_pass, 1, top_k) % num_logical_experts
        self._ids = flat.expand(-1, num_layers, -1).contiguous()
        self._weights = torch.full(self._ids.shape, 1.0 / top_k)

    def batch(self, pass_id: int) -> RoutingBatch:
        return RoutingBatch(topk_ids=self._ids, topk_weights=self._weights)


class TraceWorkload:
    """Replays recorded routing [T, L, k] in passes of ``tokens_per_pass`` tokens, cycling.

    topk_ids: [T, L, k] int logical ids (-1 = padding); topk_weights: same shape or None
    (equal weights). Only the first ``num_layers`` layers are used.
    """

    def __init__(
        self,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor | None,
        *,
        num_layers: int,
        num_logical_experts: int,
        tokens_per_pass: int,
        source: str = "trace",
    ):
        if topk_ids.dim() != 3:
            raise ConfigError(f"{source}: topk_ids must be [tokens, layers, top_k], got {list(topk_ids.shape)}")
        if topk_ids.shape[1] < num_layers:
            raise ConfigError(
                f"{source}: the trace has {topk_ids.shape[1]} layers, the model {num_layers}; "
                "pass --num-layers <= the trace's layers"
            )
        problem = trace_id_problem(int(topk_ids.min()), int(topk_ids.max()), num_logical_experts) \
            if topk_ids.numel() else None
        if problem is not None:
            fix = "" if int(topk_ids.min()) < -1 else "; pick a --model-preset with as many experts as the trace"
            raise ConfigError(f"{source}: {problem}{fix}")
        if tokens_per_pass < 1 or tokens_per_pass > topk_ids.shape[0]:
            raise ConfigError(f"{source}: --batch-tokens {tokens_per_pass} must be in [1, {topk_ids.shape[0]}] tokens")
        self.topk_ids = topk_ids[:, :num_layers].to(torch.int64).contiguous()
        k = topk_ids.shape[2]
        if topk_weights is None:
            topk_weights = torch.full(self.topk_ids.shape, 1.0 / k)
        self.topk_weights = topk_weights[:, :num_layers].to(torch.float32).contiguous()
        self.num_layers, self.num_logical_experts, self.top_k = num_layers, num_logical_experts, k
        self.tokens_per_pass = tokens_per_pass
        self.num_tokens = self.topk_ids.shape[0]

    def batch(self, pass_id: int) -> RoutingBatch:
        start = (pass_id * self.tokens_per_pass) % self.num_tokens
        idx = (torch.arange(self.tokens_per_pass) + start) % self.num_tokens
        return RoutingBatch(topk_ids=self.topk_ids[idx], topk_weights=self.topk_weights[idx])


def read_npz_trace(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A per-token ``.npz``: (topk_ids [T, L, k] int64, weights [T, L, k] float32 or None).

    A one-layer file (``topk_ids [T, k]``) reads as L = 1.
    """
    with np.load(path) as z:
        if "topk_ids" not in z:
            raise ConfigError(f"trace {path}: no 'topk_ids' array (keys: {sorted(z.keys())})")
        ids = torch.from_numpy(z["topk_ids"].astype(np.int64))
        weights = None
        for key in ("topk_weights", "topk_scores"):
            if key in z:
                weights = torch.from_numpy(z[key].astype(np.float32))
                break
    if ids.dim() == 2:
        ids = ids.unsqueeze(1)
        weights = weights.unsqueeze(1) if weights is not None else None
    return ids, weights


def read_sglang_per_token_dump(path: str | Path) -> torch.Tensor:
    """An SGLang ``per_token`` dump: logical topk_ids [T, L, k] int64 (-1 = no expert).

    Records hold physical ids ``topk_ids_of_layer [L, T, k]``; each is mapped back with the
    map it was recorded under (``physical_to_logical_map_by_epoch`` when the plugin's
    recorder wrote the file, else SGLang's ``last_physical_to_logical_map``). Records are
    taken in ``forward_pass_id`` order.
    """
    data = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(data, dict) or "records" not in data:
        raise ConfigError(f"trace {path}: not an SGLang per_token dump (no 'records' key)")
    by_epoch = data.get("physical_to_logical_map_by_epoch") or {}
    last_map = data.get("last_physical_to_logical_map")
    chunks = []
    for record in sorted(data["records"], key=lambda r: r.get("forward_pass_id", 0)):
        if "topk_ids_of_layer" not in record:
            raise ConfigError(f"trace {path}: a record has no 'topk_ids_of_layer' (was the mode per_token?)")
        physical = record["topk_ids_of_layer"].to(torch.int64)  # [L, T, k]
        phy2log = by_epoch.get(record.get("physical_to_logical_map_epoch"), last_map)
        if phy2log is None:
            raise ConfigError(f"trace {path}: no physical_to_logical_map to map physical ids back")
        phy2log = torch.as_tensor(phy2log, dtype=torch.int64)
        layer_idx = torch.arange(physical.shape[0]).view(-1, 1, 1)
        logical = torch.where(physical >= 0, phy2log[layer_idx, physical.clamp_min(0)], -1)
        chunks.append(logical.permute(1, 0, 2))
    if not chunks:
        raise ConfigError(f"trace {path}: the dump holds no records")
    return torch.cat(chunks)


def load_traces(paths: Sequence[str | Path]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read and concatenate (in order) trace files: ``.npz`` per-token or SGLang ``.pt`` dumps."""
    if not paths:
        raise ConfigError("--workload trace needs at least one --trace PATH")
    ids_list, weights_list = [], []
    for path in paths:
        if not Path(path).exists():
            raise ConfigError(f"--trace {path}: file not found")
        if str(path).endswith(".pt"):
            ids, weights = read_sglang_per_token_dump(path), None
        else:
            ids, weights = read_npz_trace(path)
        ids_list.append(ids)
        weights_list.append(weights)
    shapes = {tuple(i.shape[1:]) for i in ids_list}
    if len(shapes) > 1:
        raise ConfigError(f"--trace files disagree on [layers, top_k]: {sorted(shapes)}")
    weights = None
    if all(w is not None for w in weights_list):
        weights = torch.cat(weights_list)
    return torch.cat(ids_list), weights
