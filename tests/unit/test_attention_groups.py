"""Paged attention over groups (same new-token count, similar key counts) equals dense attention.

A step mixes decodes whose key lists differ by far more than the 1.5x bucket factor and a
prefill chunk; each sequence's output must equal plain causal attention over its own keys.
"""

from __future__ import annotations

import torch

from experts.attention import AttentionBatch, SequenceChunk, paged_attention

BLOCK, HQ, HKV, D = 16, 4, 2, 8


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached: int) -> torch.Tensor:
    """q [n, Hq, D] at key index cached.., k/v [cached + n, Hkv, D] -> [n, Hq * D]."""
    n = q.shape[0]
    k = k.repeat_interleave(HQ // HKV, dim=1)
    v = v.repeat_interleave(HQ // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / D**0.5
    visible = torch.arange(k.shape[0])[None, :] <= (cached + torch.arange(n))[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).reshape(n, HQ * D)


def test_mixed_key_lengths_and_a_prefill_match_dense_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    specs = [(10, 1), (300, 1), (100, 1), (70, 5), (12, 1), (700, 1)]  # (cached keys, new)
    num_slots = 4096
    k_cache = torch.randn(num_slots, HKV, D, generator=gen)
    v_cache = torch.randn(num_slots, HKV, D, generator=gen)
    free = list(torch.randperm(num_slots // BLOCK, generator=gen).tolist())
    chunks, keys = [], []
    for cached, new in specs:
        table = [free.pop() for _ in range(-(-(cached + new) // BLOCK))]
        chunks.append(SequenceChunk(table, cached, new, cached))
        keys.append(table)
    total = sum(new for _, new in specs)
    q = torch.randn(total, HQ, D, generator=gen)
    k_new = torch.randn(total, HKV, D, generator=gen)
    v_new = torch.randn(total, HKV, D, generator=gen)
    batch = AttentionBatch.build(chunks, BLOCK, torch.device("cpu"))
    assert len(batch.groups) >= 4  # decodes split by key length, the prefill apart
    out = paged_attention(q, k_new, v_new, k_cache, v_cache, batch, D**-0.5)
    row = 0
    for chunk, table in zip(chunks, keys, strict=True):
        pos = torch.arange(chunk.num_keys)
        slots = torch.tensor(table)[pos // BLOCK] * BLOCK + pos % BLOCK
        expected = _dense(
            q[row : row + chunk.num_new], k_cache[slots], v_cache[slots], chunk.num_cached
        )
        torch.testing.assert_close(out[row : row + chunk.num_new], expected, atol=1e-5, rtol=1e-5)
        row += chunk.num_new
