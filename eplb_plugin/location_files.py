"""Placement files: one validation path for every placement and counts file, and the writer.

Read by ``--init-expert-location`` (the runtime, the SGLang plugin, the launcher), by
``eplb inspect`` and by ``eplb plan`` / ``simulate``'s counts. Every problem ends in
ExpertLocationFileError (a PlacementError) or CountsError naming the file, the key and
what is wrong, never a raw ``RecursionError``, ``UnicodeDecodeError``, ``KeyError`` or
``IndexError``:

1. Size first: a file (or inline JSON) larger than the model's shape can justify
   (``max_source_bytes``), or a ``.pt`` archive whose entries unpack to more, is refused
   before it is read, so a file cannot make the process allocate gigabytes.
2. Parse: ``.pt`` with ``weights_only=True``; JSON as UTF-8 (too deep nesting, bad bytes, a
   directory: typed errors). The top level must be a dict with string keys.
3. Shape before anything is derived: a nested list's lengths (walked without recursion)
   or a tensor's shape, dtype (no bool, no complex), layout (dense) and device (not meta)
   are checked against the model before a tensor is built or a view derived.

Plugin-only sidecars beside a placement file (stock SGLang never opens them, and would
refuse any extra key in the file itself, which it passes on as a keyword):

- ``<file>.weights.json``: replica weights (and the map they belong to), weighted plans only.
- ``<file>.meta.json``: ``{"eplb_placement": {ep_size, num_layers, num_logical_experts,
  num_physical_experts}}``, what the placement was made for; loaders refuse a mismatch.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from eplb_plugin.algorithms.names import DEFAULT_ALGORITHM
from eplb_plugin.errors import CountsError, ExpertLocationFileError, PlacementError
from eplb_plugin.location import INLINE_SOURCE, ExpertLocation, validate_logical_count
from eplb_plugin.placement_format import (
    COUNT_KEY,
    MAP_KEY,
    META_KEY,
    meta_sidecar,
    weights_sidecar,
)

# Re-exported: the file formats' names and the writer, where callers import them from.
from eplb_plugin.placement_format import META_SUFFIX as META_SUFFIX
from eplb_plugin.placement_format import WEIGHTS_SUFFIX as WEIGHTS_SUFFIX
from eplb_plugin.placement_format import save_placement as save_placement

MAX_COUNT_PASSES = 4096  # a [B, L, E] counts input holds at most this many passes
JSON_BYTES_PER_NUMBER = 24  # a number and its separator in JSON text, generously
PT_BYTES_PER_NUMBER = 8  # int64 / float64 in a .pt
FIXED_OVERHEAD_BYTES = 1 << 20  # keys, headers, small files
UNBOUNDED_NUMBERS = 1 << 26  # counts files read without a model shape (eplb tools): 64M numbers


def max_source_bytes(*, num_layers: int | None, num_logical_experts: int | None,
                     num_physical_experts: int | None, binary: bool) -> int:
    """The largest input the model's shape can justify: a [L, P] map or [B <= MAX_COUNT_PASSES,
    L, E] counts (either may be in a file); without a shape, UNBOUNDED_NUMBERS numbers."""
    if num_layers is None or num_logical_experts is None:
        numbers = UNBOUNDED_NUMBERS
    else:
        numbers = num_layers * max(num_physical_experts or 0, num_logical_experts * MAX_COUNT_PASSES)
    return numbers * (PT_BYTES_PER_NUMBER if binary else JSON_BYTES_PER_NUMBER) + FIXED_OVERHEAD_BYTES


# ---------------------------------------------------------------------- reading


def read_location_source(source: str, *, max_bytes: int | None = None,
                         takes_trivial: bool = False) -> tuple[dict[str, Any], str]:
    """Parse an ``--init-expert-location`` value (a ``.pt`` / ``.json`` path or inline JSON)
    into its dict, as SGLang does, within ``max_bytes``. Returns (dict, a name for messages).
    ``takes_trivial``: the caller accepts ``trivial`` too (its messages list it)."""
    if source.endswith(".pt"):
        name = source
        _check_file(name, max_bytes)
        _check_archive(name, max_bytes)
        try:
            data = torch.load(source, weights_only=True, map_location="cpu")
        except Exception as exc:  # torch raises many types for a bad archive; name it once
            raise ExpertLocationFileError(name, None, f"not a loadable torch file ({type(exc).__name__}: "
                                                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
    elif source.endswith(".json"):
        name = source
        _check_file(name, max_bytes)
        try:
            raw = Path(source).read_bytes()
        except OSError as exc:
            raise ExpertLocationFileError(name, None, f"cannot be read ({exc.strerror or exc})") from exc
        data = _parse_json(raw, name)
    elif os.path.lexists(source):  # a path, never inline JSON (lexists is False for what is no path)
        problem = "is a directory" if os.path.isdir(source) else \
            f"unsupported file type ({Path(source).suffix or 'no suffix'})"
        raise ExpertLocationFileError(source, None, f"{problem}; expected a .pt or .json file")
    else:
        name = INLINE_SOURCE
        if max_bytes is not None and len(source) > max_bytes:
            raise ExpertLocationFileError(name, None, f"is {len(source)} bytes, more than the model's shape "
                                                      f"can need ({max_bytes}); pass a file instead")
        try:
            data = _parse_json(source.encode(), name)
        except ExpertLocationFileError as exc:
            allowed = "neither 'trivial', a .pt/.json path, nor" if takes_trivial else "neither a .pt/.json path nor"
            raise ExpertLocationFileError(name, None, f"{allowed} valid JSON ({exc.problem})") from exc
    if not isinstance(data, Mapping):
        raise ExpertLocationFileError(name, None, f"expected a dict, got {type(data).__name__}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ExpertLocationFileError(name, None, f"keys must be strings, got {bad_keys[:5]!r}")
    return dict(data), name


def _check_file(name: str, max_bytes: int | None) -> None:
    path = Path(name)
    if not path.exists():
        if path.is_symlink():
            raise ExpertLocationFileError(name, None, f"is a symbolic link to a missing file ({os.readlink(path)})")
        raise ExpertLocationFileError(name, None, "file not found")
    if not path.is_file():
        raise ExpertLocationFileError(name, None, "is not a regular file (a directory?)")
    size = os.path.getsize(path)
    if max_bytes is not None and size > max_bytes:
        raise ExpertLocationFileError(name, None, f"is {size} bytes, more than the model's shape can need "
                                                  f"({max_bytes}); is it the file for this model?")


def _check_archive(name: str, max_bytes: int | None) -> None:
    """A .pt is a zip archive (torch's format since 1.6) whose entries may be compressed: their
    unpacked sizes count against ``max_bytes`` too, read from the archive's directory before
    anything is unpacked. A legacy (not zip) .pt is its on-disk size, checked already."""
    if max_bytes is None or not zipfile.is_zipfile(name):
        return
    try:
        with zipfile.ZipFile(name) as archive:
            unpacked = sum(item.file_size for item in archive.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise ExpertLocationFileError(name, None, f"not a loadable torch file ({exc})") from exc
    if unpacked > max_bytes:
        raise ExpertLocationFileError(name, None, f"unpacks to {unpacked} bytes, more than the model's shape can "
                                                  f"need ({max_bytes}); is it the file for this model?")


def _parse_json(raw: bytes, name: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ExpertLocationFileError(name, None, f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise ExpertLocationFileError(name, None, f"invalid JSON ({exc})") from exc
    except RecursionError as exc:
        raise ExpertLocationFileError(name, None, "JSON nested too deeply (a map is [layers][slots])") from exc


def checked_array(value: Any, *, source: str, key: str, dims: tuple[int, ...],
                  shape: tuple[int | None, ...] | None = None, integer: bool,
                  error: type[Exception] = PlacementError, names: tuple[str, ...] = ()) -> torch.Tensor:
    """``value`` (nested lists or a tensor) as a CPU tensor, its shape checked before it is
    built: ``len(shape) in dims``, entries of ``shape`` that are not None must match (the
    trailing ones when fewer dims), numbers only (no bool, no complex; integers when
    ``integer``), dense and not meta. Raises ``error`` naming source and key; ``names``: the
    dimensions' names for messages (the trailing ones, e.g. ("layers", "slots"))."""
    where = f"{source}: {key}"
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise error(f"{where} is a {value.layout} tensor; save a dense tensor (.to_dense())")
        if value.is_meta:
            raise error(f"{where} is a meta tensor (no data); save the tensor itself")
        if value.dtype == torch.bool or value.is_complex():
            raise error(f"{where} has dtype {value.dtype}; expected {'integer' if integer else 'real'} numbers")
        got = tuple(value.shape)
    else:
        got = _nested_shape(value, max(dims), where, error)
    layout = " or ".join("[" + ", ".join(n[0].upper() for n in names[-d:]) + "]" for d in dims) if names else ""
    if len(got) not in dims:
        raise error(f"{where} has {len(got)} dimensions (shape {list(got)}); expected "
                    f"{layout or ' or '.join(map(str, dims)) + ' dimensions'}")
    if shape is not None:
        for have, want, dim_name in zip(reversed(got), reversed(shape), reversed(names or ("",) * len(shape))):
            if want is not None and have != want:
                raise error(f"{where} has shape {list(got)} ({have} {dim_name or 'entries'}); "
                            f"the model needs {_show(shape, len(got))}")
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
    else:
        try:
            tensor = torch.tensor(value)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise error(f"{where} is not a rectangular array of numbers ({exc})") from exc
        if tensor.dtype == torch.bool:
            raise error(f"{where} holds true/false; expected numbers")
    if integer and tensor.is_floating_point():
        if not torch.isfinite(tensor).all() or not torch.equal(tensor, tensor.round()):
            raise error(f"{where} holds non-integer ids")
    return tensor


def _show(shape: tuple[int | None, ...], ndim: int) -> str:
    dims = ["*" if d is None else str(d) for d in shape[-ndim:]]
    return "[" + ", ".join(dims) + "]"


def _nested_shape(value: Any, max_dims: int, where: str, error: type[Exception]) -> tuple[int, ...]:
    """The shape of nested lists along their first elements (no recursion; at most max_dims
    levels); ragged rows are caught when the tensor is built."""
    shape: list[int] = []
    node = value
    while isinstance(node, (list, tuple)):
        if len(shape) == max_dims:
            raise error(f"{where} is nested deeper than {max_dims} levels")
        shape.append(len(node))
        if not node:
            break
        node = node[0]
    if isinstance(node, (dict, str)) or (node is not None and not shape and not isinstance(node, (int, float))):
        raise error(f"{where} is not an array of numbers (found {type(node).__name__})")
    return tuple(shape)


def _present(sidecar: Path) -> bool:
    """Whether a sidecar is there: a link to a missing file is, so that it is refused by name."""
    return sidecar.exists() or sidecar.is_symlink()


def _with_sidecar_weights(location: ExpertLocation, source: str) -> ExpertLocation:
    """``location`` (the validated map of ``source``) with the replica weights of the sidecar
    beside ``source``; errors name the sidecar and its key."""
    path = weights_sidecar(source)
    if not _present(path):
        return location
    name = str(path)
    weights = _sidecar_weights(name, source, location.physical_to_logical_map)
    try:
        return ExpertLocation.from_physical_to_logical_map(
            location.physical_to_logical_map, num_logical_experts=location.num_logical_experts,
            ep_size=location.ep_size, replica_weights=weights, source=name)
    except PlacementError as exc:  # the map was valid: the weights are wrong
        problem = str(exc).removeprefix(f"{name}: ").removeprefix("replica_weights ")
        raise ExpertLocationFileError(name, "replica_weights", problem) from exc


def _sidecar_weights(name: str, source: str, phy2log: torch.Tensor) -> torch.Tensor:
    """The replica weights of the sidecar ``name`` beside ``source``, checked to belong to its map."""
    path = Path(name)
    size_cap = max_source_bytes(num_layers=phy2log.shape[0], num_logical_experts=1,
                                num_physical_experts=2 * phy2log.shape[1], binary=False)
    _check_file(name, size_cap)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ExpertLocationFileError(name, None, f"cannot be read ({exc.strerror or exc})") from exc
    side = _parse_json(raw, name)
    if not isinstance(side, Mapping) or "replica_weights" not in side or MAP_KEY not in side:
        raise ExpertLocationFileError(name, None, "must be a dict with 'replica_weights' and "
                                                  "'physical_to_logical_map'; delete it or re-plan")
    shape = tuple(phy2log.shape)
    side_map = checked_array(side[MAP_KEY], source=name, key=MAP_KEY, dims=(2,), shape=shape, integer=True,
                             error=_file_error(name, MAP_KEY))
    if not torch.equal(side_map.to(torch.int64), phy2log):
        raise ExpertLocationFileError(name, MAP_KEY, f"belongs to another map than {source}; delete it or re-plan")
    return checked_array(side["replica_weights"], source=name, key="replica_weights", dims=(2,), shape=shape,
                         integer=False, error=_file_error(name, "replica_weights"))


def _file_error(name: str, key: str) -> type[Exception]:
    """A PlacementError subclass whose messages come out as ExpertLocationFileError(name, key)."""

    class _Err(ExpertLocationFileError):
        def __init__(self, problem: str):
            super().__init__(name, key, problem.removeprefix(f"{name}: {key} ").removeprefix(f"{name}: "))

    return _Err


def read_made_for(source: str) -> dict[str, int] | None:
    """What the placement file was made for (its meta sidecar), or None without one."""
    path = meta_sidecar(source)
    if not _present(path):
        return None
    name = str(path)
    _check_file(name, FIXED_OVERHEAD_BYTES)
    meta = _parse_json(path.read_bytes(), name)
    fields = ("ep_size", "num_layers", "num_logical_experts", "num_physical_experts")
    made_for = meta.get(META_KEY) if isinstance(meta, Mapping) else None
    if not isinstance(made_for, Mapping) or not all(
            isinstance(made_for.get(f), int) and not isinstance(made_for.get(f), bool) for f in fields):
        raise ExpertLocationFileError(name, META_KEY, f"must hold the integers {list(fields)}; delete it or re-plan")
    return {f: int(made_for[f]) for f in fields}


def check_made_for(made_for: dict[str, int] | None, *, source: str, ep_size: int, num_layers: int | None,
                   num_logical_experts: int | None, num_physical_experts: int | None) -> None:
    """Refuse a placement made for another EP size or model shape (its meta sidecar)."""
    if made_for is None:
        return
    want = {"ep_size": ep_size, "num_layers": num_layers, "num_logical_experts": num_logical_experts,
            "num_physical_experts": num_physical_experts}
    for key, value in want.items():
        if value is not None and made_for[key] != value:
            flag = "--ep-size" if key == "ep_size" else key
            raise ExpertLocationFileError(
                source, META_KEY, f"was made for {key} {made_for[key]} but {flag} is {value} here "
                                  f"(made for {made_for}); re-plan for this EP size and model")


def load_placement(
    source: str, *, ep_size: int, num_layers: int | None = None, num_logical_experts: int,
    num_physical_experts: int | None = None,
) -> ExpertLocation:
    """A placement file (or inline JSON) holding ``physical_to_logical_map``, validated against
    the model (and against its meta sidecar), with its sidecar's replica weights."""
    if source == "trivial":  # the trivial placement is made for a slot count, which a file carries
        raise ExpertLocationFileError(source, None, "the trivial placement is made for a slot count, which a "
                                                    "placement file gives and 'trivial' does not; give a file (eplb "
                                                    "plan writes one and prints the trivial placement's balancedness)")
    cap = max_source_bytes(num_layers=num_layers, num_logical_experts=num_logical_experts,
                           num_physical_experts=num_physical_experts, binary=source.endswith(".pt"))
    data, name = read_location_source(source, max_bytes=cap)
    if MAP_KEY not in data:
        raise ExpertLocationFileError(name, None, f"holds no {MAP_KEY!r} (keys: {sorted(data)})")
    return _location_from_map(data, name, source, ep_size=ep_size, num_layers=num_layers,
                              num_logical_experts=num_logical_experts, num_physical_experts=num_physical_experts)


def _location_from_map(data: dict[str, Any], name: str, source: str, *, ep_size: int, num_layers: int | None,
                       num_logical_experts: int, num_physical_experts: int | None) -> ExpertLocation:
    extra = set(data) - {MAP_KEY}
    if extra:
        raise ExpertLocationFileError(name, MAP_KEY, f"unexpected keys {sorted(extra)} beside it (SGLang passes "
                                                     "them on as keywords and fails); remove them")
    if name != INLINE_SOURCE:
        check_made_for(read_made_for(source), source=name, ep_size=ep_size, num_layers=num_layers,
                       num_logical_experts=num_logical_experts, num_physical_experts=num_physical_experts)
    phy2log = checked_array(data[MAP_KEY], source=name, key=MAP_KEY, dims=(2,), names=("layers", "slots"),
                            shape=(num_layers, num_physical_experts), integer=True, error=_file_error(name, MAP_KEY))
    try:
        location = ExpertLocation.from_physical_to_logical_map(
            phy2log, num_logical_experts=num_logical_experts, ep_size=ep_size,
            num_layers=num_layers, num_physical_experts=num_physical_experts, source=name,
        )
    except ExpertLocationFileError:
        raise
    except PlacementError as exc:
        raise ExpertLocationFileError(name, MAP_KEY, str(exc).removeprefix(f"{name}: ")) from exc
    return _with_sidecar_weights(location, source) if name != INLINE_SOURCE else location


def read_counts(source: str, *, num_layers: int | None = None, num_logical_experts: int | None = None,
                data: dict[str, Any] | None = None, name: str | None = None,
                keep_passes: bool = False) -> torch.Tensor:
    """``logical_count`` [L, E] or [B, L, E] of a file (``.pt`` / ``.json``; also ``counts``)
    checked (shape, NaN, negative) and summed to [L, E] float64 (kept per pass with
    ``keep_passes``: ``validate_logical_count``). CountsError names the file."""
    if data is None:
        cap = max_source_bytes(num_layers=num_layers, num_logical_experts=num_logical_experts,
                               num_physical_experts=None, binary=source.endswith(".pt"))
        try:
            data, name = read_location_source(source, max_bytes=cap)
        except ExpertLocationFileError as exc:
            raise CountsError(str(exc).removeprefix("--init-expert-location ")) from exc
    name = name or source
    key = next((k for k in (COUNT_KEY, "counts") if k in data), None)
    if key is None:
        raise CountsError(f"{name}: no 'logical_count' or 'counts' key (keys: {sorted(data)})")
    raw = checked_array(data[key], source=name, key=key, dims=(2, 3), shape=(num_layers, num_logical_experts),
                        integer=False, error=CountsError, names=("passes", "layers", "experts"))
    if raw.dim() == 3 and raw.shape[0] == 0:  # a stat dump taken before any pass was recorded
        raise CountsError(f"{name}: {key} holds no passes (shape {list(raw.shape)}): nothing to plan from")
    if raw.dim() == 3 and raw.shape[0] > MAX_COUNT_PASSES:
        raise CountsError(f"{name}: {key} holds {raw.shape[0]} passes, more than {MAX_COUNT_PASSES}; sum them first")
    return validate_logical_count(raw, source=name, num_layers=num_layers, num_logical_experts=num_logical_experts,
                                  keep_passes=keep_passes)


def load_init_expert_location(
    source: str, *, num_layers: int, num_logical_experts: int, num_physical_experts: int, ep_size: int,
    num_nodes: int = 1, num_groups: int | None = None, algorithm: str = DEFAULT_ALGORITHM, split: str = "equal",
    dispatch: str | None = None,
) -> ExpertLocation:
    """Resolve ``--init-expert-location`` into a validated ExpertLocation.

    Accepts ``trivial``, a ``.pt`` / ``.json`` path or inline JSON holding
    ``physical_to_logical_map`` [L][P] (plus, from the plugin's sidecar, replica weights) or
    ``logical_count`` [L][E] / [B][L][E] (planned with ``algorithm`` for ``split`` and ``dispatch``).
    Raises ExpertLocationFileError naming the source, the key and the problem.
    """
    if source == "trivial":
        return ExpertLocation.trivial(num_layers=num_layers, num_logical_experts=num_logical_experts,
                                      num_physical_experts=num_physical_experts, ep_size=ep_size)
    cap = max_source_bytes(num_layers=num_layers, num_logical_experts=num_logical_experts,
                           num_physical_experts=num_physical_experts, binary=source.endswith(".pt"))
    data, name = read_location_source(source, max_bytes=cap, takes_trivial=True)
    if MAP_KEY in data:
        return _location_from_map(data, name, source, ep_size=ep_size, num_layers=num_layers,
                                  num_logical_experts=num_logical_experts, num_physical_experts=num_physical_experts)
    if COUNT_KEY in data:
        try:
            count = read_counts(source, num_layers=num_layers, num_logical_experts=num_logical_experts,
                                data={COUNT_KEY: data[COUNT_KEY]}, name=name, keep_passes=True)
            return ExpertLocation.from_logical_count(
                count, num_physical_experts=num_physical_experts, ep_size=ep_size, num_nodes=num_nodes,
                num_groups=num_groups, algorithm=algorithm, source=name, split=split, dispatch=dispatch,
            )
        except (PlacementError, CountsError) as exc:
            if isinstance(exc, ExpertLocationFileError):
                raise
            raise ExpertLocationFileError(name, COUNT_KEY, str(exc).removeprefix(f"{name}: ")) from exc
    raise ExpertLocationFileError(
        name, None, f"holds neither 'physical_to_logical_map' nor 'logical_count' (keys: {sorted(data)})"
    )
