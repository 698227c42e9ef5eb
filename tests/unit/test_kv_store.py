"""The cluster KV store without Ray: hash ring, shard budget and LRU, pins, the client's fan-out,
replication through a lost shard, timeouts, and tenants kept apart."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.block_key import KeySpace, KVLayout, ring_point
from cache.hash_ring import HashRing
from cache.kv_store import StoreShard
from cache.prefix_hash import hash_blocks, root_hash
from cluster.kv_store.client import local_store, wait_puts
from cluster.kv_store.config import KVStoreConfig

SPACE = KeySpace("m", KVLayout("float32", 1, 1, 4, 4))


def keys(n: int, salt: str = "", start: int = 0) -> list[bytes]:
    return SPACE.keys(salt, hash_blocks(list(range(start, start + 4 * n)), 4, root=root_hash(salt)))


def block(fill: int, size: int = 64) -> np.ndarray:
    return np.full(size, fill % 256, dtype=np.uint8)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- ring ---------------------------------------------------------------------------------------


def test_ring_spreads_keys_and_moves_few_on_a_loss() -> None:
    shards = [f"s{i}" for i in range(4)]
    ring = HashRing(shards, virtual_nodes=64)
    points = [ring_point(k) for k in keys(4000)]
    owners = [ring.owners(p, 1)[0] for p in points]
    counts = Counter(owners)
    assert min(counts.values()) > 0.5 * 1000 and max(counts.values()) < 1.5 * 1000
    after = [ring.owners(p, 1, down={"s0"})[0] for p in points]
    moved = sum(1 for a, b in zip(owners, after, strict=True) if a != b)
    assert moved == counts["s0"]  # only s0's keys moved
    assert all(len(set(ring.owners(p, 3))) == 3 for p in points[:50])
    assert ring.owners(points[0], 2, down=set(shards)) == []


def test_ring_checks_name_the_field() -> None:
    with pytest.raises(ValueError, match="virtual_nodes=0"):
        HashRing(["a"], 0)
    with pytest.raises(ValueError, match="shards"):
        HashRing([], 8)


# --- shard --------------------------------------------------------------------------------------


def test_shard_holds_its_budget_evicting_lru_and_remembers_evictions() -> None:
    clock = Clock()
    shard = StoreShard("s", capacity_bytes=64 * 10, clock=clock)
    ks = keys(15)
    for i, k in enumerate(ks[:10]):
        clock.now = float(i)
        shard.put_many([k], [block(i)])
    shard.get_many([ks[0]])  # block 0 becomes most recent: block 1 goes first
    clock.now = 20.0
    shard.put_many(ks[10:12], [block(10), block(11)])
    assert shard.num_bytes <= 640 and len(shard) == 10
    reply = shard.get_many([ks[0], ks[1], ks[2], ks[3], ks[14]])
    assert [b is not None for b in reply.blocks] == [True, False, False, True, False]
    assert reply.evicted == [False, True, True, False, False]  # 14: never stored
    assert sorted(reply.eviction_ages) == [18.0, 19.0]  # stored at 2 and 1, sent once
    assert shard.take_eviction_ages() == [] and shard.get_many([ks[0]]).eviction_ages == ()
    assert reply.stats.num_evictions == 2 and reply.stats.num_bytes == 640
    assert reply.blocks[0] is not None and int(reply.blocks[0][0]) == 0


def test_pins_are_evicted_last_capped_and_expire() -> None:
    clock = Clock()
    shard = StoreShard("s", capacity_bytes=64 * 8, max_pinned_share=0.25, clock=clock)
    ks = keys(20)
    shard.put_many(ks[:3], [block(i) for i in range(3)], pin_ttl_s=100)  # cap: 2 blocks pinned
    assert shard.num_pinned_bytes == 128
    shard.put_many(ks[3:15], [block(i) for i in range(3, 15)])
    assert ks[0] in shard and ks[1] in shard and ks[2] not in shard  # the third was unpinned
    clock.now = 200.0  # the pins expired: ordinary blocks again, evicted when room is needed
    shard.put_many(ks[15:20], [block(i) for i in range(15, 20)])
    shard.put_many(keys(8, start=1000), [block(i) for i in range(8)])
    assert ks[0] not in shard and ks[1] not in shard


def test_shard_refuses_bad_input_without_echoing_it() -> None:
    shard = StoreShard("s", capacity_bytes=100)
    with pytest.raises(ValueError, match="over capacity_bytes=100"):
        shard.put_many(keys(1), [block(0, 200)])
    with pytest.raises(ValueError, match="a block key is 24 bytes"):
        shard.get_many([b"x" * 1000])
    with pytest.raises(ValueError, match="allowed <= 4096"):
        shard.get_many(keys(1) * 5000)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 300)), max_size=120))
def test_memory_bound_holds_under_any_puts(puts: list[tuple[int, int]]) -> None:
    shard = StoreShard("s", capacity_bytes=2000)
    pool = keys(41)
    for index, size in puts:
        shard.put_many([pool[index]], [block(index, size)], pin_ttl_s=float(index % 3))
        assert shard.num_bytes <= 2000
        assert shard.num_pinned_bytes <= 500
        assert shard.num_bytes == sum(
            e.block.nbytes for e in [*shard._lru.values(), *shard._pinned.values()]
        )


# --- client -------------------------------------------------------------------------------------


def test_client_fetches_in_parallel_from_owners() -> None:
    client, calls = local_store(3, capacity_bytes=1 << 20)
    ks = keys(30)
    assert wait_puts(client.put_many(ks, [block(i) for i in range(30)]), 5.0)
    assert sum(len(s) for s in calls.shards.values()) == 30
    assert all(len(s) > 0 for s in calls.shards.values())  # spread over the shards
    got = client.get_many(ks + keys(2, start=9999), timeout_s=5.0)
    assert sorted(int(got.blocks[k][0]) for k in ks) == list(range(30))
    assert len(got.blocks) == 30 and not got.failed_shards


def test_tenants_never_fetch_each_others_blocks() -> None:
    client, _ = local_store(2, capacity_bytes=1 << 20)
    a = keys(8, salt="tenant-a")
    assert wait_puts(client.put_many(a, [block(i) for i in range(8)]), 5.0)
    got = client.get_many(keys(8, salt="tenant-b"), timeout_s=5.0)
    assert not got.blocks and not got.evicted  # no hit, and not even "evicted": nothing shared


def test_a_lost_shard_costs_its_blocks_unless_replicated() -> None:
    for replication, expect_all in ((1, False), (2, True)):
        client, calls = local_store(3, capacity_bytes=1 << 20, replication=replication)
        ks = keys(60)
        assert wait_puts(client.put_many(ks, [block(i) for i in range(60)]), 5.0)
        calls.kill("shard-1")
        got = client.get_many(ks, timeout_s=5.0)
        assert (len(got.blocks) == 60) is expect_all, replication
        assert 0 < len(got.blocks) <= 60
        assert "shard-1" in client.down()  # skipped from now on: its keys go to the next owner
        again = client.get_many(ks, timeout_s=5.0)
        assert not again.failed_shards and len(again.blocks) == len(got.blocks)


def test_a_slow_store_is_a_miss_within_the_timeout() -> None:
    client, calls = local_store(2, capacity_bytes=1 << 20)
    ks = keys(4)
    assert wait_puts(client.put_many(ks, [block(i) for i in range(4)]), 5.0)
    calls.latency_s = 0.5
    start = time.monotonic()
    got = client.get_many(ks, timeout_s=0.05)
    assert time.monotonic() - start < 0.3
    assert not got.blocks and got.failed_shards


def test_config_errors_name_the_field_and_limit() -> None:
    with pytest.raises(ValueError, match=r"replication=4 is out of range: allowed \[1, 3\]"):
        KVStoreConfig(replication=4)
    with pytest.raises(ValueError, match="fetch_timeout_s=0"):
        KVStoreConfig(fetch_timeout_s=0)
    assert KVStoreConfig().enabled is False
