"""The SGLang plugin: entry point ``eplb_plugin`` in group ``sglang.srt.plugins``.

SGLang (0.5.11+) calls ``register()`` in every process it starts (launcher, each scheduler /
model-runner process, detokenizer, DP controller). ``register()`` is cheap, idempotent, and
does nothing unless EPLB is asked for (see ``plugin_requested``). When asked, it registers
these hooks with SGLang's ``HookRegistry`` (applied by ``load_plugins()``):

================================================================================  =======  ==========================================
target                                                                            type     effect
================================================================================  =======  ==========================================
``sglang.srt.server_args.ServerArgs.add_cli_args``                                AFTER    adds the plugin's own flags and ``minmax``
``sglang.srt.server_args.ServerArgs.from_cli_args``                               AROUND   exports them to children
``sglang.srt.eplb.eplb_algorithms.compute_algorithm``                             AROUND   accepts ``eplb_plugin*``
``sglang.srt.eplb.eplb_algorithms.rebalance_experts``                             AROUND   runs the project's planner
``sglang.srt.eplb.expert_distribution.ExpertDistributionRecorder.init_new``       AROUND   the project's recorder
``sglang.srt.eplb.eplb_manager.EPLBManager``                                      REPLACE  the project's manager
``sglang.srt.eplb.expert_location_dispatch.ExpertLocationDispatchInfo.init_new``  AROUND   adds the layer id and the padding bound
``sglang.srt.eplb.expert_location_dispatch.topk_ids_logical_to_physical``         AROUND   runs ``minmax``
``sglang.srt.eplb.expert_location.ExpertLocationMetadata.update``                 AFTER    ``minmax`` tables follow
``sglang.srt.layers.moe.topk.TopK.empty_topk_output``                             AFTER    an idle rank joins the count all-gather
``sglang.srt.layers.moe.hash_topk.HashTopK.empty_topk_output``                    AFTER    the same, for hash routing
================================================================================  =======  ==========================================

The last two only with ``--eplb-dispatch-counts global`` (``sglang_counts``).

``add_cli_args`` also offers the project's ``minmax`` in ``--ep-dispatch-algorithm``
(``sglang_dispatch``: SGLang's own names keep their meaning).

Resolving a target imports its module; SGLang's engine imports these ``sglang.srt.eplb``
modules in every process anyway, so the hooks add no import of note. SGLang only logs hook
failures: ``applied_hooks()`` says which targets are patched, and the first scheduler-side
use logs ``[eplb_plugin] ... active``.

Every ``import sglang`` of the package lives inside functions of ``integrations/``;
``import eplb_plugin`` never imports sglang. Tested against sglang 0.5.23 (``TESTED_SGLANG``);
EPLB signatures changed in 0.5.18, 0.5.19 and 0.5.21, so other versions are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from eplb_plugin.errors import ConfigError
from eplb_plugin.flagspec import flag_name
from eplb_plugin.integrations.sglang_common import (
    CONFIG_ENV,
    DISPATCH_FLAG,
    ENABLE_ENV,
    LOG_PREFIX,
    is_plugin_dispatch,
    plugin_field_names,
    plugin_settings,
)

logger = logging.getLogger(__name__)

ALLOW_UNTESTED_ENV = "EPLB_PLUGIN_ALLOW_UNTESTED_SGLANG"
TESTED_SGLANG = ("0.5.21", "0.5.23")  # inclusive; CI runs 0.5.23

# SGLang flags whose presence on the command line turns the plugin on.
_TRIGGER_FLAGS = ("--enable-eplb", "--expert-distribution-recorder-mode")
_PLUGIN_ALGORITHM_PREFIX = "eplb_plugin"

_registered = False


# ---------------------------------------------------------------------- settings


def _argv_requests_plugin(argv: list[str]) -> bool:
    plugin_flags = {flag_name(n) for n in plugin_field_names()}
    for i, arg in enumerate(argv):
        name, _, inline = arg.partition("=")
        if name in _TRIGGER_FLAGS or name in plugin_flags:
            return True
        value = inline or (argv[i + 1] if i + 1 < len(argv) else "")
        if name == "--eplb-algorithm" and value.startswith(_PLUGIN_ALGORITHM_PREFIX):
            return True
        if name == DISPATCH_FLAG and is_plugin_dispatch(value):
            return True
    return False


def plugin_requested(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> bool:
    """Whether this process should hook SGLang.

    ``$EPLB_PLUGIN_ENABLE`` decides when set ("1"/"0"). Otherwise the plugin is on when
    ``$EPLB_PLUGIN_CONFIG`` is set or the command line (``sys.argv``, which SGLang's spawned
    children inherit) has ``--enable-eplb``, ``--expert-distribution-recorder-mode``,
    ``--eplb-algorithm eplb_plugin*``, ``--ep-dispatch-algorithm minmax`` or one of the
    plugin's flags. ``sglang.Engine(...)`` and ``--config file.yaml`` users set
    ``EPLB_PLUGIN_ENABLE=1``.
    """
    env = os.environ if environ is None else environ
    explicit = env.get(ENABLE_ENV, "").strip().lower()
    if explicit in ("1", "true", "yes", "on"):
        return True
    if explicit in ("0", "false", "no", "off"):
        return False
    if env.get(CONFIG_ENV, "").strip():
        return True
    return _argv_requests_plugin(list(sys.argv[1:] if argv is None else argv))


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def sglang_version_supported(version: str) -> bool:
    low, high = (_version_tuple(v) for v in TESTED_SGLANG)
    return low <= _version_tuple(version) <= high


# ---------------------------------------------------------------------- hooks


def _add_plugin_flags(result: Any, parser: Any) -> None:
    """AFTER ``ServerArgs.add_cli_args(parser)``: add the flags SGLang lacks."""
    from eplb_plugin.args import add_eplb_args

    existing = {s for action in parser._actions for s in action.option_strings}
    skip = tuple(n for n in plugin_field_names() if flag_name(n) in existing)
    # absent from the namespace unless given: see _capture_plugin_flags
    add_eplb_args(parser, only_plugin_flags=True, skip=skip, unset_defaults=True)
    from eplb_plugin.integrations.sglang_dispatch import add_dispatch_choices

    add_dispatch_choices(parser)


def _capture_plugin_flags(original: Callable, cls: Any, args: Any, *rest: Any, **kw: Any) -> Any:
    """AROUND ``ServerArgs.from_cli_args``: move the plugin's flags into ``$EPLB_PLUGIN_CONFIG``.

    SGLang keeps only its own fields; the environment reaches every child it spawns. Values
    given on the command line, at their default value too, override those already in the
    variable (the plugin's flags default to unset, so the namespace holds only those given).
    A plugin dispatch algorithm that a SGLang fast path would bypass is refused here, in the
    launcher.
    """
    from eplb_plugin.integrations.sglang_checks import check_dispatch_algorithm

    check_dispatch_algorithm(getattr(args, "ep_dispatch_algorithm", None), os.environ)
    given = {name: getattr(args, name) for name in plugin_field_names() if hasattr(args, name)}
    if given:
        merged = {**plugin_settings(), **given}
        os.environ[CONFIG_ENV] = json.dumps(merged)
        logger.info("%s plugin settings from the command line: %s", LOG_PREFIX, merged)
    return original(cls, args, *rest, **kw)


@dataclasses.dataclass(frozen=True)
class PluginAlgorithm:
    """What ``compute_algorithm`` returns for a project policy name (SGLang's enum lacks it)."""

    name: str


def plugin_algorithm_names() -> tuple[str, ...]:
    """Project policies SGLang does not know: these are routed to the project's planner."""
    from eplb_plugin.algorithms import ALGORITHMS

    return tuple(n for n in ALGORITHMS if n.startswith(_PLUGIN_ALGORITHM_PREFIX))


def _compute_algorithm(original: Callable, raw_algorithm: str, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``eplb_algorithms.compute_algorithm``: SGLang's names keep their meaning."""
    if raw_algorithm in plugin_algorithm_names():
        return PluginAlgorithm(raw_algorithm)
    return original(raw_algorithm, *args, **kwargs)


def _rebalance_experts(original: Callable, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``eplb_algorithms.rebalance_experts`` (SGLang calls it with keywords only)."""
    algorithm = kwargs.get("algorithm", args[5] if len(args) > 5 else None)
    if not isinstance(algorithm, PluginAlgorithm):
        return original(*args, **kwargs)
    from eplb_plugin.algorithms import rebalance_experts

    names = ("tokens_per_expert", "num_physical_experts", "num_local_physical_experts", "num_groups", "num_nodes")
    call = dict(zip(names, args))
    call.update({k: v for k, v in kwargs.items() if k != "algorithm"})
    tokens = call["tokens_per_expert"]
    device = tokens.device
    phy2log, log2phy, count = rebalance_experts(**{**call, "tokens_per_expert": tokens.cpu()}, algorithm=algorithm.name,
                                                dispatch=_server_dispatch())
    logger.info("%s planned %s with policy %s", LOG_PREFIX, tuple(phy2log.shape), algorithm.name)
    return phy2log.to(device), log2phy.to(device), count.to(device)


def _server_dispatch() -> str | None:
    """The server's ``--ep-dispatch-algorithm`` (SGLang's resolved runtime config), which a
    per-pass policy plans for; None where SGLang has none (no dispatch: no replica is used) or
    its runtime config is not set up (the policy then plans for its default, with a warning)."""
    try:
        from sglang.srt.runtime_context import get_exec

        return get_exec().moe.ep_dispatch_algorithm
    except (ImportError, AttributeError, ValueError) as exc:  # ValueError: SGLang's config not published
        logger.warning("%s could not read SGLang's --ep-dispatch-algorithm (%s): a per-pass policy plans for "
                       "its default dispatch", LOG_PREFIX, exc)
        return None


def _recorder_init_new(original: Callable, *args: Any, **kwargs: Any) -> Any:
    from eplb_plugin.integrations.sglang_recorder import init_new

    return init_new(original, *args, **kwargs)


def hook_specs() -> list[tuple[str, str, Any]]:
    """(target, hook type name, hook) for every hook the plugin registers. The dispatch hooks
    are SGLang's hot path (every MoE layer, inside its compiled top-k): they are the bodies
    themselves, not lazy-import wrappers."""
    from eplb_plugin.integrations import sglang_dispatch
    from eplb_plugin.integrations.sglang_counts import dispatch_counts_setting
    from eplb_plugin.integrations.sglang_manager import SGLangEPLBManager

    idle_ranks_join = [
        (f"sglang.srt.layers.moe.{module}.empty_topk_output", "AFTER", sglang_dispatch.empty_topk_output_joins_exchange)
        for module in ("topk.TopK", "hash_topk.HashTopK")
    ] if dispatch_counts_setting() == "global" else []
    return [
        ("sglang.srt.server_args.ServerArgs.add_cli_args", "AFTER", _add_plugin_flags),
        ("sglang.srt.server_args.ServerArgs.from_cli_args", "AROUND", _capture_plugin_flags),
        ("sglang.srt.eplb.eplb_algorithms.compute_algorithm", "AROUND", _compute_algorithm),
        ("sglang.srt.eplb.eplb_algorithms.rebalance_experts", "AROUND", _rebalance_experts),
        ("sglang.srt.eplb.expert_distribution.ExpertDistributionRecorder.init_new", "AROUND", _recorder_init_new),
        ("sglang.srt.eplb.eplb_manager.EPLBManager", "REPLACE", SGLangEPLBManager),
        ("sglang.srt.eplb.expert_location_dispatch.ExpertLocationDispatchInfo.init_new", "AROUND",
         sglang_dispatch.dispatch_info_init_new),
        ("sglang.srt.eplb.expert_location_dispatch.topk_ids_logical_to_physical", "AROUND",
         sglang_dispatch.topk_ids_logical_to_physical),
        ("sglang.srt.eplb.expert_location.ExpertLocationMetadata.update", "AFTER",
         sglang_dispatch.metadata_rows_updated),
        *idle_ranks_join,
    ]


def applied_hooks() -> dict[str, bool]:
    """Target -> whether SGLang's HookRegistry has patched it (SGLang only logs failures)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    return {target: target in HookRegistry._patched for target, _, _ in hook_specs()}


def register() -> None:
    """SGLang's plugin entry point: register the hooks, once per process, when asked for."""
    global _registered
    if _registered:
        return
    if not plugin_requested():
        logger.debug("%s EPLB not asked for (no --enable-eplb / recorder mode / %s): no hooks", LOG_PREFIX, ENABLE_ENV)
        return
    from importlib.metadata import version

    installed = version("sglang")
    if not sglang_version_supported(installed) and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        logger.error(
            "%s sglang %s is outside the tested range %s..%s: no hooks registered "
            "(set %s=1 to try anyway)", LOG_PREFIX, installed, *TESTED_SGLANG, ALLOW_UNTESTED_ENV,
        )
        return
    try:
        plugin_settings()
    except ConfigError as exc:
        # SGLang's load_plugins() logs and swallows a plugin's Exception (the plugin would be
        # silently off, SGLang's own EPLB serving): SystemExit passes it and stops the launch.
        raise SystemExit(f"{LOG_PREFIX} {exc}") from exc
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, hook_type, hook in hook_specs():
        HookRegistry.register(target, hook, HookType[hook_type])
    _registered = True
    os.environ[ENABLE_ENV] = "1"  # children started with other argv still hook
    logger.info("%s registered %d SGLang hooks (sglang %s)", LOG_PREFIX, len(hook_specs()), installed)
