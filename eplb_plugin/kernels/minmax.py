"""The ``minmax`` split: each expert's tokens of one pass over its replicas, minimizing the
pass's maximum GPU load, as torch ops (the reference) and as Triton kernels.

The problem, for one layer of one pass: expert ``e`` has ``c_e`` tokens and replicas on a
set of GPUs; choose how many of them each GPU serves so that the largest GPU load is as
small as possible. Experts with one replica have no choice: they make each GPU's base
load. Only replicated experts (at most ``P - E`` of them) are split, so the work is on a
small ``[M, G]`` table (M = ``max(1, P - E)``, G GPUs) whatever the token count.

The split minimizes the sum of squared GPU loads, whose minimizer on this (polymatroid)
set of reachable load vectors also minimizes the maximum load. It is found by diffusion
with momentum: every step each replica's share moves toward its expert's mean GPU level
(the step divided by the replicated experts on that GPU, so concurrent moves do not
overshoot), then a heavy-ball step is taken and each expert's shares are renormalized to
its tokens (once per step: renormalizing before the momentum too changes nothing measurable
and costs a reduction per step in the kernel). No GPU's load can go under its base, so once
the peak is within ``MINMAX_STOP_TOKENS`` of the largest base the split is optimal and its
remaining steps are skipped (an exact stop, per layer-pass: where a GPU of single-replica
experts sets the peak, as at 72 GPUs in most passes, the split takes one step or none).
Only on a whole pass's counts: on one rank's share the steps past that point still even
out the other GPUs, which the ranks' sum needs. The last iterate is kept unless its peak is
above the equal split's. On the layer-passes the per-pass policy serves in the ESFT replay,
8 steps land 0.20% (EP8) and 0.76% (EP16) above the exact optimum on average, and
0.26% / 1.09% on the layer-passes whose peak the split can lower at all (16 steps: 0.03% /
0.35%; ``benchmarks/probe_minmax_convergence.py``; an LP solves it exactly, see also
``benchmarks/bench_minmax_dispatch.py``). Each step costs about 0.3 us per layer in the
Triton kernel, so ``minmax_iterations`` runs 8 steps up to 8 GPUs (DeepSeek-V3 decode at
EP8 stays under 10 us), 16 from 9 to 32 GPUs and 8 past 32 (see its docstring). Past 32
GPUs the kernels take the same steps on the list of replicas (``MinmaxTables.entries``)
instead of the dense table: a step's work then grows with the replicas, not with experts
x GPUs.

Shares then become token choices by occurrence order: the j-th token of expert e in the
pass goes to the replica whose cumulative quota first exceeds j, so each replica gets its
share to within one token and every rank computing the same pass computes the same loads.
(The Triton kernels number an expert's tokens in the order their atomics land, so which of
its tokens lands where may differ between runs; the tokens each slot serves do not.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

MINMAX_ITERATIONS = 8  # diffusion steps on up to MINMAX_NARROW_GPUS GPUs (the module docstring: quality)
MINMAX_ITERATIONS_WIDE = 16  # on more GPUs, up to MINMAX_WIDE_GPUS, where 8 steps leave the peak ~1% over the optimum
MINMAX_NARROW_GPUS = 8
MINMAX_WIDE_GPUS = 32  # past this, MINMAX_ITERATIONS again: 8 steps suffice there (see minmax_iterations)
MINMAX_MOMENTUM = 0.6  # heavy-ball weight of the previous step (0.5: a little further from the optimum at 8
# steps on the traces and on 4 of 5 synthetic shapes: benchmarks/probe_minmax_convergence.py --synthetic)
MINMAX_STOP_TOKENS = 0.5  # a layer-pass's split stops once its peak is this close to its largest base load


def minmax_iterations(num_gpus: int) -> int:
    """The split's diffusion steps for a placement over ``num_gpus`` GPUs (the default of every
    ``iterations=None`` here and in the kernels): 8 up to 8 GPUs; 16 from 9 to 32, where the
    split converges more slowly (ESFT at EP16: 1.09% over the optimum after 8 steps on the
    layer-passes the split can change, 0.35% after 16; synthetic EP32 1.05% / 0.28%); 8 again
    past 32 GPUs, where 8 steps already land within 0.8% of 200 (synthetic EP36 to EP72:
    with few slots per GPU a GPU of single-replica experts sets most peaks). There the kernels
    split on the list of replicas, about 0.6 us a step per layer on an H100 (EP72, 512 tokens:
    14.5 us with 8 steps, 19.2 with 16; on the dense table a step took 2.4 us). On a whole
    pass most of those steps stop early (``MINMAX_STOP_TOKENS``: EP72 10.4 us at 512 tokens)."""
    if MINMAX_NARROW_GPUS < num_gpus <= MINMAX_WIDE_GPUS:
        return MINMAX_ITERATIONS_WIDE
    return MINMAX_ITERATIONS


class MinmaxTables(NamedTuple):
    """Placement-only tables of the ``minmax`` split, one row per layer (fixed widths, so a
    CUDA graph that captured the split keeps reading them when a new placement is copied in).

    multi_experts: [L, M] int64, the replicated experts of each layer (replicas on two or
        more GPUs); -1 = unused row.
    multi_gpus: [L, M, G] float32, 1.0 where that expert has a replica on that GPU.
    single_slots: [L, G, S] int64, the expert held by each GPU's slot when all its
        replicas are on that GPU (at its first slot only); -1 elsewhere (S = slots per GPU).
    multi_row: [L, E] int64, each expert's row in ``multi_experts``; -1 if not replicated.
    slot_on_gpu: [L, E, G] int64, the expert's first slot on each GPU; -1 where it has none.
        A GPU's share of an expert goes to that slot (a second copy on the same GPU would
        serve the same GPU load).
    home_slot: [L, E] int64, a slot of each expert (for an expert on one GPU: its first slot
        there, where all its tokens go).
    entries: [L, ENTRY_FIELDS, N] int64, the same replicas as a list (the kernels' split of
        wide tables, ``entries=``): entry n is a (replicated expert, GPU) pair, listed by row
        of ``multi_experts`` then GPU; N = ``entries_width`` (a bound on them, padded). Its
        fields are the ``ENTRY_*`` rows below (a padding entry: row -1, GPU 0, and its own
        one-entry groups).
    multi_entry: [L, M, G] int64, the entry of each (row, GPU) pair; -1 where it has none.
    """

    multi_experts: torch.Tensor
    multi_gpus: torch.Tensor
    single_slots: torch.Tensor
    multi_row: torch.Tensor
    slot_on_gpu: torch.Tensor
    home_slot: torch.Tensor
    entries: torch.Tensor
    multi_entry: torch.Tensor


# The fields of ``MinmaxTables.entries`` (rows of its second axis).
ENTRY_ROW = 0  # the entry's row in multi_experts (-1: padding)
ENTRY_GPU = 1  # its GPU
ENTRY_BY_GPU = 2  # the entries listed by GPU then row: at position k, an entry's index
ENTRY_GPU_FIRST = 3  # the first and last positions, in that GPU order, of the entries of its GPU
ENTRY_GPU_LAST = 4
ENTRY_ROW_FIRST = 5  # the first and last entries of its row (its expert's replicas)
ENTRY_ROW_LAST = 6
ENTRY_FIELDS = 7


def entries_width(num_slots: int, num_logical_experts: int) -> int:
    """The entries' padded width: a power of two at least ``2 (P - E)``. A replicated
    expert has an entry per GPU it is on, at most its slots, and its replicas beyond the
    first take the ``P - E`` redundant slots, so there are at most ``2 (P - E)`` entries."""
    bound = 2 * max(1, num_slots - num_logical_experts)
    return 1 << (bound - 1).bit_length()


def _entry_tables(multi_gpus: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(entries [L, ENTRY_FIELDS, width], multi_entry [L, M, G]) of the replicas
    ``multi_gpus`` [L, M, G] (``MinmaxTables``); width 0: both empty."""
    num_layers, num_multi, num_gpus = multi_gpus.shape
    device = multi_gpus.device
    if width == 0:
        return (torch.zeros(num_layers, ENTRY_FIELDS, 0, dtype=torch.int64, device=device),
                torch.zeros(num_layers, num_multi, 0, dtype=torch.int64, device=device))
    inc = multi_gpus > 0
    flat = inc.flatten(1)  # by row, then GPU: the entries' order
    index = torch.cumsum(flat, 1) - 1
    multi_entry = torch.where(flat, index, -1).view_as(inc)
    own = torch.arange(width, device=device).expand(num_layers, -1)
    # Padding entries: row -1, GPU 0, each its own group in both orders.
    entries = torch.stack([torch.full_like(own, -1), torch.zeros_like(own)] + [own] * 5, 1).clone()
    target = torch.where(flat, index, width)  # the pairs without an entry go to a dropped column
    row = torch.arange(num_multi, device=device)[:, None].expand(num_multi, num_gpus).flatten()
    gpu = torch.arange(num_gpus, device=device).repeat(num_multi)
    degree = inc.sum(2)  # [L, M]
    row_first = torch.cumsum(degree, 1) - degree
    per_gpu = inc.sum(1)  # [L, G]
    gpu_first = torch.cumsum(per_gpu, 1) - per_gpu
    # Each entry's position in the GPU order: its GPU's first, plus the entries of lower rows there.
    position = (gpu_first[:, None, :] + torch.cumsum(inc, 1) - 1).flatten(1)
    values = {
        ENTRY_ROW: row.expand(num_layers, -1), ENTRY_GPU: gpu.expand(num_layers, -1),
        ENTRY_GPU_FIRST: gpu_first[:, gpu], ENTRY_GPU_LAST: (gpu_first + per_gpu - 1)[:, gpu],
        ENTRY_ROW_FIRST: row_first[:, row], ENTRY_ROW_LAST: (row_first + degree - 1)[:, row],
    }
    padded = torch.cat([entries, entries.new_zeros(num_layers, ENTRY_FIELDS, 1)], 2)
    for field, value in values.items():
        padded[:, field].scatter_(1, target, value)
    by_gpu = padded[:, ENTRY_BY_GPU]
    by_gpu.scatter_(1, torch.where(flat, position, width), torch.where(flat, index, width))
    return padded[..., :width].contiguous(), multi_entry


def build_minmax_tables(physical_to_logical_map: torch.Tensor, num_logical_experts: int, *,
                        num_gpus: int, entries: bool = True) -> MinmaxTables:
    """physical_to_logical_map: [L, P] int (every expert listed at least once). Returns the
    tables on the map's device. entries=False: ``entries`` and ``multi_entry`` left empty
    (width 0; the kernels refuse such tables): for the torch split alone (the planner's
    scoring), which does not read them."""
    phy2log = physical_to_logical_map.long()
    num_layers, num_slots = phy2log.shape
    num_logical = num_logical_experts
    slots_per_gpu = num_slots // num_gpus
    width = max(1, num_slots - num_logical)
    device = phy2log.device
    layer = torch.arange(num_layers, device=device)[:, None].expand_as(phy2log)
    slot = torch.arange(num_slots, device=device).expand_as(phy2log)
    gpu = slot // slots_per_gpu
    # Step 1: each expert's first slot on each GPU (scatter_reduce amin over its slots).
    first = torch.full((num_layers, num_logical, num_gpus), num_slots, dtype=torch.int64, device=device)
    first = first.flatten().scatter_reduce(0, (layer * num_logical * num_gpus + phy2log * num_gpus + gpu).flatten(),
                                           slot.flatten(), reduce="amin").view_as(first)
    has = first < num_slots
    slot_on_gpu = torch.where(has, first, -1)
    replicated = has.sum(-1) > 1  # [L, E]
    # Step 2: the replicated experts in id order, padded to M rows (-1).
    order = torch.sort(torch.where(replicated, 0, 1), dim=1, stable=True).indices[:, :width]
    used = torch.gather(replicated, 1, order)
    multi_experts = torch.where(used, order, -1)
    multi_gpus = (torch.gather(has, 1, order[..., None].expand(-1, -1, num_gpus)) & used[..., None]).to(torch.float32)
    multi_row = torch.full((num_layers, num_logical + 1), -1, dtype=torch.int64, device=device)
    multi_row.scatter_(1, torch.where(used, order, num_logical), torch.arange(width, device=device).expand(num_layers, -1))
    # Step 3: experts on one GPU only, listed at their first slot there.
    first_of_slot = torch.gather(first.flatten(1), 1, phy2log * num_gpus + gpu) == slot
    single = torch.gather(~replicated, 1, phy2log) & first_of_slot
    single_slots = torch.where(single, phy2log, -1).view(num_layers, num_gpus, slots_per_gpu)
    entries, multi_entry = _entry_tables(multi_gpus, entries_width(num_slots, num_logical) if entries else 0)
    return MinmaxTables(multi_experts, multi_gpus, single_slots, multi_row[:, :num_logical], slot_on_gpu,
                        slot_on_gpu.amax(-1), entries, multi_entry)


class MinmaxProblem(NamedTuple):
    """One batch of split problems (``minmax_gpu_shares``'s rows), set up for the diffusion.

    base [N, G]: load of the experts on one GPU; demand [N, M]: tokens of each replicated
    expert; inc [N, M, G]: 1.0 where it has a replica; degree [N, M]: its GPUs; step
    [N, M, G]: the step on each GPU; equal [N, M, G]: the equal split (the start)."""

    base: torch.Tensor
    demand: torch.Tensor
    inc: torch.Tensor
    degree: torch.Tensor
    step: torch.Tensor
    equal: torch.Tensor

    def renormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Each expert's shares scaled to its tokens (the equal split where they sum to 0)."""
        total = x.sum(-1, keepdim=True)
        return torch.where(total > 0, x * (self.demand.unsqueeze(-1) / total.clamp_min(1e-30)), self.equal)

    def advance(self, x: torch.Tensor, prev: torch.Tensor, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One diffusion step with momentum: (next iterate, the step's iterate before momentum)."""
        load = self.base + x.sum(1)  # [N, G]
        level = (self.inc * load.unsqueeze(1)).sum(-1) / self.degree  # the mean load each expert's GPUs see
        y = ((x + self.step * (level.unsqueeze(-1) - load.unsqueeze(1))).clamp_min(0.0)) * self.inc
        return self.renormalize((y + momentum * (y - prev)).clamp_min(0.0) * self.inc), y

    def peak(self, x: torch.Tensor) -> torch.Tensor:
        """[N] the largest GPU load of shares x."""
        return (self.base + x.sum(1)).amax(-1)

    def stop_at(self) -> torch.Tensor:
        """[N] the peak at which a whole pass's split stops: within ``MINMAX_STOP_TOKENS`` of
        the largest base load, which no split's peak goes under."""
        return self.base.amax(-1) + MINMAX_STOP_TOKENS


def minmax_problem(counts: torch.Tensor, multi_experts: torch.Tensor, multi_gpus: torch.Tensor,
                   single_slots: torch.Tensor) -> MinmaxProblem:
    """The rows' problems (arguments as ``minmax_gpu_shares``)."""
    c = torch.cat([counts.to(torch.float32), counts.new_zeros(counts.shape[0], 1, dtype=torch.float32)], 1)
    num_logical = counts.shape[1]
    base = torch.gather(c, 1, torch.where(single_slots >= 0, single_slots, num_logical).flatten(1))
    base = base.view(single_slots.shape).sum(-1)  # [N, G] load of single-GPU experts
    demand = torch.gather(c, 1, torch.where(multi_experts >= 0, multi_experts, num_logical))  # [N, M]
    inc = multi_gpus
    degree = inc.sum(-1).clamp_min(1.0)  # [N, M]
    step = inc / inc.sum(1, keepdim=True).clamp_min(1.0)  # [N, M, G]
    return MinmaxProblem(base, demand, inc, degree, step, inc * (demand / degree).unsqueeze(-1))


def minmax_gpu_shares(
    counts: torch.Tensor, multi_experts: torch.Tensor, multi_gpus: torch.Tensor, single_slots: torch.Tensor,
    *, iterations: int | None = None, momentum: float = MINMAX_MOMENTUM, stop: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched split of N independent rows (a row is one layer of one pass).

    counts: [N, E] tokens per logical expert (float or int); multi_experts [N, M],
    multi_gpus [N, M, G], single_slots [N, G, S]: rows of ``MinmaxTables``. iterations: the
    steps each row takes; with ``stop`` (counts of whole passes: what the kernels do on them)
    a row stops once its peak is within ``MINMAX_STOP_TOKENS`` of its largest base load.
    Without it every step runs, evening out the GPUs below the peak too, which a rank's
    share of a pass needs (the pass's loads are the ranks' sum). Returns (shares [N, M, G]
    float32: tokens of each replicated expert each GPU serves, gpu_load [N, G] float32: the
    resulting GPU loads).
    """
    problem = minmax_problem(counts, multi_experts, multi_gpus, single_slots)
    x = prev = problem.equal
    stop_at = problem.stop_at() if stop else None
    for _ in range(minmax_iterations(multi_gpus.shape[-1]) if iterations is None else iterations):
        step_x, step_prev = problem.advance(x, prev, momentum)
        if stop_at is None:
            x, prev = step_x, step_prev
            continue
        going = (problem.peak(x) > stop_at)[:, None, None]  # rows masked, no early exit: that would read the device
        x, prev = torch.where(going, step_x, x), torch.where(going, step_prev, prev)
    kept = problem.peak(x) <= problem.peak(problem.equal)  # never worse than the equal split
    shares = torch.where(kept[:, None, None], x, problem.equal)
    return shares, problem.base + shares.sum(1)


def minmax_choose(position: torch.Tensor, experts: torch.Tensor, shares: torch.Tensor, multi_row: torch.Tensor,
                  slot_on_gpu: torch.Tensor) -> torch.Tensor:
    """The slot of each pair of one row (layer of a pass) from its occurrence index.

    position: [n] int or float, the pair's index among its expert's pairs of the pass;
    experts: [n] int64 logical ids (valid); shares: [M, G] (``minmax_gpu_shares`` of the
    row); multi_row: [E]; slot_on_gpu: [E, G]. The j-th pair of a replicated expert goes to
    the first GPU whose cumulative share (in GPU order) exceeds j + 0.5, clamped to the
    expert's last GPU; an expert on one GPU keeps its first slot there. Returns [n] int64.
    """
    row = multi_row[experts]
    cum = torch.cumsum(torch.cat([shares, shares.new_zeros(1, shares.shape[1])])[row], -1)  # row -1: zeros
    gpus = slot_on_gpu[experts]  # [n, G]
    hosted = gpus >= 0
    last = torch.where(hosted, torch.arange(gpus.shape[1], device=gpus.device), -1).amax(-1)
    first = torch.where(hosted, torch.arange(gpus.shape[1], device=gpus.device), gpus.shape[1]).amin(-1)
    pick = (cum <= position.to(cum.dtype).unsqueeze(-1) + 0.5).sum(-1)
    pick = torch.where(row >= 0, torch.minimum(pick, last), first)
    return torch.gather(gpus, 1, pick.unsqueeze(-1)).squeeze(-1)


def minmax_loads(maps: torch.Tensor, counts: torch.Tensor, *, num_gpus: int,
                 iterations: int | None = None) -> torch.Tensor:
    """GPU loads under the split (fractional: before rounding to tokens) of R independent
    rows, each a map and one pass's counts. maps: [R, P] int64; counts: [R, E]. Returns [R, G]."""
    tables = build_minmax_tables(maps, counts.shape[1], num_gpus=num_gpus, entries=False)
    _, gpu = minmax_gpu_shares(counts, tables.multi_experts, tables.multi_gpus, tables.single_slots,
                               iterations=iterations)
    return gpu
