"""Deterministic expert weights derived from (layer, logical expert), and their checks.

Each logical expert's FFN is ``w13 [2I, H]`` (gate rows then up rows) and ``w2 [H, I]``,
drawn from a torch Generator seeded by (seed, layer, expert) and scaled by 1/sqrt(fan_in),
so any slot can be regenerated and compared with what it holds. A rank's weights per MoE
layer are two contiguous tensors whose dim 0 is the local slot: ``w13 [S, 2I, H]`` and
``w2 [S, H, I]`` (S = slots per rank), which is what the executor moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eplb_plugin.executor import fingerprint
from eplb_plugin.location import ExpertLocation

_LAYER_STRIDE = 1_000_033
_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class FFNShape:
    """Sizes of one expert FFN: hidden H, intermediate I; dtype and device of the weights."""

    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    seed: int = 0


def expert_seed(layer: int, expert: int, seed: int = 0) -> int:
    """The generator seed of one (layer, logical expert)."""
    return (seed * _SEED_STRIDE + layer) * _LAYER_STRIDE + expert


def make_expert_weights(layer: int, expert: int, shape: FFNShape) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [2I, H], w2 [H, I]) of one logical expert, on ``shape.device`` in ``shape.dtype``.

    Drawn in float32 on the device's generator, then cast: the same values for every
    dtype up to rounding, identical on every call with the same device type.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    g = torch.Generator(device=shape.device).manual_seed(expert_seed(layer, expert, shape.seed))
    w13 = torch.randn(2 * i, h, generator=g, device=shape.device) * h**-0.5
    w2 = torch.randn(h, i, generator=g, device=shape.device) * i**-0.5
    return w13.to(shape.dtype), w2.to(shape.dtype)


def build_rank_weights(location: ExpertLocation, rank: int, shape: FFNShape) -> list[list[torch.Tensor]]:
    """Per MoE layer, ``[w13 [S, 2I, H], w2 [S, H, I]]`` for ``rank``'s slots (contiguous)."""
    local = location.local_physical_to_logical_map(rank)  # [L, S]
    h, i = shape.hidden_size, shape.intermediate_size
    per_layer = []
    for layer in range(location.num_layers):
        experts = local[layer].tolist()
        w13 = torch.empty(len(experts), 2 * i, h, dtype=shape.dtype, device=shape.device)
        w2 = torch.empty(len(experts), h, i, dtype=shape.dtype, device=shape.device)
        for slot, expert in enumerate(experts):
            a, b = make_expert_weights(layer, expert, shape)
            w13[slot].copy_(a)
            w2[slot].copy_(b)
        per_layer.append([w13, w2])
    return per_layer


def build_dense_weights(num_layers: int, num_logical_experts: int, shape: FFNShape) -> list[list[torch.Tensor]]:
    """Per layer ``[w13 [E, 2I, H], w2 [E, H, I]]`` indexed by logical expert (dense reference)."""
    trivial = ExpertLocation.trivial(
        num_layers=num_layers, num_logical_experts=num_logical_experts,
        num_physical_experts=num_logical_experts, ep_size=1,
    )
    return build_rank_weights(trivial, 0, shape)


def expected_fingerprint(layer: int, expert: int, shape: FFNShape) -> int:
    """The fingerprint a slot holding (layer, expert) must have (``executor.fingerprint``)."""
    w13, w2 = make_expert_weights(layer, expert, shape)
    return int(fingerprint([w13.unsqueeze(0), w2.unsqueeze(0)])[0])


@dataclass(frozen=True)
class WeightCheck:
    """Result of checking one rank's slots: slots checked, and the (layer, slot, expert) that failed."""

    slots_checked: int
    failures: tuple[tuple[int, int, int], ...]


def verify_rank_weights(
    weights: list[list[torch.Tensor]], location: ExpertLocation, rank: int, shape: FFNShape
) -> WeightCheck:
    """Fingerprint every slot of ``rank`` and compare with its logical expert's expected one."""
    local = location.local_physical_to_logical_map(rank)
    failures = []
    for layer, tensors in enumerate(weights):
        got = fingerprint(tensors).tolist()
        cache: dict[int, int] = {}
        for slot, expert in enumerate(local[layer].tolist()):
            if expert not in cache:
                cache[expert] = expected_fingerprint(layer, expert, shape)
            if got[slot] != cache[expert]:
                failures.append((layer, slot, expert))
    return WeightCheck(slots_checked=local.numel(), failures=tuple(failures))
