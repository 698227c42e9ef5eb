"""The MoE gate: router logits -> top-k experts per token and their weights.

Legend: T tokens, E experts, K chosen per token, H hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(
    hidden: torch.Tensor,  # [T, H]
    router: torch.Tensor,  # [E, H]
    top_k: int,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [T, K] long, weights [T, K] fp32
    """Softmax over all experts in fp32, keep the top k, renormalise them if asked."""
    logits = F.linear(hidden, router)  # [T, E]
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K] each
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights
