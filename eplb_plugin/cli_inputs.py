"""Inputs the ``eplb`` subcommands share: counts files, per-token traces, the slot count from
the flags, and the argparse types that refuse out-of-range numbers before anything runs."""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .algorithms.evaluate import pass_counts
from .counts import trace_id_problem
from .errors import ConfigError, CountsError
from .location_files import read_counts

TRACE_KEY = "topk_ids"  # a per-token .npz trace: topk_ids [tokens, layers, top_k], logical ids, -1 = padding
COUNTS_SUFFIXES = (".npz", ".pt", ".json")
MAX_EXPERTS = 1 << 16  # routed experts per layer a trace may have (the largest presets have 384)
MAX_PASS_COUNTS_BYTES = 4 << 30  # per-pass counts [B, L, E] float64 that --pass-tokens may cut a trace into


# ---------------------------------------------------------------------- argparse types


def positive_int(text: str) -> int:
    """An int >= 1 (argparse names the flag when it refuses one)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value})")
    return value


def decay_factor(text: str) -> float:
    """A float in (0, 1]: the weight of a pass one pass older (1 weighs every past pass alike)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (got {text})")
    return value


# Names argparse prints for the types above ("invalid <name> value: '0'" for text that is no number).
positive_int.__name__ = "int"
non_negative_int.__name__ = "int"
decay_factor.__name__ = "float"


# ---------------------------------------------------------------------- output files


def check_output_file(flag: str, path: Path, *, suffixes: tuple[str, ...] | None = None,
                      make_folder: bool = False) -> None:
    """ConfigError naming ``flag`` unless ``path`` can be written: its suffix, not a folder,
    its folder existing (or, with ``make_folder``, the nearest existing folder above it) and
    taking a file (probed with a temporary file: permission bits do not stop root, a
    read-only mount or /proc does). Run before the work whose result it will hold."""
    if suffixes is not None and path.suffix not in suffixes:
        raise ConfigError(f"{flag} {path}: must end in {', '.join(suffixes[:-1])} or {suffixes[-1]}"
                          if len(suffixes) > 1 else f"{flag} {path}: must end in {suffixes[0]}")
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name")
    folder = path.parent
    if make_folder:
        folder = next(f for f in (folder, *folder.parents) if f.exists())
    if not folder.is_dir():
        raise ConfigError(f"{flag} {path}: " + (f"{folder} is not a folder" if folder.exists() else
                                               f"folder {folder} does not exist"))
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: folder {folder} takes no file ({exc.strerror or exc})") from exc


# ---------------------------------------------------------------------- traces and counts


def read_trace(path: str | Path) -> np.ndarray:
    """``topk_ids`` [T, L, k] of a per-token ``.npz``: integer logical ids, -1 = padding;
    CountsError naming the file and the key for anything else (an id below -1 included)."""
    path = Path(path)
    try:
        archive = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CountsError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CountsError(f"{path}: a single array, not a .npz archive with a {TRACE_KEY!r} key")
    with archive:
        if TRACE_KEY not in archive.files:
            raise CountsError(f"{path}: no {TRACE_KEY!r} key (keys: {sorted(archive.files)}); a per-token trace "
                              f"holds {TRACE_KEY} [tokens, layers, top_k]")
        try:
            ids = archive[TRACE_KEY]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise CountsError(f"{path}: {TRACE_KEY} cannot be read ({type(exc).__name__}: {exc})") from exc
    if ids.ndim != 3:
        raise CountsError(f"{path}: {TRACE_KEY} has shape {list(ids.shape)}; expected [tokens, layers, top_k] "
                          "(a one-layer [tokens, top_k] trace: reshape it to [tokens, 1, top_k])")
    if not np.issubdtype(ids.dtype, np.integer):
        raise CountsError(f"{path}: {TRACE_KEY} holds {ids.dtype} values; expected integer expert ids")
    if 0 in ids.shape:
        raise CountsError(f"{path}: {TRACE_KEY} has shape {list(ids.shape)} [tokens, layers, top_k]: nothing to count")
    problem = trace_id_problem(int(ids.min()), int(ids.max()), None)
    if problem is not None:
        raise CountsError(f"{path}: {TRACE_KEY} holds {problem}")
    return ids


def trace_experts(traces: Sequence[tuple[str | Path, np.ndarray]], *, num_logical: int | None) -> int:
    """E of per-token traces ((path, topk_ids) pairs): ``num_logical`` (``--num-logical-experts``)
    checked against their ids, else their largest id + 1 (experts above the largest id that
    got a token are not seen: give the flag for them)."""
    tops = [(int(ids.max()), path) for path, ids in traces]
    top, where = max(tops, key=lambda t: t[0])
    # counts are [passes, layers, experts]: E is bounded before they are allocated
    if num_logical is not None and num_logical > MAX_EXPERTS:
        raise ConfigError(f"--num-logical-experts {num_logical} is more than the {MAX_EXPERTS} experts a trace may have")
    if top >= MAX_EXPERTS:
        raise CountsError(f"{where}: {TRACE_KEY} holds expert id {top}, more than the {MAX_EXPERTS} experts a trace "
                          "may have: are they expert ids?")
    if num_logical is not None:
        if top >= num_logical:
            raise CountsError(f"{where}: {TRACE_KEY} holds expert id {top}, but --num-logical-experts is {num_logical}")
        return num_logical
    if top < 0:
        raise CountsError(f"{where}: {TRACE_KEY} holds only padding (-1); give --num-logical-experts "
                          "to count it as no tokens")
    return top + 1


def trace_counts(ids: np.ndarray, *, path: str | Path, num_logical: int, pass_tokens: int | None) -> np.ndarray:
    """[L, E] counts of a trace, or [B, L, E] cut into passes of ``pass_tokens`` (tokens past
    the last whole pass are left out)."""
    if pass_tokens is None:
        return pass_counts(ids, num_logical=num_logical, pass_tokens=len(ids))[0]
    if pass_tokens < 1:
        raise ConfigError(f"--pass-tokens must be >= 1 (got {pass_tokens})")
    if pass_tokens > len(ids):
        raise CountsError(f"{path}: {len(ids)} tokens, fewer than one pass of --pass-tokens {pass_tokens}")
    num_bytes = len(ids) // pass_tokens * ids.shape[1] * num_logical * np.dtype(np.float64).itemsize
    if num_bytes > MAX_PASS_COUNTS_BYTES:
        raise CountsError(f"{path}: --pass-tokens {pass_tokens} cuts its {len(ids)} tokens into "
                          f"{len(ids) // pass_tokens} passes, {num_bytes / 2**30:.1f} GiB of per-pass counts (at most "
                          f"{MAX_PASS_COUNTS_BYTES / 2**30:.0f} GiB); give a larger --pass-tokens")
    return pass_counts(ids, num_logical=num_logical, pass_tokens=pass_tokens)


def _check_counts_path(path: Path) -> None:
    if not path.exists():
        raise CountsError(f"counts file {path} does not exist")
    if path.suffix not in COUNTS_SUFFIXES:
        raise CountsError(f"counts file {path}: expected a per-token .npz, an SGLang stat dump .pt or a .json "
                          f"with logical_count/counts (the name must end in {', '.join(COUNTS_SUFFIXES)})")


def load_counts(path: str | Path, *, pass_tokens: int | None = None, num_logical: int | None = None,
                keep_passes: bool = False) -> np.ndarray:
    """Counts from an SGLang stat dump ``.pt``, a JSON with ``logical_count``/``counts``, or a
    per-token ``.npz`` (``topk_ids [T, L, k]``, -1 = padding). Returns [L, E], or [B, L, E]
    when ``pass_tokens`` cuts a per-token trace into passes or, with ``keep_passes``, when the
    counts file holds passes (a stat dump's [B, L, E]). ``num_logical``: E (a trace's
    largest id + 1 without it; a counts file's width is checked against it)."""
    path = Path(path)
    _check_counts_path(path)
    if path.suffix == ".npz":
        ids = read_trace(path)
        num_logical = trace_experts([(path, ids)], num_logical=num_logical)
        return trace_counts(ids, path=path, num_logical=num_logical, pass_tokens=pass_tokens)
    if pass_tokens is not None:
        raise ConfigError(f"--pass-tokens cuts a per-token .npz trace into passes; {path} holds counts "
                          "(give the .npz, or leave --pass-tokens out)")
    # the loaders' checks: size, shape, NaN, negative
    return read_counts(str(path), num_logical_experts=num_logical, keep_passes=keep_passes).numpy()


def load_traces(paths: list[str], *, pass_tokens: int, num_logical: int | None = None) -> list[np.ndarray]:
    """[B_i, L, E] passes of each per-token ``.npz`` trace, all of one E (``num_logical``, else
    the largest id of any trace + 1), one L and one top_k (CountsError naming each trace's)."""
    traces = []
    for path in paths:
        if Path(path).suffix != ".npz":
            raise CountsError(f"trace {path}: expected a per-token .npz (topk_ids [tokens, layers, top_k])")
        _check_counts_path(Path(path))
        traces.append((path, read_trace(path)))
    # one model's replay: one layer count and one top_k (mixed top_k would weigh tokens unequally)
    for axis, what in ((1, "layer counts"), (2, "top_k")):
        if len({ids.shape[axis] for _, ids in traces}) > 1:
            raise CountsError(f"the traces have different {what}: " +
                              ", ".join(f"{path}: {ids.shape[axis]}" for path, ids in traces))
    experts = trace_experts(traces, num_logical=num_logical)
    return [trace_counts(ids, path=path, num_logical=experts, pass_tokens=pass_tokens) for path, ids in traces]


def num_physical_from_args(args, num_logical: int) -> int:
    """``--num-physical-experts`` if given, else the logical experts plus ``--redundant``."""
    return num_logical + args.redundant if args.num_physical_experts is None else args.num_physical_experts


def check_slots(args, *, num_physical: int, num_logical: int) -> None:
    """ConfigError naming the flags unless ``num_physical`` slots hold the ``num_logical``
    experts and divide over ``--ep-size`` (before any plan runs)."""
    from .algorithms.sizing import min_redundant

    sources = [getattr(args, "counts", None), *getattr(args, "trace", [])]
    inferred = args.num_logical_experts is None and any(str(s).endswith(".npz") for s in sources if s)
    experts = f"{num_logical} experts" + (" (the .npz's largest expert id + 1; --num-logical-experts sets it)"
                                          if inferred else "")
    given = f"--num-physical-experts {num_physical}" if args.num_physical_experts is not None \
        else f"{experts} + --redundant {args.redundant} = {num_physical} slots"
    if num_physical < num_logical:
        raise ConfigError(f"{given} is below the {experts} of the counts; every expert needs a slot")
    if num_physical % args.ep_size:
        fits = [min_redundant(num_logical, args.ep_size) + i * args.ep_size for i in range(4)]
        raise ConfigError(f"{given} is not divisible by --ep-size {args.ep_size}; --redundant values that divide: "
                          f"{', '.join(map(str, fits))}, ...")
