"""The SGLang plugin's entry point: when it turns on, its settings, and hooks applied by SGLang."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from test_sglang_helpers import run_sglang_script, subprocess_env

from eplb_plugin.errors import ConfigError
from eplb_plugin.integrations.sglang import (
    CONFIG_ENV,
    ENABLE_ENV,
    plugin_requested,
    plugin_settings,
    sglang_version_supported,
)

SUBPROCESS_TIMEOUT_S = 120


def _run(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=subprocess_env(**env),
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, False),
        (["--model-path", "m", "--tp", "8"], {}, False),
        (["--enable-eplb"], {}, True),
        (["--expert-distribution-recorder-mode", "stat"], {}, True),
        (["--eplb-algorithm", "eplb_plugin"], {}, True),
        (["--eplb-algorithm=eplb_plugin_equal"], {}, True),
        (["--eplb-algorithm", "deepseek"], {}, False),
        (["--ep-dispatch-algorithm", "minmax"], {}, True),
        (["--ep-dispatch-algorithm=minmax"], {}, True),
        (["--ep-dispatch-algorithm", "dynamic"], {}, False),
        (["--eplb-non-blocking"], {}, True),
        ([], {ENABLE_ENV: "1"}, True),
        (["--enable-eplb"], {ENABLE_ENV: "0"}, False),
        ([], {CONFIG_ENV: '{"eplb_non_blocking": true}'}, True),
    ],
)
def test_plugin_turns_on_only_when_eplb_is_asked_for(argv, environ, expected):
    """EPLB flags, a plugin flag, the config or the enable variable turn the plugin on; 0 wins."""
    assert plugin_requested(argv, environ) is expected


def test_plugin_settings_read_inline_json_and_files(tmp_path):
    """$EPLB_PLUGIN_CONFIG holds inline JSON or a .json path; flag spellings are accepted."""
    assert plugin_settings({CONFIG_ENV: '{"eplb-transfer-budget-mb": 64}'}) == {"eplb_transfer_budget_mb": 64}
    path = tmp_path / "eplb.json"
    path.write_text(json.dumps({"eplb_drift_threshold": 0.9}))
    assert plugin_settings({CONFIG_ENV: str(path)}) == {"eplb_drift_threshold": 0.9}
    assert plugin_settings({}) == {}


def test_plugin_settings_reject_unknown_keys_and_bad_json():
    """An unknown key names the known ones; SGLang's own flags are not plugin settings."""
    with pytest.raises(ConfigError, match="unknown key 'eplb_algorithm'.*eplb_transfer_budget_mb"):
        plugin_settings({CONFIG_ENV: '{"eplb_algorithm": "x"}'})
    with pytest.raises(ConfigError, match="EPLB_PLUGIN_CONFIG"):
        plugin_settings({CONFIG_ENV: "{not json"})


@pytest.mark.parametrize("settings, message", [
    ('{"eplb_non_blocking": "false"}', "key 'eplb_non_blocking' must be a JSON bool .true or false., got 'false'"),
    ('{"eplb_verify_weights": "no"}', "key 'eplb_verify_weights' must be a JSON bool"),
    ('{"eplb_plan_in_process": "yes"}', "key 'eplb_plan_in_process' must be a JSON bool"),
    ('{"enable_expert_distribution_metrics": "off"}', "key 'enable_expert_distribution_metrics' must be a JSON bool"),
    ('{"eplb_non_blocking": 1}', "key 'eplb_non_blocking' must be a JSON bool"),
    ('{"eplb_drift_threshold": "0.5"}', "key 'eplb_drift_threshold' must be a number or null, got '0.5'"),
    ('{"eplb_drift_threshold": [0.5]}', "key 'eplb_drift_threshold' must be a number or null"),
    ('{"eplb_rebalance_interval_s": true}', "key 'eplb_rebalance_interval_s' must be a number or null, got True"),
    ('{"eplb_transfer_budget_mb": null}', "key 'eplb_transfer_budget_mb' must be a number, got None"),
    ('{"eplb_move_budget_carry": 2.0}', "key 'eplb_move_budget_carry' must be an int, got 2.0"),
    ('{"eplb_transport": "bogus"}', r"key 'eplb_transport' must be one of \['nccl', 'ipc', 'auto'\], got 'bogus'"),
    ('{"eplb-dispatch-counts": "GLOBAL"}', r"key 'eplb-dispatch-counts' must be one of \['global', 'local'\]"),
])
def test_plugin_settings_reject_a_value_of_the_wrong_type_naming_the_key_and_the_type(settings, message):
    """$EPLB_PLUGIN_CONFIG's JSON bypasses argparse: a string "false" would turn a switch on
    and "0.5" would fail inside a range check, so each value must have its flag's type."""
    with pytest.raises(ConfigError, match=message):
        plugin_settings({CONFIG_ENV: settings})


def test_plugin_settings_accept_values_of_their_flags_types():
    """An int where a number is asked, null for an optional setting, a known name."""
    settings = ('{"eplb_transfer_budget_mb": 64, "eplb_drift_threshold": null, "eplb_non_blocking": false, '
                '"eplb_transport": "ipc", "eplb_move_budget_carry": 0}')
    assert plugin_settings({CONFIG_ENV: settings}) == {
        "eplb_transfer_budget_mb": 64, "eplb_drift_threshold": None, "eplb_non_blocking": False,
        "eplb_transport": "ipc", "eplb_move_budget_carry": 0}


def test_plugin_settings_refuse_a_setting_given_under_both_spellings():
    """A field name and a flag name for one setting: which one wins would be JSON order."""
    with pytest.raises(ConfigError, match="'eplb-transfer-budget-mb' sets eplb_transfer_budget_mb a second time"):
        plugin_settings({CONFIG_ENV: '{"eplb_transfer_budget_mb": 5, "eplb-transfer-budget-mb": 7}'})


def test_tested_sglang_range_is_pinned():
    assert sglang_version_supported("0.5.23")
    assert sglang_version_supported("0.5.21")
    assert not sglang_version_supported("0.5.18")
    assert not sglang_version_supported("0.5.24")


def test_importing_the_package_and_integration_does_not_import_sglang():
    """``import eplb_plugin`` (and the integration module) leaves sglang unimported."""
    result = _run(
        """
        import sys
        import eplb_plugin, eplb_plugin.integrations.sglang, eplb_plugin.integrations.sglang_manager
        import eplb_plugin.integrations.sglang_recorder, eplb_plugin.integrations.sglang_dispatch
        import eplb_plugin.integrations.sglang_common, eplb_plugin.integrations.sglang_metadata
        assert not any(m == "sglang" or m.startswith("sglang.") for m in sys.modules), "sglang imported"
        print("OK")
        """
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


HOOKS_APPLIED_SCRIPT = """
    import argparse, dataclasses, json, os, sys
    from importlib.metadata import entry_points
    assert any(ep.name == "eplb_plugin" and ep.value == "eplb_plugin.integrations.sglang:register"
               for ep in entry_points(group="sglang.srt.plugins")), "entry point not installed"
    import sglang.srt.model_executor.model_runner as model_runner  # holds EPLBManager by name
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from eplb_plugin.integrations import sglang as plugin
    from eplb_plugin.integrations.sglang_manager import SGLangEPLBManager
    applied = plugin.applied_hooks()
    assert all(applied.values()), applied
    import sglang.srt.eplb.eplb_manager as eplb_manager
    from sglang.srt.eplb.eplb_manager import EPLBManager
    assert EPLBManager is SGLangEPLBManager and eplb_manager.EPLBManager is SGLangEPLBManager
    assert model_runner.EPLBManager is SGLangEPLBManager, model_runner.EPLBManager
    from sglang.srt.eplb import eplb_algorithms as ea
    assert ea.compute_algorithm("eplb_plugin", None, 1) == plugin.PluginAlgorithm("eplb_plugin")
    assert ea.compute_algorithm("deepseek", None, 1) is ea.EplbAlgorithm.deepseek
    assert ea.compute_algorithm("auto", 8, 1) is ea.EplbAlgorithm.deepseek_hierarchical
    from sglang.srt.eplb.expert_distribution import ExpertDistributionRecorder
    assert ExpertDistributionRecorder.init_new.__wrapped__.__name__ == "init_new"
    from sglang.srt.server_args import ServerArgs
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    shown = " ".join(parser.format_help().split())  # the plugin's flags tell their defaults, though parsed unset
    from eplb_plugin.args import EPLBArgs
    carry = next(f for f in dataclasses.fields(EPLBArgs) if f.name == "eplb_move_budget_carry")
    assert "==SUPPRESS==" not in shown and " ".join(carry.metadata["help"].split()) + " (default: 3)" in shown
    ns = parser.parse_args(["--model-path", "m", "--enable-eplb", "--eplb-algorithm", "eplb_plugin",
                            "--eplb-transfer-budget-mb", "64", "--eplb-non-blocking"])
    server_args = ServerArgs.from_cli_args(ns)
    assert server_args.eplb_algorithm == "eplb_plugin" and server_args.enable_eplb
    config = json.loads(os.environ["EPLB_PLUGIN_CONFIG"])
    assert config == {"eplb_drift_threshold": 0.5, "eplb_transfer_budget_mb": 64.0,
                      "eplb_non_blocking": True}, config
    print("HOOKS-OK")
"""


@pytest.mark.sglang
def test_load_plugins_discovers_the_entry_point_and_applies_every_hook():
    """In a fresh process, SGLang's load_plugins() finds eplb_plugin and patches every target."""
    pytest.importorskip("sglang")
    result = _run(HOOKS_APPLIED_SCRIPT, EPLB_PLUGIN_ENABLE="1", SGLANG_PLUGINS="eplb_plugin",
                  EPLB_PLUGIN_CONFIG='{"eplb_drift_threshold": 0.5}')
    assert result.returncode == 0 and "HOOKS-OK" in result.stdout, result.stderr[-4000:]


@pytest.mark.sglang
def test_register_registers_nothing_when_eplb_is_not_asked_for(monkeypatch):
    """Without EPLB flags register() adds no hook (zero cost when off)."""
    pytest.importorskip("sglang")
    from sglang.srt.plugins.hook_registry import HookRegistry

    from eplb_plugin.integrations import sglang as plugin

    monkeypatch.setenv(ENABLE_ENV, "")
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["sglang", "--model-path", "m"])
    before = {t: list(h) for t, h in HookRegistry._hooks.items()}
    plugin.register()
    assert {t: list(h) for t, h in HookRegistry._hooks.items()} == before
    assert not plugin._registered


@pytest.mark.sglang
@pytest.mark.parametrize("settings, message", [
    ('{"bogus_key": 1}', "unknown key 'bogus_key'"),
    ("{not json", "not a readable .json file nor inline JSON"),
])
def test_a_bad_plugin_config_stops_the_launch_in_load_plugins(settings, message):
    """SGLang's load_plugins() logs and swallows a plugin's Exception, which would leave the
    plugin silently off and SGLang's stock EPLB serving: a bad $EPLB_PLUGIN_CONFIG exits the
    process instead, with the ConfigError's message."""
    pytest.importorskip("sglang")
    result = _run("""
        import sys
        sys.argv = ["sglang", "--enable-eplb"]
        from sglang.srt.plugins import load_plugins
        load_plugins()
        print("LAUNCH-WENT-ON")
    """, SGLANG_PLUGINS="eplb_plugin", EPLB_PLUGIN_CONFIG=settings)
    assert result.returncode != 0 and "LAUNCH-WENT-ON" not in result.stdout, result.stdout
    assert message in result.stderr and "EPLB_PLUGIN_CONFIG" in result.stderr, result.stderr[-4000:]


CLI_OVER_CONFIG_SCRIPT = """
    from sglang.srt.plugins import load_plugins
    load_plugins()
    config = {"eplb_dispatch_counts": "global", "eplb_move_budget_carry": 7, "eplb_non_blocking": True}
    out = {}
    os.environ["EPLB_PLUGIN_CONFIG"] = json.dumps(config)
    parse(["--enable-eplb", "--eplb-dispatch-counts", "local", "--eplb-move-budget-carry", "3"])
    out["given_at_defaults"] = json.loads(os.environ["EPLB_PLUGIN_CONFIG"])
    os.environ["EPLB_PLUGIN_CONFIG"] = json.dumps(config)
    args, _ = parse(["--enable-eplb"])
    out["none_given"] = json.loads(os.environ["EPLB_PLUGIN_CONFIG"])
    out["kept_by_sglang"] = hasattr(args, "eplb_move_budget_carry")
    print("RESULT " + json.dumps(out))
"""


@pytest.mark.sglang
def test_a_flag_given_on_the_command_line_overrides_the_config_even_at_its_default_value():
    """SGLang's parser hands over values only: a flag given at its default value must still
    override $EPLB_PLUGIN_CONFIG, and flags not given must leave the variable's values alone."""
    pytest.importorskip("sglang")
    out = run_sglang_script(CLI_OVER_CONFIG_SCRIPT, timeout_s=SUBPROCESS_TIMEOUT_S)
    assert out["given_at_defaults"] == {"eplb_dispatch_counts": "local", "eplb_move_budget_carry": 3,
                                        "eplb_non_blocking": True}
    assert out["none_given"] == {"eplb_dispatch_counts": "global", "eplb_move_budget_carry": 7,
                                 "eplb_non_blocking": True}
    assert not out["kept_by_sglang"]
