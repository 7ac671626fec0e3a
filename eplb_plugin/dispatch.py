"""Dispatch: the router's logical ``topk_ids`` -> physical slot ids, per token, as torch ops.

Algorithms (``--ep-dispatch-algorithm``):

- ``static``: a fixed table per rank: a replica on this rank if there is one, else one on
  this node, else a fixed even spread of the ranks over the expert's replicas. The table
  is a pure function of the placement and the rank, so every rank can compute every
  other rank's table identically.
- ``random``: a uniformly random replica per token (a torch Generator makes it repeatable).
- ``weighted``: each expert's tokens of the pass split over its replicas in the planned
  ``replica_weights`` proportions, by occurrence order (deterministic: the same token set
  gives the same choice on every rank).
- ``dynamic``: per pass, shares water-filled toward the least-loaded GPUs using this pass's
  own counts, then split by occurrence order as ``weighted``.

Every path keeps ``-1`` (padding) as ``-1`` and does no host synchronization.
"""

from __future__ import annotations

import torch

from eplb_plugin.args import DISPATCH_ALGORITHMS
from eplb_plugin.errors import ConfigError
from eplb_plugin.kernels._launch import use_triton
from eplb_plugin.kernels.dynamic import dynamic_dispatch_triton, scratch_numel
from eplb_plugin.location import ExpertLocation

DYNAMIC_WATERFILL_ITERATIONS = 6


def _nth_true(mask: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Index of the n-th (0-based) True along the last dim. mask: [..., X]; n: [...]."""
    rank_among_true = torch.cumsum(mask.to(torch.int64), -1) - 1
    hit = mask & (rank_among_true == n.unsqueeze(-1))
    return hit.to(torch.int64).argmax(-1)


def compute_static_dispatch_table(
    location: ExpertLocation, *, rank: int, num_gpus_per_node: int | None = None
) -> torch.Tensor:
    """[L, E] int64: the slot ``rank`` sends each logical expert's tokens to.

    A replica on ``rank`` first (the lowest such slot), else one on ``rank``'s node (the
    node's replicas spread over the node's ranks), else replica ``(rank + e) % count``:
    the ranks without a local copy spread evenly over the replicas.
    """
    l2p = location.logical_to_physical_map
    valid = l2p >= 0
    slot_rank = torch.where(valid, l2p // location.num_local_physical_experts, -1)
    num_experts = location.num_logical_experts
    # Ranks with no local copy are numbered 0, 1, ... per expert and dealt over its replicas.
    holds = torch.zeros(*valid.shape[:2], location.ep_size + 1, dtype=torch.bool)
    holds.scatter_(2, torch.where(valid, slot_rank, location.ep_size), True)
    ordinal = rank - holds[..., :rank].sum(-1)
    spread = ordinal + torch.arange(num_experts)

    on_rank = valid & (slot_rank == rank)
    choice_any = _nth_true(valid, spread % location.logical_replica_count)
    choice = choice_any
    if num_gpus_per_node is not None and num_gpus_per_node < location.ep_size:
        on_node = valid & (slot_rank // num_gpus_per_node == rank // num_gpus_per_node)
        node_count = on_node.sum(-1)
        choice_node = _nth_true(on_node, spread % node_count.clamp_min(1))
        choice = torch.where(node_count > 0, choice_node, choice_any)
    choice = torch.where(on_rank.any(-1), on_rank.to(torch.int64).argmax(-1), choice)
    return torch.gather(l2p, 2, choice.unsqueeze(-1)).squeeze(-1)


class ExpertDispatcher:
    """Maps logical ids to slots for one rank under one placement and algorithm.

    Tables live on ``device``; ``dispatch`` allocates its output only. backend: "torch", or
    "triton" / "auto" (Triton on CUDA) to run ``dynamic`` as one kernel per layer
    (``kernels/dynamic.py``; the other algorithms are a few torch ops either way).
    """

    def __init__(
        self,
        location: ExpertLocation,
        *,
        rank: int,
        algorithm: str = "static",
        num_gpus_per_node: int | None = None,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        backend: str = "torch",
    ):
        if algorithm not in DISPATCH_ALGORITHMS:
            raise ConfigError(
                f"--ep-dispatch-algorithm {algorithm!r} is unknown; choose one of {list(DISPATCH_ALGORITHMS)}"
            )
        if not 0 <= rank < location.ep_size:
            raise ConfigError(f"rank {rank} is outside [0, ep_size={location.ep_size})")
        self.algorithm = algorithm
        self.rank = rank
        self.num_gpus_per_node = num_gpus_per_node
        self.location = location
        self.device = torch.device(device)
        self.generator = generator
        self.num_local_physical_experts = location.num_local_physical_experts
        self.static_table = compute_static_dispatch_table(
            location, rank=rank, num_gpus_per_node=num_gpus_per_node
        ).to(self.device)
        self.logical_to_physical_map = location.logical_to_physical_map.to(self.device)
        self.replica_count = location.logical_replica_count.to(self.device)
        weights = location.effective_replica_weights()
        padded = torch.cat([weights, torch.zeros(location.num_layers, 1)], 1)
        l2p = location.logical_to_physical_map
        # [L, E, X]: the planned share of each listed replica (0 on padding).
        self.replica_shares = torch.gather(
            padded, 1, torch.where(l2p >= 0, l2p, location.num_physical_experts).flatten(1)
        ).view_as(l2p).to(self.device)
        # [L, E, X] what dynamic's water-filling starts from: which replicas are listed,
        # their GPUs, and equal shares (placement-only, so built here, not per pass).
        self.listed = self.logical_to_physical_map >= 0
        self.slot_gpu = torch.where(self.listed, self.logical_to_physical_map // self.num_local_physical_experts, 0)
        self.equal_shares = self.listed.to(torch.float32) / self.replica_count.unsqueeze(-1).to(torch.float32)
        # dynamic on the Triton backend: one program per layer, scratch allocated once here
        # (nothing is allocated under CUDA-graph capture).
        self._kernel = algorithm == "dynamic" and use_triton(backend, self.replica_count)
        self._scratch = None
        if self._kernel:
            size = scratch_numel(*self.logical_to_physical_map.shape[1:])
            self._scratch = torch.empty(size, dtype=torch.float32, device=self.device)

    def update_(self, location: ExpertLocation) -> bool:
        """Take ``location``'s tables into this dispatcher's tensors, in place (so a CUDA
        graph that captured ``dispatch`` keeps reading the live tables). Stream-ordered:
        dispatches queued later see the new tables. Returns False, changing nothing, when
        the shapes differ (another slot count or replica width)."""
        fresh = ExpertDispatcher(location, rank=self.rank, algorithm=self.algorithm,
                                 num_gpus_per_node=self.num_gpus_per_node, device=self.device)  # torch tables only
        pairs = [(self.static_table, fresh.static_table),
                 (self.logical_to_physical_map, fresh.logical_to_physical_map),
                 (self.replica_count, fresh.replica_count), (self.replica_shares, fresh.replica_shares),
                 (self.listed, fresh.listed), (self.slot_gpu, fresh.slot_gpu), (self.equal_shares, fresh.equal_shares)]
        if any(old.shape != new.shape or old.dtype != new.dtype for old, new in pairs):
            return False
        for old, new in pairs:
            old.copy_(new)
        self.location = location
        return True

    def dispatch(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids: [T, k] int, logical ids, -1 = padding -> [T, k] int64 physical slots."""
        if self._kernel:
            return dynamic_dispatch_triton(
                topk_ids, self.logical_to_physical_map[layer], num_local=self.num_local_physical_experts,
                num_gpus=self.location.ep_size, iterations=DYNAMIC_WATERFILL_ITERATIONS, scratch=self._scratch,
            )
        ids = topk_ids.to(torch.int64)
        valid = ids >= 0
        safe = ids.clamp_min(0)
        if self.algorithm == "static":
            out = self.static_table[layer][safe]
        elif self.algorithm == "random":
            u = torch.rand(ids.shape, generator=self.generator, device=ids.device)
            idx = (u * self.replica_count[layer][safe]).to(torch.int64)
            out = self.logical_to_physical_map[layer][safe, idx]
        else:
            shares = self.replica_shares[layer]
            if self.algorithm == "dynamic":
                shares = self._waterfill_shares(layer, safe, valid)
            out = self._split_by_occurrence(layer, safe, valid, shares)
        return torch.where(valid, out, -1)

    def _waterfill_shares(self, layer: int, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[E, X] replica shares that even out this pass's GPU loads (few fixed-point steps)."""
        num_experts = self.replica_count.shape[1]
        listed, slot_gpu, shares = self.listed[layer], self.slot_gpu[layer], self.equal_shares[layer]
        expert_tokens = torch.zeros(num_experts, device=ids.device, dtype=torch.float32)
        expert_tokens.index_add_(0, ids.flatten(), valid.flatten().to(torch.float32))
        num_gpus = self.location.ep_size
        for _ in range(DYNAMIC_WATERFILL_ITERATIONS):
            gpu_load = torch.zeros(num_gpus, device=ids.device).index_add_(
                0, slot_gpu.flatten(), (shares * expert_tokens.unsqueeze(-1)).flatten()
            )
            # Scale each replica's share by how far its GPU sits below the expert's mean.
            load_at = gpu_load[slot_gpu].clamp_min(1.0)
            mean_at = (shares * load_at).sum(-1, keepdim=True)
            shares = shares * (mean_at / load_at)
            shares = torch.where(listed, shares, 0.0)
            shares = shares / shares.sum(-1, keepdim=True).clamp_min(1e-12)
        return shares

    def _split_by_occurrence(
        self, layer: int, ids: torch.Tensor, valid: torch.Tensor, shares: torch.Tensor
    ) -> torch.Tensor:
        """The j-th token of expert e in this pass goes to the replica whose cumulative
        quota (shares x the expert's token count) first exceeds j."""
        flat = torch.where(valid, ids, shares.shape[0]).flatten()  # padding sorts last
        order = torch.sort(flat, stable=True).indices
        sorted_ids = flat[order]
        num_slots = shares.shape[0] + 1
        per_expert = torch.zeros(num_slots, dtype=torch.int64, device=ids.device)
        per_expert.index_add_(0, flat, torch.ones_like(flat))
        starts = torch.cumsum(per_expert, 0) - per_expert
        position = torch.empty_like(flat)
        position[order] = torch.arange(flat.numel(), device=ids.device) - starts[sorted_ids]
        experts = ids.flatten()
        quota = torch.cumsum(shares[experts], -1) * per_expert[experts].unsqueeze(-1)
        idx = (quota <= position.unsqueeze(-1).to(quota.dtype) + 0.5).sum(-1)
        idx = torch.minimum(idx, self.replica_count[layer][experts] - 1)
        return self.logical_to_physical_map[layer][experts, idx].view_as(ids)
