"""Which tensors a family stores, under which names and shapes, and loading them.

The backbone (attention, norms, gates, dense and shared MLPs, embeddings) and
the routed experts are loaded separately, so an expert shard reads only the
(layer, expert) pairs it hosts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from experts.checkpoint import CheckpointReader
from experts.spec import CheckpointError, ModelSpec


@dataclass
class MLPWeights:
    """A SwiGLU MLP: ``down(silu(x @ gate) * (x @ up))`` with gate and up fused."""

    gate_up: torch.Tensor  # [2I, H]
    down: torch.Tensor  # [H, I]


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


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_attention_norm: torch.Tensor  # [H]
    attention: AttentionWeights
    router: torch.Tensor | None  # [E, H] on MoE layers
    dense_mlp: MLPWeights | None  # on dense layers
    shared_expert: MLPWeights | None  # Qwen2-MoE
    shared_expert_gate: torch.Tensor | None  # [1, H]


@dataclass
class BackboneWeights:
    embed: torch.Tensor  # [V, H]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H] (the embedding when tied)
    layers: list[LayerWeights]


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def expert_tensor_names(spec: ModelSpec, layer: int, expert: int) -> tuple[str, str, str]:
    """(gate, up, down) tensor names of one routed expert."""
    base = f"{layer_prefix(layer)}{spec.family.moe_prefix}.experts.{expert}."
    gate, up, down = spec.family.expert_names
    return f"{base}{gate}.weight", f"{base}{up}.weight", f"{base}{down}.weight"


def _load_mlp(
    reader: CheckpointReader, names: tuple[str, str, str], hidden: int, inter: int, device: str
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
    names = expert_tensor_names(spec, layer, expert)
    return _load_mlp(reader, names, spec.hidden_size, spec.moe_intermediate_size, device)


def load_experts(
    reader: CheckpointReader, pairs: Iterable[tuple[int, int]], device: str = "cpu"
) -> dict[tuple[int, int], MLPWeights]:
    return {(layer, e): load_expert(reader, layer, e, device) for layer, e in pairs}


def _load_attention(reader: CheckpointReader, layer: int, device: str) -> AttentionWeights:
    spec = reader.spec
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
    if spec.family.qk_norm == "head":
        q_norm = reader.load(f"{p}q_norm.weight", (spec.head_dim,), device=device)
        k_norm = reader.load(f"{p}k_norm.weight", (spec.head_dim,), device=device)
    elif spec.family.qk_norm == "full":
        q_norm = reader.load(f"{p}q_norm.weight", (qs,), device=device)
        k_norm = reader.load(f"{p}k_norm.weight", (kvs,), device=device)
    o = reader.load(f"{p}o_proj.weight", (h, qs), device=device)
    return AttentionWeights(_in_out(torch.cat([q, k, v])), bias, _in_out(o), q_norm, k_norm)


def _in_out(weight: torch.Tensor) -> torch.Tensor:  # [in, out] from [out, in]
    from experts.expert_slots import stores_in_out  # here: expert_slots imports this module

    in_out = stores_in_out(weight.device, weight.dtype)
    return weight.t().contiguous() if in_out else weight.t()


def _load_layer(reader: CheckpointReader, layer: int, device: str) -> LayerWeights:
    spec = reader.spec
    p = layer_prefix(layer)
    h = spec.hidden_size
    router = dense = shared = shared_gate = None
    if spec.is_moe_layer(layer):
        moe = f"{p}{spec.family.moe_prefix}."
        router = reader.load(f"{moe}gate.weight", (spec.num_experts, h), device=device)
        if spec.family.has_shared_expert and spec.shared_expert_intermediate_size:
            names = tuple(f"{moe}shared_expert.{n}.weight" for n in spec.family.expert_names)
            shared = _load_mlp(reader, names, h, spec.shared_expert_intermediate_size, device)  # type: ignore[arg-type]
            shared_gate = reader.load(f"{moe}shared_expert_gate.weight", (1, h), device=device)
    else:
        names = tuple(f"{p}mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj"))
        dense = _load_mlp(reader, names, h, spec.intermediate_size, device)  # type: ignore[arg-type]
    return LayerWeights(
        input_norm=reader.load(f"{p}input_layernorm.weight", (h,), device=device),
        post_attention_norm=reader.load(f"{p}post_attention_layernorm.weight", (h,), device=device),
        attention=_load_attention(reader, layer, device),
        router=router,
        dense_mlp=dense,
        shared_expert=shared,
        shared_expert_gate=shared_gate,
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
