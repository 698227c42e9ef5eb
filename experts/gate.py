"""The MoE gates: router logits -> top-k experts per token and their weights.

Four kinds, by family (``FamilyInfo.gate``): softmax over all experts (Mixtral, Qwen, OLMoE),
grouped sigmoid (DeepSeek-V3, GLM-4.5), grouped softmax (DeepSeek-V2) and softmax over the
biased top k (gpt-oss).

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


def route_grouped_sigmoid(
    hidden: torch.Tensor,  # [T, H]
    router: torch.Tensor,  # [E, H] fp32
    score_bias: torch.Tensor,  # [E] fp32 e_score_correction_bias
    top_k: int,
    n_group: int,
    topk_group: int,
    normalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [T, K] long, weights [T, K] fp32
    """DeepSeek-V3 / GLM-4.5 routing, in fp32 like the reference.

    Sigmoid scores; the correction bias shifts them for *selection* only: each of the
    ``n_group`` expert groups is scored by the sum of its two best biased scores, the best
    ``topk_group`` groups are kept, and the top k experts inside them are chosen. Their
    weights are the unbiased scores, renormalised if asked, times ``scaling``.
    """
    scores = F.linear(hidden.float(), router).sigmoid()  # [T, E]
    choice = scores + score_bias  # [T, E]
    grouped = choice.view(choice.shape[0], n_group, -1)  # [T, G, E/G]
    keep = _top_groups(grouped.topk(2, dim=-1)[0].sum(dim=-1), topk_group)  # [T, G]
    choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view_as(choice)  # [T, E]
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]  # [T, K]
    weights = scores.gather(1, ids)  # [T, K]
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


def route_grouped_softmax(
    hidden: torch.Tensor,  # [T, H]
    router: torch.Tensor,  # [E, H] fp32
    top_k: int,
    n_group: int,
    topk_group: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [T, K] long, weights [T, K] fp32
    """DeepSeek-V2 routing (``group_limited_greedy``; ``greedy`` is one group), in fp32.

    Softmax over all experts; each of the ``n_group`` groups is scored by its best expert,
    the best ``topk_group`` groups are kept (the others' scores zeroed, as the reference
    does) and the top k scores are the weights, times ``scaling``, never renormalised.
    """
    scores = F.linear(hidden.float(), router).softmax(dim=-1)  # [T, E]
    if topk_group < n_group:
        grouped = scores.view(scores.shape[0], n_group, -1)  # [T, G, E/G]
        keep = _top_groups(grouped.amax(dim=-1), topk_group)  # [T, G]
        scores = grouped.masked_fill(~keep[:, :, None], 0.0).view_as(scores)  # [T, E]
    weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)  # [T, K] each
    return ids, weights * scaling


def _top_groups(group_scores: torch.Tensor, topk_group: int) -> torch.Tensor:  # [T, G] bool
    """Per token, the ``topk_group`` best-scoring expert groups (``group_scores`` [T, G])."""
    groups = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    return torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)


def route_topk_softmax(
    hidden: torch.Tensor,  # [T, H]
    router: torch.Tensor,  # [E, H]
    bias: torch.Tensor,  # [E]
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [T, K] long, weights [T, K] fp32
    """gpt-oss routing: biased logits in the model's dtype, top k, softmax over those k only."""
    logits = F.linear(hidden, router, bias)  # [T, E]
    top, ids = torch.topk(logits, top_k, dim=-1)  # [T, K] each
    return ids, F.softmax(top, dim=-1, dtype=top.dtype).float()
