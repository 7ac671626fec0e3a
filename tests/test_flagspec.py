"""flagspec: a dataclass field declared with ``flag(...)`` becomes one command-line option."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from eplb_plugin.flagspec import add_flags, config_kwargs, flag, option_of, value_type


@dataclass(frozen=True)
class _Config:
    batch_tokens: int = flag("Tokens per pass.", default=512)
    mode: Literal["a", "b"] = flag("The mode.", choices=("a", "b"), default="a")
    http_port: Optional[int] = flag("HTTP port.", name="--port", default=None)
    verbose: bool = flag("Say more.", default=False)
    progress: bool = flag("Show progress.", default=True)
    cuda_graph: bool = flag("Run eagerly.", name="--disable-cuda-graph", negate=True, default=True)
    traces: tuple[str, ...] = flag("Trace files.", name="--trace", repeat=True, default=())
    passes: tuple[int, ...] = flag("Passes to profile.", default=())
    ready_file: Optional[str] = flag("For tests.", hidden=True, default=None)
    label: str = "not a flag"


@dataclass(frozen=True)
class _Other:
    batch_tokens: int = flag("Another config's tokens per pass.", default=7)


def _parser(*classes: type, **kw) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_flags(parser, *classes, **kw)
    return parser


def test_parsing_nothing_gives_the_dataclass_defaults_and_flags_reach_their_fields():
    """Defaults and values round-trip through config_kwargs: renamed, negated, repeated and
    several-valued options set their fields, lists become the fields' tuples."""
    parser = _parser(_Config)
    assert _Config(**config_kwargs(_Config, parser.parse_args([]))) == _Config()
    ns = parser.parse_args(["--batch-tokens", "8", "--mode", "b", "--port", "0", "--verbose", "--no-progress",
                            "--disable-cuda-graph", "--trace", "x", "--trace", "y", "--passes", "3", "5"])
    assert _Config(**config_kwargs(_Config, ns)) == _Config(
        batch_tokens=8, mode="b", http_port=0, verbose=True, progress=False, cuda_graph=False, traces=("x", "y"),
        passes=(3, 5))


def test_each_field_is_one_option_with_its_help_and_a_bool_is_a_switch_unless_it_defaults_to_true():
    """A bool defaulting to False is ``--x`` alone; one defaulting to True also gets
    ``--no-x``; a negated one is ``--disable-x``; a hidden flag's help is suppressed; a
    field without ``flag`` is no option."""
    parser = _parser(_Config)
    options = parser._option_string_actions
    assert "--verbose" in options and "--no-verbose" not in options
    assert "--progress" in options and "--no-progress" in options
    assert "--disable-cuda-graph" in options and "--cuda-graph" not in options
    assert "--label" not in options
    assert options["--batch-tokens"].help == "Tokens per pass. (default: %(default)s)"  # argparse fills it in
    assert "(default: 512)" in parser.format_help()
    assert options["--ready-file"].help == argparse.SUPPRESS
    assert option_of(_Config.__dataclass_fields__["http_port"]) == "--port"


def test_a_choice_outside_the_fields_choices_is_refused():
    with pytest.raises(SystemExit):
        _parser(_Config).parse_args(["--mode", "c"])


def test_an_option_two_configs_share_is_added_once_and_include_picks_fields():
    """The first class's field gives the shared option; include leaves fields out."""
    parser = _parser(_Config, _Other)
    assert parser.parse_args([]).batch_tokens == 512
    parser = _parser(_Config, include=lambda f: f.name != "verbose")
    assert "--verbose" not in parser._option_string_actions and "--mode" in parser._option_string_actions


def test_the_value_type_unwraps_optional_literal_and_tuple():
    assert (value_type(Optional[int]), value_type(Literal["a", "b"]), value_type(tuple[int, ...])) == (int, str, int)
