"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of latents.

Keys and values of every head are linear in one compressed latent per token: the cache
holds that latent (RMS-normed, R wide) beside the token's rotary key (Dr wide, shared by
all heads), one [R + Dr] entry per token and layer instead of per-head K and V.

A query head h scores a key as ``q_nope_h . (W_uk_h c) + q_rope_h . k_rope`` and reads
``W_uv_h c``. Two equal ways to compute that:
- expanded (transformers' way): multiply every key's latent up to per-head k_nope and v,
  then attend as usual; costs C*R*Hq*(Dn+Dv) for the expansion.
- absorbed: fold ``W_uk_h`` into the query (``q_lat = W_uk_h^T q_nope_h``) and attend with
  one shared [R + Dr] key per token (multi-query attention whose values are the latents),
  then apply ``W_uv_h`` to each head's output; costs Q*Hq*C*(2R + Dr) for the attention.
Per key, absorbing costs Q*(2R - Dn - Dv) more than expanding's attention but saves the
R*(Dn+Dv) expansion, so a group absorbs when it has few queries per sequence: always at
decode, not for long prefill chunks (``absorb_is_cheaper``).

Legend: T new tokens, H hidden, Hq heads, Dn/Dr/Dv the no-rope, rope and value widths of a
head, R kv_lora_rank, Nq the query projection's width, G sequences of a group, Q new tokens
of each, C keys, S cache slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from experts.attention import AttentionBatch, _probe_stats
from experts.layers import RotaryAngles, rms_norm, rotate
from experts.mla_weights import MLAWeights
from experts.spec import ModelSpec

MLA_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm: the reference's default, not the config's


def absorb_is_cheaper(num_queries: int, spec: ModelSpec) -> bool:
    """Whether a group with ``num_queries`` new tokens per sequence attends absorbed."""
    rank, nope, v_dim = spec.kv_lora_rank, spec.qk_nope_head_dim, spec.v_head_dim
    return num_queries * (2 * rank - nope - v_dim) < rank * (nope + v_dim)


def mla_attention(
    spec: ModelSpec,
    w: MLAWeights,
    h: torch.Tensor,  # [T, H] normed hidden states
    angles: RotaryAngles,  # cos, sin [T, 1, Dr]
    batch: AttentionBatch,
    cache: torch.Tensor,  # [S, 1, R + Dr] one layer's latent entries
    scale: float,
    absorb: bool | None = None,  # None: per group, as absorb_is_cheaper says
) -> torch.Tensor:  # [T, H]
    """Write the new tokens' latent entries into the cache, then attend every query."""
    heads, rank, rope = spec.num_heads, spec.kv_lora_rank, spec.qk_rope_head_dim
    nope, v_dim = spec.qk_nope_head_dim, spec.v_head_dim
    num_tokens = h.shape[0]
    down = h @ w.down if w.down_bias is None else torch.addmm(w.down_bias, h, w.down)
    q, latent, k_rope = down.split([down.shape[1] - rank - rope, rank, rope], dim=-1)
    if w.q_b is not None:  # q LoRA: [T, Rq] -> [T, Hq*(Dn+Dr)]
        assert w.q_a_norm is not None
        q = rms_norm(q, w.q_a_norm, MLA_NORM_EPS) @ w.q_b
    q_nope, q_rope = q.view(num_tokens, heads, nope + rope).split([nope, rope], dim=-1)
    q_rope = rotate(q_rope, angles)  # [T, Hq, Dr]
    entry = torch.cat(
        [rms_norm(latent, w.kv_a_norm, MLA_NORM_EPS)[:, None], rotate(k_rope[:, None], angles)],
        dim=-1,
    )  # [T, 1, R + Dr]
    cache.index_copy_(0, batch.slot_mapping, entry)
    if batch.probe is not None:  # the probe's softmax, with absorbed queries over the entries
        q_lat = torch.einsum("thn,hnr->thr", q_nope, w.w_uk)  # [T, Hq, R]
        batch.probe.results.append(
            _probe_stats(torch.cat([q_lat, q_rope], -1), cache, batch.probe, scale)
        )
    out = q.new_empty(num_tokens, heads, v_dim)  # [T, Hq, Dv]
    for group in batch.groups:
        num_seqs, max_c = group.key_slots.shape
        max_q = group.rows.shape[0] // num_seqs
        rows = slice(None) if group.in_order else group.rows
        entries = cache.index_select(0, group.key_slots.reshape(-1))  # [G*C, 1, R+Dr]
        entries = entries.view(num_seqs, max_c, rank + rope)  # [G, C, R+Dr]
        qn, qr = q_nope[rows], q_rope[rows]  # [G*Q, Hq, Dn], [G*Q, Hq, Dr]
        use_absorb = absorb_is_cheaper(max_q, spec) if absorb is None else absorb
        if use_absorb:
            q_lat = torch.einsum("thn,hnr->thr", qn, w.w_uk)  # [G*Q, Hq, R]
            qb = torch.cat([q_lat, qr], -1).view(num_seqs, max_q, heads, rank + rope)
            kb = entries[:, None]  # [G, 1, C, R+Dr]
            attended = F.scaled_dot_product_attention(
                qb.transpose(1, 2),  # [G, Hq, Q, R+Dr]
                kb,
                kb[..., :rank],  # [G, 1, C, R] the latents are the values
                attn_mask=group.mask,
                is_causal=group.causal,
                scale=scale,
                enable_gqa=True,
            )  # [G, Hq, Q, R]
            attended = torch.einsum("ghqr,hvr->gqhv", attended, w.w_uv)  # [G, Q, Hq, Dv]
        else:
            kv = (entries[..., :rank] @ w.kv_b).view(num_seqs, max_c, heads, nope + v_dim)
            k_nope, values = kv.split([nope, v_dim], dim=-1)  # [G, C, Hq, Dn], [G, C, Hq, Dv]
            shared = entries[:, :, None, rank:].expand(num_seqs, max_c, heads, rope)
            keys = torch.cat([k_nope, shared], dim=-1)  # [G, C, Hq, Dn+Dr]
            qb = torch.cat([qn, qr], -1).view(num_seqs, max_q, heads, nope + rope)
            attended = F.scaled_dot_product_attention(
                qb.transpose(1, 2),  # [G, Hq, Q, Dn+Dr]
                keys.transpose(1, 2),  # [G, Hq, C, Dn+Dr]
                values.transpose(1, 2),  # [G, Hq, C, Dv]
                attn_mask=group.mask,
                is_causal=group.causal,
                scale=scale,
            ).transpose(1, 2)  # [G, Q, Hq, Dv]
        out[rows] = attended.reshape(-1, heads, v_dim)
    flat = out.view(num_tokens, heads * v_dim)  # [T, Hq*Dv]
    return flat @ w.o if w.o_bias is None else torch.addmm(w.o_bias, flat, w.o)  # [T, H]
