"""The per-family random checkpoints that other tests rely on are real, loadable and seeded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from tests.checkpoints import FAMILIES, build_family_checkpoint


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_back_with_finite_logits(family: str, tmp_path: Path) -> None:
    path = build_family_checkpoint(family, tmp_path / family, seed=0)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == family
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.arange(3, 40).unsqueeze(0)).logits
    assert logits.shape == (1, 37, 256)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.5, "logits this flat make greedy decoding fragile"


def test_family_specific_shapes(tmp_path: Path) -> None:
    q3moe = _tensors(build_family_checkpoint("qwen3_moe", tmp_path / "a"))
    assert q3moe["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)  # head_dim 32
    assert not [k for k in q3moe if k.startswith("model.layers.1.mlp.experts.")]
    assert "model.layers.1.mlp.gate_proj.weight" in q3moe  # layer 1 is dense
    q2moe = _tensors(build_family_checkpoint("qwen2_moe", tmp_path / "b"))
    assert q2moe["model.layers.0.mlp.shared_expert.up_proj.weight"].shape == (48, 64)
    assert "model.layers.0.self_attn.q_proj.bias" in q2moe
    olmoe = _tensors(build_family_checkpoint("olmoe", tmp_path / "c"))
    assert olmoe["model.layers.0.self_attn.q_norm.weight"].shape == (64,)  # full projection
    llama = _tensors(build_family_checkpoint("llama", tmp_path / "d"))
    assert llama["model.layers.0.self_attn.k_proj.weight"].shape == (16, 64)  # MQA
    mixtral = _tensors(build_family_checkpoint("mixtral", tmp_path / "e"))
    assert mixtral["model.layers.0.block_sparse_moe.gate.weight"].shape == (8, 64)


def test_norms_and_biases_are_not_trivial(tmp_path: Path) -> None:
    t = _tensors(build_family_checkpoint("qwen2_moe", tmp_path / "q"))
    assert not torch.equal(t["model.layers.0.input_layernorm.weight"], torch.ones(64))
    assert t["model.layers.0.self_attn.k_proj.bias"].abs().sum() > 0


def test_seeded(tmp_path: Path) -> None:
    a = _tensors(build_family_checkpoint("mixtral", tmp_path / "a", seed=5))
    b = _tensors(build_family_checkpoint("mixtral", tmp_path / "b", seed=5))
    c = _tensors(build_family_checkpoint("mixtral", tmp_path / "c", seed=6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_sharded_writes_an_index_and_matches_unsharded(tmp_path: Path) -> None:
    whole = build_family_checkpoint("qwen3_moe", tmp_path / "whole", seed=3)
    split = build_family_checkpoint("qwen3_moe", tmp_path / "split", seed=3, sharded=True)
    index = json.loads((split / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert shards == {p.name for p in split.glob("*.safetensors")}
    a, b = _tensors(whole), _tensors(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    transformers.AutoModelForCausalLM.from_pretrained(split)


def test_overrides_reach_the_config(tmp_path: Path) -> None:
    path = build_family_checkpoint(
        "qwen3", tmp_path / "q", tie_word_embeddings=True, num_key_value_heads=1
    )
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] == 1
    assert "lm_head.weight" not in _tensors(path)


def test_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mixtral"):
        build_family_checkpoint("gpt2", tmp_path / "g")
