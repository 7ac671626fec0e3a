"""The minmax dispatch's Triton kernels against the dispatcher's torch path (interpreted on CPU)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

import pytest

from eplb_plugin.dispatch import ExpertDispatcher
from eplb_plugin.kernels import triton_available
from eplb_plugin.location import ExpertLocation

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed: int, num_experts: int, num_slots: int, ep: int, tokens: int, top_k: int):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.rand(2, num_experts, generator=gen) ** 4 * 1000  # skewed
    location = ExpertLocation.from_logical_count(counts, num_physical_experts=num_slots, ep_size=ep,
                                                 algorithm="eplb_plugin_equal")
    hot = torch.multinomial(counts[0] + 1, tokens * top_k, replacement=True, generator=gen)
    ids = hot.view(tokens, top_k)
    ids[torch.rand(tokens, top_k, generator=gen) < 0.05] = -1  # padding
    return location, ids


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("seed, num_experts, num_slots, ep, tokens, top_k",
                         [(0, 16, 20, 4, 37, 4), (1, 64, 72, 8, 333, 6), (2, 8, 16, 2, 5, 2),
                          (3, 256, 288, 8, 97, 8),  # DeepSeek-V3's experts and slots
                          (4, 256, 288, 72, 97, 8),  # ... over 72 GPUs: a [32, 128] split table
                          (6, 16, 20, 4, 1500, 4),  # many tiles
                          (9, 64, 72, 8, 2100, 4)])  # a large pass: the kernels with per-chunk bases
def test_kernel_dispatches_like_the_torch_path(seed, num_experts, num_slots, ep, tokens, top_k):
    """Every pair goes to a replica of its own expert (padding stays -1); per-slot loads
    match the torch path's within one pair (float sums in another order may move a pair on
    a quota boundary), and the counts the kernel adds are exactly the slots it chose."""
    location, ids = _case(seed, num_experts, num_slots, ep, tokens, top_k)
    torch_path = ExpertDispatcher(location, rank=1, algorithm="minmax")
    kernel = ExpertDispatcher(location, rank=1, algorithm="minmax", backend="triton", device=DEVICE)
    counts = torch.zeros(2, num_slots, dtype=torch.int32, device=DEVICE)
    for layer in range(2):
        got = kernel.dispatch(layer, ids.to(DEVICE), counts_out=counts).cpu()
        want = torch_path.dispatch(layer, ids)
        assert torch.equal(got == -1, ids == -1)
        phy2log = location.physical_to_logical_map[layer]
        assert torch.equal(phy2log[got[ids >= 0]], ids[ids >= 0])
        got_load = torch.bincount(got[got >= 0], minlength=num_slots)
        want_load = torch.bincount(want[want >= 0], minlength=num_slots)
        assert (got_load - want_load).abs().max() <= 1
        assert torch.equal(counts[layer].cpu(), got_load.to(torch.int32))


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("seed, num_experts, num_slots, ep, tokens, top_k",
                         [(0, 16, 20, 4, 37, 4), (3, 256, 288, 8, 97, 8), (6, 16, 20, 4, 1500, 4)])
def test_the_fused_kernel_dispatches_like_the_torch_path(seed, num_experts, num_slots, ep, tokens, top_k):
    """The fused kernel (one launch; in the interpreter one program over every tile): each
    pair on a replica of its expert, the torch path's slot loads within one pair, and the
    counts it adds exactly the slots it chose."""
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton, minmax_scratch

    location, ids = _case(seed, num_experts, num_slots, ep, tokens, top_k)
    tables = ExpertDispatcher(location, rank=0, algorithm="minmax", backend="triton", device=DEVICE).minmax
    assert tables is not None
    scratch = minmax_scratch(tables)
    torch_path = ExpertDispatcher(location, rank=0, algorithm="minmax")
    counts = torch.zeros(2, num_slots, dtype=torch.int32, device=DEVICE)
    for layer in range(2):
        got = minmax_dispatch_triton(ids.to(DEVICE), tables, layer=layer, num_slots=num_slots, counts_out=counts,
                                     scratch=scratch, fused=True).cpu()
        assert scratch.counters[layer, -1].item() == 1  # the fused kernel ran: the layer's epoch moved on
        want = torch_path.dispatch(layer, ids)
        assert torch.equal(got == -1, ids == -1)
        assert torch.equal(location.physical_to_logical_map[layer][got[ids >= 0]], ids[ids >= 0])
        got_load = torch.bincount(got[got >= 0], minlength=num_slots)
        assert (got_load - torch.bincount(want[want >= 0], minlength=num_slots)).abs().max() <= 1
        assert torch.equal(counts[layer].cpu(), got_load.to(torch.int32))


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("seed, num_experts, num_slots, ep, tokens, top_k",
                         [(1, 64, 72, 8, 333, 6), (4, 256, 288, 72, 97, 8), (5, 64, 80, 16, 1500, 4),
                          (7, 16, 21, 3, 50, 4)])  # (3 GPUs: the search passes a padded GPU)
@pytest.mark.parametrize("bases, fused", [(False, False), (False, True), (True, False)])
def test_a_binary_search_of_the_quotas_picks_the_gpus_the_full_comparison_picks(seed, num_experts, num_slots, ep,
                                                                                 tokens, top_k, bases, fused):
    """``search=True`` (each pair's GPU by a binary search of its expert's quotas) serves
    every slot exactly the pairs the full comparison does, on every kernel set, and counts
    them; in the interpreter (programs one after another: the same tickets) pair for pair."""
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton

    location, ids = _case(seed, num_experts, num_slots, ep, tokens, top_k)
    tables = ExpertDispatcher(location, rank=0, algorithm="minmax", backend="triton", device=DEVICE).minmax
    assert tables is not None
    outs, loads = [], []
    for search in (False, True):
        counts = torch.zeros(2, num_slots, dtype=torch.int32, device=DEVICE)
        out = minmax_dispatch_triton(ids.to(DEVICE), tables, layer=1, num_slots=num_slots, counts_out=counts,
                                     bases=bases, fused=fused, search=search).cpu()
        assert torch.equal(location.physical_to_logical_map[1][out[ids >= 0]], ids[ids >= 0])
        outs.append(out)
        loads.append(torch.bincount(out[out >= 0], minlength=num_slots))
        assert torch.equal(counts[1].cpu(), loads[-1].to(torch.int32))
    assert torch.equal(loads[0], loads[1])
    if DEVICE == "cpu":
        assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("seed, num_experts, num_slots, ep, tokens, top_k",
                         [(4, 256, 288, 72, 97, 8), (1, 64, 72, 8, 333, 6), (5, 64, 80, 16, 1500, 4),
                          (10, 64, 96, 48, 200, 4),  # 32 redundant slots over 48 GPUs: experts on 3 and more
                          (7, 16, 21, 3, 50, 4)])  # (3 GPUs: a padded GPU in the dense table)
@pytest.mark.parametrize("bases, fused, glob", [(False, False, False), (False, True, False), (True, False, False),
                                                (False, False, True), (True, False, True)])
def test_the_split_on_the_list_of_replicas_writes_the_dense_splits_quotas(seed, num_experts, num_slots, ep, tokens,
                                                                          top_k, bases, fused, glob):
    """``entries=True`` (the split's steps on the list of (expert, GPU) replicas: a step's
    work by the replicas, not by experts x GPUs) writes the quotas of the split on the dense
    table (float sums in another order: within 1e-3 of a token), on every kernel set and
    through an exchange (the split kernel); every pair on a replica of its expert, the same
    slot loads within a pair, counted exactly."""
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton, minmax_scratch

    location, ids = _case(seed, num_experts, num_slots, ep, tokens, top_k)
    tables = ExpertDispatcher(location, rank=0, algorithm="minmax", backend="triton", device=DEVICE).minmax
    assert tables is not None
    local = torch.bincount(ids[ids >= 0], minlength=num_experts).to(torch.int32)

    def exchange(mine):  # one rank: the pass's counts are its own
        return local.to(mine.device), torch.zeros_like(local).to(mine.device)

    quotas, loads = [], []
    for entries in (False, True):
        scratch = minmax_scratch(tables)
        counts = torch.zeros(2, num_slots, dtype=torch.int32, device=DEVICE)
        out = minmax_dispatch_triton(ids.to(DEVICE), tables, layer=1, num_slots=num_slots, scratch=scratch,
                                     counts_out=counts, bases=bases, fused=fused, exchange=exchange if glob else None,
                                     entries=entries).cpu()
        assert torch.equal(location.physical_to_logical_map[1][out[ids >= 0]], ids[ids >= 0])
        quotas.append(scratch.quotas[1].cpu())
        loads.append(torch.bincount(out[out >= 0], minlength=num_slots))
        assert torch.equal(counts[1].cpu(), loads[-1].to(torch.int32))
    assert quotas[0].abs().max() > 0  # some expert was split
    torch.testing.assert_close(quotas[1], quotas[0], rtol=1e-5, atol=1e-3)
    assert (loads[1] - loads[0]).abs().max() <= 1


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("tokens", [97, 2100])  # the fused kernel, then the large-pass kernels
def test_the_split_on_the_list_of_replicas_reads_the_list_not_the_dense_table(tokens):
    """With ``entries=True`` the split reads ``MinmaxTables.entries``: with the dense table
    (``multi_gpus``) blanked it writes the same quotas, while the dense split, given the blank
    table, splits nothing (so the comparison above is not of one path with itself)."""
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton, minmax_scratch

    location, ids = _case(4, 256, 288, 72, tokens, 8)
    tables = ExpertDispatcher(location, rank=0, algorithm="minmax", backend="triton", device=DEVICE).minmax
    assert tables is not None
    blank = tables._replace(multi_gpus=torch.zeros_like(tables.multi_gpus))

    def quotas(t, entries):
        scratch = minmax_scratch(t)
        minmax_dispatch_triton(ids.to(DEVICE), t, layer=1, num_slots=288, scratch=scratch, entries=entries)
        return scratch.quotas[1].cpu()

    listed = quotas(tables, True)
    assert listed.abs().max() > 0
    assert torch.equal(quotas(blank, True), listed)
    assert quotas(blank, False).abs().max() == 0


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_the_kernels_refuse_tables_built_without_the_list_of_replicas():
    """Tables built for the torch split alone (``entries=False``: the planner's scoring) are
    refused by name before any launch, not read out of bounds."""
    from eplb_plugin.kernels.minmax import build_minmax_tables
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton

    location, ids = _case(0, 16, 20, 4, 37, 4)
    tables = build_minmax_tables(location.physical_to_logical_map, 16, num_gpus=4, entries=False)
    with pytest.raises(ValueError, match="entries=False"):
        minmax_dispatch_triton(ids, tables, layer=0, num_slots=20)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_kernel_follows_a_new_placement_copied_in_place():
    """After update_, the kernel reads the new tables (what a captured graph replays)."""
    old, ids = _case(4, 16, 20, 4, 50, 4)
    new, _ = _case(5, 16, 20, 4, 50, 4)
    kernel = ExpertDispatcher(old, rank=0, algorithm="minmax", backend="triton", device=DEVICE)
    kernel.dispatch(0, ids.to(DEVICE))  # the layer's launch arguments are made (and kept) here
    assert kernel.update_(new)
    got = kernel.dispatch(0, ids.to(DEVICE)).cpu()
    want = ExpertDispatcher(new, rank=0, algorithm="minmax").dispatch(0, ids)
    got_load = torch.bincount(got[got >= 0], minlength=20)
    assert (got_load - torch.bincount(want[want >= 0], minlength=20)).abs().max() <= 1


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("fused", [False, True])
def test_repeated_calls_leave_the_totals_zeroed_and_serve_the_same_slot_loads(fused):
    """The kernels keep per-layer counters between calls (the totals and the done count are
    zero between calls: the split zeroes them, and the tickets before the assign; the fused
    kernel moves the layer's epoch on by one a call), so a captured graph can replay them:
    every call of a layer serves the same tokens per slot."""
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton, minmax_scratch

    location, ids = _case(7, 64, 72, 8, 700, 6)
    dispatcher = ExpertDispatcher(location, rank=0, algorithm="minmax", backend="triton", device=DEVICE)
    assert dispatcher.minmax is not None
    scratch = minmax_scratch(dispatcher.minmax)
    loads = []
    for call in range(3):
        for layer in (1, 0):
            out = minmax_dispatch_triton(ids.to(DEVICE), dispatcher.minmax, layer=layer, num_slots=72, scratch=scratch,
                                         fused=fused)
            nb = (scratch.counters.shape[1] - 2) // 2
            assert not scratch.counters[:, :nb].any() and not scratch.counters[:, 2 * nb].any()
            assert scratch.counters[layer, -1].item() == (call + 1 if fused else 0)  # the epoch
            if layer == 0:
                loads.append(torch.bincount(out[out >= 0].cpu(), minlength=72))
    assert all(torch.equal(load, loads[0]) for load in loads)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_ranks_splitting_on_the_pass_counts_serve_what_one_dispatcher_of_the_whole_pass_serves():
    """With an exchange (``--ep-dispatch-counts global``) each rank's kernels split on the
    pass's counts and place its pairs after the lower ranks' pairs of each expert: the slots
    both ranks choose together carry the whole-pass torch path's loads (within a pair per
    rank at quota boundaries)."""
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton

    location, ids = _case(8, 64, 72, 8, 600, 6)
    parts = (ids[:250], ids[250:])
    local = [torch.bincount(p[p >= 0], minlength=64) for p in parts]
    kernel = ExpertDispatcher(location, rank=0, algorithm="minmax", backend="triton", device=DEVICE)
    assert kernel.minmax is not None
    called = []

    def loads() -> torch.Tensor:
        load = torch.zeros(72, dtype=torch.int64)
        for rank, part in enumerate(parts):
            def exchange(mine, rank=rank):
                called.append(rank)
                assert mine.dtype == torch.int32  # the kernels' dtype: exchanged without a conversion
                assert torch.equal(mine.cpu(), local[rank])
                return (local[0] + local[1]).to(mine.device), \
                    (local[0] if rank else torch.zeros_like(local[0])).to(mine.device)

            out = minmax_dispatch_triton(part.to(DEVICE), kernel.minmax, layer=1, num_slots=72,
                                         exchange=exchange).cpu()
            assert torch.equal(location.physical_to_logical_map[1][out[part >= 0]], part[part >= 0])
            load += torch.bincount(out[out >= 0], minlength=72)
        return load

    whole = ExpertDispatcher(location, rank=0, algorithm="minmax").dispatch(1, ids)
    want = torch.bincount(whole[whole >= 0], minlength=72)
    assert (loads() - want).abs().max() <= 2
    assert called == [0, 1]  # every rank's kernels took the pass's counts from the exchange


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("bases, fused", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("glob", [False, True])
def test_kernels_leave_rows_that_pad_the_batch_out_of_the_split_the_exchange_and_the_counts(bases, fused, glob):
    """minmax_dispatch(num_valid_rows=) on the kernels, which read the bound themselves: the
    real rows get the slot loads the torch reference gives those rows alone (with the same
    other ranks' counts, where the exchange gives some: a kernel that ignored them would
    differ), the exchange sees the real rows' counts
    only, padding rows' pairs get their expert's home slot (-1 kept), and
    counts_out holds the real rows' slots."""
    from eplb_plugin.dispatch import minmax_dispatch
    from eplb_plugin.kernels.minmax import build_minmax_tables
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton, minmax_scratch

    location, ids = _case(7, 16, 20, 4, 61, 4)
    tables = build_minmax_tables(location.physical_to_logical_map.to(DEVICE), 16, num_gpus=4)
    scratch = minmax_scratch(tables)
    real = 45
    local = torch.bincount(ids[:real][ids[:real] >= 0], minlength=16)
    gen = torch.Generator().manual_seed(5)
    below = torch.randint(0, 6, (16,), generator=gen)  # the pass's tokens on lower ranks ...
    above = torch.randint(0, 6, (16,), generator=gen)  # ... and on higher ones
    seen = []

    def others(mine):
        return mine + (below + above).to(mine), below.to(mine)

    def exchange(mine):
        seen.append(mine.cpu().long())
        return others(mine)

    counts = torch.zeros(2, 20, dtype=torch.int32, device=DEVICE)
    got = minmax_dispatch_triton(ids.to(DEVICE), tables, layer=1, num_slots=20, scratch=scratch, counts_out=counts,
                                 exchange=exchange if glob else None, bases=bases, fused=fused,
                                 num_valid_rows=torch.tensor([real], device=DEVICE)).cpu()
    alone = minmax_dispatch(ids[:real].to(DEVICE), tables, layer=1, num_slots=20, use_kernel=False,
                            exchange=others if glob else None).cpu()
    assert torch.equal(got[:real] == -1, alone == -1)
    real_load = torch.bincount(got[:real][got[:real] >= 0], minlength=20)
    assert torch.equal(real_load, torch.bincount(alone[alone >= 0], minlength=20))
    pad = ids[real:]
    assert torch.equal(got[real:], torch.where(pad >= 0, tables.home_slot[1].cpu()[pad.clamp_min(0)], -1))
    assert torch.equal(counts[1].cpu(), real_load.to(torch.int32)) and not counts[0].any()
    if glob:
        assert len(seen) == 1 and torch.equal(seen[0], local)
    nb = (scratch.counters.shape[1] - 2) // 2
    assert not scratch.counters[:, :nb].any() and not scratch.counters[:, 2 * nb].any()
    assert scratch.counters[1, -1].item() == int(fused and not glob)  # the fused kernel ran, with no exchange only


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("bound, dtype", [(0, torch.int32), (61, torch.int64), (1000, torch.int32), (-3, torch.int64)])
def test_a_bound_of_no_rows_or_of_every_row_is_clamped(bound, dtype):
    """The kernels clamp the bound to [0, T]: 0 or below leaves every row out (each pair at
    its home slot, nothing counted), T or more keeps every row (as no bound)."""
    from eplb_plugin.kernels.minmax import build_minmax_tables
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton

    location, ids = _case(3, 16, 20, 4, 61, 4)
    tables = build_minmax_tables(location.physical_to_logical_map.to(DEVICE), 16, num_gpus=4)
    counts = torch.zeros(2, 20, dtype=torch.int32, device=DEVICE)
    got = minmax_dispatch_triton(ids.to(DEVICE), tables, layer=0, num_slots=20, counts_out=counts,
                                 num_valid_rows=torch.tensor([bound], dtype=dtype, device=DEVICE)).cpu()
    if bound <= 0:
        assert torch.equal(got, torch.where(ids >= 0, tables.home_slot[0].cpu()[ids.clamp_min(0)], -1))
        assert not counts.any()
    else:
        unbounded = minmax_dispatch_triton(ids.to(DEVICE), tables, layer=0, num_slots=20).cpu()
        load = torch.bincount(got[got >= 0], minlength=20)
        assert torch.equal(load, torch.bincount(unbounded[unbounded >= 0], minlength=20))
        assert torch.equal(counts[0].cpu(), load.to(torch.int32))


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("seed, num_experts, num_slots, ep, tokens, top_k, tile",
                         [(0, 16, 20, 4, 37, 4, 256), (1, 64, 72, 8, 333, 6, 256), (3, 256, 288, 8, 97, 8, 128),
                          (4, 256, 288, 72, 97, 8, 128),  # the split's counts over 72 GPUs
                          (6, 16, 20, 4, 1500, 4, 1024)])
@pytest.mark.parametrize("glob", [False, True])
def test_the_large_pass_kernels_on_any_pass(seed, num_experts, num_slots, ep, tokens, top_k, tile, glob):
    """The kernels of large passes (``bases=True``), also on small ones and with a count
    exchange of two ranks: each pair on a replica of its expert, the slot loads of the
    torch path within one pair per rank, counts exactly the slots chosen, totals zeroed."""
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton, minmax_scratch

    location, ids = _case(seed, num_experts, num_slots, ep, tokens, top_k)
    tables = ExpertDispatcher(location, rank=0, algorithm="minmax", backend="triton", device=DEVICE).minmax
    assert tables is not None
    scratch = minmax_scratch(tables)
    counts = torch.zeros(2, num_slots, dtype=torch.int32, device=DEVICE)
    cut = tokens // 3 if glob else tokens
    parts = (ids[:cut], ids[cut:]) if glob else (ids,)
    local = [torch.bincount(p[p >= 0], minlength=num_experts) for p in parts]
    load = torch.zeros(num_slots, dtype=torch.int64)
    called: list[int] = []
    for rank, part in enumerate(parts):
        def exchange(mine, rank=rank):
            called.append(rank)
            assert mine.dtype == torch.int32
            return sum(local).to(mine.device), sum(local[:rank], torch.zeros_like(local[0])).to(mine.device)

        out = minmax_dispatch_triton(part.to(DEVICE), tables, layer=1, num_slots=num_slots, scratch=scratch,
                                     exchange=exchange if glob else None, counts_out=counts, bases=True,
                                     totals_tile=tile, chunk=64).cpu()
        assert torch.equal(out == -1, part == -1)
        assert torch.equal(location.physical_to_logical_map[1][out[part >= 0]], part[part >= 0])
        load += torch.bincount(out[out >= 0], minlength=num_slots)
        assert not scratch.counters[1, :(scratch.counters.shape[1] - 1) // 2].any() and not scratch.counters[1, -1]
    assert torch.equal(counts[1].cpu(), load.to(torch.int32))
    assert called == ([0, 1] if glob else [])  # every rank exchanged its counts
    # exchanged counts are the whole pass: the split stops as a dispatcher of the whole pass's does
    whole = ExpertDispatcher(location, rank=0, algorithm="minmax", whole_pass=glob).dispatch(1, ids)
    assert (load - torch.bincount(whole[whole >= 0], minlength=num_slots)).abs().max() <= len(parts)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("bases", [False, True])
def test_the_kernels_keep_the_equal_split_where_a_step_raises_the_peak(bases):
    """The hand case of ``test_minmax_split``: one diffusion step peaks at 81.5 tokens, so
    the kernels (like the torch path) serve the equal split, whose peak is 74.8."""
    from eplb_plugin.kernels.minmax import build_minmax_tables
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton

    phy2log = torch.tensor([[0, 1, 5, 3, 2, 4, 5, 2, 4, 3, 4, 2]])
    counts = [58, 2, 64, 79, 42, 28]
    order = torch.randperm(sum(counts), generator=torch.Generator().manual_seed(0))
    ids = torch.repeat_interleave(torch.arange(6), torch.tensor(counts))[order].view(-1, 1)
    tables = build_minmax_tables(phy2log.to(DEVICE), 6, num_gpus=4)
    out = minmax_dispatch_triton(ids.to(DEVICE), tables, layer=0, num_slots=12, iterations=1, bases=bases).cpu()
    gpu = torch.bincount(out.flatten() // 3, minlength=4)
    assert gpu.max().item() <= 75  # the equal split's 74.8, whole tokens; the step's split would need 81


# 3 GPUs x 2 slots: expert 0 alone on GPU 0 (100 tokens) sets the peak; expert 4 has a
# replica on GPU 1 (beside expert 2's 30 tokens) and on GPU 2 (alone).
STOP_MAP = [0, 1, 2, 4, 3, 4]
STOP_COUNTS = [100, 0, 30, 0, 20]


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("bases, fused, entries", [(False, False, False), (False, True, False), (True, False, False),
                                                   (False, False, True), (False, True, True), (True, False, True)])
def test_the_kernels_take_no_step_on_a_whole_pass_where_a_gpu_without_replicas_sets_the_peak(bases, fused, entries):
    """GPU 0's 100 tokens are the peak of every split, so on a whole pass (``whole_pass``,
    or counts through an exchange) the split stops before its first step and expert 4 keeps
    the equal split (10 tokens on each replica), as in the torch path. On a rank's share of
    a pass it takes its steps, moving expert 4's tokens toward the idle GPU 2."""
    from eplb_plugin.dispatch import minmax_dispatch
    from eplb_plugin.kernels.minmax import build_minmax_tables
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton

    phy2log = torch.tensor([STOP_MAP])
    order = torch.randperm(sum(STOP_COUNTS), generator=torch.Generator().manual_seed(0))
    ids = torch.repeat_interleave(torch.arange(5), torch.tensor(STOP_COUNTS))[order].view(-1, 1)
    tables = build_minmax_tables(phy2log.to(DEVICE), 5, num_gpus=3, entries=True)

    def exchange(local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # one rank: its counts are the pass's
        return local.clone(), torch.zeros_like(local)

    def loads(use_kernel: bool, **how) -> list[int]:
        if use_kernel:
            out = minmax_dispatch_triton(ids.to(DEVICE), tables, layer=0, num_slots=6, iterations=16, bases=bases,
                                         fused=fused, entries=entries, **how)
        else:
            out = minmax_dispatch(ids.to(DEVICE), tables, layer=0, num_slots=6, use_kernel=False, iterations=16, **how)
        return torch.bincount(out.cpu().flatten(), minlength=6).tolist()

    for use_kernel in (True, False):
        assert loads(use_kernel, whole_pass=True) == [100, 0, 30, 10, 0, 10]
        assert loads(use_kernel, exchange=exchange) == [100, 0, 30, 10, 0, 10]
        share = loads(use_kernel)
        assert share[3] < 10 and share[3] + share[5] == 20


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("bases", [False, True])
def test_the_kernels_write_int32_slots_when_asked(bases):
    """out_dtype=torch.int32 (SGLang's topk_ids dtype): the kernels write int32 slots with
    the int64 output's slot loads, -1 kept, every pair on a replica of its expert."""
    from eplb_plugin.kernels.minmax import build_minmax_tables
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton

    location, ids = _case(1, 64, 72, 8, 333, 6)
    tables = build_minmax_tables(location.physical_to_logical_map.to(DEVICE), 64, num_gpus=8)
    wide = minmax_dispatch_triton(ids.to(DEVICE), tables, layer=1, num_slots=72, bases=bases).cpu()
    narrow = minmax_dispatch_triton(ids.to(torch.int32).to(DEVICE), tables, layer=1, num_slots=72, bases=bases,
                                    out_dtype=torch.int32).cpu()
    assert wide.dtype == torch.int64 and narrow.dtype == torch.int32
    assert torch.equal(narrow == -1, ids == -1)
    assert torch.equal(location.physical_to_logical_map[1][narrow[ids >= 0].long()], ids[ids >= 0])
    assert torch.equal(torch.bincount(narrow[narrow >= 0].long(), minlength=72),
                       torch.bincount(wide[wide >= 0], minlength=72))


def test_the_torch_path_writes_the_dtype_asked_and_refuses_others():
    """minmax_dispatch(out_dtype=) on the torch path: int32 holds the int64 result exactly;
    a float dtype is refused by name."""
    from eplb_plugin.dispatch import minmax_dispatch
    from eplb_plugin.errors import ConfigError
    from eplb_plugin.kernels.minmax import build_minmax_tables

    location, ids = _case(2, 16, 20, 4, 37, 4)
    tables = build_minmax_tables(location.physical_to_logical_map, 16, num_gpus=4)
    wide = minmax_dispatch(ids, tables, layer=0, num_slots=20, use_kernel=False)
    narrow = minmax_dispatch(ids, tables, layer=0, num_slots=20, use_kernel=False, out_dtype=torch.int32,
                             num_valid_rows=torch.tensor([30]))
    assert narrow.dtype == torch.int32
    assert torch.equal(narrow[:30].long(), minmax_dispatch(ids[:30], tables, layer=0, num_slots=20,
                                                           use_kernel=False))
    assert wide.dtype == torch.int64
    with pytest.raises(ConfigError, match="out_dtype"):
        minmax_dispatch(ids, tables, layer=0, num_slots=20, use_kernel=False, out_dtype=torch.float32)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("bases, fused", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("glob", [False, True])
def test_the_kernel_path_runs_no_torch_op_but_its_output_allocation(monkeypatch, bases, fused, glob):
    """What SGLang's mapping runs per layer (int32 ids, a padding bound, int32 slots, the
    recorder's buffer, an exchange) is the kernels' launches alone: no torch op besides
    allocating the output (and the large passes' chunk bases) and views; the padding
    bound, the dtypes and the exchange's counts need no conversion (the launches are
    recorded, not run). A small pass without an exchange is one launch (the fused kernel),
    unless fused=False."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from eplb_plugin.dispatch import minmax_dispatch
    from eplb_plugin.kernels import minmax_triton as host
    from eplb_plugin.kernels.minmax import build_minmax_tables

    launched: list[str] = []

    class Launch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(self.name)

    for module in host._kernels():
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, Launch(name))
    monkeypatch.setattr(host, "FUSED", fused)
    location, ids = _case(3, 16, 20, 4, 2100 if bases else 61, 4)  # > SMALL_PASS_IDS pairs: the bases kernels
    tables = build_minmax_tables(location.physical_to_logical_map.to(DEVICE), 16, num_gpus=4)
    scratch = host.minmax_scratch(tables)
    ids = ids.to(torch.int32).to(DEVICE)
    bound = torch.tensor([50], dtype=torch.int32, device=DEVICE)
    counts = torch.zeros(2, 20, dtype=torch.int32, device=DEVICE)
    pass_counts = (torch.zeros(16, dtype=torch.int32, device=DEVICE),) * 2

    def call():
        return minmax_dispatch(ids, tables, layer=1, num_slots=20, use_kernel=True, num_valid_rows=bound,
                               out_dtype=torch.int32, scratch=scratch, counts_out=counts,
                               exchange=(lambda mine: pass_counts) if glob else None)

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    call()  # the first call of a layer makes its launch arguments
    ops: list[str] = []
    launched.clear()
    with Ops():
        out = call()
    assert out.dtype == torch.int32 and out.shape == ids.shape
    assert set(ops) <= {"empty", "view", "slice"}, ops
    assert ops.count("empty") == (2 if bases else 1)
    if fused and not glob:
        assert launched == ["minmax_fused_kernel"]
    else:
        assert launched == ([f"{'bases' if bases else 'minmax'}_totals_kernel"] + ["minmax_split_kernel"] * glob
                            + [f"{'bases' if bases else 'minmax'}_assign_kernel"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("tokens", [61, 2100])  # the ticket kernels, the bases kernels
def test_a_graph_of_sglangs_mapping_and_hook_counts_each_layer_once_on_every_replay(tokens):
    """SGLang's sequence per layer (the mapping takes the recorder's buffer and counts in its
    launch, SGLang masks the padding rows, then calls on_select_experts) captured in one CUDA
    graph: every replay adds each layer's real rows' slots once, as the torch path counts them."""
    from eplb_plugin.dispatch import minmax_dispatch
    from eplb_plugin.kernels.minmax import build_minmax_tables
    from eplb_plugin.kernels.minmax_triton import minmax_scratch
    from eplb_plugin.recorder import ExpertDistributionRecorder

    location, ids = _case(11, 16, 20, 4, tokens, 4)
    phy2log = location.physical_to_logical_map.cuda()
    tables = build_minmax_tables(phy2log, 16, num_gpus=4)
    scratch = minmax_scratch(tables)
    ids = ids.to(torch.int32).cuda()
    real = tokens - tokens // 8
    bound = torch.tensor([real], dtype=torch.int32, device="cuda")
    rec = ExpertDistributionRecorder("stat", physical_to_logical_map=phy2log, num_logical_experts=16)
    outs = []

    def forward():
        outs.clear()
        for layer in range(2):
            with rec.with_current_layer(layer):
                out = minmax_dispatch(ids, tables, layer=layer, num_slots=20, use_kernel=True, scratch=scratch,
                                      counts_out=rec.select_counts_buffer(layer), num_valid_rows=bound,
                                      out_dtype=torch.int32)
                out[real:] = -1  # SGLang's mask of the padding rows
                rec.on_select_experts(out)
                outs.append(out)

    rec.start_record()
    with rec.with_forward_pass(0):
        forward()  # compiles the kernels
    torch.cuda.synchronize()  # warm-up done before capture
    graph = torch.cuda.CUDAGraph()
    with rec.counts_discarded(), torch.cuda.graph(graph):
        forward()
    for p in range(1, 4):
        with rec.with_forward_pass(p):
            graph.replay()
        torch.cuda.synchronize()  # read this replay's slots
        want = torch.stack([torch.bincount(o[o >= 0].long(), minlength=20) for o in outs]).cpu()
        assert torch.equal(rec.physical_count_passes()[-1].cpu(), want)
        assert torch.equal(want.sum(1), torch.full((2,), int((ids[:real] >= 0).sum())))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("num_experts, num_slots, ep, tokens, top_k",
                         [(256, 288, 8, 512, 8),  # DeepSeek-V3 decode: 32 programs wait for one split
                          (256, 288, 72, 1024, 8),  # 72 GPUs: 256 tiles of 32 pairs over at most one program per SM
                          (64, 72, 8, 1, 6)])  # one program
def test_the_fused_kernel_in_a_graph_serves_the_torch_paths_loads_on_every_replay(num_experts, num_slots, ep, tokens,
                                                                                  top_k):
    """The fused kernel's programs wait for the one that solves the split, on the GPU: 20
    layers in one CUDA graph, replayed 30 times; every replay serves the torch path's slot
    loads (within one pair per slot), counts each real pair once, and leaves each layer's
    epoch one further on."""
    from eplb_plugin.kernels.minmax_triton import minmax_dispatch_triton, minmax_scratch

    num_layers = 20
    _, ids = _case(12, num_experts, num_slots, ep, tokens, top_k)
    skew = torch.rand(num_layers, num_experts, generator=torch.Generator().manual_seed(13)) ** 4 * 1000
    location = ExpertLocation.from_logical_count(skew,
                                                 num_physical_experts=num_slots, ep_size=ep,
                                                 algorithm="eplb_plugin_equal")
    dispatcher = ExpertDispatcher(location, rank=0, algorithm="minmax", backend="triton", device="cuda")
    tables = dispatcher.minmax
    assert tables is not None
    scratch = minmax_scratch(tables)
    ids = ids.cuda()
    counts = torch.zeros(num_layers, num_slots, dtype=torch.int32, device="cuda")
    outs = [torch.empty_like(ids) for _ in range(num_layers)]

    def forward():
        for layer in range(num_layers):
            outs[layer].copy_(minmax_dispatch_triton(ids, tables, layer=layer, num_slots=num_slots, scratch=scratch,
                                                     counts_out=counts, fused=True))

    forward()  # compiles the kernel
    torch.cuda.synchronize()  # warm-up done before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    torch_path = ExpertDispatcher(location, rank=0, algorithm="minmax")
    want = []
    for layer in range(num_layers):
        out = torch_path.dispatch(layer, ids.cpu())
        want.append(torch.bincount(out[out >= 0], minlength=num_slots))
    epoch = scratch.counters[:, -1].clone()
    for replay in range(30):
        counts.zero_()
        graph.replay()
        torch.cuda.synchronize()  # read this replay's slots
        got = torch.stack([torch.bincount(o[o >= 0].cpu(), minlength=num_slots) for o in outs])
        assert (got - torch.stack(want)).abs().max() <= 1, replay
        assert torch.equal(counts.cpu().long(), got)
        assert torch.equal(scratch.counters[:, -1], epoch + replay + 1)


@pytest.mark.parametrize("ep, wide", [(8, False), (32, False), (36, True), (72, True)])
@pytest.mark.parametrize("tokens", [97, 2100])  # the ticket kernels, then the large-pass kernels
def test_the_kernels_default_search_split_and_warps_by_the_pass_and_the_tables_width(ep, wide, tokens, monkeypatch):
    """Past 32 GPUs the split kernels get ENTRIES (the split on the list of replicas: H100,
    EP72 at 512 tokens 14.5 against 26.9 us per layer) and the ticket kernels SEARCH (a
    binary search of the quotas); up to 32 the dense table and the full comparison. The
    large passes' assign kernel searches at any width, in 2 warps (EP8 at 16,384 tokens:
    18.2 against 20.4 us in 4 warps without the search); the ticket kernels take 4. An
    explicit ``search``, ``entries`` or ``num_warps`` wins. The launches are recorded, not run."""
    from eplb_plugin.kernels import minmax_triton

    launches: dict[str, dict] = {}

    class Kernels:  # stands in for a kernel module: keeps each launch's keywords
        def __getattr__(self, name):
            return _Launch(name)

    class _Launch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.__setitem__(self.name, kw)

    location, ids = _case(4, 256, 288, ep, tokens, 8)
    tables = ExpertDispatcher(location, rank=0, algorithm="minmax").minmax
    assert tables is not None
    monkeypatch.setattr(minmax_triton, "_kernels", lambda: (Kernels(), Kernels()))
    large = tokens * 8 > minmax_triton.SMALL_PASS_IDS
    for given in (None, not wide):
        launches.clear()
        minmax_triton.minmax_dispatch_triton(ids, tables, layer=0, num_slots=288, search=given, entries=given,
                                             num_warps=None if given is None else 8)
        assigns = {name: (kw["SEARCH"], kw["num_warps"]) for name, kw in launches.items() if "SEARCH" in kw}
        want = (large or wide, 2 if large else 4) if given is None else (given, 8)
        assert assigns and set(assigns.values()) == {want}, assigns
        splits = {name: kw["ENTRIES"] for name, kw in launches.items() if "ENTRIES" in kw}
        assert splits and set(splits.values()) == {wide if given is None else given}, splits
