"""Which tensors a family stores, under which names and shapes, and loading them.

The backbone (attention, norms, gates, dense and shared MLPs, embeddings) and
the routed experts are loaded separately, so an expert shard reads only the
(layer, expert) pairs it hosts: one tensor per projection, or (gpt-oss, whose
experts are fused [E, ...] tensors) one slice of each.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from experts.checkpoint import CheckpointReader
from experts.spec import CheckpointError, ModelSpec


@dataclass
class MLPWeights:
    """A SwiGLU MLP: ``down(silu(x @ gate) * (x @ up))`` with gate and up fused (gate rows
    first, then up rows); gpt-oss experts add biases (and clamp the SwiGLU elsewhere)."""

    gate_up: torch.Tensor  # [2I, H]
    down: torch.Tensor  # [H, I]
    gate_up_bias: torch.Tensor | None = None  # [2I]
    down_bias: torch.Tensor | None = None  # [H]


@dataclass
class AttentionWeights:
    """The projections are stored [in, out] for ``x @ W``: contiguous where that layout reads
    faster (``stores_in_out``: fp32 on CPU, 1.7x for a batch-1 qkv matvec), else a transposed
    view of the checkpoint's [out, in], which ``x @ W`` runs as ``F.linear`` does."""

    qkv: torch.Tensor  # [H, Hq*D + 2*Hkv*D] q, k and v projections fused
    qkv_bias: torch.Tensor | None  # [Hq*D + 2*Hkv*D]
    o: torch.Tensor  # [Hq*D, H]
    q_norm: torch.Tensor | None  # [D] (per head) or [Hq*D] (full)
    k_norm: torch.Tensor | None  # [D] or [Hkv*D]
    o_bias: torch.Tensor | None = None  # [H] (gpt-oss)
    sinks: torch.Tensor | None = None  # [Hq] learned sink logit per head (gpt-oss)


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


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_attention_norm: torch.Tensor  # [H]
    attention: AttentionWeights | MLAWeights
    router: torch.Tensor | None  # [E, H] on MoE layers (fp32 for grouped sigmoid routing)
    dense_mlp: MLPWeights | None  # on dense layers
    shared_expert: MLPWeights | None  # Qwen2-MoE, DeepSeek-V3, GLM-4.5
    shared_expert_gate: torch.Tensor | None  # [1, H] (Qwen2-MoE)
    router_bias: torch.Tensor | None = None  # [E] (gpt-oss)
    score_bias: torch.Tensor | None = None  # [E] fp32 e_score_correction_bias (grouped)


@dataclass
class BackboneWeights:
    embed: torch.Tensor  # [V, H]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H] (the embedding when tied)
    layers: list[LayerWeights]


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def expert_tensor_names(spec: ModelSpec, layer: int, expert: int) -> tuple[str, ...]:
    """What one routed expert reads: (gate, up, down) tensor names, or for fused experts the
    slices ``name[expert]`` of the layer's [E, ...] tensors (as ``tensors_read`` logs them)."""
    if spec.family.fused_experts:
        base = f"{layer_prefix(layer)}{spec.family.moe_prefix}.experts."
        names = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
        return tuple(f"{base}{n}[{expert}]" for n in names)
    base = f"{layer_prefix(layer)}{spec.family.moe_prefix}.experts.{expert}."
    gate, up, down = spec.family.expert_names
    return f"{base}{gate}.weight", f"{base}{up}.weight", f"{base}{down}.weight"


def _load_mlp(
    reader: CheckpointReader, names: tuple[str, ...], hidden: int, inter: int, device: str
) -> MLPWeights:
    gate = reader.load(names[0], (inter, hidden), device=device)
    up = reader.load(names[1], (inter, hidden), device=device)
    down = reader.load(names[2], (hidden, inter), device=device)
    return MLPWeights(gate_up=torch.cat([gate, up]), down=down)


def load_expert(reader: CheckpointReader, layer: int, expert: int, device: str) -> MLPWeights:
    """One routed expert's weights; reads exactly its three tensors."""
    spec = reader.spec
    if not spec.is_moe_layer(layer):
        raise CheckpointError(f"layer {layer} is not an MoE layer (MoE layers: {spec.moe_layers})")
    if not 0 <= expert < spec.num_experts:
        raise CheckpointError(f"expert {expert} out of range [0, {spec.num_experts})")
    if spec.family.fused_experts:
        return _load_fused_expert(reader, layer, expert, device)
    names = expert_tensor_names(spec, layer, expert)
    return _load_mlp(reader, names, spec.hidden_size, spec.moe_intermediate_size, device)


def _load_fused_expert(
    reader: CheckpointReader, layer: int, expert: int, device: str
) -> MLPWeights:
    """gpt-oss: one expert's slices of the fused [E, ...] tensors, in our layout.

    The checkpoint stores ``gate_up_proj`` [E, H, 2I] for ``x @ W`` with gate and up
    interleaved column by column (gate at even columns, up at odd ones), and ``down_proj``
    [E, I, H]; our slots want gate rows then up rows, [2I, H], and [H, I].
    """
    spec = reader.spec
    num_e, h, inter = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
    base = f"{layer_prefix(layer)}{spec.family.moe_prefix}.experts."
    gate_up = reader.load_slice(f"{base}gate_up_proj", expert, (num_e, h, 2 * inter), device)
    gate_up_bias = reader.load_slice(f"{base}gate_up_proj_bias", expert, (num_e, 2 * inter), device)
    down = reader.load_slice(f"{base}down_proj", expert, (num_e, inter, h), device)
    down_bias = reader.load_slice(f"{base}down_proj_bias", expert, (num_e, h), device)
    return MLPWeights(
        gate_up=torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1).T.contiguous(),  # [2I, H]
        down=down.T.contiguous(),  # [H, I]
        gate_up_bias=torch.cat([gate_up_bias[0::2], gate_up_bias[1::2]]),  # [2I]
        down_bias=down_bias,  # [H]
    )


def load_experts(
    reader: CheckpointReader, pairs: Iterable[tuple[int, int]], device: str = "cpu"
) -> dict[tuple[int, int], MLPWeights]:
    return {(layer, e): load_expert(reader, layer, e, device) for layer, e in pairs}


def _load_attention(
    reader: CheckpointReader, layer: int, device: str
) -> AttentionWeights | MLAWeights:
    spec = reader.spec
    if spec.is_mla:
        return _load_mla(reader, layer, device)
    p = f"{layer_prefix(layer)}self_attn."
    h, qs, kvs = spec.hidden_size, spec.q_size, spec.kv_size
    q = reader.load(f"{p}q_proj.weight", (qs, h), device=device)
    k = reader.load(f"{p}k_proj.weight", (kvs, h), device=device)
    v = reader.load(f"{p}v_proj.weight", (kvs, h), device=device)
    bias = None
    if spec.attention_bias:
        bias = torch.cat(
            [
                reader.load(f"{p}q_proj.bias", (qs,), device=device),
                reader.load(f"{p}k_proj.bias", (kvs,), device=device),
                reader.load(f"{p}v_proj.bias", (kvs,), device=device),
            ]
        )
    q_norm = k_norm = None
    if spec.qk_norm == "head":
        q_norm = reader.load(f"{p}q_norm.weight", (spec.head_dim,), device=device)
        k_norm = reader.load(f"{p}k_norm.weight", (spec.head_dim,), device=device)
    elif spec.qk_norm == "full":
        q_norm = reader.load(f"{p}q_norm.weight", (qs,), device=device)
        k_norm = reader.load(f"{p}k_norm.weight", (kvs,), device=device)
    o = reader.load(f"{p}o_proj.weight", (h, qs), device=device)
    o_bias = _o_bias(reader, p, device)
    sinks = None
    if spec.family.attention_sinks:
        sinks = reader.load(f"{p}sinks", (spec.num_heads,), device=device)
    return AttentionWeights(
        _in_out(torch.cat([q, k, v])), bias, _in_out(o), q_norm, k_norm, o_bias, sinks
    )


def _o_bias(reader: CheckpointReader, p: str, device: str) -> torch.Tensor | None:
    spec = reader.spec
    if not (spec.family.o_proj_bias and spec.attention_bias):
        return None
    return reader.load(f"{p}o_proj.bias", (spec.hidden_size,), device=device)


def _deinterleave_rope_rows(weight: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Reorder the last ``rope_dim`` rows of each [.., rows, in] block from DeepSeek's
    interleaved pairs (x0, x1), (x2, x3).. to the half-split order (x0, x2, .., x1, x3, ..)."""
    rope = weight[..., -rope_dim:, :]
    split = torch.cat([rope[..., 0::2, :], rope[..., 1::2, :]], dim=-2)
    return torch.cat([weight[..., :-rope_dim, :], split], dim=-2)


def _load_mla(reader: CheckpointReader, layer: int, device: str) -> MLAWeights:
    """Multi-head latent attention (DeepSeek-V3), with and without a q LoRA."""
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
        q_b = _in_out(
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
        down=_in_out(torch.cat([q_down, kv_a])),
        down_bias=down_bias,
        q_a_norm=q_a_norm,
        q_b=q_b,
        kv_a_norm=reader.load(f"{p}kv_a_layernorm.weight", (rank,), device=device),
        kv_b=_in_out(kv_b),
        w_uk=per_head[:, :nope].contiguous(),
        w_uv=per_head[:, nope:].contiguous(),
        o=_in_out(o),
        o_bias=_o_bias(reader, p, device),
    )


def _in_out(weight: torch.Tensor) -> torch.Tensor:  # [in, out] from [out, in]
    from experts.expert_slots import stores_in_out  # here: expert_slots imports this module

    in_out = stores_in_out(weight.device, weight.dtype)
    return weight.t().contiguous() if in_out else weight.t()


def _load_layer(reader: CheckpointReader, layer: int, device: str) -> LayerWeights:
    spec = reader.spec
    p = layer_prefix(layer)
    h = spec.hidden_size
    router = dense = shared = shared_gate = router_bias = score_bias = None
    family, num_e = spec.family, spec.num_experts
    if spec.is_moe_layer(layer):
        moe = f"{p}{family.moe_prefix}."
        gate = f"{moe}{family.router_name}."
        if family.gate == "grouped_sigmoid":  # fp32, as the reference keeps and runs it
            router = reader.load(f"{gate}weight", (num_e, h), torch.float32, device)
            score_bias = reader.load(
                f"{gate}e_score_correction_bias", (num_e,), torch.float32, device
            )
        else:
            router = reader.load(f"{gate}weight", (num_e, h), device=device)
        if family.gate == "topk_softmax":
            router_bias = reader.load(f"{gate}bias", (num_e,), device=device)
        if family.has_shared_expert and spec.shared_expert_intermediate_size:
            names = tuple(
                f"{moe}{family.shared_expert_prefix}.{n}.weight"
                for n in ("gate_proj", "up_proj", "down_proj")
            )
            shared = _load_mlp(reader, names, h, spec.shared_expert_intermediate_size, device)
            if family.shared_expert_prefix == "shared_expert":  # Qwen2-MoE gates it
                shared_gate = reader.load(f"{moe}shared_expert_gate.weight", (1, h), device=device)
    else:
        names = tuple(f"{p}mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj"))
        dense = _load_mlp(reader, names, h, spec.intermediate_size, device)
    return LayerWeights(
        input_norm=reader.load(f"{p}input_layernorm.weight", (h,), device=device),
        post_attention_norm=reader.load(f"{p}post_attention_layernorm.weight", (h,), device=device),
        attention=_load_attention(reader, layer, device),
        router=router,
        dense_mlp=dense,
        shared_expert=shared,
        shared_expert_gate=shared_gate,
        router_bias=router_bias,
        score_bias=score_bias,
    )


def load_backbone(reader: CheckpointReader, device: str = "cpu") -> BackboneWeights:
    """Everything but the routed experts."""
    spec = reader.spec
    vh = (spec.vocab_size, spec.hidden_size)
    embed = reader.load("model.embed_tokens.weight", vh, device=device)
    if spec.tie_word_embeddings:
        lm_head = embed
    else:
        lm_head = reader.load("lm_head.weight", vh, device=device)
    return BackboneWeights(
        embed=embed,
        final_norm=reader.load("model.norm.weight", (spec.hidden_size,), device=device),
        lm_head=lm_head,
        layers=[_load_layer(reader, i, device) for i in range(spec.num_layers)],
    )
