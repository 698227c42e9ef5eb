"""Attention over a paged KV cache, for a batch of sequences of different lengths.

Each sequence brings some new tokens (a prefill chunk, or one decode token)
and a block table: the KV-pool blocks holding its keys in logical order. New
keys/values are written into their slots first; then every sequence gathers
its keys through its block table and attends with a causal mask, all
sequences in one padded ``scaled_dot_product_attention`` call.

Legend: T new tokens in the batch, B sequences, Q most new tokens of one
sequence, C most keys of one sequence, Hq/Hkv query/kv heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a forward pass.

    ``num_cached`` keys are already in the cache (in ``block_table`` order);
    ``num_new`` tokens are computed now, at ``start_position`` onwards.
    ``start_position`` differs from ``num_cached`` only when a KV policy has
    dropped blocks (positions keep counting; the dropped keys are gone).
    """

    block_table: Sequence[int]
    num_cached: int
    num_new: int
    start_position: int

    @property
    def num_keys(self) -> int:
        return self.num_cached + self.num_new


@dataclass(frozen=True)
class AttentionBatch:
    """Index tensors for one forward pass, built once and shared by all layers."""

    positions: torch.Tensor  # [T] rotary position of each new token
    slot_mapping: torch.Tensor  # [T] flat KV-pool slot each new token's K/V is written to
    key_slots: torch.Tensor  # [B, C] flat slots of each sequence's keys (padding: slot 0)
    mask: torch.Tensor  # [B, 1, Q, C] True where a query may attend a key
    query_index: torch.Tensor  # [B, Q] row of each (sequence, query) in [T]; padding -> T
    valid: torch.Tensor  # [B, Q] True for real (non-padding) queries
    last_index: torch.Tensor  # [B] row in [T] of each sequence's last new token

    @classmethod
    def build(
        cls, chunks: Sequence[SequenceChunk], block_size: int, device: torch.device
    ) -> AttentionBatch:
        # Built with a handful of whole-batch tensor ops rather than per-sequence ones: this
        # runs once per engine step, and per-sequence ops cost ~0.1 ms each at decode.
        new_list = [c.num_new for c in chunks]
        keys_list = [c.num_keys for c in chunks]
        max_q, max_c = max(new_list), max(keys_list)
        num_blocks = -(-max_c // block_size)  # blocks the longest sequence's keys span
        tables: list[list[int]] = []
        for b, chunk in enumerate(chunks):
            assert chunk.num_new > 0, f"sequence {b} has no new tokens"
            assert len(chunk.block_table) * block_size >= chunk.num_keys, (
                f"sequence {b}: {len(chunk.block_table)} blocks cannot hold {chunk.num_keys} keys"
            )
            table = list(chunk.block_table[:num_blocks])
            tables.append(table + [0] * (num_blocks - len(table)))
        per_seq = [new_list, keys_list, [c.num_cached for c in chunks]]
        per_seq.append([c.start_position for c in chunks])
        new, num_keys, cached, start_pos = torch.tensor(per_seq, dtype=torch.long)  # [B] each
        key_pos = torch.arange(max_c)  # [C]
        block_of_key = torch.tensor(tables, dtype=torch.long)[:, key_pos // block_size]  # [B, C]
        key_slots = block_of_key * block_size + key_pos % block_size  # [B, C]
        key_slots.masked_fill_(key_pos[None, :] >= num_keys[:, None], 0)
        q_pos = torch.arange(max_q)  # [Q]
        valid = q_pos[None, :] < new[:, None]  # [B, Q]
        key_index = cached[:, None] + q_pos[None, :]  # [B, Q] key index of each query
        slots = key_slots.gather(1, key_index.clamp(max=max_c - 1))[valid]  # [T]
        positions = (start_pos[:, None] + q_pos[None, :])[valid]  # [T]
        first = torch.cumsum(new, 0) - new  # [B] row in [T] of each sequence's first token
        num_tokens = int(positions.shape[0])
        query_index = (first[:, None] + q_pos[None, :]).masked_fill_(~valid, num_tokens)
        # query i sits at key index num_cached + i and sees keys up to it
        mask = key_pos[None, None, :] <= key_index[:, :, None]  # [B, Q, C]
        mask &= valid[:, :, None]
        mask[:, :, 0] |= ~valid  # padding rows attend one key: no NaN
        return cls(
            positions=positions.to(device),
            slot_mapping=slots.to(device),
            key_slots=key_slots.to(device),
            mask=mask[:, None].to(device),
            query_index=query_index.to(device),
            valid=valid.to(device),
            last_index=(first + new - 1).to(device),
        )


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D] (rotated)
    k: torch.Tensor,  # [T, Hkv, D] (rotated)
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [S, Hkv, D] flat view of one layer's key blocks (S slots)
    v_cache: torch.Tensor,  # [S, Hkv, D]
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:  # [T, Hq * D]
    """Write the new K/V into the cache, then attend every query to its sequence's keys."""
    k_cache[batch.slot_mapping] = k
    v_cache[batch.slot_mapping] = v
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, max_q = batch.query_index.shape
    dense = num_seqs * max_q == num_tokens  # every sequence has max_q new tokens: no padding
    if dense:  # rows are already in (sequence, query) order: a view, no gather
        qb = q.reshape(num_seqs, max_q, num_heads, head_dim).transpose(1, 2)  # [B, Hq, Q, D]
    else:
        q_pad = torch.cat([q, q.new_zeros(1, num_heads, head_dim)])  # [T+1, Hq, D]
        qb = q_pad[batch.query_index].transpose(1, 2)  # [B, Hq, Q, D]
    # index_select on the flat slot list is ~2x faster than advanced indexing with [B, C]
    flat_slots = batch.key_slots.reshape(-1)  # [B*C]
    kv_shape = (*batch.key_slots.shape, k_cache.shape[1], head_dim)  # [B, C, Hkv, D]
    kb = k_cache.index_select(0, flat_slots).view(kv_shape).transpose(1, 2)  # [B, Hkv, C, D]
    vb = v_cache.index_select(0, flat_slots).view(kv_shape).transpose(1, 2)  # [B, Hkv, C, D]
    out = F.scaled_dot_product_attention(
        qb, kb, vb, attn_mask=batch.mask, scale=scale, enable_gqa=num_heads != kb.shape[1]
    )  # [B, Hq, Q, D]
    out = out.transpose(1, 2)  # [B, Q, Hq, D]
    out = out.reshape(num_tokens, num_heads, head_dim) if dense else out[batch.valid]
    return out.reshape(num_tokens, num_heads * head_dim)  # rows in query_index order
