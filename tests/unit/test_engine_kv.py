"""An engine linked to the cluster KV store (in-process shards) and emitting KV events: a
conversation's next turn on another engine computes only its new tokens with the output of a
no-cache run; a lost or slow store means recompute, never a wrong token; replication keeps
hits through a lost shard; tenants never fetch each other's blocks; events and miss reasons."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cache.block_key import model_fingerprint
from cluster.engine.config import EngineConfig
from cluster.engine.engine_kv import (
    MISS_EVICTED_LOCAL,
    MISS_EVICTED_STORE,
    MISS_NEVER_SEEN,
    MISS_NONE,
    MISS_STORE_UNAVAILABLE,
)
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, TokenEvent
from cluster.kv_store.client import StoreClient, local_store
from cluster.kv_store.config import KVStoreConfig
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.checkpoints import BuildCheckpoint
from tests.engine_runs import run_to_end

BS = 16
CONFIG = KVStoreConfig(enabled=True, min_fetch_tokens=16, fetch_timeout_s=2.0)


@pytest.fixture(scope="module")
def path(shared_checkpoint: BuildCheckpoint) -> Path:
    return shared_checkpoint("mixtral", seed=3)


@pytest.fixture(scope="module")
def model(path: Path) -> MoEModel:
    return MoEModel.from_checkpoint(path)


def engine(
    model: MoEModel,
    path: Path,
    store: StoreClient | None = None,
    config: KVStoreConfig = CONFIG,
    num_blocks: int = 64,
) -> LLMEngine:
    e = LLMEngine(model, EngineConfig(block_size=BS, num_blocks=num_blocks))
    e.attach_kv(model_fingerprint(path), store, config)
    return e


def plain(model: MoEModel) -> LLMEngine:
    """An engine with no KV link and prefix caching off: the no-cache reference."""
    config = EngineConfig(block_size=BS, num_blocks=64, enable_prefix_caching=False)
    return LLMEngine(model, config)


def turn(rid: str, ids: list[int], salt: str = "", n: int = 6) -> EngineRequest:
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    return EngineRequest(rid, ids, params, cache_salt=salt)


def run(e: LLMEngine, request: EngineRequest) -> list[TokenEvent]:
    return run_to_end(e, [request])[request.request_id]


def tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events]


HISTORY = [3 + (i * 53) % 250 for i in range(70)]  # turn 1's prompt: 4 full blocks + 6


def second_turn(first: list[TokenEvent]) -> list[int]:
    return [*HISTORY, *tokens(first), 7, 8, 9, 10, 11]


def test_turn_two_on_another_engine_computes_only_new_tokens(model: MoEModel, path: Path) -> None:
    store, _ = local_store(2, capacity_bytes=1 << 24)
    a, b = engine(model, path, store), engine(model, path, store)
    first = run(a, turn("t1", HISTORY))
    assert a.kv is not None and a.kv.flush() and a.kv.num_published_blocks == 4
    prompt2 = second_turn(first)  # 70 + 6 + 5 = 81 tokens, 5 full blocks usable
    reference = run(
        LLMEngine(model, EngineConfig(block_size=BS, num_blocks=64)), turn("r", prompt2)
    )
    second = run(b, turn("t2", prompt2))
    assert tokens(second) == tokens(reference)
    # turn 1's 4 full blocks came from the store (its 5th block holds turn 1's output, which
    # engine a never computed K/V for in full: published only once full)
    assert second[-1].num_cached_prompt_tokens == 64
    assert second[-1].num_store_cached_tokens == 64
    assert b.num_prompt_tokens_computed == len(prompt2) - 64
    assert second[-1].kv_miss == MISS_NEVER_SEEN  # block 4 was never computed anywhere
    # on a's own engine: turn 1's blocks are local, the block b computed comes from the store
    assert b.kv is not None and b.kv.flush()
    again = run(a, turn("t2a", prompt2))
    assert tokens(again) == tokens(reference)
    assert again[-1].num_cached_prompt_tokens == 80 and again[-1].num_store_cached_tokens == 16
    assert again[-1].kv_miss == MISS_NONE


def test_tenants_never_fetch_each_others_blocks(model: MoEModel, path: Path) -> None:
    store, _ = local_store(1, capacity_bytes=1 << 24)
    a, b = engine(model, path, store), engine(model, path, store)
    run(a, turn("a", HISTORY, salt="tenant-a"))
    assert a.kv is not None and a.kv.flush()
    other = run(b, turn("b", HISTORY, salt="tenant-b"))
    assert other[-1].num_cached_prompt_tokens == 0 and other[-1].kv_miss == MISS_NEVER_SEEN
    same = run(b, turn("a2", HISTORY, salt="tenant-a"))
    assert same[-1].num_store_cached_tokens == 64


@pytest.mark.parametrize("replication", [1, 2])
def test_a_lost_shard_means_recompute_or_replica_hits(
    model: MoEModel, path: Path, replication: int
) -> None:
    store, calls = local_store(3, capacity_bytes=1 << 24, replication=replication)
    a = engine(model, path, store)
    first = run(a, turn("t1", HISTORY))
    assert a.kv is not None and a.kv.flush()
    owners = {store.owners(k, set())[0] for k in _keys(a, HISTORY)}
    calls.kill(sorted(owners)[0])  # a shard holding some of the prefix is lost
    reference = run(
        LLMEngine(model, EngineConfig(block_size=BS, num_blocks=64)), turn("r", HISTORY)
    )
    b = engine(model, path, store)
    got = run(b, turn("t1b", HISTORY))
    assert tokens(got) == tokens(first) == tokens(reference)
    if replication == 2:
        assert got[-1].num_store_cached_tokens == 64
    else:
        assert got[-1].num_store_cached_tokens < 64
        assert got[-1].kv_miss in (MISS_STORE_UNAVAILABLE, MISS_NEVER_SEEN)


def _keys(e: LLMEngine, ids: list[int], salt: str = "") -> list[bytes]:
    from cache.prefix_hash import hash_blocks, root_hash

    assert e.kv is not None
    return e.kv.keyspace.keys(salt, hash_blocks(ids, BS, (len(ids) - 1) // BS, root_hash(salt)))


def test_a_slow_store_means_recompute_without_stalling(model: MoEModel, path: Path) -> None:
    store, calls = local_store(1, capacity_bytes=1 << 24)
    a = engine(model, path, store)
    first = run(a, turn("t1", HISTORY))
    assert a.kv is not None and a.kv.flush()
    calls.latency_s = 5.0
    config = KVStoreConfig(enabled=True, min_fetch_tokens=16, fetch_timeout_s=0.1)
    b = engine(model, path, store, config)
    start = time.monotonic()
    got = run(b, turn("t1b", HISTORY))
    assert time.monotonic() - start < 3.0
    assert tokens(got) == tokens(first)
    assert got[-1].num_store_cached_tokens == 0 and got[-1].kv_miss == MISS_STORE_UNAVAILABLE
    calls.latency_s = 0.0


def test_below_the_threshold_nothing_is_fetched(model: MoEModel, path: Path) -> None:
    store, _ = local_store(1, capacity_bytes=1 << 24)
    a = engine(model, path, store)
    run(a, turn("t1", HISTORY))
    assert a.kv is not None and a.kv.flush()
    b = engine(model, path, store, KVStoreConfig(enabled=True, min_fetch_tokens=128))
    got = run(b, turn("t1b", HISTORY))
    assert b.kv is not None and b.kv.num_fetches == 0 and got[-1].num_cached_prompt_tokens == 0


def test_store_evictions_and_local_evictions_are_told_apart(model: MoEModel, path: Path) -> None:
    e = engine(model, path, num_blocks=64)
    assert e.kv is not None
    bytes_per_block = e.kv.block_bytes
    shard_capacity = 3 * bytes_per_block  # the store keeps only 3 blocks
    store, _ = local_store(1, capacity_bytes=shard_capacity)
    a = engine(model, path, store, num_blocks=8)  # a tiny pool: its blocks get evicted
    run(a, turn("t1", HISTORY))
    assert a.kv is not None and a.kv.flush()
    other = [3 + (i * 31) % 250 for i in range(100)]
    run(a, turn("o", other))  # evicts turn 1's blocks locally; the store evicts them too
    assert a.kv.flush()
    got = run(a, turn("t1-again", HISTORY))
    assert got[-1].kv_miss in (MISS_EVICTED_STORE, MISS_EVICTED_LOCAL)
    fresh = engine(model, path, store)
    got = run(fresh, turn("t1-fresh", HISTORY))
    assert got[-1].kv_miss == MISS_EVICTED_STORE
    hit = run(fresh, turn("t1-hit", HISTORY))
    assert hit[-1].kv_miss == MISS_NONE


def test_events_are_numbered_and_resync_with_snapshots(model: MoEModel, path: Path) -> None:
    e = engine(model, path, num_blocks=8)
    assert e.kv is not None
    first = e.kv.take_events()
    assert first is not None and first.snapshot and first.seq_no == 0 and not first.stored
    run(e, turn("t1", HISTORY))
    batch = e.kv.take_events()
    assert batch is not None and not batch.snapshot and batch.seq_no == 1
    assert set(batch.stored) >= set(_keys(e, HISTORY))
    run(e, turn("o", [3 + (i * 31) % 250 for i in range(100)]))
    batch = e.kv.take_events()
    assert batch is not None and batch.seq_no == 2 and batch.removed
    snap = e.kv.snapshot()
    assert snap.snapshot and snap.seq_no == 3
    assert len(snap.stored) == e.blocks.num_cached
    assert engine(model, path).kv.events.epoch != e.kv.events.epoch  # type: ignore[union-attr]


def test_an_abort_while_fetching_frees_everything(model: MoEModel, path: Path) -> None:
    store, calls = local_store(1, capacity_bytes=1 << 24)
    a = engine(model, path, store)
    run(a, turn("t1", HISTORY))
    assert a.kv is not None and a.kv.flush()
    calls.latency_s = 0.3
    b = engine(model, path, store)
    b.add_request(turn("t", HISTORY))
    assert b.has_unfinished() and b.kv is not None and b.kv.has_pending()
    assert b.abort("t") and not b.has_unfinished()
    time.sleep(0.4)
    assert b.step() == [] and b.blocks.num_held == 0
    calls.latency_s = 0.0


def test_a_broken_relay_is_a_miss(model: MoEModel, path: Path) -> None:
    class Broken:
        def get_many(self, keys: object, timeout_s: float) -> object:
            raise RuntimeError("broken")

        def put_many(self, keys: object, blocks: object, pin_ttl_s: float = 0.0) -> list[object]:
            raise RuntimeError("broken")

    b = engine(model, path, Broken())  # type: ignore[arg-type]
    ref = run(plain(model), turn("r", HISTORY))
    got = run(b, turn("t", HISTORY))
    assert tokens(got) == tokens(ref)
    assert got[-1].kv_miss == MISS_STORE_UNAVAILABLE


def test_a_pinned_prefix_outlives_pressure_here_and_is_pinned_in_the_store(
    model: MoEModel, path: Path
) -> None:
    store, calls = local_store(1, capacity_bytes=1 << 24)
    e = engine(model, path, store, num_blocks=12)  # 3 of them may be pinned
    system = HISTORY[:48]  # 3 full blocks
    pinned = EngineRequest(
        "p",
        [*system, 5, 6],
        SamplingParams(max_tokens=2, ignore_eos=True),
        pin_tokens=48,
        pin_ttl_s=60.0,
    )
    run_to_end(e, [pinned])
    assert e.kv is not None and e.kv.flush()
    for i in range(4):  # other prompts fill the pool many times over
        run(e, turn(f"o{i}", [3 + (j * (7 + i)) % 250 for j in range(80)], n=2))
    again = run(e, turn("again", [*system, 9, 9, 9]))
    assert again[-1].num_cached_prompt_tokens == 48  # kept while the rest was evicted
    shard = next(iter(calls.shards.values()))
    assert shard.num_pinned_bytes == 3 * e.kv.block_bytes
