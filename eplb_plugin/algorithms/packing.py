"""Packing slots onto GPUs: the equal-split plan's steps (``balanced.py``; the chain plan,
``chain.py``, shares the round-robin pack). Numpy, vectorized over rows (a row is one layer); rows are
independent. Slots are rank-major: GPU g holds slots g*S .. (g+1)*S - 1 (S = P / G).
"""

from __future__ import annotations

import numpy as np

SWAP_ITERS = 40
SWAP_PARTNERS = 8


def counts_to_slots(count: np.ndarray, num_physical: int) -> np.ndarray:
    """[L, E] replica counts -> [L, P] list of experts, each repeated count times."""
    num_layers, num_logical = count.shape
    flat = np.repeat(np.tile(np.arange(num_logical), num_layers), count.ravel())
    return flat.reshape(num_layers, num_physical)


def round_robin_pack(slot_load: np.ndarray, num_gpus: int) -> np.ndarray:
    """Order slots so that rank-major GPUs get balanced loads.

    slot_load: [L, P]. Returns perm [L, P]: new slot q holds old slot perm[:, q].
    """
    num_layers, num_slots = slot_load.shape
    per_gpu = num_slots // num_gpus
    rows = np.arange(num_layers)[:, None]
    order = np.argsort(-slot_load, axis=1, kind="stable")
    gpu_load = np.zeros((num_layers, num_gpus))
    perm = np.empty((num_layers, num_slots), dtype=np.int64)
    for k in range(per_gpu):
        items = order[:, k * num_gpus:(k + 1) * num_gpus]
        lightest = np.argsort(gpu_load, axis=1, kind="stable")
        perm[rows, lightest * per_gpu + k] = items
        gpu_load[rows, lightest] += np.take_along_axis(slot_load, items, axis=1)
    return perm


def refine_swaps(phy2log: np.ndarray, slot_load: np.ndarray, num_gpus: int, *, iters: int = SWAP_ITERS) -> None:
    """Swap slots between the heaviest GPU and the light ones, in place.

    phy2log, slot_load: [L, P]. GPUs in a stable order by load (ties by index): the heavy
    GPU is the last; the light candidates are every GPU up to and including the
    ``SWAP_PARTNERS``-th lightest load (all GPUs at that load), in that order. A swap is
    taken only if it lowers the heaviest GPU's load and the partner stays below the old
    maximum; the first best one in (heavy slot, light GPU, light slot) order. A row without
    such a swap is left alone from then on (its state, hence its answer, would not change),
    so later iterations work on the rows still improving only.
    """
    num_layers, num_slots = slot_load.shape
    per_gpu = num_slots // num_gpus
    partners = min(SWAP_PARTNERS, num_gpus - 1)
    if partners < 1 or per_gpu < 1:
        return
    own = np.arange(per_gpu)
    active = np.arange(num_layers)
    for _ in range(iters):
        n = active.size
        base = (np.arange(n) * num_slots)[:, None]
        loads = slot_load[active]
        g = loads.reshape(n, num_gpus, per_gpu).sum(-1)
        by_load = np.argsort(g, axis=1, kind="stable")
        sorted_g = np.take_along_axis(g, by_load, axis=1)
        # Light candidates: the first ``partners`` and every later GPU at the same load, the
        # heaviest (last) excluded; rows have different numbers of them, padded to the most.
        num_light = np.minimum((sorted_g <= sorted_g[:, partners - 1:partners]).sum(1), num_gpus - 1)
        width = int(num_light.max()) * per_gpu
        light = by_load[:, :width // per_gpu]
        heavy_slots = by_load[:, -1:] * per_gpu + own  # [n, S]
        light_slots = (light[:, :, None] * per_gpu + own).reshape(n, width)
        flat = loads.ravel()
        xa = flat[heavy_slots + base][:, :, None]
        xb = flat[light_slots + base][:, None, :]
        gh = g.max(1)[:, None, None]
        gl = np.repeat(sorted_g[:, :width // per_gpu], per_gpu, axis=1)[:, None, :]
        # gain = gh - max(gh - delta, gl + delta) = min(gh - (gh - delta), gh - (gl + delta)),
        # the same floats (gh - x is monotone in x); <= 0 where delta <= 0, so no swap that
        # does not help is taken. In place: these [n, S, width] arrays are most of the
        # planner's time.
        delta = xa - xb
        gain = np.subtract(gh, delta)
        np.subtract(gh, gain, out=gain)
        other = np.add(gl, delta, out=delta)
        np.subtract(gh, other, out=other)
        np.minimum(gain, other, out=gain)
        gain[np.broadcast_to((np.arange(width) // per_gpu)[None, None, :] >= num_light[:, None, None], gain.shape)] \
            = -np.inf
        gain = gain.reshape(n, -1)
        best = gain.argmax(1)
        ok = gain[np.arange(n), best] > 1e-9 * (gh[:, 0, 0] + 1e-30)
        if not ok.any():
            return
        r = active[ok]
        a = heavy_slots[ok, best[ok] // width]
        b = light_slots[ok, best[ok] % width]
        phy2log[r, a], phy2log[r, b] = phy2log[r, b], phy2log[r, a].copy()
        slot_load[r, a], slot_load[r, b] = slot_load[r, b], slot_load[r, a].copy()
        active = r
