"""Model presets: MoE shapes of the models the plugin targets, and EPLB defaults.

``get_preset("deepseek-v3")`` returns a frozen ModelPreset; ``PRESET_NAMES`` lists them.
The numbers live in ``models.json`` beside this file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from eplb_plugin.errors import ConfigError

_MODELS_FILE = Path(__file__).with_name("models.json")


@dataclass(frozen=True)
class ModelPreset:
    """MoE shape of one model. Expert FFN: w13 [2 * moe_intermediate, hidden], w2 [hidden, moe_intermediate]."""

    name: str
    hf_id: str | None
    num_layers: int  # MoE layers only
    first_moe_layer: int
    num_logical_experts: int
    top_k: int
    num_groups: int
    topk_groups: int
    num_shared_experts: int
    hidden_size: int
    moe_intermediate_size: int
    dtype_bytes: float
    eplb: dict[str, Any] = field(default_factory=dict)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights (gate, up and down projections)."""
        return int(3 * self.hidden_size * self.moe_intermediate_size * self.dtype_bytes)


@cache
def _load() -> dict[str, ModelPreset]:
    raw = json.loads(_MODELS_FILE.read_text())
    return {name: ModelPreset(name=name, **spec) for name, spec in raw.items() if not name.startswith("_")}


PRESET_NAMES: tuple[str, ...] = tuple(_load())


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; an unknown name raises ConfigError listing the known ones."""
    presets = _load()
    if name not in presets:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(presets)}")
    return presets[name]
