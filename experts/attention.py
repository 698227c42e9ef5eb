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
        num_seqs = len(chunks)
        max_q = max(c.num_new for c in chunks)
        max_c = max(c.num_keys for c in chunks)
        positions: list[int] = []
        slots: list[int] = []
        key_slots = torch.zeros(num_seqs, max_c, dtype=torch.long)
        mask = torch.zeros(num_seqs, 1, max_q, max_c, dtype=torch.bool)
        query_index = torch.full((num_seqs, max_q), -1, dtype=torch.long)
        last_index: list[int] = []
        for b, chunk in enumerate(chunks):
            assert chunk.num_new > 0, f"sequence {b} has no new tokens"
            assert len(chunk.block_table) * block_size >= chunk.num_keys, (
                f"sequence {b}: {len(chunk.block_table)} blocks cannot hold {chunk.num_keys} keys"
            )
            table = torch.as_tensor(list(chunk.block_table), dtype=torch.long)
            key_pos = torch.arange(chunk.num_keys)
            seq_slots = table[key_pos // block_size] * block_size + key_pos % block_size
            key_slots[b, : chunk.num_keys] = seq_slots
            slots.extend(seq_slots[chunk.num_cached :].tolist())
            positions.extend(range(chunk.start_position, chunk.start_position + chunk.num_new))
            start = len(positions) - chunk.num_new
            query_index[b, : chunk.num_new] = torch.arange(start, start + chunk.num_new)
            # query i sits at key index num_cached + i and sees keys up to it
            visible = chunk.num_cached + torch.arange(chunk.num_new) + 1  # [Qb]
            mask[b, 0, : chunk.num_new, :] = torch.arange(max_c)[None, :] < visible[:, None]
            mask[b, 0, chunk.num_new :, 0] = True  # padding rows attend one key: no NaN
            last_index.append(start + chunk.num_new - 1)
        valid = query_index >= 0
        query_index[~valid] = len(positions)
        return cls(
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            key_slots=key_slots.to(device),
            mask=mask.to(device),
            query_index=query_index.to(device),
            valid=valid.to(device),
            last_index=torch.tensor(last_index, dtype=torch.long, device=device),
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
    q_pad = torch.cat([q, q.new_zeros(1, num_heads, head_dim)])  # [T+1, Hq, D]
    qb = q_pad[batch.query_index].transpose(1, 2)  # [B, Hq, Q, D]
    kb = k_cache[batch.key_slots].transpose(1, 2)  # [B, Hkv, C, D]
    vb = v_cache[batch.key_slots].transpose(1, 2)  # [B, Hkv, C, D]
    out = F.scaled_dot_product_attention(
        qb, kb, vb, attn_mask=batch.mask, scale=scale, enable_gqa=num_heads != kb.shape[1]
    )  # [B, Hq, Q, D]
    out = out.transpose(1, 2)[batch.valid]  # [T, Hq, D], rows in query_index order
    return out.reshape(num_tokens, num_heads * head_dim)
