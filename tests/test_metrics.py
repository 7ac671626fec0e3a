"""EPLBMetrics: balancedness from counts, counters, private registries, text rendering."""

from __future__ import annotations

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from eplb_plugin.errors import CountsError
from eplb_plugin.manager import RebalanceRecord
from eplb_plugin.metrics import EPLBMetrics


def _samples(metrics: EPLBMetrics) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_balancedness_per_layer_and_mean_from_counts():
    """Hand example, 2 GPUs: layer 0 loads (3, 1) -> 2/3, layer 1 (2, 2) -> 1; mean 5/6."""
    m = EPLBMetrics()
    assert m.update_from_counts(torch.tensor([[2, 1, 0, 1], [1, 1, 2, 0]], dtype=torch.int32), ep_size=2)
    s = _samples(m)
    assert s[("eplb_layer_balancedness", (("layer", "0"),))] == pytest.approx(2 / 3)
    assert s[("eplb_layer_balancedness", (("layer", "1"),))] == 1.0
    assert s[("eplb_balancedness", ())] == pytest.approx(5 / 6)
    assert s[("eplb_expert_tokens_total", (("layer", "0"),))] == 4


def test_token_counters_accumulate_and_per_expert_is_opt_in():
    """Token counters add up over updates; per-slot series exist only when asked for."""
    counts = torch.tensor([[1, 0, 3, 0]], dtype=torch.int32)
    plain, detailed = EPLBMetrics(), EPLBMetrics(per_expert=True)
    for m in (plain, detailed):
        m.update_from_counts(counts, ep_size=1)
        m.update_from_counts(counts, ep_size=1)
    assert _samples(plain)[("eplb_expert_tokens_total", (("layer", "0"),))] == 8
    assert not any(k[0].startswith("eplb_expert_tokens_per_expert") for k in _samples(plain))
    s = _samples(detailed)
    assert s[("eplb_expert_tokens_per_expert_total", (("expert", "2"), ("layer", "0")))] == 6


def _record(**kw) -> RebalanceRecord:
    """An ended rebalance record (done unless ``skipped`` or ``error`` is given)."""
    return RebalanceRecord(**{"index": 0, "trigger": "interval", "start_pass": 10, "end_pass": 12, **kw})


def test_a_done_rebalance_exports_its_records_figures():
    """A done rebalance counts once and observes its wall, solver and stall times from the record."""
    m = EPLBMetrics()
    m.observe_rebalance(_record(wall_s=0.7, solver_s=0.02, stall_s=0.3, bytes_moved=1 << 20, slots_moved=12,
                                balancedness_predicted=0.97))
    s = _samples(m)
    assert s[("eplb_rebalances_total", ())] == 1
    assert s[("eplb_rebalance_seconds_count", ())] == 1 and s[("eplb_rebalance_seconds_sum", ())] == pytest.approx(0.7)
    assert s[("eplb_bytes_moved_total", ())] == 1 << 20
    assert s[("eplb_slots_moved_total", ())] == 12
    assert s[("eplb_solver_seconds_sum", ())] == pytest.approx(0.02)
    assert s[("eplb_stall_seconds_count", ())] == 1 and s[("eplb_stall_seconds_sum", ())] == pytest.approx(0.3)
    assert s[("eplb_predicted_balancedness", ())] == pytest.approx(0.97)


def test_instances_have_private_registries():
    """Two instances register the same names without colliding."""
    a, b = EPLBMetrics(), EPLBMetrics()
    a.observe_rebalance(_record(wall_s=1.0))
    assert _samples(b)[("eplb_rebalances_total", ())] == 0


def test_bad_counts_raise():
    """Counts of the wrong rank or not divisible by ep_size are CountsError."""
    with pytest.raises(CountsError):
        EPLBMetrics().update_from_counts(torch.zeros(4, dtype=torch.int32), ep_size=1)
    with pytest.raises(CountsError, match="ep_size"):
        EPLBMetrics().update_from_counts(torch.zeros(2, 5, dtype=torch.int32), ep_size=2)


def test_failed_and_skipped_rebalances_count_apart_and_add_their_stall():
    """A failed rebalance counts as an error, a skipped one as a skip; both add their stall and
    what they moved, neither counts as a rebalance nor observes a rebalance time."""
    m = EPLBMetrics()
    m.observe_rebalance(_record(wall_s=0.5, solver_s=0.25, stall_s=0.125, slots_moved=2, bytes_moved=10))
    m.observe_rebalance(_record(error="boom", stall_s=0.25, slots_moved=3, bytes_moved=5))
    m.observe_rebalance(_record(skipped="no tokens recorded in the window", stall_s=0.5))
    s = _samples(m)
    assert s[("eplb_rebalances_total", ())] == 1 and s[("eplb_rebalance_seconds_count", ())] == 1
    assert s[("eplb_rebalance_errors_total", ())] == 1 and s[("eplb_rebalances_skipped_total", ())] == 1
    assert s[("eplb_stall_seconds_count", ())] == 3 and s[("eplb_stall_seconds_sum", ())] == 0.875
    assert s[("eplb_slots_moved_total", ())] == 5 and s[("eplb_bytes_moved_total", ())] == 15
