"""The demo builder's GLM-4.5, DeepSeek-V2/V3 and gpt-oss presets: each builds, is served as its
family, and its prefill logits match transformers' (a prompt past gpt-oss's 128-token window)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.engine.generator import generate
from deploy.demo_model import build_demo_model
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.reference import reference_model

PRESETS = {
    "glm4-moe": "glm4_moe",
    "deepseek-v2": "deepseek_v2",
    "deepseek-v3": "deepseek_v3",
    "gpt-oss": "gpt_oss",
}


@pytest.mark.parametrize(("preset", "family"), PRESETS.items())
def test_family_presets_are_served_like_transformers(
    preset: str, family: str, tmp_path: Path
) -> None:
    path = build_demo_model(tmp_path / preset, preset, seed=0)
    model = MoEModel.from_checkpoint(path)
    assert model.spec.family.name == family and model.spec.is_moe
    assert model.spec.num_experts == 16 and model.spec.num_experts_per_tok == 4
    prompt = torch.randint(3, 2048, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    res = generate(model, [prompt], [SamplingParams(max_tokens=1, ignore_eos=True)])[0]
    with torch.inference_mode():
        logits = reference_model(path)(torch.tensor([prompt])).logits[0, -1]  # [V]
    expected = torch.log_softmax(logits.float(), -1)  # [V]
    token = res.token_ids[0]
    assert abs(res.logprobs[0] - expected[token].item()) < 1e-4
    assert expected[token] >= expected.max() - 1e-4  # the greedy choice, up to float ties
