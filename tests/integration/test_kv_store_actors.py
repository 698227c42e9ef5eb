"""Store shard actors on a local Ray instance: one per node, named and found again, blocks
through the object store (a same-node read maps the shard's reply without a copy); a
SIGKILLed shard is restarted empty and serves again."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import ray

from cache.block_key import KeySpace, KVLayout
from cache.prefix_hash import hash_blocks
from cluster.faults import actors_named, kill_actor_process, wait_for_replacement, wait_until
from cluster.kv_store.client import StoreClient, wait_puts
from cluster.kv_store.config import KVStoreConfig
from cluster.kv_store.shard_actor import SHARD_NAME_PREFIX, RayShardCalls, start_store_shards


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_shards_store_and_serve_blocks(local_ray: None) -> None:
    config = KVStoreConfig(enabled=True, capacity_bytes=4 << 20)
    handles = start_store_shards(config)
    assert len(handles) == 1  # one node, one shard
    again = start_store_shards(config)  # found by name, not a second actor
    assert [h._actor_id for h in again.values()] == [h._actor_id for h in handles.values()]
    client = StoreClient(RayShardCalls(handles), list(handles))
    space = KeySpace("m", KVLayout("float32", 1, 1, 4, 16))
    keys = space.keys("", hash_blocks(list(range(160)), 16))
    blocks = [np.full(200_000, i, dtype=np.uint8) for i in range(len(keys))]
    assert wait_puts(client.put_many(keys, blocks), 30.0)
    got = client.get_many(keys, timeout_s=30.0)
    assert len(got.blocks) == len(keys)
    for i, key in enumerate(keys):
        assert got.blocks[key].shape == (200_000,) and int(got.blocks[key][-1]) == i
    # a large array comes back as a read-only view of the object store: no copy on the read
    assert not got.blocks[keys[0]].flags.writeable
    stats = ray.get(next(iter(handles.values())).stats.remote())
    assert stats.num_blocks == 10 and stats.num_hits == 10 and stats.num_bytes == 2_000_000


def test_a_killed_shard_restarts_empty_and_serves_again(local_ray: None) -> None:
    config = KVStoreConfig(enabled=True, capacity_bytes=4 << 20)
    handles = start_store_shards(config)
    (shard_id,) = handles
    client = StoreClient(RayShardCalls(handles), list(handles), retry_down_s=0.2)
    space = KeySpace("restart", KVLayout("float32", 1, 1, 4, 16))
    keys = space.keys("", hash_blocks(list(range(64)), 16))
    blocks = [np.full(1000, i, dtype=np.uint8) for i in range(len(keys))]
    assert wait_puts(client.put_many(keys, blocks), 30.0)
    assert len(client.get_many(keys, timeout_s=30.0).blocks) == len(keys)
    (victim,) = actors_named(SHARD_NAME_PREFIX + shard_id)
    kill_actor_process(victim)
    # while it is down or restarting: a miss (recompute), never an error or a hang
    assert len(client.get_many(keys, timeout_s=5.0).blocks) <= len(keys)
    wait_for_replacement(victim, SHARD_NAME_PREFIX + shard_id, timeout_s=60)
    stats = ray.get(handles[shard_id].stats.remote())  # the same handle reaches the new one
    assert stats.num_blocks == 0  # it came back empty: its blocks were in its memory

    def stored_again() -> bool:  # (a put skips a shard the client saw down a moment ago)
        wait_puts(client.put_many(keys, blocks), 10.0)
        return len(client.get_many(keys, timeout_s=10.0).blocks) == len(keys)

    wait_until(stored_again, 30, "the restarted shard serving puts and gets")
