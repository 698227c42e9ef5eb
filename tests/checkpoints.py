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
    "qwen3": (transformers.Qwen3Config, {"head_dim": 32}),
}


def family_config(family: str, **overrides: Any) -> transformers.PretrainedConfig:
    """The config :func:`build_family_checkpoint` would use, without building weights."""
    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    make, specific = _FAMILY_CONFIGS[family]
    return make(**{**_COMMON, **specific, **overrides})


def _perturb_vectors(model: torch.nn.Module) -> None:
    """Randomise norm weights and biases, which transformers initialises to exactly 1 and 0.

    With identity norms and zero biases an implementation that skips a norm, swaps q_norm and
    k_norm, or drops the qkv bias would still match the reference bit for bit.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and name.endswith(".weight"):  # every 1-D weight is a norm
                param.normal_(1.0, 0.1)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)


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
