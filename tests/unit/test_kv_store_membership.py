"""Store shard membership: a node that joins gets a shard on the ring, one that leaves takes
its shard off it, and consistent hashing moves only that shard's share of the keys. Also the
store-side eviction ages, exported per shard by the client that reads them."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from cache.block_key import KeySpace, KVLayout, ring_point
from cache.hash_ring import HashRing
from cache.kv_store import StoreShard
from cache.prefix_hash import hash_blocks, root_hash
from cluster.kv_store import client as client_module
from cluster.kv_store.client import local_store, wait_puts
from cluster.kv_store.config import KVStoreConfig
from cluster.kv_store.membership import ShardMembership, plan_membership, shard_id_of
from cluster.telemetry.metrics import Metrics

SPACE = KeySpace("m", KVLayout("float32", 1, 1, 4, 4))
KEYS = SPACE.keys("", hash_blocks(list(range(4 * 4000)), 4, root=root_hash("")))
POINTS = [ring_point(k) for k in KEYS]


def owners(ring: HashRing) -> list[str]:
    return [ring.owners(p, 1)[0] for p in POINTS]


def test_a_joining_shard_takes_only_its_share() -> None:
    before = HashRing([f"s{i}" for i in range(4)], virtual_nodes=64)
    after = before.with_shards([f"s{i}" for i in range(5)])
    old, new = owners(before), owners(after)
    moved = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    assert all(b == "s4" for _, b in moved)  # every key that moved went to the new shard
    assert 0.1 * len(KEYS) < len(moved) < 0.3 * len(KEYS)  # about 1/5 of them


def test_a_leaving_shard_moves_only_its_keys() -> None:
    before = HashRing([f"s{i}" for i in range(4)], virtual_nodes=64)
    after = before.with_shards(["s0", "s1", "s3"])
    old, new = owners(before), owners(after)
    moved = [a for a, b in zip(old, new, strict=True) if a != b]
    assert Counter(moved) == Counter({"s2": Counter(old)["s2"]})
    with pytest.raises(ValueError, match="shards"):
        before.with_shards([])


def test_plan_names_joining_nodes_and_leaving_shards() -> None:
    a, b, c = "a" * 16 + "x" * 40, "b" * 16 + "y" * 40, "c" * 16 + "z" * 40
    change = plan_membership({shard_id_of(a), shard_id_of(b)}, [a, c])
    assert change.join == (c,) and change.leave == (shard_id_of(b),)
    assert not plan_membership({shard_id_of(a)}, [a])
    assert not plan_membership({shard_id_of(a)}, [])  # no node seen: a failed look, not a loss


def test_client_follows_a_membership_change_keeping_the_stayers_blocks() -> None:
    client, calls = local_store(3, capacity_bytes=1 << 20)
    ks = KEYS[:300]
    assert wait_puts(client.put_many(ks, [bytes_block(i) for i in range(300)]), 5.0)
    calls.add(StoreShard("shard-3", 1 << 20))
    client.set_shards(["shard-0", "shard-1", "shard-2", "shard-3"])
    got = client.get_many(ks, timeout_s=5.0)
    moved = [k for k in ks if client.owners(k, set()) == ["shard-3"]]
    assert 0 < len(moved) < 150 and len(got.blocks) == 300 - len(moved)  # only its share missed
    assert wait_puts(client.put_many(moved, [bytes_block(0)] * len(moved)), 5.0)
    assert len(calls.shards["shard-3"]) == len(moved)
    client.set_shards(["shard-0", "shard-2", "shard-3"])  # shard-1's node left
    assert all("shard-1" not in client.owners(k, set()) for k in ks)
    assert "shard-1" not in client.stats


class FakeCalls:
    handles: dict[str, Any]

    def __init__(self, handles: dict[str, Any]) -> None:
        self.handles = handles


def test_membership_step_starts_joining_shards_then_swaps_the_ring(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = "a" * 16 + "0" * 40, "b" * 16 + "1" * 40
    client, _ = local_store(1, capacity_bytes=1 << 20)
    client.set_shards([shard_id_of(a)])
    calls = FakeCalls({shard_id_of(a): "handle-a"})
    started: list[list[str]] = []

    def start(config: KVStoreConfig, nodes: list[str]) -> dict[str, Any]:
        started.append(nodes)
        return {shard_id_of(n): f"handle-{n[0]}" for n in nodes}

    monkeypatch.setattr("cluster.kv_store.shard_actor.start_store_shards", start)
    config = KVStoreConfig(enabled=True, membership_interval_s=3600.0)
    watcher = ShardMembership(client, calls, config)
    try:
        change = watcher.step([a, b])
        assert change.join == (b,) and started == [[b]]
        assert calls.handles == {shard_id_of(a): "handle-a", shard_id_of(b): "handle-b"}
        assert set(client.ring.shards) == {shard_id_of(a), shard_id_of(b)}
        assert not watcher.step([a, b]) and started == [[b]]  # nothing new: nothing started
        watcher.step([b])
        assert client.ring.shards == (shard_id_of(b),) and list(calls.handles) == [shard_id_of(b)]
    finally:
        watcher.stop()


def test_store_eviction_ages_are_exported_per_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    reader = InMemoryMetricReader()
    metrics = Metrics(MeterProvider(metric_readers=[reader]).get_meter("test"))

    class Telemetry:
        pass

    telemetry = Telemetry()
    telemetry.metrics = metrics  # type: ignore[attr-defined]
    monkeypatch.setattr(client_module, "get_telemetry", lambda: telemetry)
    client, calls = local_store(1, capacity_bytes=1 << 20)
    calls.shards["shard-0"] = StoreShard("shard-0", capacity_bytes=64 * 4)
    ks = KEYS[:6]
    assert wait_puts(client.put_many(ks, [bytes_block(i) for i in range(6)]), 5.0)
    client.get_many(ks[:1], timeout_s=5.0)  # the reply carries the two evictions' ages
    data = reader.get_metrics_data()
    assert data is not None
    points = [
        (dict(p.attributes or {}), p.count)
        for m in data.resource_metrics[0].scope_metrics[0].metrics
        if m.name == "moe.kv.block_age_at_eviction"
        for p in m.data.data_points
        if isinstance(p, HistogramDataPoint)
    ]
    assert points == [({"moe.kv.where": "store", "moe.kv_store.shard": "shard-0"}, 2)]


def bytes_block(fill: int) -> Any:
    import numpy as np

    return np.full(64, fill % 256, dtype=np.uint8)
