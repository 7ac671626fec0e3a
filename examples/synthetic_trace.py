"""Write a per-token routing trace (``.npz`` with ``topk_ids [T, L, k]``) from the runtime's
synthetic workload, as input for ``eplb plan`` / ``inspect`` / ``simulate`` where no recorded
trace is at hand. Two seeds give two different hot-expert sets (a change of traffic).

    python examples/synthetic_trace.py --seed 1 --out eplb_runs/day.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from eplb_plugin.configs import PRESET_NAMES
from eplb_plugin.runtime.config import ModelShape, WorkloadSpec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-preset", default="deepseek-v2-lite", choices=PRESET_NAMES, help="MoE shape")
    parser.add_argument("--passes", type=int, default=32, help="forward passes to write")
    parser.add_argument("--tokens-per-pass", type=int, default=256, help="tokens per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed: which experts are hot")
    parser.add_argument("--out", required=True, help="the .npz to write (its folder is created)")
    args = parser.parse_args(argv)
    model = ModelShape.from_preset(args.model_preset)
    # No drift inside the trace: one hot-expert set per seed.
    workload = WorkloadSpec(seed=args.seed, drift_every_passes=args.passes + 1).build(model, args.tokens_per_pass)
    ids = torch.cat([workload.batch(p).topk_ids for p in range(args.passes)])  # [T, L, k]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, topk_ids=ids.numpy().astype(np.int16))
    print(f"wrote {out}: topk_ids {list(ids.shape)} ({model.num_layers} layers, {model.num_logical_experts} experts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
