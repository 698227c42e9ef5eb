"""The config fields the newer families add, read from ``config.json`` and checked.

GLM-4.5 MoE and DeepSeek-V3 route with grouped sigmoid scores, DeepSeek-V2 with grouped
softmax scores, and all three start with dense layers; DeepSeek-V2/V3 attend with multi-head
latent attention (MLA); gpt-oss alternates sliding and full attention layers and clamps its
SwiGLU. ``family_args`` returns the ``ModelSpec``
arguments these add (and the rotary width every family has), refusing what is not served
with an error naming the field, its value and what is allowed.
"""

from __future__ import annotations

from typing import Any

from experts.errors import CheckpointError

LAYER_TYPES = ("full_attention", "sliding_attention")
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


def family_args(
    arch: str, cfg: dict[str, Any], base: dict[str, Any], partial_rotary: float
) -> dict[str, Any]:
    """Extra ``ModelSpec`` arguments for ``arch``; ``base`` holds the common ones parsed so far."""
    head_dim = int(base["head_dim"])
    if partial_rotary != 1.0 and arch != "Glm4MoeForCausalLM":
        raise CheckpointError(
            f"partial_rotary_factor={partial_rotary} is not supported for {arch} (allowed: 1.0)"
        )
    args: dict[str, Any] = {"rotary_dim": int(head_dim * partial_rotary)}
    if arch in ("Glm4MoeForCausalLM", "DeepseekV3ForCausalLM"):
        args.update(_grouped_routing(cfg, base))
    elif arch == "DeepseekV2ForCausalLM":
        args.update(_grouped_softmax_routing(cfg, base))
    if arch == "Glm4MoeForCausalLM":
        args["qk_norm"] = "head" if cfg.get("use_qk_norm") else "none"
        if args["rotary_dim"] % 2:
            raise CheckpointError(
                f"partial_rotary_factor={partial_rotary} leaves an odd rotary width "
                f"{args['rotary_dim']} of head_dim={head_dim}"
            )
    elif arch == "DeepseekV3ForCausalLM":
        args.update(_mla(cfg, base))
    elif arch == "DeepseekV2ForCausalLM":  # rotates interleaved pairs (complex product) always
        args.update(_mla(cfg, base), rope_interleave=True)
    elif arch == "GptOssForCausalLM":
        args.update(_gpt_oss(cfg, base))
    return args


def _positive(cfg: dict[str, Any], name: str) -> int:
    value = cfg.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"config.json field {name}={value!r} must be a positive integer")
    return value


def _grouped_routing(cfg: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Grouped sigmoid routing (DeepSeek-V3, GLM-4.5): shared experts, dense first layers."""
    scoring = cfg.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise CheckpointError(f"scoring_func={scoring!r} is not supported (supported: 'sigmoid')")
    num_experts = int(cfg.get("n_routed_experts") or cfg.get("num_local_experts") or 0)
    n_group = int(cfg.get("n_group") or 1)
    topk_group = int(cfg.get("topk_group") or 1)
    top_k = int(cfg.get("num_experts_per_tok") or 0)
    if n_group <= 0 or num_experts % n_group:
        raise CheckpointError(
            f"n_group={n_group} must divide n_routed_experts={num_experts} into equal groups"
        )
    if num_experts // n_group < 2:
        raise CheckpointError(
            f"n_group={n_group} leaves {num_experts // n_group} expert(s) per group; a group's "
            "score sums its top 2, so each group needs >= 2 experts"
        )
    if not 0 < topk_group <= n_group:
        raise CheckpointError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    if top_k > topk_group * (num_experts // n_group):
        raise CheckpointError(
            f"num_experts_per_tok={top_k} exceeds the {topk_group * (num_experts // n_group)} "
            f"experts of topk_group={topk_group} groups"
        )
    return {"n_group": n_group, "topk_group": topk_group, **_dense_and_shared(cfg, base)}


def _grouped_softmax_routing(cfg: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V2's gate: softmax scores, ``greedy`` top k or ``group_limited_greedy`` (a
    group scores its best expert; the top k come from the best ``topk_group`` groups)."""
    scoring = cfg.get("scoring_func") or "softmax"  # transformers 5 writes null
    if scoring != "softmax":
        raise CheckpointError(f"scoring_func={scoring!r} is not supported (supported: 'softmax')")
    method = cfg.get("topk_method") or "greedy"
    if method not in V2_TOPK_METHODS:
        raise CheckpointError(
            f"topk_method={method!r} is not supported for DeepseekV2ForCausalLM (supported: "
            f"{', '.join(repr(m) for m in V2_TOPK_METHODS)})"
        )
    if cfg.get("norm_topk_prob"):  # transformers ignores it; DeepSeek's own code renormalises
        raise CheckpointError(
            "norm_topk_prob=true is not supported for DeepseekV2ForCausalLM: transformers "
            "ignores it while DeepSeek's reference code renormalises; set it to false"
        )
    n_group = topk_group = 1  # greedy: one group holding every expert
    if method == "group_limited_greedy":
        num_experts = int(base["num_experts"])
        n_group, topk_group = _positive(cfg, "n_group"), _positive(cfg, "topk_group")
        if num_experts % n_group:
            raise CheckpointError(
                f"n_group={n_group} must divide n_routed_experts={num_experts} into equal groups"
            )
        if topk_group > n_group:
            raise CheckpointError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
        top_k, kept = int(base["num_experts_per_tok"]), topk_group * (num_experts // n_group)
        if top_k > kept:
            raise CheckpointError(
                f"num_experts_per_tok={top_k} exceeds the {kept} experts of "
                f"topk_group={topk_group} groups"
            )
    return {"n_group": n_group, "topk_group": topk_group, **_dense_and_shared(cfg, base)}


def _dense_and_shared(cfg: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek's and GLM's dense first layers, shared experts and routed scaling."""
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    if not 0 <= first_dense <= int(base["num_layers"]):
        raise CheckpointError(
            f"first_k_dense_replace={first_dense} must be in [0, num_hidden_layers]"
        )
    n_shared = int(cfg.get("n_shared_experts") or 0)
    return {
        "routed_scaling_factor": float(cfg.get("routed_scaling_factor", 1.0)),
        "first_k_dense_replace": first_dense,
        "shared_expert_intermediate_size": int(cfg.get("moe_intermediate_size") or 0) * n_shared,
    }


def _mla(cfg: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Multi-head latent attention's ranks and head widths (DeepSeek-V2/V3)."""
    q_lora = cfg.get("q_lora_rank")
    if q_lora is not None:
        q_lora = _positive(cfg, "q_lora_rank")
    kv_lora = _positive(cfg, "kv_lora_rank")
    nope = _positive(cfg, "qk_nope_head_dim")
    rope = _positive(cfg, "qk_rope_head_dim")
    v_dim = _positive(cfg, "v_head_dim")
    if rope % 2:
        raise CheckpointError(f"qk_rope_head_dim={rope} must be even")
    return {
        "q_lora_rank": q_lora or 0,
        "kv_lora_rank": kv_lora,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": v_dim,
        "head_dim": nope + rope,  # a query/key head; values are v_head_dim wide
        "num_kv_heads": int(base["num_heads"]),  # every head reads the shared latent
        "rotary_dim": rope,
        "rope_interleave": bool(cfg.get("rope_interleave", True)),
    }


def _gpt_oss(cfg: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """gpt-oss: sliding and full attention layers, the clamped SwiGLU."""
    num_layers = int(base["num_layers"])
    layer_types = cfg.get("layer_types")
    if layer_types is None:  # transformers' default: sliding, full, sliding, ...
        layer_types = [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
        ]
    if len(layer_types) != num_layers or any(t not in LAYER_TYPES for t in layer_types):
        raise CheckpointError(
            f"layer_types={layer_types!r} must list one of {LAYER_TYPES} per layer "
            f"({num_layers} layers)"
        )
    window = cfg.get("sliding_window")
    if "sliding_attention" in layer_types:
        window = _positive(cfg, "sliding_window")
    limit = float(cfg.get("swiglu_limit", 7.0))
    if limit <= 0:
        raise CheckpointError(f"swiglu_limit={limit} must be > 0")
    return {
        "layer_types": tuple(layer_types),
        "sliding_window": window,
        "attention_bias": bool(cfg.get("attention_bias", True)),  # gpt-oss's default
        "swiglu_alpha": float(cfg.get("swiglu_alpha", 1.702)),
        "swiglu_limit": limit,
        "moe_intermediate_size": int(cfg.get("intermediate_size") or 0),
    }
