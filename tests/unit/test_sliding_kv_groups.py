"""gpt-oss's sliding layers keep only their window's KV blocks, served exactly.

The test checkpoint alternates sliding (window 8) and full layers; with 4-token blocks a
sliding group may hold ceil(8 / 4) + 1 = 3 blocks per decoding sequence. Prompts several
windows long go through paged decode, chunked prefill, continuous batching and preemption
with transformers' greedy tokens, every step within that bound while the full group holds
every block, and all blocks back in the pool at the end; a prefix hit whose window blocks
were evicted is trimmed and still gives transformers' tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cache.block_allocator import blocks_for
from cache.kv_groups import first_kept_block, group_key
from cache.prefix_hash import hash_blocks
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.checkpoints import BuildCheckpoint
from tests.reference import reference_greedy, reference_model

BLOCK = 4
WINDOW = 8  # tests.checkpoints' gpt_oss sliding_window
BOUND = -(-WINDOW // BLOCK) + 1
NEW = 10


@pytest.fixture(scope="module")
def checkpoint(shared_checkpoint: BuildCheckpoint) -> Path:
    return shared_checkpoint("gpt_oss", seed=7)


def _prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in lengths]


def _serve(engine: LLMEngine, prompts: list[list[int]], new: int = NEW) -> dict[str, list[int]]:
    """Run prompts to completion, checking each step's block tables against the window."""
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=new, ignore_eos=True)
        engine.add_request(EngineRequest(str(i), prompt, params))
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for event in engine.step():
            got[event.request_id].append(event.token_id)
        for seq in engine.scheduler.running:
            assert len(seq.block_table) == blocks_for(seq.num_computed, BLOCK)
            (table,) = seq.window_tables
            assert len(table) <= BOUND, (seq.request_id, seq.num_computed, len(table))
            assert seq.window_starts == [first_kept_block(seq.num_computed, WINDOW, BLOCK)]
    assert engine.blocks.num_held == 0  # every block back: free or cached
    return got


@pytest.mark.parametrize(
    ("num_blocks", "budget"),
    [(96, 512), (96, 7), (40, 16)],
    ids=["whole-prompts", "chunked-prefill", "preempting"],
)
def test_long_prompts_are_token_identical_within_the_window_bound(
    checkpoint: Path, num_blocks: int, budget: int
) -> None:
    model = MoEModel.from_checkpoint(checkpoint)
    assert model.spec.kv_group_windows == (None, WINDOW)
    prompts = _prompts((45, 23, 61), seed=5)
    config = EngineConfig(block_size=BLOCK, num_blocks=num_blocks, max_num_batched_tokens=budget)
    engine = LLMEngine(model, config)
    got = _serve(engine, prompts)
    if num_blocks == 40:
        assert engine.scheduler.num_preemptions > 0
    ref = reference_model(checkpoint)
    for i, prompt in enumerate(prompts):
        assert got[str(i)] == reference_greedy(ref, prompt, NEW), f"prompt {i}"


def test_a_prefix_hit_is_trimmed_to_cached_window_blocks(checkpoint: Path) -> None:
    model = MoEModel.from_checkpoint(checkpoint)
    engine = LLMEngine(model, EngineConfig(block_size=BLOCK, num_blocks=96))
    (prompt,) = _prompts((41,), seed=9)
    _serve(engine, [prompt], new=3)
    # the sliding blocks of the window at token 40 (blocks 8 and 9) leave the cache
    hashes = hash_blocks(prompt, BLOCK)
    blocks = engine.blocks
    for j in (8, 9):
        block = blocks._block_of.pop(group_key(hashes[j], 1))
        del blocks._hash_of[block], blocks._group_of[block], blocks._evictable[block]
        blocks.allocator.release(block)
    longer = [*prompt[:40], 7, 8, 9]
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    engine.add_request(EngineRequest("again", longer, params))
    got: list[int] = []
    cached = 0
    while engine.has_unfinished():
        for event in engine.step():
            got.append(event.token_id)
            cached = event.num_cached_prompt_tokens
    # 10 full blocks match; 40 and 36 tokens need sliding block 9 or 8; 32 needs 6 and 7
    assert cached == 32
    assert got == reference_greedy(reference_model(checkpoint), longer, NEW)
    assert engine.blocks.num_held == 0
