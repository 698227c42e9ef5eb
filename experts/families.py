"""The supported model families: how each names its tensors and computes its blocks.

One row per Hugging Face architecture name (``config.json``'s ``architectures[0]``); the
per-checkpoint values (sizes, ranks, windows) are in ``ModelSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyInfo:
    """How one model family names its tensors and computes its MoE block."""

    name: str
    moe_prefix: str  # sub-module of a decoder layer holding the MoE block
    expert_names: tuple[str, str, str]  # (gate, up, down) projections inside one expert
    qk_norm: str  # "none" | "head" (RMSNorm over head_dim) | "full" (over all heads)
    default_norm_topk: bool
    has_shared_expert: bool = False
    is_moe: bool = True
    shared_expert_prefix: str = "shared_expert"  # "shared_experts" (DeepSeek, GLM): no gate
    # | "grouped_sigmoid" (DeepSeek-V3, GLM) | "grouped_softmax" (DeepSeek-V2)
    # | "topk_softmax" (gpt-oss)
    gate: str = "softmax"
    attention: str = "mha"  # "mha" | "mla" (DeepSeek's multi-head latent attention)
    fused_experts: bool = False  # experts stored as [E, ...] tensors (gpt-oss), read by slicing
    router_name: str = "gate"  # the router's sub-module inside the MoE block
    o_proj_bias: bool = False  # the output projection has a bias when attention_bias is set
    attention_sinks: bool = False  # a learned per-head sink logit in every softmax (gpt-oss)
    rope_types: tuple[str, ...] = ("default",)
    default_partial_rotary: float = 1.0


FAMILIES: dict[str, FamilyInfo] = {
    "MixtralForCausalLM": FamilyInfo(
        "mixtral", "block_sparse_moe", ("w1", "w3", "w2"), "none", default_norm_topk=True
    ),
    "Qwen3MoeForCausalLM": FamilyInfo(
        "qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj"), "head", default_norm_topk=False
    ),
    "Qwen2MoeForCausalLM": FamilyInfo(
        "qwen2_moe",
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "none",
        default_norm_topk=False,
        has_shared_expert=True,
    ),
    "OlmoeForCausalLM": FamilyInfo(
        "olmoe", "mlp", ("gate_proj", "up_proj", "down_proj"), "full", default_norm_topk=False
    ),
    "Glm4MoeForCausalLM": FamilyInfo(
        "glm4_moe",
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "none",  # q/k norm per head when use_qk_norm (ModelSpec.qk_norm)
        default_norm_topk=True,
        has_shared_expert=True,
        shared_expert_prefix="shared_experts",
        gate="grouped_sigmoid",
        rope_types=("default", "yarn"),
        default_partial_rotary=0.5,
    ),
    "DeepseekV3ForCausalLM": FamilyInfo(
        "deepseek_v3",
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "none",
        default_norm_topk=True,
        has_shared_expert=True,
        shared_expert_prefix="shared_experts",
        gate="grouped_sigmoid",
        attention="mla",
        o_proj_bias=True,
        rope_types=("default", "yarn"),
    ),
    "DeepseekV2ForCausalLM": FamilyInfo(
        "deepseek_v2",
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "none",
        default_norm_topk=False,
        has_shared_expert=True,
        shared_expert_prefix="shared_experts",
        gate="grouped_softmax",
        attention="mla",
        o_proj_bias=True,
        rope_types=("default", "yarn"),
    ),
    "GptOssForCausalLM": FamilyInfo(
        "gpt_oss",
        "mlp",
        ("gate_up_proj", "gate_up_proj", "down_proj"),  # fused: [E, H, 2I] and [E, I, H]
        "none",
        default_norm_topk=False,
        gate="topk_softmax",
        fused_experts=True,
        router_name="router",
        o_proj_bias=True,
        attention_sinks=True,
        rope_types=("default", "yarn"),
    ),
    "LlamaForCausalLM": FamilyInfo(
        "llama", "mlp", ("gate_proj", "up_proj", "down_proj"), "none", False, is_moe=False
    ),
    "Qwen3ForCausalLM": FamilyInfo(
        "qwen3", "mlp", ("gate_proj", "up_proj", "down_proj"), "head", False, is_moe=False
    ),
}
