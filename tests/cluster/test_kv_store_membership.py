"""Store shard membership on a real Ray cluster: a node added after start-up gets a shard
on the hash ring (its share of the keys goes there), and a removed node's shard leaves it
(the shards that stay keep their blocks: what moved back finds its old copies)."""

from __future__ import annotations

import time

import numpy as np
import ray
from ray.cluster_utils import Cluster

from cache.block_key import KeySpace, KVLayout
from cache.prefix_hash import hash_blocks, root_hash
from cluster.kv_store.client import StoreClient, wait_puts
from cluster.kv_store.config import KVStoreConfig
from cluster.kv_store.membership import ShardMembership, shard_id_of
from cluster.kv_store.relay import RayStoreFactory
from cluster.kv_store.shard_actor import start_store_shards

SPACE = KeySpace("m", KVLayout("float32", 1, 1, 4, 4))
KEYS = SPACE.keys("", hash_blocks(list(range(4 * 200)), 4, root=root_hash("")))


def alive_nodes() -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]


def test_a_node_added_later_gets_a_shard_and_a_removed_one_leaves() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    watcher: ShardMembership | None = None
    try:
        config = KVStoreConfig(enabled=True, capacity_bytes=1 << 24, membership_interval_s=3600.0)
        handles = start_store_shards(config)
        client = RayStoreFactory(tuple(sorted(handles.items())), config).build()
        assert isinstance(client, StoreClient) and isinstance(client.membership, ShardMembership)
        watcher = client.membership
        (head_shard,) = client.ring.shards
        blocks = [np.full(64, i % 256, dtype=np.uint8) for i in range(len(KEYS))]
        assert wait_puts(client.put_many(KEYS, blocks), 30.0)

        node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        change = watcher.step(alive_nodes())
        new_shard = shard_id_of(node.node_id)
        assert change.join == (node.node_id,) and set(client.ring.shards) == {head_shard, new_shard}
        handle = watcher.calls.handles[new_shard]
        assert ray.get(handle.node_id.remote(), timeout=60) == node.node_id  # on the new node
        moved = [k for k in KEYS if client.owners(k, set()) == [new_shard]]
        assert 0 < len(moved) < len(KEYS)  # its share, not all of them
        got = client.get_many(KEYS, timeout_s=30.0)
        assert len(got.blocks) == len(KEYS) - len(moved)  # the rest still on the head's shard
        assert wait_puts(client.put_many(moved, blocks[: len(moved)]), 30.0)
        assert ray.get(handle.stats.remote(), timeout=30).num_blocks == len(moved)

        cluster.remove_node(node)
        deadline = time.monotonic() + 60
        while node.node_id in alive_nodes() and time.monotonic() < deadline:
            time.sleep(0.5)
        change = watcher.step(alive_nodes())
        assert change.leave == (new_shard,) and client.ring.shards == (head_shard,)
        again = client.get_many(KEYS, timeout_s=30.0)
        # the head's shard owns every key again, and still holds the copies it had before
        assert len(again.blocks) == len(KEYS) and not again.failed_shards
    finally:
        if watcher is not None:
            watcher.stop()
        ray.shutdown()
        cluster.shutdown()
