"""Small random checkpoints, one per supported family, written with transformers itself.

Tests compare our model core against transformers, so the fixtures must be real
``save_pretrained`` output (same tensor names, config keys and sharding) rather than hand-made
files. Each family turns on the features that distinguish it (explicit head_dim, dense layers
inside an MoE stack, shared experts, qkv bias, q/k norms, MQA) so one checkpoint per family
exercises every code path that family needs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

# The ``shared_checkpoint`` fixture's type (tests/conftest.py): (family, *, seed) -> its directory
BuildCheckpoint = Callable[..., Path]

FAMILIES: tuple[str, ...] = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "llama", "qwen3")
# Issue 19's families, each in the variants that exercise its distinct paths: GLM-4.5 MoE
# (grouped sigmoid routing on standard attention), DeepSeek-V3 (MLA with and without q LoRA,
# interleaved rotary or not, YaRN) and gpt-oss (sinks, sliding/full layers, fused experts).
NEW_FAMILIES: tuple[str, ...] = (
    "glm4_moe",
    "glm4_moe_flat",
    "deepseek_v3",
    "deepseek_v3_no_q_lora",
    "deepseek_v3_yarn",
    "gpt_oss",
)
# DeepSeek-V2: MLA with and without q LoRA (V2-Lite), YaRN, and its softmax gate both ways:
# group_limited_greedy (two group settings) and greedy.
V2_FAMILIES: tuple[str, ...] = (
    "deepseek_v2",
    "deepseek_v2_lite",
    "deepseek_v2_yarn",
)

# Passed to save_pretrained when sharded=True; well below the ~0.6 MB of one MoE layer, so the
# checkpoint is split into several files plus model.safetensors.index.json.
SHARD_SIZE = "200KB"

_COMMON: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "max_position_embeddings": 512,
    "dtype": "float32",
    # The default 0.02 gives near-uniform logits, so greedy argmax could flip on 1e-6 numeric
    # noise between implementations; 0.2 makes token and expert choices decisive.
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    # No pad id: a pad id makes nn.Embedding zero that row, and olmoe's default (1) is our bos.
    "pad_token_id": None,
    "tie_word_embeddings": False,
}
_MOE: dict[str, Any] = {"num_experts": 8, "num_experts_per_tok": 2}
# DeepSeek-V3's latent attention, small: every head reads one 16-wide latent + 8 rotary dims
_MLA: dict[str, Any] = {
    "num_key_value_heads": 4,  # MLA has no kv heads; the reference wants them equal to heads
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "routed_scaling_factor": 2.5,
}

# Typed as plain callables: the config classes' generated signatures reject mypy-checked kwargs.
_FAMILY_CONFIGS: dict[str, tuple[Callable[..., transformers.PretrainedConfig], dict[str, Any]]] = {
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 8, "num_experts_per_tok": 2}),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        {
            **_MOE,
            "moe_intermediate_size": 32,
            "head_dim": 32,  # deliberately != hidden_size / num_attention_heads (16)
            "decoder_sparse_step": 1,
            "mlp_only_layers": [1],  # layer 1 is a dense MLP between two MoE layers
            "norm_topk_prob": True,
        },
    ),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        {
            **_MOE,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "qkv_bias": True,
            "norm_topk_prob": False,
        },
    ),
    "olmoe": (transformers.OlmoeConfig, {**_MOE, "norm_topk_prob": False}),
    "llama": (transformers.LlamaConfig, {"num_key_value_heads": 1}),  # MQA
    # 16 experts in 4 groups, 2 groups kept, top-3; q/k norm, partial rotary, qkv bias
    "glm4_moe": (
        transformers.Glm4MoeConfig,
        {
            "n_routed_experts": 16,
            "num_experts_per_tok": 3,
            "n_group": 4,
            "topk_group": 2,
            "moe_intermediate_size": 32,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "use_qk_norm": True,
            "attention_bias": True,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
        },
    ),
    # one group, no q/k norm, no bias, unnormalised top-k, explicit head_dim, 2 shared experts
    "glm4_moe_flat": (
        transformers.Glm4MoeConfig,
        {
            **_MOE,
            "n_routed_experts": 8,
            "n_group": 1,
            "topk_group": 1,
            "moe_intermediate_size": 32,
            "n_shared_experts": 2,
            "first_k_dense_replace": 0,
            "norm_topk_prob": False,
            "head_dim": 32,
        },
    ),
    # MLA with a q LoRA and interleaved rotary dims; 16 experts in 4 groups (2 kept), top-3
    "deepseek_v3": (
        transformers.DeepseekV3Config,
        {
            **_MLA,
            "n_routed_experts": 16,
            "num_experts_per_tok": 3,
            "n_group": 4,
            "topk_group": 2,
            "q_lora_rank": 24,
        },
    ),
    # MLA with a full-rank q, half-split rotary, attention biases; 2 groups, 1 kept
    "deepseek_v3_no_q_lora": (
        transformers.DeepseekV3Config,
        {
            **_MLA,
            "n_routed_experts": 8,
            "n_group": 2,
            "topk_group": 1,
            "q_lora_rank": None,
            "rope_interleave": False,
            "attention_bias": True,
            "norm_topk_prob": False,
        },
    ),
    # DeepSeek's published YaRN shape, scaled down: factor 4 over a 128-token original context
    "deepseek_v3_yarn": (
        transformers.DeepseekV3Config,
        {
            **_MLA,
            "n_routed_experts": 8,
            "n_group": 1,
            "topk_group": 1,
            "q_lora_rank": 24,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 0.707,
                "mscale_all_dim": 1.0,
            },
        },
    ),
    # q LoRA, 16 experts in 4 groups (2 kept), top-3, scaled: fewer groups kept than experts
    # chosen, so the group limit changes choices
    "deepseek_v2": (
        transformers.DeepseekV2Config,
        {
            **_MLA,
            "n_routed_experts": 16,
            "num_experts_per_tok": 3,
            "topk_method": "group_limited_greedy",
            "n_group": 4,
            "topk_group": 2,
            "q_lora_rank": 24,
        },
    ),
    # V2-Lite's shape: full-rank q, greedy top-2 of 8, attention biases, 2 shared experts
    "deepseek_v2_lite": (
        transformers.DeepseekV2Config,
        {
            **_MLA,
            "n_routed_experts": 8,
            "topk_method": "greedy",
            "q_lora_rank": None,
            "n_shared_experts": 2,
            "attention_bias": True,
            "routed_scaling_factor": 1.0,
        },
    ),
    # YaRN as DeepSeek-V2 publishes it (mscale == mscale_all_dim), scaled down; 2 groups, 1 kept
    "deepseek_v2_yarn": (
        transformers.DeepseekV2Config,
        {
            **_MLA,
            "n_routed_experts": 8,
            "topk_method": "group_limited_greedy",
            "n_group": 2,
            "topk_group": 1,
            "q_lora_rank": 24,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
        },
    ),
    # sliding (window 8) and full layers, sinks, biases, fused experts, a tight SwiGLU clamp
    "gpt_oss": (
        transformers.GptOssConfig,
        {
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "intermediate_size": 32,
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "swiglu_limit": 1.0,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
            },
        },
    ),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 32}),
}


def family_config(family: str, **overrides: Any) -> transformers.PretrainedConfig:
    """The config :func:`build_family_checkpoint` would use, without building weights."""
    if family not in _FAMILY_CONFIGS:
        known = ", ".join((*FAMILIES, *NEW_FAMILIES, *V2_FAMILIES))
        raise ValueError(f"unknown family {family!r}; known: {known}")
    make, specific = _FAMILY_CONFIGS[family]
    return make(**{**_COMMON, **specific, **overrides})


def _perturb_vectors(model: torch.nn.Module) -> None:
    """Randomise norm weights and biases, which transformers initialises to exactly 1 and 0.

    With identity norms and zero biases an implementation that skips a norm, swaps q_norm and
    k_norm, or drops the qkv bias would still match the reference bit for bit. The same goes
    for gpt-oss's fused expert biases (``*_proj_bias``) and the grouped gate's selection
    bias (``e_score_correction_bias``, a buffer).
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and name.endswith(".weight"):  # every 1-D weight is a norm
                param.normal_(1.0, 0.1)
            elif name.endswith(".bias") or name.endswith("_proj_bias"):
                param.normal_(0.0, 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)


def _check_finite(model: transformers.PreTrainedModel, vocab_size: int) -> None:
    """A random init that overflows would make every downstream comparison meaningless."""
    ids = torch.arange(3, 3 + 24).remainder(vocab_size).unsqueeze(0)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("random checkpoint produced non-finite logits")


def build_family_checkpoint(
    family: str,
    out_dir: Path,
    *,
    seed: int = 0,
    sharded: bool = False,
    **overrides: Any,
) -> Path:
    """Write a small seeded random checkpoint of ``family`` to ``out_dir`` and return it.

    ``overrides`` replace config kwargs (e.g. ``tie_word_embeddings=True``). The same seed gives
    the same weights; the caller's global torch RNG is left untouched.
    """
    cfg = family_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        _perturb_vectors(model)
    _check_finite(model, cfg.vocab_size)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size=SHARD_SIZE if sharded else "50GB")
    if sharded:
        index = out_dir / "model.safetensors.index.json"
        shards = (
            set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else set()
        )
        if len(shards) < 2:
            raise RuntimeError(f"sharded=True but {out_dir} holds {len(shards)} shard(s)")
    return out_dir
