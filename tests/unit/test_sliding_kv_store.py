"""gpt-oss (full and sliding KV groups) with the cluster KV store (in-process shards).

Engine a serves a prompt several windows long; engine b, with a cache of its own and the same
store, serves that prefix plus new tokens: it fetches group 0's blocks of the whole prefix and
the sliding group's blocks of the window only, computes only the new tokens, and its greedy
tokens are a no-cache run's and transformers'. Tenants never share; a store lacking some of
the window's sliding blocks gives a shorter prefix (asking for the shorter one's window) or
none, never a wrong token.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.block_key import BlockKey, model_fingerprint
from cache.kv_groups import group_key
from cache.kv_store import FetchResult
from cache.prefix_hash import hash_blocks, root_hash
from cluster.engine.config import EngineConfig
from cluster.engine.engine_kv import MISS_NONE
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, TokenEvent
from cluster.engine.window_fetch import group_block_key
from cluster.kv_store.client import StoreClient, local_store
from cluster.kv_store.config import KVStoreConfig
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.checkpoints import BuildCheckpoint
from tests.engine_runs import run_to_end
from tests.reference import reference_greedy, reference_model

BLOCK = 4
WINDOW = 8  # tests.checkpoints' gpt_oss sliding_window: the window is 2 blocks
NEW = 8
CONFIG = KVStoreConfig(enabled=True, min_fetch_tokens=8, fetch_timeout_s=2.0)


@pytest.fixture(scope="module")
def checkpoint(shared_checkpoint: BuildCheckpoint) -> Path:
    return shared_checkpoint("gpt_oss", seed=7)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> MoEModel:
    model = MoEModel.from_checkpoint(checkpoint)
    assert model.spec.kv_group_windows == (None, WINDOW)
    return model


class Filtered:
    """A store whose ``hidden`` keys are missing (as if evicted), counting calls."""

    def __init__(self, inner: StoreClient) -> None:
        self.inner = inner
        self.hidden: set[BlockKey] = set()
        self.calls = 0

    def get_many(self, keys: Sequence[BlockKey], timeout_s: float) -> FetchResult:
        self.calls += 1
        found = self.inner.get_many(keys, timeout_s)
        blocks = {k: v for k, v in found.blocks.items() if k not in self.hidden}
        return FetchResult(blocks, found.evicted, found.failed_shards)

    def put_many(
        self, keys: Sequence[BlockKey], blocks: Sequence[np.ndarray], pin_ttl_s: float = 0.0
    ) -> Sequence[Future[int]]:
        return self.inner.put_many(keys, blocks, pin_ttl_s)


def engine(model: MoEModel, checkpoint: Path, store: object) -> LLMEngine:
    e = LLMEngine(model, EngineConfig(block_size=BLOCK, num_blocks=96))
    e.attach_kv(model_fingerprint(checkpoint), store, CONFIG)  # type: ignore[arg-type]
    return e


def run(e: LLMEngine, rid: str, ids: list[int], salt: str = "", new: int = NEW) -> list[TokenEvent]:
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    events = run_to_end(e, [EngineRequest(rid, ids, params, cache_salt=salt)])[rid]
    assert e.blocks.num_held == 0
    return events


def tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events]


def conversation(model: MoEModel, checkpoint: Path, store: object) -> tuple[list[int], LLMEngine]:
    """Engine a serves a 30-token history (3 tokens): K/V of 32 tokens, 8 full blocks; the
    next turn's prompt (36 tokens) shares them."""
    gen = torch.Generator().manual_seed(4)
    history = torch.randint(3, 256, (30,), generator=gen).tolist()
    a = engine(model, checkpoint, store)
    first = run(a, "t1", history, new=3)
    assert a.kv is not None and a.kv.flush()
    assert a.kv.num_published_blocks == 16  # 8 positions, each group's block
    return [*history, *tokens(first), 5, 6, 7], a


def no_cache(model: MoEModel, prompt: list[int]) -> list[int]:
    config = EngineConfig(block_size=BLOCK, num_blocks=96, enable_prefix_caching=False)
    return tokens(run(LLMEngine(model, config), "ref", prompt))


def test_another_engine_computes_only_the_new_tokens(model: MoEModel, checkpoint: Path) -> None:
    store, _ = local_store(2, capacity_bytes=1 << 24)
    prompt, _ = conversation(model, checkpoint, store)
    expected = reference_greedy(reference_model(checkpoint), prompt, NEW)
    assert no_cache(model, prompt) == expected
    b = engine(model, checkpoint, store)
    got = run(b, "t2", prompt)
    assert tokens(got) == expected
    assert got[-1].num_cached_prompt_tokens == got[-1].num_store_cached_tokens == 32
    assert b.num_prompt_tokens_computed == len(prompt) - 32
    # group 0's 8 blocks and the sliding group's 2 of the window at token 32, one call
    assert b.kv is not None and b.kv.num_fetches == 1 and b.kv.num_fetched_blocks == 10
    assert got[-1].kv_miss == MISS_NONE  # every block a prompt token can reuse was cached
    # b's blocks went to the store too: a third engine takes 9 blocks (36 tokens less one)
    assert b.kv.flush()
    longer = [*prompt, *tokens(got), 9]
    c = engine(model, checkpoint, store)
    again = run(c, "t3", longer)
    assert tokens(again) == no_cache(model, longer)
    assert again[-1].num_store_cached_tokens == 40  # b computed K/V of 36 + 7 tokens


def test_group_keys_never_meet(model: MoEModel, checkpoint: Path) -> None:
    store, _ = local_store(1, capacity_bytes=1 << 24)
    e = engine(model, checkpoint, store)
    assert e.kv is not None
    spaces = e.kv.spaces
    assert len(spaces) == 2 and spaces[0] is e.kv.keyspace
    assert spaces[0].namespace("") != spaces[1].namespace("")
    assert group_block_key(spaces, "", 123, 0) == spaces[0].key("", 123)
    assert group_block_key(spaces, "", 123, 1)[16:] != (123).to_bytes(8, "little")


def test_tenants_never_share(model: MoEModel, checkpoint: Path) -> None:
    store, _ = local_store(1, capacity_bytes=1 << 24)
    gen = torch.Generator().manual_seed(6)
    prompt = torch.randint(3, 256, (33,), generator=gen).tolist()
    a = engine(model, checkpoint, store)
    run(a, "a", prompt, salt="tenant-a", new=2)
    assert a.kv is not None and a.kv.flush()
    b = engine(model, checkpoint, store)
    other = run(b, "b", prompt, salt="tenant-b")
    assert other[-1].num_cached_prompt_tokens == 0
    same = run(engine(model, checkpoint, store), "a2", prompt, salt="tenant-a")
    assert same[-1].num_store_cached_tokens == 32
    assert tokens(same) == tokens(other) == no_cache(model, prompt)


@pytest.mark.parametrize(
    ("hidden", "cached", "calls"),
    [
        ((7,), 28, 2),  # prefix 7: its window is blocks 5 and 6; 5 asked in a second call
        ((5, 7), 20, 3),  # 7 then 5 missing: prefix 5, window 3 and 4
        (tuple(range(8)), 0, 3),  # no sliding block: windows of 6, 4, 2 asked, then recompute
    ],
    ids=["window-block-7", "blocks-5-and-7", "no-sliding-blocks"],
)
def test_missing_window_blocks_mean_a_shorter_prefix(
    model: MoEModel, checkpoint: Path, hidden: tuple[int, ...], cached: int, calls: int
) -> None:
    inner, _ = local_store(2, capacity_bytes=1 << 24)
    store = Filtered(inner)
    prompt, a = conversation(model, checkpoint, store)
    assert a.kv is not None
    hashes = hash_blocks(prompt, BLOCK, 8, root_hash(""))
    store.hidden = {group_block_key(a.kv.spaces, "", hashes[j], 1) for j in hidden}
    store.calls = 0  # engine a asked too (and found nothing)
    b = engine(model, checkpoint, store)
    got = run(b, "t2", prompt)
    assert tokens(got) == no_cache(model, prompt)
    assert got[-1].num_cached_prompt_tokens == got[-1].num_store_cached_tokens == cached
    assert b.num_prompt_tokens_computed == len(prompt) - cached
    assert store.calls == calls


def test_a_local_hit_missing_its_window_takes_the_window_from_the_store(
    model: MoEModel, checkpoint: Path
) -> None:
    """Engine a's cache keeps group 0's 8 blocks but lost the sliding blocks 6 and 7 of the
    window at token 32: locally it serves 24 tokens; the store adds the two window blocks."""
    store, _ = local_store(1, capacity_bytes=1 << 24)
    prompt, a = conversation(model, checkpoint, store)
    hashes = hash_blocks(prompt, BLOCK, 8, root_hash(""))
    blocks = a.blocks
    for j in (6, 7):
        block = blocks._block_of.pop(group_key(hashes[j], 1))
        del blocks._hash_of[block], blocks._group_of[block], blocks._evictable[block]
        blocks.allocator.release(block)
    got = run(a, "t2", prompt)
    assert tokens(got) == no_cache(model, prompt)
    assert got[-1].num_cached_prompt_tokens == 32 and got[-1].num_store_cached_tokens == 8
    assert a.kv is not None and a.kv.num_fetched_blocks == 2  # the window's sliding blocks
