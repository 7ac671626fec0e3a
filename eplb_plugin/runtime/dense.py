"""Single-process reference: the same MoE layers over logical experts, no EP, no placement.

``dense_forward`` computes what the EP runtime must compute for any placement: each layer
``h = h + MoE_l(rms_normalize(h))`` with the same deterministic weights. Tests compare the
EP ranks' outputs against it before and after rebalances.
"""

from __future__ import annotations

import torch

from eplb_plugin.runtime.moe import expert_ffn, rms_normalize


def dense_moe_layer(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """x: [T, H]; topk_ids: [T, k] logical (-1 skipped); topk_weights: [T, k];
    w13: [E, 2I, H]; w2: [E, H, I] -> [T, H]."""
    top_k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    valid = (flat >= 0).nonzero().squeeze(1)
    experts = flat[valid]
    token_of_pair = valid // top_k
    pair_out = torch.empty(valid.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    for expert in torch.unique(experts).tolist():
        rows = (experts == expert).nonzero().squeeze(1)
        pair_out[rows] = expert_ffn(x[token_of_pair[rows]], w13[expert], w2[expert])
    pair_weights = topk_weights.reshape(-1)[valid].to(x.dtype).unsqueeze(1)
    out = torch.zeros_like(x)
    out.index_add_(0, token_of_pair, pair_out * pair_weights)
    return out


def dense_forward(
    hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, dense_weights: list[list[torch.Tensor]]
) -> torch.Tensor:
    """hidden: [T, H]; topk_ids, topk_weights: [T, L, k]; dense_weights: per layer [w13 [E,2I,H], w2 [E,H,I]].

    Returns the final hidden states [T, H] after all L layers (residual chain).
    """
    h = hidden
    for layer, (w13, w2) in enumerate(dense_weights):
        h = h + dense_moe_layer(rms_normalize(h), topk_ids[:, layer], topk_weights[:, layer], w13, w2)
    return h
