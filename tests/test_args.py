"""EPLBArgs: SGLang's names and defaults, resolution, and contradictions."""

import argparse
import dataclasses

import pytest

from eplb_plugin.args import EPLBArgs, add_eplb_args
from eplb_plugin.errors import ConfigError


def test_parsing_no_arguments_gives_the_dataclass_defaults():
    assert EPLBArgs.from_cli([]) == EPLBArgs()


def test_defaults_match_sglang_0_5_23():
    """All but --eplb-algorithm: SGLang's default there is auto (SGLang's choice, which the
    runtime honours when given); the runtime's is the project's policy."""
    a = EPLBArgs()
    assert (a.ep_size, a.enable_eplb, a.eplb_algorithm) == (1, False, "eplb_plugin")
    assert a.eplb_rebalance_num_iterations == 1000
    assert a.eplb_rebalance_layers_per_chunk is None
    assert a.eplb_min_rebalancing_utilization_threshold == 1.0
    assert a.expert_distribution_recorder_mode is None
    assert a.expert_distribution_recorder_buffer_size is None
    assert (a.ep_num_redundant_experts, a.ep_dispatch_algorithm, a.init_expert_location) == (0, None, "trivial")
    assert (a.nnodes, a.node_rank, a.dist_init_addr) == (1, 0, None)


def test_every_field_is_a_flag_with_its_own_name():
    """Each field is the flag of its name in the runtime's parser, or (SGLang-only fields) in
    the parser the plugin extends SGLang's with."""
    runtime = add_eplb_args(argparse.ArgumentParser())
    plugin = add_eplb_args(argparse.ArgumentParser(), only_plugin_flags=True)
    options = {s for p in (runtime, plugin) for action in p._actions for s in action.option_strings}
    for f in dataclasses.fields(EPLBArgs):
        assert "--" + f.name.replace("_", "-") in options


def test_flags_parse_into_typed_fields():
    a = EPLBArgs.from_cli(
        ["--ep-size", "8", "--enable-eplb", "--eplb-rebalance-layers-per-chunk", "2",
         "--eplb-min-rebalancing-utilization-threshold", "0.9", "--ep-dispatch-algorithm", "dynamic",
         "--eplb-rebalance-interval-s", "30"]
    )
    assert (a.ep_size, a.enable_eplb, a.eplb_rebalance_layers_per_chunk) == (8, True, 2)
    assert a.eplb_min_rebalancing_utilization_threshold == 0.9
    assert (a.ep_dispatch_algorithm, a.eplb_rebalance_interval_s) == ("dynamic", 30.0)


def test_unknown_choice_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        EPLBArgs.from_cli(["--expert-distribution-recorder-mode", "histogram"])


def test_enable_eplb_implies_stat_recorder_static_dispatch_and_buffer_from_interval():
    a = EPLBArgs(ep_size=4, enable_eplb=True, eplb_rebalance_num_iterations=77).resolve()
    assert a.expert_distribution_recorder_mode == "stat"
    assert a.ep_dispatch_algorithm == "static"
    assert a.expert_distribution_recorder_buffer_size == 77


def test_non_trivial_init_location_implies_static_dispatch():
    assert EPLBArgs(init_expert_location="x.json").resolve().ep_dispatch_algorithm == "static"
    assert EPLBArgs().resolve().ep_dispatch_algorithm is None


def test_metrics_imply_the_stat_recorder():
    assert EPLBArgs(enable_expert_distribution_metrics=True).resolve().expert_distribution_recorder_mode == "stat"


def test_explicit_choices_survive_resolution():
    a = EPLBArgs(ep_size=2, enable_eplb=True, expert_distribution_recorder_mode="stat_approx",
                 ep_dispatch_algorithm="weighted", expert_distribution_recorder_buffer_size=-1).resolve()
    assert (a.expert_distribution_recorder_mode, a.ep_dispatch_algorithm) == ("stat_approx", "weighted")
    assert a.expert_distribution_recorder_buffer_size == -1


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(enable_eplb=True), ("--enable-eplb", "--ep-size")),
        (dict(enable_eplb=True, ep_size=2, expert_distribution_recorder_mode="per_token"),
         ("--enable-eplb", "--expert-distribution-recorder-mode")),
        (dict(nnodes=2, ep_size=4), ("--nnodes", "--dist-init-addr")),
        (dict(nnodes=2, node_rank=2, dist_init_addr="h:1", ep_size=4), ("--node-rank", "--nnodes")),
        (dict(nnodes=3, dist_init_addr="h:1", ep_size=4), ("--ep-size", "--nnodes")),
        (dict(eplb_non_blocking=True), ("--eplb-non-blocking", "--enable-eplb")),
        (dict(eplb_min_rebalancing_utilization_threshold=1.5), ("--eplb-min-rebalancing-utilization-threshold",)),
        (dict(expert_distribution_recorder_buffer_size=0), ("--expert-distribution-recorder-buffer-size",)),
        (dict(eplb_rebalance_layers_per_chunk=0), ("--eplb-rebalance-layers-per-chunk",)),
        (dict(eplb_drift_threshold=0.0), ("--eplb-drift-threshold",)),
        (dict(eplb_drift_threshold=0.9, eplb_drift_window_passes=0), ("--eplb-drift-window-passes",)),
        (dict(eplb_drift_window_passes=4), ("--eplb-drift-window-passes", "--eplb-drift-threshold")),
        (dict(ep_num_redundant_experts=-1), ("--ep-num-redundant-experts",)),
        (dict(eplb_dispatch_minmax_steps=0), ("--eplb-dispatch-minmax-steps", "[1, 64]")),
        (dict(eplb_dispatch_minmax_steps=65), ("--eplb-dispatch-minmax-steps",)),
        (dict(eplb_dispatch_minmax_steps=True), ("--eplb-dispatch-minmax-steps",)),
    ],
)
def test_contradictions_raise_a_config_error_naming_the_flags(kwargs, names):
    with pytest.raises(ConfigError) as info:
        EPLBArgs(**kwargs).resolve()
    for name in names:
        assert name in str(info.value)


def test_plugin_only_flags_can_extend_a_host_parser():
    parser = add_eplb_args(argparse.ArgumentParser(), only_plugin_flags=True)
    options = {s for action in parser._actions for s in action.option_strings}
    assert "--eplb-rebalance-interval-s" in options and "--ep-size" not in options


def test_dispatch_flag_choices_are_the_registered_algorithms():
    """The --ep-dispatch-algorithm Literal and the dispatch registry name the same algorithms."""
    from eplb_plugin.args import DISPATCH_ALGORITHMS
    from eplb_plugin.dispatch_info import DISPATCH_INFO

    assert list(DISPATCH_ALGORITHMS) == list(DISPATCH_INFO)


def test_sglang_only_flags_extend_sglangs_parser_and_stay_out_of_the_runtimes():
    """--eplb-dispatch-counts concerns SGLang's mapping (the runtime's own is
    --ep-dispatch-counts): the plugin offers it to SGLang's parser, the runtime's parser
    lacks it, and parsing nothing still gives the dataclass's defaults (local)."""
    plugin = add_eplb_args(argparse.ArgumentParser(), only_plugin_flags=True)
    runtime = add_eplb_args(argparse.ArgumentParser())
    assert "--eplb-dispatch-counts" in {s for a in plugin._actions for s in a.option_strings}
    assert "--eplb-dispatch-counts" not in {s for a in runtime._actions for s in a.option_strings}
    assert EPLBArgs.from_cli([]) == EPLBArgs() and EPLBArgs().eplb_dispatch_counts == "local"
    assert plugin.parse_args(["--eplb-dispatch-counts", "global"]).eplb_dispatch_counts == "global"


@pytest.mark.parametrize("carry", [-1, 1.5, True])
def test_a_move_budget_carry_that_is_not_a_whole_number_of_rebalances_is_refused(carry):
    with pytest.raises(ConfigError, match="--eplb-move-budget-carry must be an int >= 0"):
        EPLBArgs(ep_size=2, enable_eplb=True, eplb_move_budget_carry=carry).resolve()


def test_the_move_budget_carry_flag_parses_with_its_default():
    parser = argparse.ArgumentParser()
    add_eplb_args(parser)
    assert EPLBArgs.from_namespace(parser.parse_args([])).eplb_move_budget_carry == 3
    assert EPLBArgs.from_namespace(parser.parse_args(["--eplb-move-budget-carry", "0"])).eplb_move_budget_carry == 0


@pytest.mark.parametrize("field, option", [
    ("eplb_move_budget_mb", "--eplb-move-budget-mb"),
    ("eplb_transfer_budget_mb", "--eplb-transfer-budget-mb"),
    ("eplb_rebalance_interval_s", "--eplb-rebalance-interval-s"),
    ("eplb_rebalance_timeout_s", "--eplb-rebalance-timeout-s"),
])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -3.0, 0.0, "100", True])
def test_an_amount_that_is_not_finite_and_positive_is_refused_naming_its_flag(field, option, value):
    """An infinite or NaN budget, interval or timeout would reach the planner or the waits
    (inf MiB of budget became NaN slots); it is refused like a negative one, and so is a value
    that is not a number ($EPLB_PLUGIN_CONFIG's JSON can carry one)."""
    with pytest.raises(ConfigError, match=f"{option} must be finite and > 0"):
        EPLBArgs(ep_size=2, enable_eplb=True, **{field: value}).resolve()


@pytest.mark.parametrize("field, value", [
    ("eplb_min_rebalancing_utilization_threshold", float("nan")),
    ("eplb_min_rebalancing_utilization_threshold", float("inf")),
    ("eplb_drift_threshold", float("nan")),
    ("eplb_drift_threshold", float("inf")),
])
def test_a_threshold_that_is_nan_or_infinite_is_refused(field, value):
    with pytest.raises(ConfigError, match="--" + field.replace("_", "-")):
        EPLBArgs(ep_size=2, enable_eplb=True, **{field: value}).resolve()
