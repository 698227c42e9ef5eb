"""Which tensors a family stores, under which names and shapes, and loading them.

The backbone (attention, norms, gates, dense and shared MLPs, embeddings) and
the routed experts are loaded separately, so an expert shard reads only the
(layer, expert) pairs it hosts: one tensor per projection, or (gpt-oss, whose
experts are fused [E, ...] tensors) one slice of each.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from experts.checkpoint import CheckpointReader
from experts.slot_layout import stores_in_out
from experts.spec import CheckpointError, ModelSpec

if TYPE_CHECKING:
    from experts.mla_weights import MLAWeights


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
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_attention_norm: torch.Tensor  # [H]
    attention: AttentionWeights | MLAWeights  # MLAWeights: DeepSeek-V3 (experts.mla_weights)
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
        from experts.mla_weights import load_mla  # here: mla_weights imports this module

        return load_mla(reader, layer, device)
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
    sinks = None
    if spec.family.attention_sinks:
        sinks = reader.load(f"{p}sinks", (spec.num_heads,), device=device)
    return AttentionWeights(
        in_out(torch.cat([q, k, v])),
        bias,
        in_out(o),
        q_norm,
        k_norm,
        o_bias(reader, p, device),
        sinks,
    )


def o_bias(reader: CheckpointReader, p: str, device: str) -> torch.Tensor | None:
    """The output projection's bias, where the family has one and attention_bias is set."""
    spec = reader.spec
    if not (spec.family.o_proj_bias and spec.attention_bias):
        return None
    return reader.load(f"{p}o_proj.bias", (spec.hidden_size,), device=device)


def in_out(weight: torch.Tensor) -> torch.Tensor:  # [in, out] from [out, in]
    """A projection as ``x @ W`` reads it (see ``AttentionWeights``)."""
    contiguous = stores_in_out(weight.device, weight.dtype)
    return weight.t().contiguous() if contiguous else weight.t()


def _load_layer(reader: CheckpointReader, layer: int, device: str) -> LayerWeights:
    spec = reader.spec
    p = layer_prefix(layer)
    h = spec.hidden_size
    router = dense = shared = shared_gate = router_bias = score_bias = None
    family, num_e = spec.family, spec.num_experts
    if spec.is_moe_layer(layer):
        moe = f"{p}{family.moe_prefix}."
        gate = f"{moe}{family.router_name}."
        if family.gate in ("grouped_sigmoid", "grouped_softmax"):  # fp32, as the reference
            router = reader.load(f"{gate}weight", (num_e, h), torch.float32, device)
        else:
            router = reader.load(f"{gate}weight", (num_e, h), device=device)
        if family.gate == "grouped_sigmoid":
            score_bias = reader.load(
                f"{gate}e_score_correction_bias", (num_e,), torch.float32, device
            )
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
