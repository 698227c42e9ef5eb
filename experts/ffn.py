"""Expert feed-forward maths: one SwiGLU MLP, and the per-expert loop over routed token groups.

The serving path computes routed experts with the grouped kernel
(``experts.grouped_ffn.routed_expert_sum``); ``run_routed_experts`` is the plain loop it
replaced, kept as the reference it is tested and measured against.

Legend: T tokens, K experts chosen per token, E experts, H hidden, I intermediate,
N tokens routed to one expert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from experts.weights import MLPWeights


def swiglu_mlp(x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for x [N, H] -> [N, H]."""
    gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)  # [N, I] each
    return F.linear(F.silu(gate) * up, w.down)  # [N, H]


def group_by_expert(expert_ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Group the flat routing slots (``token * K + k``) by expert, in increasing expert order.

    Each token meets an expert at most once, so summing the groups in expert
    order gives every token the reference's summation order.
    """
    flat = expert_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)  # [T*K] grouped by expert
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    return list(zip(experts.tolist(), torch.split(order, counts.tolist()), strict=True))


def run_routed_experts(
    hidden: torch.Tensor,  # [T, H]
    expert_ids: torch.Tensor,  # [T, K]
    weights: torch.Tensor,  # [T, K] gate weights (fp32)
    expert: Callable[[int], MLPWeights],
) -> torch.Tensor:  # [T, H]
    """Sum over each token's K experts of weight * expert(token), expert by expert (reference)."""
    num_k = expert_ids.shape[1]
    out = torch.zeros_like(hidden)  # [T, H]
    flat_weights = weights.reshape(-1)  # [T*K]
    for e, slots in group_by_expert(expert_ids):
        tokens = slots // num_k  # [N]
        y = swiglu_mlp(hidden[tokens], expert(e))  # [N, H]
        y = y * flat_weights[slots, None]  # [N, H] (fp32 weights, like the reference)
        # tokens are unique within a group; index_put_ is far cheaper than index_add_ on CPU
        out.index_put_((tokens,), y.to(out.dtype), accumulate=True)
    return out
