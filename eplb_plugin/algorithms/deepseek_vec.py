"""SGLang's ``deepseek_vec`` policy (its flat, decode form), written from its description: a
time-resolved variant of DeepSeek's recipe that plans on the window's per-pass counts.

1. Replication: one redundant slot at a time, to the expert whose extra replica lowers the
   sum over passes of the pass's largest per-replica load the most (only passes where that
   expert holds the largest load gain anything).
2. Packing: slots sorted by their window load per replica, heaviest first, dealt to the
   GPUs in a snake order (0, 1, ..., G-1, G-1, ..., 0, ...), so every GPU gets ``P / G``
   slots.

Pure numpy, vectorized over layers; the baseline the project's per-pass policies are
measured against (``benchmarks/bench_realized_balance.py``).
"""

from __future__ import annotations

import numpy as np


def deepseek_vec(per_pass: np.ndarray, num_physical: int, *, num_gpus: int) -> np.ndarray:
    """per_pass: [B, L, E] float >= 0 tokens per expert in each pass of the window.
    Returns phy2log [L, P] int64 (rank-major: GPU g holds slots g*P/G .. (g+1)*P/G - 1)."""
    num_passes, num_layers, num_logical = per_pass.shape
    # A tiny per-expert offset makes every pass's largest load unique (ties go to the higher id).
    load = per_pass + 1e-6 * np.arange(num_logical) * (per_pass.max() + 1.0)
    count = np.ones((num_layers, num_logical), dtype=np.int64)
    layers = np.arange(num_layers)
    # Step 1: replicate, one slot per step, by the summed per-pass maximum it removes.
    for _ in range(num_physical - num_logical):
        per_replica = load / count  # [B, L, E]
        top2 = np.partition(per_replica, num_logical - 2, axis=-1)[..., -2:] if num_logical > 1 else \
            np.concatenate([np.zeros_like(per_replica), per_replica], -1)
        second, first = top2[..., 0], top2[..., 1]  # [B, L]
        argmax = per_replica.argmax(-1)  # [B, L]
        after = np.take_along_axis(load, argmax[..., None], -1)[..., 0] / (count[layers, argmax] + 1)
        gain = first - np.maximum(second, after)  # [B, L]: what one more replica of the argmax removes
        total_gain = np.zeros((num_layers, num_logical))
        np.add.at(total_gain, (np.broadcast_to(layers, argmax.shape), argmax), gain)
        # No pass gains (e.g. all-zero layers): the heaviest expert per replica over the window.
        fallback = (load.sum(0) / count).argmax(-1)
        choice = np.where(total_gain.max(-1) > 0, total_gain.argmax(-1), fallback)
        count[layers, choice] += 1
    # Step 2: heaviest slot first, dealt in snake order over the GPUs.
    experts = np.repeat(np.tile(np.arange(num_logical), num_layers), count.ravel()).reshape(num_layers, num_physical)
    per_slot = np.take_along_axis(per_pass.sum(0) / count, experts, axis=1)
    order = np.argsort(-per_slot, axis=1, kind="stable")
    position = np.arange(num_physical)
    row, col = position // num_gpus, position % num_gpus
    gpu = np.where(row % 2 == 0, col, num_gpus - 1 - col)
    slot = gpu * (num_physical // num_gpus) + row  # the row-th slot of that GPU
    phy2log = np.empty_like(experts)
    phy2log[:, slot] = np.take_along_axis(experts, order, axis=1)
    return phy2log
