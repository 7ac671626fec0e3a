"""What every module of the SGLang adapter shares: the environment variables that carry the
plugin's settings to SGLang's children, the log prefix, and reading those settings.

A leaf of ``integrations/``: the plugin entry point (``sglang.py``), the manager, the recorder
and dispatch adapters import it; it imports none of them (and never sglang).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from eplb_plugin.args import EPLBArgs, check_field_type
from eplb_plugin.errors import ConfigError

ENABLE_ENV = "EPLB_PLUGIN_ENABLE"  # "1": hooks on; "0": off whatever the flags say
CONFIG_ENV = "EPLB_PLUGIN_CONFIG"  # the plugin's own settings: inline JSON or a .json path
LOG_PREFIX = "[eplb_plugin]"
# The project's dispatch algorithms the plugin adds to SGLang's --ep-dispatch-algorithm
# (``sglang_dispatch``). SGLang's names keep SGLang's meaning; ``random`` is SGLang's
# ``dynamic`` already and ``weighted`` needs replica weights, which SGLang's metadata lacks.
PLUGIN_DISPATCH_ALGORITHMS: tuple[str, ...] = ("minmax",)
DISPATCH_FLAG = "--ep-dispatch-algorithm"


def is_plugin_dispatch(name: str | None) -> bool:
    """Whether ``name`` is one of the plugin's dispatch algorithms (not SGLang's own)."""
    return name in PLUGIN_DISPATCH_ALGORITHMS


def plugin_field_names() -> tuple[str, ...]:
    """EPLBArgs fields SGLang has no flag for (the plugin adds them)."""
    return tuple(f.name for f in dataclasses.fields(EPLBArgs) if not f.metadata["sglang"])


def plugin_settings(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The plugin's own settings from ``$EPLB_PLUGIN_CONFIG`` (inline JSON or a .json path).

    Keys are EPLBArgs field names (``eplb_transfer_budget_mb``) or flag names
    (``eplb-transfer-budget-mb``). Raises ConfigError naming an unknown key, a setting given
    twice (under both spellings), a value of the wrong type (a bool must be a JSON bool) or
    bad JSON.
    """
    env = os.environ if environ is None else environ
    raw = env.get(CONFIG_ENV, "").strip()
    if not raw:
        return {}
    source = raw
    try:
        text = Path(raw).read_text() if raw.endswith(".json") else raw
        data = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"${CONFIG_ENV}={source!r}: not a readable .json file nor inline JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"${CONFIG_ENV}={source!r}: expected a JSON object, got {type(data).__name__}")
    known = plugin_field_names()
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.lstrip("-").replace("-", "_")
        if name not in known:
            raise ConfigError(f"${CONFIG_ENV}: unknown key {key!r}; known: {', '.join(known)}")
        if name in out:
            raise ConfigError(f"${CONFIG_ENV}: key {key!r} sets {name} a second time; give it once")
        check_field_type(name, value, what=f"${CONFIG_ENV}: key {key!r}")
        out[name] = value
    return out
