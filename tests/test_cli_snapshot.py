"""The command-line parsers built from the flag dataclasses stay as recorded: the launcher's
(``launch_server.build_parser``: EPLBArgs' runtime flags, then the runtime's) and the one
the plugin adds to SGLang's parser (``add_eplb_args(only_plugin_flags=True)``).

Every option's group, option strings, dest, action, type, default, choices, nargs, metavar
and help are compared with ``cli_snapshot.json``. After a deliberate change of a flag,
rewrite the snapshot with ``PYTHONPATH=. python tests/test_cli_snapshot.py`` and review its
diff.
"""

from __future__ import annotations

import argparse
import json
import pathlib

SNAPSHOT = pathlib.Path(__file__).with_name("cli_snapshot.json")
# Python 3.9-3.12's BooleanOptionalAction appends this to its help; later ones do not.
_BOOL_DEFAULT_SUFFIX = " (default: %(default)s)"


def _action(action: argparse.Action) -> dict:
    help_text = action.help
    if isinstance(action, argparse.BooleanOptionalAction) and help_text and help_text.endswith(_BOOL_DEFAULT_SUFFIX):
        help_text = help_text[: -len(_BOOL_DEFAULT_SUFFIX)]
    return {
        "options": list(action.option_strings),
        "dest": action.dest,
        "action": type(action).__name__,
        "type": getattr(action.type, "__name__", action.type),
        "default": action.default,
        "choices": None if action.choices is None else list(action.choices),
        "nargs": action.nargs,
        "metavar": action.metavar,
        "help": help_text,
    }


def snapshot(parser: argparse.ArgumentParser) -> list[dict]:
    """The parser's options, group by group, in the order they were added (``-h`` left out)."""
    return [{"group": group.title, "actions": [_action(a) for a in group._group_actions
                                               if not isinstance(a, argparse._HelpAction)]}
            for group in parser._action_groups]


def parsers() -> dict[str, argparse.ArgumentParser]:
    from eplb_plugin.args import add_eplb_args
    from eplb_plugin.launch_server import build_parser

    return {"launch_server": build_parser(),
            "sglang_plugin": add_eplb_args(argparse.ArgumentParser(), only_plugin_flags=True)}


def test_the_parsers_keep_their_recorded_options():
    """Each parser's options (names, defaults, choices, types, help) equal the snapshot."""
    recorded = json.loads(SNAPSHOT.read_text())
    current = json.loads(json.dumps({name: snapshot(p) for name, p in parsers().items()}))
    assert current.keys() == recorded.keys()
    for name in recorded:
        assert current[name] == recorded[name], name


def _dump(snapshots: dict[str, list[dict]]) -> str:
    """JSON with one option a line, so that a changed flag is a one-line diff."""
    lines = ["{"]
    for i, (name, groups) in enumerate(snapshots.items()):
        lines.append(f" {json.dumps(name)}: [")
        for j, group in enumerate(groups):
            actions = ",\n".join(f"   {json.dumps(a)}" for a in group["actions"])
            lines.append(f'  {{"group": {json.dumps(group["group"])}, "actions": [' + (f"\n{actions}\n  ]}}" if actions else "]}")
                         + ("," if j < len(groups) - 1 else ""))
        lines.append(" ]" + ("," if i < len(snapshots) - 1 else ""))
    return "\n".join([*lines, "}"]) + "\n"


if __name__ == "__main__":
    SNAPSHOT.write_text(_dump({name: snapshot(p) for name, p in parsers().items()}))
