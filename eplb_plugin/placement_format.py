"""What a placement file holds and where its plugin-only sidecars go, and the writer (a leaf
module: ``ExpertLocation.save`` writes through it, ``location_files`` reads by its keys).

- ``<file>`` (.json or .pt): ``{"physical_to_logical_map": [L][P]}`` alone, as stock SGLang
  loads it (SGLang passes any other key on as a keyword).
- ``<file>.weights.json``: replica weights (and the map they belong to), weighted plans only.
- ``<file>.meta.json``: ``{"eplb_placement": {ep_size, num_layers, num_logical_experts,
  num_physical_experts}}``, what the placement was made for; loaders refuse a mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from eplb_plugin.errors import PlacementError

WEIGHTS_SUFFIX = ".weights.json"
META_SUFFIX = ".meta.json"
META_KEY = "eplb_placement"
MAP_KEY = "physical_to_logical_map"
COUNT_KEY = "logical_count"


def weights_sidecar(path: str | Path) -> Path:
    """The plugin-only file beside a placement file that holds its replica weights."""
    path = Path(path)
    return path.with_name(path.name + WEIGHTS_SUFFIX)


def meta_sidecar(path: str | Path) -> Path:
    """The plugin-only file beside a placement file that says what it was made for."""
    path = Path(path)
    return path.with_name(path.name + META_SUFFIX)


def save_placement(path: str | Path, physical_to_logical_map: torch.Tensor, *, ep_size: int,
                   num_logical_experts: int, replica_weights: torch.Tensor | None = None) -> Path:
    """Write ``path`` (.json or .pt: the map alone, as stock SGLang loads it), the meta
    sidecar (what it was made for), and the weights sidecar when there are weights; a
    weights sidecar left from an earlier file of that name is removed (it would belong to
    another map)."""
    path = Path(path)
    phy2log = physical_to_logical_map.detach().to("cpu", torch.int64)
    if path.suffix == ".pt":
        torch.save({MAP_KEY: phy2log.clone()}, path)
    elif path.suffix == ".json":
        path.write_text(json.dumps({MAP_KEY: phy2log.tolist()}))
    else:
        raise PlacementError(f"placement file {path} must end in .json or .pt")
    meta_sidecar(path).write_text(json.dumps({META_KEY: {
        "ep_size": ep_size, "num_layers": phy2log.shape[0], "num_logical_experts": num_logical_experts,
        "num_physical_experts": phy2log.shape[1]}}))
    sidecar = weights_sidecar(path)
    if replica_weights is not None:
        sidecar.write_text(json.dumps({MAP_KEY: phy2log.tolist(), "replica_weights": replica_weights.tolist()}))
    else:
        sidecar.unlink(missing_ok=True)
    return path
