"""Tier replicas sharing the cluster KV store (in-process shards, either engine transport): a
conversation's next turn on the other replica streams the no-cache output with its prompt's
blocks from the store, the usage says so, and each replica's KV events feed a router."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cluster.engine.config import EngineConfig
from cluster.engine.launch import EngineKVLaunch
from cluster.kv_store.client import local_store
from cluster.kv_store.config import KVStoreConfig
from cluster.kv_store.relay import LiveStoreFactory
from cluster.serving.tier_messages import TierItem, TierRequest, TierTokens
from cluster.serving.tier_replica import TierReplica
from experts.sampling_params import SamplingParams
from tests.checkpoints import BuildCheckpoint

HISTORY = tuple(3 + (i * 53) % 250 for i in range(70))
KV = KVStoreConfig(enabled=True, min_fetch_tokens=16, fetch_timeout_s=5.0)


@pytest.fixture(scope="module")
def path(shared_checkpoint: BuildCheckpoint) -> Path:
    return shared_checkpoint("mixtral", seed=3)


def items(replica: TierReplica, ids: tuple[int, ...], rid: str) -> list[TierTokens]:
    request = TierRequest(rid, SamplingParams(max_tokens=6, ignore_eos=True), token_ids=ids)

    async def collect() -> list[TierItem]:
        return [item async for item in replica.generate(request)]

    out = asyncio.run(collect())
    assert all(isinstance(i, TierTokens) for i in out)
    return out  # type: ignore[return-value]


def test_next_turn_on_the_other_replica_reads_the_store(path: Path) -> None:
    store, calls = local_store(2, capacity_bytes=1 << 24)
    kv = EngineKVLaunch(KV, LiveStoreFactory(store))
    config = EngineConfig(block_size=16, num_blocks=64)
    a = TierReplica("t", path, config, engine_process=True, kv=kv)
    b = TierReplica("t", path, config, kv=kv)
    plain = TierReplica(
        "t", path, EngineConfig(block_size=16, num_blocks=64, enable_prefix_caching=False)
    )
    try:
        first = items(a, HISTORY, "t1")
        assert first[-1].num_store_cached_tokens == 0 and first[-1].kv_miss == "never_seen"
        stored = [k for batch in a.kv_events() for k in batch.stored]
        assert len(stored) == 4
        for _ in range(600):  # the child publishes in the background, through a's relay
            if sum(len(s) for s in calls.shards.values()) == 4:
                break
            asyncio.run(asyncio.sleep(0.05))
        turn2 = (*HISTORY, *[t for i in first for t in i.token_ids], 7, 8, 9)
        second = items(b, turn2, "t2")
        reference = items(plain, turn2, "r")
        tokens = [t for i in second for t in i.token_ids]
        assert tokens == [t for i in reference for t in i.token_ids]
        assert second[-1].num_cached_prompt_tokens == 64
        assert second[-1].num_store_cached_tokens == 64
        batches = b.kv_events()
        assert batches[0].snapshot and set(stored) <= {k for x in batches for k in x.stored}
    finally:
        for replica in (a, b, plain):
            replica.shutdown()
