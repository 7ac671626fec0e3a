"""Where the benchmarks find the shared routing traces: ``$EPLB_TRACES_DIR``, else
``../shared/traces`` beside the repository (never copied into it)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ESFT_TRACES = ("esft_dsv2lite_intent_top6.npz", "esft_dsv2lite_law_top6.npz")  # intent, then law
OLMOE_TRACE = "vllm_olmoe_gsm8k_layer0_top8.npz"  # OLMoE-1B-7B layer 0 on GSM8K: 4,471 tokens, 64 experts, top-8
FLAME_TRACE = "flame_moe_290m_prefill_2048tok_top6.npz"  # FLAME-MoE-290M: 2,048 tokens, 25 layers, 64 experts, top-6


def traces_dir() -> Path:
    return Path(os.environ.get("EPLB_TRACES_DIR", Path(__file__).resolve().parents[2] / "shared" / "traces"))


def esft_missing() -> bool:
    """Whether the ESFT traces are absent from ``traces_dir()`` (then it says so: the caller
    skips cleanly)."""
    if all((traces_dir() / name).exists() for name in ESFT_TRACES):
        return False
    print(f"skipped: the ESFT traces are not in {traces_dir()}")
    return True


def esft_topk_ids(directory: Path | None = None) -> np.ndarray:
    """[T, L, k] int64: the ESFT traces' routed ids, intent then law (``-1`` = padding)."""
    from eplb_plugin.runtime.workload import load_traces

    folder = directory or traces_dir()
    return load_traces([folder / name for name in ESFT_TRACES])[0].numpy()


def olmoe_topk_ids() -> np.ndarray | None:
    """[T, 1, 8] int64: the OLMoE trace's routed ids (one layer), or None where it is absent
    (then it says so: the caller skips cleanly)."""
    path = traces_dir() / OLMOE_TRACE
    if not path.exists():
        print(f"skipped: {OLMOE_TRACE} is not in {traces_dir()}")
        return None
    return np.load(path)["topk_ids"].astype(np.int64)[:, None, :]


def flame_topk_ids() -> np.ndarray | None:
    """[T, 25, 6] int64: the FLAME-MoE trace's routed ids (32 sequences of 64 tokens, a model
    trained with a balance loss: nearly balanced traffic), or None where it is absent (then
    it says so: the caller skips cleanly)."""
    path = traces_dir() / FLAME_TRACE
    if not path.exists():
        print(f"skipped: {FLAME_TRACE} is not in {traces_dir()}")
        return None
    return np.load(path)["topk_ids"].astype(np.int64)


def sequence_mixture_ids(*, seed: int = 0, num_passes: int = 64, pass_tokens: int = 256, seq_tokens: int = 64,
                         num_layers: int = 26, num_experts: int = 64, top_k: int = 6, domain_skew: float = 0.5,
                         seq_concentration: float = 64.0) -> np.ndarray:
    """[T, L, k] int64 synthetic routing, not fitted to any trace: traffic that changes
    from one domain to another halfway (as a replay of two traces in a row does), whose
    per-pass variation comes from sequences, as real traffic's does. Each domain has its own
    per-layer expert popularity (Dirichlet(``domain_skew``): skewed); each sequence of
    ``seq_tokens`` tokens draws its domain (the first half of the passes: the first domain
    with probability 0.9; the second half: the second) and its own popularity around the
    domain's (Dirichlet of total ``seq_concentration`` around the domain's); each token takes its
    top-k experts without replacement from its sequence's popularity (Gumbel top-k)."""
    rng = np.random.default_rng(seed)
    domains = rng.dirichlet(np.full(num_experts, domain_skew), size=(2, num_layers))  # [2, L, E]
    num_seqs = num_passes * pass_tokens // seq_tokens
    half = num_seqs // 2
    second = np.concatenate([rng.random(half) < 0.1, rng.random(num_seqs - half) < 0.9])
    ids = np.empty((num_seqs, seq_tokens, num_layers, top_k), dtype=np.int64)
    for s in range(num_seqs):
        base = domains[int(second[s])]  # [L, E]
        pop = np.stack([rng.dirichlet(seq_concentration * base[layer] + 1e-3)
                        for layer in range(num_layers)])
        keys = np.log(pop + 1e-30)[None] - np.log(-np.log(rng.random((seq_tokens, num_layers, num_experts))))
        ids[s] = np.argsort(-keys, axis=-1)[..., :top_k]
    return ids.reshape(num_seqs * seq_tokens, num_layers, top_k)
