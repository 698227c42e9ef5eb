"""Which tensors DeepSeek's multi-head latent attention stores, and loading them.

DeepSeek lays each head's rotary dims out as interleaved pairs; the rows that produce them
(in ``q_proj``/``q_b_proj`` and ``kv_a_proj_with_mqa``) are permuted to the half-split order
here, once, so the model rotates them with the plain ``rotate``. Scores are unchanged: the
query and the key are permuted alike.

Legend: H hidden, Hq heads, Dn/Dr/Dv no-rope, rope and value widths of a head, R
kv_lora_rank, Rq q_lora_rank, Nq the query projection's width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from experts.checkpoint import CheckpointReader
from experts.weights import in_out, layer_prefix, o_bias


@dataclass
class MLAWeights:
    """DeepSeek's multi-head latent attention, stored [in, out] like ``AttentionWeights``.

    ``down`` fuses the two projections of the hidden state: the query's (its low-rank
    ``q_a``, or the full ``q_proj`` without ``q_lora_rank``) and ``kv_a`` (latent + rotary
    key). The rotary rows of DeepSeek's interleaved checkpoints are permuted to the
    half-split order on load, so rotation is the plain ``rotate``.
    """

    down: torch.Tensor  # [H, Nq + R + Dr]; Nq = Rq (q LoRA) or Hq*(Dn+Dr)
    down_bias: torch.Tensor | None  # [Nq + R + Dr] (attention_bias; 0 where q_proj has none)
    q_a_norm: torch.Tensor | None  # [Rq]
    q_b: torch.Tensor | None  # [Rq, Hq*(Dn+Dr)]
    kv_a_norm: torch.Tensor  # [R]
    kv_b: torch.Tensor  # [R, Hq*(Dn+Dv)] expands latents to per-head k_nope and v
    w_uk: torch.Tensor  # [Hq, Dn, R] kv_b's key rows per head (absorbed into queries)
    w_uv: torch.Tensor  # [Hq, Dv, R] kv_b's value rows per head (applied after attention)
    o: torch.Tensor  # [Hq*Dv, H]
    o_bias: torch.Tensor | None  # [H]


def _deinterleave_rope_rows(weight: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Reorder the last ``rope_dim`` rows of each [.., rows, in] block from DeepSeek's
    interleaved pairs (x0, x1), (x2, x3).. to the half-split order (x0, x2, .., x1, x3, ..)."""
    rope = weight[..., -rope_dim:, :]
    split = torch.cat([rope[..., 0::2, :], rope[..., 1::2, :]], dim=-2)
    return torch.cat([weight[..., :-rope_dim, :], split], dim=-2)


def load_mla(reader: CheckpointReader, layer: int, device: str) -> MLAWeights:
    """Multi-head latent attention (DeepSeek-V2/V3), with and without a q LoRA."""
    spec = reader.spec
    p = f"{layer_prefix(layer)}self_attn."
    h, heads = spec.hidden_size, spec.num_heads
    nope, rope, v_dim = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
    rank, q_rank = spec.kv_lora_rank, spec.q_lora_rank
    qk_dim = nope + rope
    interleaved = spec.rope_interleave

    def q_rows(weight: torch.Tensor, cols: int) -> torch.Tensor:  # [Hq*(Dn+Dr), cols]
        if not interleaved:
            return weight
        per_head = _deinterleave_rope_rows(weight.view(heads, qk_dim, cols), rope)
        return per_head.reshape(heads * qk_dim, cols)

    q_a_norm = q_b = None
    q_bias: torch.Tensor | None = None
    if q_rank:
        q_down = reader.load(f"{p}q_a_proj.weight", (q_rank, h), device=device)
        if spec.attention_bias:
            q_bias = reader.load(f"{p}q_a_proj.bias", (q_rank,), device=device)
        q_a_norm = reader.load(f"{p}q_a_layernorm.weight", (q_rank,), device=device)
        q_b = in_out(
            q_rows(
                reader.load(f"{p}q_b_proj.weight", (heads * qk_dim, q_rank), device=device), q_rank
            )
        )
    else:
        q_down = q_rows(reader.load(f"{p}q_proj.weight", (heads * qk_dim, h), device=device), h)
        if spec.attention_bias:  # q_proj has no bias: zeros keep the fused add exact
            q_bias = torch.zeros(heads * qk_dim, dtype=q_down.dtype, device=device)
    kv_a = reader.load(f"{p}kv_a_proj_with_mqa.weight", (rank + rope, h), device=device)
    kv_a_bias = None
    if spec.attention_bias:
        kv_a_bias = reader.load(f"{p}kv_a_proj_with_mqa.bias", (rank + rope,), device=device)
    if interleaved:
        kv_a = _deinterleave_rope_rows(kv_a, rope)
        if kv_a_bias is not None:
            kv_a_bias = _deinterleave_rope_rows(kv_a_bias[:, None], rope)[:, 0]
    kv_b = reader.load(f"{p}kv_b_proj.weight", (heads * (nope + v_dim), rank), device=device)
    per_head = kv_b.view(heads, nope + v_dim, rank)
    o = reader.load(f"{p}o_proj.weight", (h, heads * v_dim), device=device)
    down_bias = None
    if q_bias is not None and kv_a_bias is not None:
        down_bias = torch.cat([q_bias, kv_a_bias])
    return MLAWeights(
        down=in_out(torch.cat([q_down, kv_a])),
        down_bias=down_bias,
        q_a_norm=q_a_norm,
        q_b=q_b,
        kv_a_norm=reader.load(f"{p}kv_a_layernorm.weight", (rank,), device=device),
        kv_b=in_out(kv_b),
        w_uk=per_head[:, :nope].contiguous(),
        w_uv=per_head[:, nope:].contiguous(),
        o=in_out(o),
        o_bias=o_bias(reader, p, device),
    )
