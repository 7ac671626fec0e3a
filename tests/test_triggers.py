"""The manager's trigger decisions, pure: interval, when the checks run, time, drift, the verdict."""

import torch

from eplb_plugin.triggers import checks_due, decide, drifted_layers, interval_due, local_verdict


def test_the_interval_is_due_once_enough_passes_went_by():
    assert not interval_due(9, 10) and interval_due(10, 10) and interval_due(11, 10)


def test_time_and_drift_checks_run_every_check_interval_only_when_one_is_on():
    assert checks_due(20, 10, timed=True, drifting=False) and checks_due(20, 10, timed=False, drifting=True)
    assert not checks_due(21, 10, timed=True, drifting=True)
    assert not checks_due(20, 10, timed=False, drifting=False)


def test_a_layer_drifts_when_its_load_turns_away_from_the_plan_and_only_with_tokens():
    planned = torch.tensor([[10.0, 0.0], [10.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    current = torch.tensor([[9.0, 1.0], [0.0, 10.0], [0.0, 0.0]], dtype=torch.float64)
    assert drifted_layers(current, planned, 0.9).tolist() == [False, True, False]


def test_the_verdict_puts_time_first_then_the_drifted_layers():
    drifted = torch.tensor([False, True, True])
    both = local_verdict(elapsed_s=5.0, interval_s=4.0, drifted=drifted, num_layers=3)
    assert decide(both) == ("time", None)
    only_drift = local_verdict(elapsed_s=1.0, interval_s=4.0, drifted=drifted, num_layers=3)
    assert decide(only_drift) == ("drift", [1, 2])
    assert decide(local_verdict(elapsed_s=1.0, interval_s=None, drifted=None, num_layers=3)) == (None, None)
    # ranks agree on the max of their verdicts: one rank's due clock starts it everywhere
    agreed = torch.maximum(only_drift, local_verdict(elapsed_s=9.0, interval_s=4.0, drifted=None, num_layers=3))
    assert decide(agreed) == ("time", None)
