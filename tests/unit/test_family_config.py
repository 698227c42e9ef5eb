"""Config parsing of the newer families: KV layouts, YaRN against transformers, and refusals
that name the field, its value and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from cache.kv_policy import KVPolicy
from cluster.engine.admission import validate_request
from cluster.engine.requests import EngineRequest
from experts.rope import parse_rope
from experts.spec import CheckpointError, ModelSpec
from tests.checkpoints import BuildCheckpoint, family_config


@pytest.fixture(scope="module")
def configs(shared_checkpoint: BuildCheckpoint) -> dict[str, dict[str, Any]]:
    families = (
        "mixtral",
        "llama",
        "glm4_moe",
        "deepseek_v3",
        "deepseek_v3_yarn",
        "gpt_oss",
        "deepseek_v2",
        "deepseek_v2_lite",
    )
    return {
        f: json.loads((Path(shared_checkpoint(f, seed=7)) / "config.json").read_text())
        for f in families
    }


def _spec(cfg: dict[str, Any], **changes: Any) -> ModelSpec:
    return ModelSpec.from_hf_config({**cfg, **changes})


def test_kv_layouts_name_what_a_block_holds(configs: dict[str, dict[str, Any]]) -> None:
    mla = _spec(configs["deepseek_v3"])
    assert mla.kv_cache_shape == (1, 1, 16 + 8)  # one latent + rotary key entry per token
    assert mla.kv_layout == "mla:latent16+rope8:float32"
    gqa = _spec(configs["gpt_oss"])
    assert gqa.kv_cache_shape == (2, 2, 16)
    assert gqa.kv_layout == "mha:kv2x16:float32"
    assert _spec(configs["gpt_oss"], dtype="bfloat16").kv_layout == "mha:kv2x16:bfloat16"
    assert _spec(configs["mixtral"]).kv_layout == "mha:kv2x16:float32"


def test_sliding_layers_are_a_kv_group_of_their_own(configs: dict[str, dict[str, Any]]) -> None:
    """gpt-oss's blocks hold one group's layers (sliding: 0 and 2; full: 1), so a pool block
    has two layer slots; every other family keeps one group of all its layers."""
    oss = _spec(configs["gpt_oss"])
    assert oss.kv_group_windows == (None, 8)
    assert [oss.kv_group(i) for i in range(3)] == [1, 0, 1]
    assert oss.kv_layer_slots == (0, 0, 1) and oss.kv_pool_layers == 2
    all_full = _spec(configs["gpt_oss"], layer_types=["full_attention"] * 3)
    assert all_full.kv_group_windows == (None,) and all_full.kv_pool_layers == 3
    for family in ("mixtral", "deepseek_v3", "glm4_moe"):
        spec = _spec(configs[family])
        assert spec.kv_group_windows == (None,)
        assert spec.kv_layer_slots == tuple(range(spec.num_layers))
        assert spec.kv_pool_layers == spec.num_layers


def test_grouped_families_start_with_dense_layers(configs: dict[str, dict[str, Any]]) -> None:
    spec = _spec(configs["deepseek_v3"])
    assert spec.moe_layers == (1, 2) and (spec.n_group, spec.topk_group) == (4, 2)
    assert spec.shared_expert_intermediate_size == 32
    glm = _spec(configs["glm4_moe"])
    assert (glm.qk_norm, glm.rotary_width, glm.head_dim) == ("head", 8, 16)


def test_deepseek_v2_gate_groups_and_latents(configs: dict[str, dict[str, Any]]) -> None:
    """group_limited_greedy keeps its groups; greedy is one group, whatever n_group says;
    V2 always rotates interleaved pairs and caches one latent + rotary key per token."""
    v2 = _spec(configs["deepseek_v2"])
    assert (v2.family.gate, v2.n_group, v2.topk_group) == ("grouped_softmax", 4, 2)
    assert v2.moe_layers == (1, 2) and v2.routed_scaling_factor == 2.5
    assert v2.rope_interleave and v2.kv_layout == "mla:latent16+rope8:float32"
    lite = _spec(configs["deepseek_v2_lite"], n_group=4, topk_group=2, scoring_func="softmax")
    assert (lite.n_group, lite.topk_group, lite.q_lora_rank) == (1, 1, 0)
    assert lite.shared_expert_intermediate_size == 64 and lite.rope_interleave


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3_yarn", "deepseek_v2_yarn"])
def test_yarn_frequencies_and_scale_are_transformers(family: str) -> None:
    cfg = family_config(family)
    expected_freq, expected_scale = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    settings = parse_rope(cfg.to_dict())
    dim = cfg.head_dim  # gpt-oss: the head; DeepSeek: its rotary part
    torch.testing.assert_close(settings.scaling.inv_freq(dim, settings.theta), expected_freq)
    assert settings.scaling.cos_sin_scale == pytest.approx(expected_scale, rel=1e-12)


@pytest.mark.parametrize("family", ["deepseek_v3_yarn", "deepseek_v2_yarn"])
def test_deepseek_yarn_scales_the_softmax_like_transformers(family: str) -> None:
    cfg = family_config(family)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    expected = model.model.layers[0].self_attn.scaling
    settings = parse_rope(cfg.to_dict())
    assert settings.scaling.softmax_scale((16 + 8) ** -0.5) == pytest.approx(expected, rel=1e-12)


REFUSALS = [
    ("deepseek_v3", {"n_group": 3}, r"n_group=3 must divide n_routed_experts=16"),
    ("deepseek_v3", {"topk_group": 5}, r"topk_group=5 must be in \[1, n_group=4\]"),
    ("deepseek_v3", {"n_group": 16}, r"n_group=16 leaves 1 expert\(s\) per group"),
    ("deepseek_v3", {"num_experts_per_tok": 9}, r"num_experts_per_tok=9 exceeds the 8"),
    ("deepseek_v3", {"scoring_func": "softmax"}, r"scoring_func='softmax' is not supported"),
    ("deepseek_v3", {"kv_lora_rank": 0}, r"kv_lora_rank=0 must be a positive integer"),
    ("deepseek_v3", {"qk_rope_head_dim": 7}, r"qk_rope_head_dim=7 must be even"),
    (
        "deepseek_v3",
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
        r"rope_parameters.rope_type='linear' is not supported \(supported: 'default', 'yarn'\)",
    ),
    (
        "deepseek_v3",
        {"quantization_config": {"quant_method": "fp8"}},
        r"quantization_config \(quant_method 'fp8'\) is not supported",
    ),
    (
        "deepseek_v2",
        {"topk_method": "noaux_tc"},
        r"topk_method='noaux_tc' is not supported for DeepseekV2ForCausalLM \(supported: "
        r"'greedy', 'group_limited_greedy'\)",
    ),
    ("deepseek_v2", {"scoring_func": "sigmoid"}, r"scoring_func='sigmoid' is not supported"),
    ("deepseek_v2", {"norm_topk_prob": True}, r"norm_topk_prob=true is not supported"),
    ("deepseek_v2", {"n_group": None}, r"n_group=None must be a positive integer"),
    ("deepseek_v2", {"n_group": 3}, r"n_group=3 must divide n_routed_experts=16"),
    ("deepseek_v2", {"topk_group": 5}, r"topk_group=5 must be in \[1, n_group=4\]"),
    ("deepseek_v2", {"topk_group": 0}, r"topk_group=0 must be a positive integer"),
    ("deepseek_v2", {"num_experts_per_tok": 9}, r"num_experts_per_tok=9 exceeds the 8"),
    ("deepseek_v2_lite", {"v_head_dim": None}, r"v_head_dim=None must be a positive integer"),
    (
        "deepseek_v2_lite",
        {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_parameters": None},
        r"rope_scaling.type='dynamic' is not supported",
    ),
    ("gpt_oss", {"layer_types": ["full_attention"]}, r"layer_types=\['full_attention'\] must"),
    (
        "gpt_oss",
        {"layer_types": ["sliding_attention"] * 3, "sliding_window": None},
        r"sliding_window=None must be a positive integer",
    ),
    (
        "gpt_oss",
        {"quantization_config": {"quant_method": "mxfp4"}},
        r"quantization_config \(quant_method 'mxfp4'\)",
    ),
    (
        "gpt_oss",
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
        r"rope_parameters.rope_type='yarn' needs a 'factor'",
    ),
    (
        "mixtral",
        {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6}},
        r"rope type 'yarn' is not supported for MixtralForCausalLM \(supported: 'default'\)",
    ),
    (
        "llama",
        {"partial_rotary_factor": 0.5},
        r"partial_rotary_factor=0.5 is not supported for LlamaForCausalLM \(allowed: 1.0\)",
    ),
]


@pytest.mark.parametrize(("family", "changes", "message"), REFUSALS)
def test_unsupported_settings_are_refused_naming_the_field(
    family: str, changes: dict[str, Any], message: str, configs: dict[str, dict[str, Any]]
) -> None:
    with pytest.raises(CheckpointError, match=message):
        _spec(configs[family], **changes)


def test_a_window_kv_policy_is_refused_for_sliding_layers(
    configs: dict[str, dict[str, Any]],
) -> None:
    spec = _spec(configs["gpt_oss"])
    request = EngineRequest("r", [5] * 20, kv_policy=KVPolicy("window", window=64))
    with pytest.raises(ValueError, match=r"kv_policy 'window' is not supported for gpt_oss"):
        validate_request(request, spec, 16, 64)
    validate_request(EngineRequest("r", [5] * 20), spec, 16, 64)  # 'full' is served
