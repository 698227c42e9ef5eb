"""ModelSpec: the frozen description of a checkpoint's architecture.

Parsed once from a Hugging Face ``config.json``. Everything the model maths
needs is here; derived values are properties, never written back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message says what is wrong and how to fix it."""


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
    "LlamaForCausalLM": FamilyInfo(
        "llama", "mlp", ("gate_proj", "up_proj", "down_proj"), "none", False, is_moe=False
    ),
    "Qwen3ForCausalLM": FamilyInfo(
        "qwen3", "mlp", ("gate_proj", "up_proj", "down_proj"), "head", False, is_moe=False
    ),
}

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


def _rope_theta(cfg: dict[str, Any]) -> float:
    """transformers 5 nests rope settings under ``rope_parameters``; 4.x keeps them flat."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for source in (params, scaling):
        rope_type = source.get("rope_type", source.get("type", "default"))
        if rope_type not in ("default", None):
            raise CheckpointError(
                f"rope type {rope_type!r} is not supported (supported: 'default'); "
                "remove rope_scaling/rope_parameters.rope_type from config.json"
            )
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


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

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen-style interleaving: sparse every ``decoder_sparse_step`` layers, minus opt-outs."""
        if not self.is_moe or layer in self.mlp_only_layers:
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
                rope_theta=_rope_theta(cfg),
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
        ):
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
            num_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
            if num_experts <= 0:
                raise CheckpointError(f"{arch} config.json has no num_experts/num_local_experts")
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
