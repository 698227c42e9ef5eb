"""Store shards as Ray actors, one per node, and the ``ShardCalls`` that reach them.

Each shard is a named actor pinned to its node (``NodeAffinitySchedulingStrategy``, not soft:
a shard elsewhere would put two owners of a block on one node), ``num_cpus=0`` (it waits on
calls and copies bytes, it does not compute), with a few threads so that a large put never
holds up a fetch; a lock keeps the ``StoreShard`` consistent. Blocks are numpy arrays: a
reply's arrays go through Ray's object store, so a reader on the shard's node maps them
without a copy, and one on another node gets them in one transfer.

``start_store_shards`` starts (or finds: ``get_if_exists``) a shard on every alive node and
returns their handles by shard id; every caller that lists the same nodes builds the same ring.
A node added later gets no shard until the next start (a restarted application).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from cache.block_key import BlockKey
from cache.kv_store import GetReply, ShardStats, StoreShard
from cluster.kv_store.config import KVStoreConfig

SHARD_NAME_PREFIX = "kv-store-"
_SHARD_THREADS = 4


class KVStoreShardActor:
    """One node's share of the store: a ``StoreShard`` behind a lock."""

    def __init__(
        self,
        shard_id: str,
        capacity_bytes: int,
        max_pinned_share: float,
        max_tenant_share: float = 1.0,
    ) -> None:
        self._shard = StoreShard(
            shard_id, capacity_bytes, max_pinned_share, max_tenant_share=max_tenant_share
        )
        self._lock = threading.Lock()

    def get_many(self, keys: list[BlockKey]) -> GetReply:
        with self._lock:
            return self._shard.get_many(keys)

    def put_many(self, keys: list[BlockKey], blocks: list[np.ndarray], pin_ttl_s: float) -> int:
        # the arrays may be read-only views of the object store: kept as they are (no copy);
        # the object stays alive while the shard holds it
        with self._lock:
            return self._shard.put_many(keys, blocks, pin_ttl_s)

    def stats(self) -> ShardStats:
        with self._lock:
            return self._shard.stats()

    def take_eviction_ages(self) -> list[float]:
        with self._lock:
            return self._shard.take_eviction_ages()

    def node_id(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())


class RayShardCalls:
    """``ShardCalls`` over shard actor handles (Ray's futures, answered by its threads)."""

    def __init__(self, handles: dict[str, Any]) -> None:
        self.handles = dict(handles)

    def get(self, shard: str, keys: list[BlockKey]) -> Future[GetReply]:
        future: Future[GetReply] = self.handles[shard].get_many.remote(keys).future()
        return future

    def put(
        self, shard: str, keys: list[BlockKey], blocks: list[np.ndarray], pin_ttl_s: float
    ) -> Future[int]:
        future: Future[int] = self.handles[shard].put_many.remote(keys, blocks, pin_ttl_s).future()
        return future


def start_store_shards(config: KVStoreConfig, nodes: list[str] | None = None) -> dict[str, Any]:
    """A shard actor on each alive node (or on ``nodes``, node ids), started or found by name.

    Shard ids are the first 16 hex digits of the node id; handles are returned by shard id.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if nodes is None:
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    actor = ray.remote(KVStoreShardActor)
    handles: dict[str, Any] = {}
    for node in nodes:
        shard_id = node[:16]
        options: dict[str, Any] = {
            "name": SHARD_NAME_PREFIX + shard_id,
            "get_if_exists": True,
            # a crashed shard comes back empty on its node (its blocks are recomputed or read
            # from their other owner); callers skip it while it restarts (retry_down_s)
            "max_restarts": -1,
            "num_cpus": 0,
            "max_concurrency": _SHARD_THREADS,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False),
        }
        if config.detached:
            options["lifetime"] = "detached"
        handles[shard_id] = actor.options(**options).remote(
            shard_id, config.capacity_bytes, config.max_pinned_share, config.max_tenant_share
        )
    return handles
