"""ModelSpec: the frozen description of a checkpoint's architecture.

Parsed once from a Hugging Face ``config.json``. Everything the model maths
needs is here; derived values are properties, never written back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from experts.errors import CheckpointError
from experts.families import FAMILIES, FamilyInfo
from experts.family_config import family_args
from experts.rope import RopeScaling, parse_rope

__all__ = ["FAMILIES", "SUPPORTED_DTYPES", "CheckpointError", "FamilyInfo", "ModelSpec"]

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one checkpoint. Layer-dependent choices are methods."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (dense layers and dense families)
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    dtype: str
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    clip_qkv: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    qk_norm: str = "none"  # "none" | "head" | "full" (see FamilyInfo.qk_norm)
    # rotary: the first ``rotary_dim`` dims of each head rotate (partial rotary, MLA's rope part)
    rotary_dim: int = 0  # 0: all of head_dim
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    # grouped sigmoid routing (DeepSeek-V3, GLM-4.5): pick topk_group of n_group expert
    # groups, then the top k inside them; weights scaled by routed_scaling_factor
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0  # the first k layers are dense MLPs
    # multi-head latent attention (DeepSeek-V3): the cache holds a latent and a rotary key
    q_lora_rank: int = 0  # 0: a full-rank q projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary dims stored as interleaved pairs (DeepSeek)
    # gpt-oss: per-layer attention kind and its window, and the clamped SwiGLU
    layer_types: tuple[str, ...] = ()  # "full_attention" | "sliding_attention" per layer
    sliding_window: int | None = None
    swiglu_alpha: float = 0.0  # 0: plain SwiGLU experts
    swiglu_limit: float = 0.0

    @property
    def family(self) -> FamilyInfo:
        return FAMILIES[self.architecture]

    @property
    def is_moe(self) -> bool:
        return self.family.is_moe and self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_mla(self) -> bool:
        return self.family.attention == "mla"

    @property
    def rotary_width(self) -> int:
        """How many dims of each query/key head rotate."""
        return self.rotary_dim or self.head_dim

    @property
    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(planes, heads, dim) one token takes in one layer of the KV pool: keys and values
        per kv head, or MLA's single plane holding the latent and the rotary key."""
        if self.is_mla:
            return 1, 1, self.kv_lora_rank + self.qk_rope_head_dim
        return 2, self.num_kv_heads, self.head_dim

    @property
    def kv_layout(self) -> str:
        """What a cached block holds, as a stable name: blocks of different layouts (or dtypes)
        are never interchangeable, so a block key (local prefix or cluster store) includes it.
        ``mha:kv8x128:bfloat16``; ``mla:latent512+rope64:bfloat16``."""
        if self.is_mla:
            return f"mla:latent{self.kv_lora_rank}+rope{self.qk_rope_head_dim}:{self.dtype}"
        return f"mha:kv{self.num_kv_heads}x{self.head_dim}:{self.dtype}"

    def is_sliding_layer(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    @property
    def has_sliding_layers(self) -> bool:
        return "sliding_attention" in self.layer_types

    # KV groups (``cache.block_manager``): layers whose blocks are allocated and freed
    # together. Group 0 holds the full-attention layers; a model with both sliding and full
    # layers gets group 1 for its sliding layers, whose blocks before the window are freed.
    # A model of one kind has one group (all its layers), as before.

    @property
    def kv_group_windows(self) -> tuple[int | None, ...]:
        """Per KV group, its sliding window (None: full attention, group 0)."""
        if self.has_sliding_layers and "full_attention" in self.layer_types:
            assert self.sliding_window is not None
            return (None, self.sliding_window)
        return (None,)

    def kv_group(self, layer: int) -> int:
        """The KV group of ``layer``."""
        return 1 if len(self.kv_group_windows) > 1 and self.is_sliding_layer(layer) else 0

    @property
    def kv_layer_slots(self) -> tuple[int, ...]:
        """Per layer, its index among its group's layers: the pool's layer slot for it.

        A pool block belongs to one group, so the groups share the pool's layer slots: slot
        j of block b holds layer j of whichever group holds b (vLLM's hybrid cache layout).
        """
        seen = [0] * len(self.kv_group_windows)
        slots = []
        for layer in range(self.num_layers):
            group = self.kv_group(layer)
            slots.append(seen[group])
            seen[group] += 1
        return tuple(slots)

    @property
    def kv_pool_layers(self) -> int:
        """Layer slots of one pool block: the largest group's layer count."""
        return max(self.kv_layer_slots, default=-1) + 1

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen-style interleaving: sparse every ``decoder_sparse_step`` layers, minus opt-outs;
        DeepSeek-style: dense below ``first_k_dense_replace``."""
        if not self.is_moe or layer in self.mlp_only_layers:
            return False
        if layer < self.first_k_dense_replace:
            return False
        return (layer + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in FAMILIES:
            raise CheckpointError(
                f"unsupported architecture {arch!r} in config.json; "
                f"supported: {', '.join(sorted(FAMILIES))}"
            )
        info = FAMILIES[arch]
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
        if dtype not in SUPPORTED_DTYPES:
            raise CheckpointError(
                f"dtype {dtype!r} in config.json is not supported "
                f"(supported: {', '.join(SUPPORTED_DTYPES)})"
            )
        if cfg.get("quantization_config"):
            method = (cfg["quantization_config"] or {}).get("quant_method", "?")
            raise CheckpointError(
                f"quantization_config (quant_method {method!r}) is not supported: serve a "
                "float32/float16/bfloat16 checkpoint (dequantize it first)"
            )
        rope = parse_rope(cfg, info.default_partial_rotary)
        if rope.scaling.rope_type not in info.rope_types:
            raise CheckpointError(
                f"rope type {rope.scaling.rope_type!r} is not supported for {arch} (supported: "
                f"{', '.join(repr(t) for t in info.rope_types)}); remove "
                "rope_scaling/rope_parameters.rope_type from config.json"
            )
        try:
            hidden = int(cfg["hidden_size"])
            num_heads = int(cfg["num_attention_heads"])
            spec_args: dict[str, Any] = dict(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=int(cfg.get("head_dim") or hidden // num_heads),
                intermediate_size=int(cfg.get("intermediate_size") or 0),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope.theta,
                rope_scaling=rope.scaling,
                qk_norm=info.qk_norm,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                # Qwen2-MoE always has q/k/v biases; transformers 5 writes them as `qkv_bias`.
                attention_bias=bool(
                    cfg.get("attention_bias") or cfg.get("qkv_bias", arch == "Qwen2MoeForCausalLM")
                ),
                dtype=dtype,
                clip_qkv=cfg.get("clip_qkv"),
            )
        except KeyError as err:
            raise CheckpointError(
                f"config.json is missing required field {err.args[0]!r}"
            ) from None
        if cfg.get("use_sliding_window") or (
            arch == "MixtralForCausalLM" and cfg.get("sliding_window")
        ):  # gpt-oss's per-layer windows are served (experts.family_config)
            raise CheckpointError(
                f"sliding-window attention (sliding_window={cfg.get('sliding_window')}) is not "
                "supported; set sliding_window to null / use_sliding_window to false"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(
                f"hidden_act {cfg.get('hidden_act')!r} is not supported (supported: 'silu')"
            )
        if cfg.get("mlp_bias"):
            raise CheckpointError("mlp_bias=true is not supported; set it to false")
        if info.is_moe:
            num_experts = int(
                cfg.get("num_local_experts")
                or cfg.get("num_experts")
                or cfg.get("n_routed_experts")
                or 0
            )
            if num_experts <= 0:
                raise CheckpointError(
                    f"{arch} config.json has no num_experts/num_local_experts/n_routed_experts"
                )
            spec_args.update(
                num_experts=num_experts,
                num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                moe_intermediate_size=int(
                    cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0
                ),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", info.default_norm_topk)),
                shared_expert_intermediate_size=int(
                    cfg.get("shared_expert_intermediate_size") or 0
                ),
                decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
                mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
            )
            if arch == "MixtralForCausalLM":
                spec_args["norm_topk_prob"] = True  # Mixtral always renormalises its top-k
            if not 0 < spec_args["num_experts_per_tok"] <= num_experts:
                raise CheckpointError(
                    f"num_experts_per_tok={spec_args['num_experts_per_tok']} must be in "
                    f"[1, {num_experts}]"
                )
        spec_args.update(family_args(arch, cfg, spec_args, rope.partial_rotary_factor))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        spec_args["eos_token_ids"] = eos_ids
        spec_args["bos_token_id"] = cfg.get("bos_token_id")
        if spec_args["num_heads"] % spec_args["num_kv_heads"]:
            raise CheckpointError(
                f"num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={spec_args['num_kv_heads']}"
            )
        return cls(**spec_args)
