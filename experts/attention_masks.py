"""Masks for the attention variants gpt-oss needs: sliding windows and attention sinks.

A group's mask (``AttentionGroup``) lets query q see its sequence's keys 0..k(q), where
k(q) is the query's own key index; a group without one is either a plain causal square
(k(q) = q) or single queries that see all C keys (k = C - 1). So k(q) is the count of
visible keys minus one, and a sliding window of W keeps the keys with index > k(q) - W
(transformers' ``sliding_window_overlay``). Key indices are positions, or positions less
the same offset for every key of a sequence (the sliding group's table drops whole blocks
from its front, ``cache.kv_groups``), because a model with sliding layers only serves the
``full`` KV policy (admission refuses ``window``, whose evictions would break that).

An attention sink (a learned logit per head, gpt-oss) takes part in the softmax but adds no
value: it is one more key, all zeros, whose additive score bias is the sink logit, with a
zero value. SDPA then computes exactly ``softmax([scores, sink])[:-1] @ V``.

Legend: G sequences of a group, Q new tokens of each, C keys, Hq/Hkv query/kv heads, D head
dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # experts.attention calls into this module
    from experts.attention import AttentionBatch, AttentionGroup


def group_mask(group: AttentionGroup) -> torch.Tensor:  # [G or 1, 1, Q, C] bool
    """The group's mask, built out for the groups that run without one."""
    if group.mask is not None:
        return group.mask
    num_seqs, num_keys = group.key_slots.shape
    num_queries = group.rows.shape[0] // num_seqs
    ones = torch.ones(num_queries, num_keys, dtype=torch.bool, device=group.key_slots.device)
    return (ones.tril() if group.causal else ones)[None, None]


def window_masks(batch: AttentionBatch, window: int) -> tuple[torch.Tensor | None, ...]:
    """Each group's mask narrowed to the last ``window`` keys of every query (itself
    included): built once per forward, shared by the sliding layers. None for a group of at
    most ``window`` keys: every key it sees is in the window, so its own mask stands (and
    SDPA may take an unmasked kernel)."""
    masks: list[torch.Tensor | None] = []
    for group in batch.groups:
        if group.key_slots.shape[1] <= window:
            masks.append(None)
            continue
        mask = group_mask(group)  # [G|1, 1, Q, C]
        own_key = mask.sum(-1, keepdim=True) - 1  # [G|1, 1, Q, 1] the query's key index
        key_index = torch.arange(mask.shape[-1], device=mask.device)  # [C]
        masks.append(mask & (key_index > own_key - window))
    return tuple(masks)


def with_sinks(
    kb: torch.Tensor,  # [G, Hkv, C, D]
    vb: torch.Tensor,  # [G, Hkv, C, D]
    mask: torch.Tensor,  # [G|1, 1, Q, C] bool
    sinks: torch.Tensor,  # [Hq]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [G,Hkv,C+1,D] x2, [G,Hq,Q,C+1]
    """Keys and values with a zero sink key appended, and the additive score bias: 0 on
    visible keys, -inf on hidden ones, the head's sink logit on the sink key."""
    num_seqs, _, _, _ = kb.shape
    num_queries = mask.shape[2]
    heads = sinks.shape[0]
    hidden = torch.zeros(mask.shape, dtype=kb.dtype, device=kb.device)
    bias = hidden.masked_fill_(~mask, float("-inf")).expand(num_seqs, heads, num_queries, -1)
    sink = sinks.to(kb.dtype)[None, :, None, None].expand(num_seqs, heads, num_queries, 1)
    kb = F.pad(kb, (0, 0, 0, 1))  # [G, Hkv, C+1, D]
    vb = F.pad(vb, (0, 0, 0, 1))
    return kb, vb, torch.cat([bias, sink], dim=-1)
