"""GLM-4.5 MoE, DeepSeek-V3 and gpt-oss against transformers, the correctness oracle.

Every variant of ``tests.checkpoints.NEW_FAMILIES``: prefill logits within 1e-4 (MLA both
absorbed and expanded), and greedy tokens identical through the engine, with whole prompts
and with prompts chunked into a small token budget (prefill chunks over cached keys, and
continuous batching of several requests). Prompts are longer than gpt-oss's 8-token window.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cache.kv_pool import KVPool
from cluster.engine.config import EngineConfig
from cluster.engine.generator import generate
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest
from experts.attention import AttentionBatch, SequenceChunk
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.checkpoints import NEW_FAMILIES, BuildCheckpoint
from tests.reference import reference_greedy, reference_model

BLOCK = 16
PROMPT_LENS = (37, 5, 20, 16)  # longer than a block (and the window), shorter, ragged, one block
NEW_TOKENS = 24
MLA_FAMILIES = tuple(f for f in NEW_FAMILIES if f.startswith("deepseek"))


@pytest.fixture(scope="module")
def checkpoints(shared_checkpoint: BuildCheckpoint) -> dict[str, Path]:
    return {family: shared_checkpoint(family, seed=7) for family in NEW_FAMILIES}


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _pool(model: MoEModel, num_blocks: int) -> KVPool:
    planes, heads, dim = model.spec.kv_cache_shape
    return KVPool(model.spec.num_layers, num_blocks, BLOCK, heads, dim, num_planes=planes)


def _prefill_logits(model: MoEModel, prompts: list[list[int]]) -> torch.Tensor:  # [T, V]
    # scattered, non-contiguous block tables: paging must not depend on layout
    free = list(range(63, -1, -3)) + list(range(61, -1, -3))
    chunks = []
    for p in prompts:
        chunks.append(SequenceChunk([free.pop() for _ in range(-(-len(p) // BLOCK))], 0, len(p), 0))
    batch = AttentionBatch.build(chunks, BLOCK, model.device)
    ids = torch.tensor([t for p in prompts for t in p])
    with torch.inference_mode():
        return model.logits(model.forward(ids, batch, _pool(model, 64)))


def _cases() -> list[tuple[str, bool | None]]:
    """Every family once, the MLA ones also with absorption forced on and off."""
    cases: list[tuple[str, bool | None]] = [(f, None) for f in NEW_FAMILIES]
    return cases + [(f, absorb) for f in MLA_FAMILIES for absorb in (True, False)]


@pytest.mark.parametrize(("family", "absorb"), _cases())
def test_prefill_logits_match_transformers(
    family: str, absorb: bool | None, checkpoints: dict[str, Path]
) -> None:
    model = MoEModel.from_checkpoint(checkpoints[family])
    model.mla_absorb = absorb
    prompts = _prompts(model.spec.vocab_size)
    ours = _prefill_logits(model, prompts)
    ref = reference_model(checkpoints[family])
    offset = 0
    with torch.inference_mode():
        for p in prompts:
            expected = ref(torch.tensor([p])).logits[0]
            torch.testing.assert_close(ours[offset : offset + len(p)], expected, atol=1e-4, rtol=0)
            offset += len(p)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_greedy_generation_is_token_identical(family: str, checkpoints: dict[str, Path]) -> None:
    """All prompts at once through ``generate``: paged decode, continuous batching."""
    model = MoEModel.from_checkpoint(checkpoints[family])
    prompts = _prompts(model.spec.vocab_size, seed=1)
    params = [SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)] * len(prompts)
    ref = reference_model(checkpoints[family])
    for prompt, res in zip(prompts, generate(model, prompts, params), strict=True):
        assert res.token_ids == reference_greedy(ref, prompt, NEW_TOKENS)
        assert res.finish_reason == "length"


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3", "gpt_oss"])
def test_chunked_prefill_in_a_small_token_budget_is_token_identical(
    family: str, checkpoints: dict[str, Path]
) -> None:
    """12 tokens a step: prompts arrive in chunks over their cached keys (windowed across
    blocks for gpt-oss, expanded latents for MLA), decodes of others in the same steps."""
    model = MoEModel.from_checkpoint(checkpoints[family])
    prompts = _prompts(model.spec.vocab_size, seed=2)
    engine = LLMEngine(
        model, EngineConfig(block_size=BLOCK, num_blocks=32, max_num_batched_tokens=12)
    )
    for i, prompt in enumerate(prompts):
        engine.add_request(
            EngineRequest(str(i), prompt, SamplingParams(max_tokens=12, ignore_eos=True))
        )
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for event in engine.step():
            got[int(event.request_id)].append(event.token_id)
    ref = reference_model(checkpoints[family])
    for i, prompt in enumerate(prompts):
        assert got[i] == reference_greedy(ref, prompt, 12), f"prompt {i}"
