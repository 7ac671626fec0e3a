"""Dispatch: the router's logical ``topk_ids`` -> physical slot ids, per token, as torch ops.

Algorithms (``--ep-dispatch-algorithm``):

- ``static``: a fixed table per rank: a replica on this rank if there is one, else one on
  this node, else a fixed even spread of the ranks over the expert's replicas. The table
  is a pure function of the placement and the rank, so every rank can compute every
  other rank's table identically.
- ``random``: a uniformly random replica per token (a torch Generator makes it repeatable).
- ``dynamic``: SGLang's name for the same thing (an even random spread), kept with SGLang's
  meaning.
- ``weighted``: each expert's tokens of the pass split over its replicas in the planned
  ``replica_weights`` proportions, by occurrence order (deterministic: the same token set
  gives the same choice on every rank).
- ``minmax`` (the project's own): per pass, each expert's tokens split over its replicas so
  that the pass's maximum GPU load is (near) minimal given the placement
  (``kernels/minmax.py``), then by occurrence order as ``weighted`` (the Triton kernels
  number each expert's tokens in the order their atomics land instead, per pair or per
  tile: the same tokens per slot, though which token of an expert lands on which replica
  may differ). With ``count_group``
  the ranks first all-gather their per-expert counts of the layer, so the split follows the
  whole pass and each rank takes its own run of every expert's occurrences; without it each
  rank splits its own tokens.

Every path keeps ``-1`` (padding) as ``-1`` and does no host synchronization. Input checks:
types, shapes and dtypes everywhere; id values (``[-1, E)``) only on CPU tensors, since
reading a CUDA tensor's values would sync the host inside a captured graph (on CUDA an id
outside the range is undefined: it may be dropped or index out of bounds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from eplb_plugin.counts import check_routed_ids
from eplb_plugin.dispatch_info import dispatch_info
from eplb_plugin.errors import ConfigError, UsageError
from eplb_plugin.kernels._launch import check_backend, check_counts, check_out_dtype, use_triton
from eplb_plugin.kernels.fused import map_and_count
from eplb_plugin.kernels.minmax import (
    MinmaxTables,
    build_minmax_tables,
    minmax_choose,
    minmax_gpu_shares,
)
from eplb_plugin.kernels.minmax_triton import MinmaxScratch, minmax_scratch
from eplb_plugin.location import ExpertLocation, check_rank


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

    Tables live on ``device``; ``dispatch`` allocates its output only (and, for ``minmax``
    with a ``count_group``, the gathered counts). backend: "torch", or "triton" / "auto"
    (Triton on CUDA) to run ``minmax`` as Triton kernels (``kernels/minmax_triton.py``) and
    ``static`` with the recorder's buffer as the fused map+count kernel (``kernels/fused.py``);
    the other algorithms are a few torch ops either way. count_group: for ``minmax``, the
    process group whose ranks dispatch one pass together (their per-expert counts are
    all-gathered per layer; every rank of it must call ``dispatch`` for the same layers).
    minmax_steps: the ``minmax`` split's diffusion steps (``--eplb-dispatch-minmax-steps``;
    None: ``kernels.minmax.minmax_iterations`` of the placement's GPUs). whole_pass: without a
    ``count_group``, this rank routes every token of the pass (its counts are the pass's), so
    the split may stop once no step can lower the peak, as it does on gathered counts.
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
        count_group: Any = None,
        minmax_steps: int | None = None,
        whole_pass: bool = False,
    ):
        self.info = dispatch_info(algorithm)  # ConfigError naming the known ones
        check_rank(rank, location.ep_size)
        # (num_gpus_per_node: a last node with fewer ranks is fine, a rank's node is rank // num_gpus_per_node)
        _check_positive_or_none(num_gpus_per_node=num_gpus_per_node, minmax_steps=minmax_steps)
        check_backend(backend)
        self.minmax_steps = minmax_steps
        self.whole_pass = whole_pass
        self.algorithm = algorithm
        self.rank = rank
        self.num_gpus_per_node = num_gpus_per_node
        self.location = location
        self.device = torch.device(device)
        self.generator = generator
        self.backend = backend
        self.count_group = count_group
        self.count_world = 1 if count_group is None else dist.get_world_size(count_group)
        self.count_rank = 0 if count_group is None else dist.get_rank(count_group)
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
        # minmax's placement-only tables, built here (not per pass) and updated in place.
        self.minmax = build_minmax_tables(location.physical_to_logical_map.to(self.device),
                                          location.num_logical_experts, num_gpus=location.ep_size) \
            if algorithm == "minmax" else None
        self._kernel = algorithm == "minmax" and use_triton(backend, self.replica_count)
        # the kernels' per-layer counters and quotas (kept across placements copied in place)
        self._scratch = minmax_scratch(self.minmax) if self._kernel and self.minmax is not None else None

    def _tables(self) -> list[torch.Tensor]:
        return [self.static_table, self.logical_to_physical_map, self.replica_count, self.replica_shares,
                *(self.minmax or ())]

    def update_(self, location: ExpertLocation) -> bool:
        """Take ``location``'s tables into this dispatcher's tensors, in place (so a CUDA
        graph that captured ``dispatch`` keeps reading the live tables). Stream-ordered:
        dispatches queued later see the new tables. Returns False, changing nothing, when
        the shapes differ (another slot count or replica width)."""
        fresh = ExpertDispatcher(location, rank=self.rank, algorithm=self.algorithm,
                                 num_gpus_per_node=self.num_gpus_per_node, device=self.device)  # torch tables only
        pairs = list(zip(self._tables(), fresh._tables()))
        if any(old.shape != new.shape or old.dtype != new.dtype for old, new in pairs):
            return False
        for old, new in pairs:
            old.copy_(new)
        self.location = location
        return True

    def dispatch(self, layer: int, topk_ids: torch.Tensor, *, counts_out: torch.Tensor | None = None) -> torch.Tensor:
        """topk_ids: [T, k] int, logical ids, -1 = padding -> [T, k] int64 physical slots.

        counts_out: an optional [L, P] int32 buffer (the recorder's) to which algorithms with
        ``DispatchInfo.counts_slots`` add this call's slots in the kernel that maps them
        (``static``: the fused map+count kernel; ``minmax``: its own); the others ignore it
        (but every algorithm checks its shape and dtype).

        Raises UsageError for a topk_ids that is not an integer torch tensor, a bad layer or a
        counts_out not shaped [L, P]; CountsError for a counts_out not int32. Ids outside
        [-1, E) raise UsageError on CPU tensors only (CUDA: unchecked, no host sync).
        """
        if not isinstance(topk_ids, torch.Tensor):
            raise UsageError(f"topk_ids must be a torch.Tensor of logical ids (got {type(topk_ids).__name__})")
        if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
            raise UsageError(f"topk_ids has dtype {topk_ids.dtype}; expected integer expert ids")
        num_layers, num_experts = self.static_table.shape
        if not 0 <= layer < num_layers:
            raise UsageError(f"layer {layer} is outside 0..{num_layers - 1}")
        if counts_out is not None:
            expected = [num_layers, self.location.num_physical_experts]
            if list(counts_out.shape) != expected:
                raise UsageError(f"counts_out has shape {list(counts_out.shape)}; expected [L, P] = {expected}")
            check_counts(counts_out)  # CountsError unless int32 (the recorder's buffer), for every algorithm
        check_routed_ids(topk_ids, num_experts, what="logical expert", layer=layer)  # CPU tensors only
        pick = self.info.pick
        if pick == "minmax":
            return self._dispatch_minmax(layer, topk_ids, counts_out)
        if pick == "table" and counts_out is not None:
            return map_and_count(topk_ids, self.static_table, counts_out, layer, backend=self.backend).long()
        ids = topk_ids.to(torch.int64)
        valid = ids >= 0
        safe = ids.clamp_min(0)
        if pick == "table":
            out = self.static_table[layer][safe]
        elif pick == "uniform":
            u = torch.rand(ids.shape, generator=self.generator, device=ids.device)
            idx = (u * self.replica_count[layer][safe]).to(torch.int64)
            out = self.logical_to_physical_map[layer][safe, idx]
        else:
            out = self._split_by_occurrence(layer, safe, valid, self.replica_shares[layer])
        return torch.where(valid, out, -1)

    def pass_counts(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """local: [E] int32, this rank's tokens per expert for one layer. Returns (total [E],
        offset [E]: tokens of each expert on lower ranks of ``count_group``), in local's dtype. Collective over
        ``count_group`` when it has more than one rank."""
        if self.count_world == 1:
            return local, torch.zeros_like(local)
        gathered = local.new_empty(self.count_world * local.numel())
        _all_gather_single(gathered, local, group=self.count_group)
        return split_gathered_counts(gathered.view(self.count_world, -1), self.count_rank)

    def _dispatch_minmax(self, layer: int, topk_ids: torch.Tensor, counts_out: torch.Tensor | None) -> torch.Tensor:
        assert self.minmax is not None  # built for minmax in __init__
        return minmax_dispatch(topk_ids, self.minmax, layer=layer, num_slots=self.location.num_physical_experts,
                               use_kernel=self._kernel, exchange=self.pass_counts if self.count_world > 1 else None,
                               counts_out=counts_out, scratch=self._scratch, iterations=self.minmax_steps,
                               whole_pass=self.whole_pass)

    def _split_by_occurrence(self, layer: int, ids: torch.Tensor, valid: torch.Tensor,
                             shares: torch.Tensor) -> torch.Tensor:
        """The j-th token of expert e in this pass goes to the replica whose cumulative
        quota (shares x the expert's tokens) first exceeds j."""
        num_experts = shares.shape[0]
        experts = ids.flatten()
        position = _occurrence_index(ids, valid, num_experts)
        tokens = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
        tokens.index_add_(0, experts, valid.flatten().to(torch.int64))
        quota = torch.cumsum(shares[experts], -1) * tokens[experts].unsqueeze(-1)
        idx = (quota <= position.unsqueeze(-1).to(quota.dtype) + 0.5).sum(-1)
        idx = torch.minimum(idx, self.replica_count[layer][experts] - 1)
        return self.logical_to_physical_map[layer][experts, idx].view_as(ids)


def split_gathered_counts(per_rank: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """per_rank: [W, E] every rank's tokens per expert of one layer, in rank order -> (the
    pass's [E] counts, offset [E]: tokens of each expert on ranks below ``rank``), in
    ``per_rank``'s dtype (int32 for the kernels: a plain sum would widen to int64), what a
    count exchange of ``minmax_dispatch`` returns."""
    return per_rank.sum(0, dtype=per_rank.dtype), per_rank[:rank].sum(0, dtype=per_rank.dtype)


def _check_positive_or_none(**values: Any) -> None:
    """ConfigError naming the first of ``values`` that is neither None nor a positive int
    (a bool is not one)."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name}={value!r} must be a positive int or None")


def minmax_dispatch(
    topk_ids: torch.Tensor, tables: MinmaxTables, *, layer: int, num_slots: int, use_kernel: bool,
    exchange: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    counts_out: torch.Tensor | None = None, num_valid_rows: torch.Tensor | None = None,
    scratch: MinmaxScratch | None = None, out_dtype: torch.dtype = torch.int64, iterations: int | None = None,
    whole_pass: bool = False,
) -> torch.Tensor:
    """The ``minmax`` choice of one layer of one pass, for any host of the tables.

    topk_ids: [T, k] int32/int64 logical ids, -1 = padding; tables: ``MinmaxTables`` of the
    live placement (all layers; row ``layer`` is read); num_slots: P. use_kernel: run the
    Triton kernels (CUDA) instead of the torch reference. exchange: this rank's [E] int32
    counts -> (the pass's [E] counts, tokens of each expert on lower ranks), int32 (what the
    kernels read; both paths exchange int32), collective; None = the
    split follows ``topk_ids``' own counts. counts_out: optional [L, P] int32 buffer to which
    the chosen slots are added (row ``layer``). num_valid_rows: optional one-element int
    tensor (on ``topk_ids``' device): rows at or past it pad the batch (a CUDA graph's fixed
    size); they are left out of the split, the exchange and ``counts_out`` and get their
    expert's ``home_slot`` (the host masks them next); the kernels read the bound on the
    device, so the kernel path adds no torch op for it. scratch: the kernels' per-layer counters for these
    tables (``minmax_scratch``), kept by the host across calls (None: fresh ones each call).
    iterations: the split's diffusion steps (None: ``minmax_iterations`` of the tables' GPUs).
    whole_pass: without an exchange, ``topk_ids`` is the whole pass (the split's stop, as on
    exchanged counts; on a rank's share it takes every step: ``minmax_gpu_shares``).
    Returns [T, k] physical slots of ``out_dtype`` (int64 or int32: the kernels write it, so
    a host that wants int32 casts nothing), -1 kept. No host synchronization.
    """
    if use_kernel:  # the kernels read num_valid_rows themselves (no torch op here)
        from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton

        return minmax_dispatch_triton(topk_ids, tables, layer=layer, num_slots=num_slots, scratch=scratch,
                                      exchange=exchange, counts_out=counts_out, num_valid_rows=num_valid_rows,
                                      out_dtype=out_dtype, iterations=iterations, whole_pass=whole_pass)
    check_out_dtype(out_dtype)
    if num_valid_rows is not None:
        in_batch = torch.arange(topk_ids.shape[0], device=topk_ids.device).unsqueeze(-1) < num_valid_rows.reshape(-1)[:1]
        out = minmax_dispatch(torch.where(in_batch, topk_ids, -1), tables, layer=layer, num_slots=num_slots,
                              use_kernel=False, exchange=exchange, counts_out=counts_out, out_dtype=out_dtype,
                              iterations=iterations, whole_pass=whole_pass)
        padding = ~in_batch & (topk_ids >= 0)
        some_slot = tables.home_slot[layer]  # [E]: a slot of each expert
        return torch.where(padding, some_slot[topk_ids.clamp_min(0).long()].to(out_dtype), out)
    ids = topk_ids.to(torch.int64)
    valid = ids >= 0
    safe = ids.clamp_min(0)
    num_experts = tables.multi_row.shape[1]
    local = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)  # int32: the kernels' exchange dtype
    local.index_add_(0, safe.flatten(), valid.flatten().to(torch.int32))
    total, offset = (local, torch.zeros_like(local)) if exchange is None else exchange(local)
    shares, _ = minmax_gpu_shares(total.unsqueeze(0), tables.multi_experts[layer:layer + 1],
                                  tables.multi_gpus[layer:layer + 1], tables.single_slots[layer:layer + 1],
                                  iterations=iterations, stop=exchange is not None or whole_pass)
    position = _occurrence_index(safe, valid, num_experts) + offset[safe.flatten()]
    out = minmax_choose(position, safe.flatten(), shares[0], tables.multi_row[layer],
                        tables.slot_on_gpu[layer]).view_as(ids)
    if counts_out is not None:  # padding adds 0 (no boolean indexing: no host sync)
        counts_out[layer].index_add_(0, torch.where(valid, out, 0).flatten(), valid.flatten().to(counts_out.dtype))
    return torch.where(valid, out, -1).to(out_dtype)


# torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there).
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def _occurrence_index(ids: torch.Tensor, valid: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[n] int64: each pair's index among the earlier pairs of its expert (flattened order).
    ids: [T, k] int64 (valid entries), valid: [T, k] bool; padding gets an unused index."""
    flat = torch.where(valid, ids, num_experts).flatten()  # padding sorts last
    order = torch.sort(flat, stable=True).indices
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    per_expert.index_add_(0, flat, torch.ones_like(flat))
    starts = torch.cumsum(per_expert, 0) - per_expert
    position = torch.empty_like(flat)
    position[order] = torch.arange(flat.numel(), device=ids.device) - starts[flat[order]]
    return position
