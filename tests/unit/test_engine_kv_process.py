"""The cluster KV store from an engine process: the child reaches the store through its
replica's relay (a Unix socket with a key challenge, no Ray call in the child), publishes its
blocks, fetches another engine's, and streams its KV events back with its step results."""

from __future__ import annotations

import asyncio
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import pytest

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.config import EngineConfig
from cluster.engine.engine_process import EngineProcess
from cluster.engine.launch import EngineKVLaunch, EngineLaunch
from cluster.engine.requests import EngineRequest, TokenEvent
from cluster.kv_store.client import local_store
from cluster.kv_store.config import KVStoreConfig
from cluster.kv_store.relay import LiveStoreFactory, StoreRelay
from experts.sampling_params import SamplingParams
from tests.checkpoints import BuildCheckpoint
from tests.engine_runs import collect

CONFIG = KVStoreConfig(enabled=True, min_fetch_tokens=16, fetch_timeout_s=5.0)
HISTORY = [3 + (i * 53) % 250 for i in range(70)]  # 4 full blocks + 6


@pytest.fixture(scope="module")
def path(shared_checkpoint: BuildCheckpoint) -> Path:
    return shared_checkpoint("mixtral", seed=3)


def request(rid: str, ids: list[int]) -> EngineRequest:
    return EngineRequest(rid, ids, SamplingParams(max_tokens=6, ignore_eos=True))


def test_engine_process_publishes_and_fetches_through_the_relay(path: Path) -> None:
    store, calls = local_store(2, capacity_bytes=1 << 24)
    relay = StoreRelay(store, CONFIG)
    engine_config = EngineConfig(block_size=16, num_blocks=64)
    child = EngineProcess(
        EngineLaunch(str(path), engine_config, kv=EngineKVLaunch(CONFIG, relay.factory))
    )
    local = AsyncEngine.start(
        EngineLaunch(str(path), engine_config, kv=EngineKVLaunch(CONFIG, LiveStoreFactory(store)))
    )
    try:
        first: list[TokenEvent] = asyncio.run(collect(child, request("t1", HISTORY)))
        deadline = time.monotonic() + 30
        while sum(len(s) for s in calls.shards.values()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(len(s) for s in calls.shards.values()) == 4  # published by the child
        # another engine, fresh cache: the prefix comes from the store
        again: list[TokenEvent] = asyncio.run(collect(local, request("t1b", HISTORY)))
        assert [e.token_id for e in again] == [e.token_id for e in first]
        assert again[-1].num_store_cached_tokens == 64
        # and the child fetches what the other engine published
        other = [*HISTORY[:32], *range(100, 140)]
        asyncio.run(collect(local, request("o", other)))
        assert local.engine.kv is not None and local.engine.kv.flush()
        fetched = asyncio.run(collect(child, request("o2", other)))
        # 72 tokens: 4 full blocks usable; blocks 0-1 are its own (turn 1), 2-3 from the store
        assert fetched[-1].num_store_cached_tokens == 32
        assert fetched[-1].num_cached_prompt_tokens == 64
        batches = child.take_kv_events()
        assert batches[0].snapshot and batches[0].seq_no == 0
        assert [b.seq_no for b in batches] == list(range(len(batches)))
        child.request_kv_snapshot()
        asyncio.run(collect(child, request("o3", other)))
        assert any(b.snapshot and len(b.stored) > 4 for b in child.take_kv_events())
    finally:
        child.shutdown()
        local.shutdown()
        relay.close()


def test_the_relay_refuses_a_peer_without_the_key() -> None:
    store, _ = local_store(1, capacity_bytes=1 << 20)
    relay = StoreRelay(store, CONFIG)
    try:
        with pytest.raises(AuthenticationError):
            Client(relay.address, family="AF_UNIX", authkey=b"not the key")
        assert relay.factory.build().get_many([b"x" * 24], 1.0).blocks == {}
    finally:
        relay.close()
