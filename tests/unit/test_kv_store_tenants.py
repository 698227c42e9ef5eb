"""Tenant occupancy in a store shard: a tenant at its share of the budget evicts its own blocks,
never another's, so one tenant's traffic cannot flush the others'; alone, a tenant still uses
the whole budget. And two salts never see each other's blocks, under any quota."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.block_key import NAMESPACE_BYTES, KeySpace, KVLayout
from cache.kv_store import StoreShard
from cache.prefix_hash import hash_blocks, root_hash
from cluster.kv_store.config import KVStoreConfig

SPACE = KeySpace("m", KVLayout("float32", 1, 1, 4, 4))
BLOCK = 64  # bytes per test block


def keys(n: int, salt: str, start: int = 0) -> list[bytes]:
    return SPACE.keys(salt, hash_blocks(list(range(start, start + 4 * n)), 4, root=root_hash(salt)))


def blocks(n: int, fill: int = 0) -> list[np.ndarray]:
    return [np.full(BLOCK, (fill + i) % 256, dtype=np.uint8) for i in range(n)]


def ns(salt: str) -> bytes:
    return keys(1, salt)[0][:NAMESPACE_BYTES]


def test_a_tenant_at_its_share_evicts_only_its_own() -> None:
    shard = StoreShard("s", capacity_bytes=BLOCK * 10, max_tenant_share=0.5)
    a = keys(5, "tenant-a")
    shard.put_many(a, blocks(5))
    flood = keys(40, "tenant-b")
    for i in range(0, 40, 4):
        shard.put_many(flood[i : i + 4], blocks(4, i))
    assert all(k in shard for k in a)  # b never went past its half while the shard was full
    assert shard.tenant_bytes(ns("tenant-b")) == 5 * BLOCK
    assert all(k in shard for k in flood[-5:])  # b kept its own newest blocks


def test_alone_a_tenant_uses_the_whole_budget() -> None:
    shard = StoreShard("s", capacity_bytes=BLOCK * 10, max_tenant_share=0.5)
    shard.put_many(keys(10, "only"), blocks(10))
    assert len(shard) == 10 and shard.tenant_bytes(ns("only")) == 10 * BLOCK
    shard.put_many(keys(3, "only", start=1000), blocks(3))  # full: its own oldest go
    assert len(shard) == 10


def test_a_tenant_under_its_share_takes_room_from_one_over_it() -> None:
    shard = StoreShard("s", capacity_bytes=BLOCK * 10, max_tenant_share=0.5)
    big = keys(10, "big")
    shard.put_many(big, blocks(10))  # alone: the whole shard
    shard.put_many(keys(3, "small"), blocks(3))  # under its share: the shard's LRU gives way
    assert shard.tenant_bytes(ns("small")) == 3 * BLOCK and sum(k in shard for k in big) == 7


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 30)), max_size=150),
    st.sampled_from([0.25, 0.5, 1.0]),
)
def test_quota_bound_and_isolation_under_any_puts(
    puts: list[tuple[str, int]], share: float
) -> None:
    """Whatever the tenants store: the budget holds, per-tenant bytes add up, a tenant's
    flood past its share removes nothing of the others', and a lookup with one salt finds
    only that salt's blocks (same token ids for every tenant: the keys still differ)."""
    capacity = BLOCK * 12
    shard = StoreShard("s", capacity_bytes=capacity, max_tenant_share=share)
    pools = {t: keys(31, t) for t in "abc"}
    for tenant, index in puts:
        others = {k for t, p in pools.items() if t != tenant for k in p if k in shard}
        over = shard.tenant_bytes(ns(tenant)) + BLOCK > int(capacity * share)
        shard.put_many([pools[tenant][index]], blocks(1, index))
        assert shard.num_bytes <= capacity
        assert sum(shard.tenant_bytes(ns(t)) for t in "abc") == shard.num_bytes
        if over and shard.tenant_bytes(ns(tenant)) > 0:
            assert all(k in shard for k in others), "a tenant at its share evicted another's"
    for tenant, pool in pools.items():
        reply = shard.get_many(pool)
        held = [k for k, b in zip(pool, reply.blocks, strict=True) if b is not None]
        assert all(k[:NAMESPACE_BYTES] == ns(tenant) for k in held)
        other = [k for t, p in pools.items() if t != tenant for k in p]
        assert not set(held) & set(other)


def test_tenant_share_is_checked() -> None:
    with pytest.raises(ValueError, match=r"max_tenant_share=0 is out of range"):
        StoreShard("s", capacity_bytes=100, max_tenant_share=0)
    with pytest.raises(ValueError, match=r"max_tenant_share=2 is out of range: allowed \[0.01"):
        KVStoreConfig(max_tenant_share=2)
