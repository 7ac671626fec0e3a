"""Command-line flags generated from frozen config dataclasses (EPLBArgs, the runtime's configs).

A field declared with ``flag(...)`` is one command-line option: its default is the field's
default and its help the field's, so parsing no arguments gives the dataclass's defaults.
The option's name is ``--field-name`` unless ``name`` gives another (SGLang's spelling, or
one that says what the field is for on the command line). ``add_flags`` adds dataclasses'
flags to a parser, ``config_kwargs`` reads them back from the parsed namespace.

    flag("Global tokens per forward pass.", default=512)
    flag("Run passes eagerly.", name="--disable-cuda-graph", negate=True, default=True)

A leaf module (the standard library only): ``args.py`` and ``runtime/config.py`` build on it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, get_args, get_type_hints


def flag(help_text: str, *, name: str | None = None, choices: tuple[str, ...] | None = None,
         negate: bool = False, hidden: bool = False, repeat: bool = False, metavar: str | None = None,
         tags: Mapping[str, Any] | None = None, **field_kw: Any) -> Any:
    """A dataclass field that is a command-line flag (``field_kw``: ``default=``...).

    name: the option (default ``--field-name``). A bool field whose default is False is a
    switch (``--x`` sets it); negate: a bool field set False by such a switch
    (``--disable-cuda-graph`` for ``cuda_graph=True``); other bools get ``--x/--no-x``.
    hidden: a flag for tests and the launcher, left out of ``--help``. A ``tuple`` field
    takes several values after its option, or with ``repeat`` one value per use of the
    option (``--trace a --trace b``). tags: more metadata for the dataclass's own readers
    (EPLBArgs: which host offers the flag).
    """
    metadata = {"help": help_text, "flag": name, "choices": choices, "negate": negate, "hidden": hidden,
                "repeat": repeat, "metavar": metavar, **(tags or {})}
    return dataclasses.field(metadata=metadata, **field_kw)


def flag_name(field_name: str) -> str:
    """The option a field gets by default: ``eplb_drift_threshold`` -> ``--eplb-drift-threshold``."""
    return "--" + field_name.replace("_", "-")


def value_type(annotation: Any) -> type:
    """The argparse ``type`` of a field: unwrap Optional[...], Literal[...] and tuple[...]."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if not args:
        return annotation
    if all(isinstance(a, str) for a in args):  # a Literal of names
        return str
    return value_type(args[0])


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are flags, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]


def option_of(f: dataclasses.Field) -> str:
    """The command-line option of flag field ``f``."""
    return f.metadata["flag"] or flag_name(f.name)


def dest_of(f: dataclasses.Field) -> str:
    """The namespace attribute flag field ``f`` parses into (its option's name)."""
    return option_of(f).lstrip("-").replace("-", "_")


def add_flags(group: Any, *classes: type,
              include: Callable[[dataclasses.Field], bool] | None = None, unset_defaults: bool = False) -> None:
    """Add every flag field of ``classes`` to ``group`` (a parser or argument group), defaults
    and help read from the fields. include: which fields to add (default: all). A field
    whose option an earlier class already added (one flag setting two configs, e.g.
    ``--seed``) is not added twice. unset_defaults: a flag not given is absent from the
    namespace (``argparse.SUPPRESS``; a host parser that must tell given flags from defaults),
    its help still naming the field's default."""
    seen: set[str] = set()
    for cls in classes:
        hints = get_type_hints(cls)
        for f in flag_fields(cls):
            option = option_of(f)
            if option in seen or (include is not None and not include(f)):
                continue
            seen.add(option)
            help_text = argparse.SUPPRESS if f.metadata["hidden"] else f.metadata["help"]
            default = f.default  # flag fields take defaults, not factories (a tuple, not a list)
            kind = hints[f.name]
            switch = kind is bool and (f.metadata["negate"] or not default)  # --x alone (or --disable-x)
            # --help shows what an absent flag means (argparse adds it to a --x/--no-x pair itself,
            # unless its default is unset)
            if help_text is not argparse.SUPPRESS and default is not None and not switch \
                    and (kind is not bool or unset_defaults) and "default" not in help_text:
                help_text += f" (default: {default})" if unset_defaults else " (default: %(default)s)"
            if kind is bool:
                negate = f.metadata["negate"]
                shown = not default if negate else default
                if switch:  # --x sets the field True (negate: --disable-x sets it False)
                    group.add_argument(option, dest=dest_of(f), action="store_true",
                                       default=argparse.SUPPRESS if unset_defaults else shown, help=help_text)
                else:
                    group.add_argument(option, dest=dest_of(f), action=argparse.BooleanOptionalAction,
                                       default=argparse.SUPPRESS if unset_defaults else default, help=help_text)
                continue
            kw: dict[str, Any] = dict(dest=dest_of(f), type=value_type(kind), choices=f.metadata["choices"],
                                      help=help_text, metavar=f.metadata["metavar"])
            if isinstance(default, tuple):  # argparse collects a list; config_kwargs makes it a tuple
                kw["default"] = list(default)
                if f.metadata["repeat"]:
                    kw["action"] = "append"
                else:
                    kw["nargs"] = "+"
            else:
                kw["default"] = default
            if unset_defaults:
                kw["default"] = argparse.SUPPRESS
            group.add_argument(option, **kw)


def config_kwargs(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """The flag fields of ``cls`` read from a namespace parsed with ``add_flags`` (lists back
    to the fields' tuples)."""
    out: dict[str, Any] = {}
    for f in flag_fields(cls):
        value = getattr(ns, dest_of(f))
        if f.metadata["negate"]:
            value = not value
        out[f.name] = tuple(value) if isinstance(value, list) else value
    return out
