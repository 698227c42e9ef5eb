"""The store client: a key's owners on the hash ring, parallel fan-out, timeouts, lost shards.

``StoreClient`` implements ``cache.kv_store.BlockStore`` over any ``ShardCalls`` (Ray actor
calls in ``cluster.kv_store.shard_actor``, in-process shards here for tests and benchmarks).

get: every key goes to its first live owner, all shards asked at once; what is missing after
that (a miss, a failed or late shard) is asked of the key's next owner, if the replication
factor gives one and time is left. A shard whose call raised is skipped for ``retry_down_s``
(its keys fall to the next shards on the ring). Whatever is not found by ``timeout_s`` is a
miss: the engine recomputes it. Nothing here raises for a shard's failure.

put: each block goes to its ``replication`` first live owners, one call per shard; the caller
(the engine's publisher thread) may wait on the returned futures with a timeout.

Membership: ``set_shards`` swaps in the ring of a new shard set (a node joined or left;
``cluster.kv_store.membership`` watches the nodes): consistent hashing moves only the keys of
the shard that joined or left; a call in flight finishes on the ring it started with.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Protocol, TypeVar

import numpy as np

from cache.block_key import BlockKey, ring_point
from cache.hash_ring import HashRing
from cache.kv_store import FetchResult, GetReply, ShardStats, StoreShard
from cluster.telemetry.setup import get_telemetry

T = TypeVar("T")


class ShardCalls(Protocol):
    """Calls to store shards by id, each answered through a future."""

    def get(self, shard: str, keys: list[BlockKey]) -> Future[GetReply]: ...

    def put(
        self, shard: str, keys: list[BlockKey], blocks: list[np.ndarray], pin_ttl_s: float
    ) -> Future[int]: ...


class StoreClient:
    """``BlockStore`` over shards placed on a consistent-hash ring (see the module doc)."""

    def __init__(
        self,
        calls: ShardCalls,
        shard_ids: Sequence[str],
        replication: int = 1,
        virtual_nodes: int = 64,
        retry_down_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.calls = calls
        self.ring = HashRing(shard_ids, virtual_nodes)
        self.replication = replication
        self.retry_down_s = retry_down_s
        self.clock = clock
        self._down: dict[str, float] = {}  # shard -> when to try it again
        self._lock = threading.Lock()
        self.stats: dict[str, ShardStats] = {}  # the latest each shard reported
        self.membership: object | None = None  # what keeps the shard set current, if any

    def down(self) -> set[str]:
        """Shards skipped now (their call failed less than ``retry_down_s`` ago)."""
        now = self.clock()
        with self._lock:
            for shard in [s for s, until in self._down.items() if until <= now]:
                del self._down[shard]
            return set(self._down)

    def mark_down(self, shard: str) -> None:
        with self._lock:
            self._down[shard] = self.clock() + self.retry_down_s

    def owners(self, key: BlockKey, down: set[str]) -> list[str]:
        return self.ring.owners(ring_point(key), self.replication, down)

    def set_shards(self, shard_ids: Sequence[str]) -> None:
        """The shards are now ``shard_ids`` (their calls must already reach the new ones)."""
        if set(shard_ids) != set(self.ring.shards):
            self.ring = self.ring.with_shards(sorted(shard_ids))  # one assignment: atomic
        with self._lock:
            for gone in [s for s in self._down if s not in shard_ids]:
                del self._down[gone]
        # readers iterate ``stats`` on other threads: a new dict, never one shrunk in place
        self.stats = {s: st for s, st in self.stats.items() if s in shard_ids}

    def get_many(self, keys: Sequence[BlockKey], timeout_s: float) -> FetchResult:
        deadline = time.monotonic() + timeout_s
        down = self.down()
        candidates = {key: self.owners(key, down) for key in keys}
        found: dict[BlockKey, np.ndarray] = {}
        evicted: set[BlockKey] = set()
        failed: set[str] = set()
        for attempt in range(self.replication):
            groups: dict[str, list[BlockKey]] = {}
            for key, owners in candidates.items():
                if key not in found and attempt < len(owners) and owners[attempt] not in failed:
                    groups.setdefault(owners[attempt], []).append(key)
            if not groups or time.monotonic() >= deadline:
                break
            self._ask(groups, deadline, found, evicted, failed)
        evicted -= found.keys()
        return FetchResult(found, frozenset(evicted), tuple(sorted(failed)))

    def _ask(
        self,
        groups: Mapping[str, list[BlockKey]],
        deadline: float,
        found: dict[BlockKey, np.ndarray],
        evicted: set[BlockKey],
        failed: set[str],
    ) -> None:
        """One round: every shard asked at once, answers read until the deadline."""
        pending = {self.calls.get(shard, keys): shard for shard, keys in groups.items()}
        done, late = wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        for future in late:
            future.cancel()
            failed.add(pending[future])
        for future in done:
            shard = pending[future]
            try:
                reply = future.result()
            except Exception:  # a dead or broken shard: its keys are misses, it is skipped
                failed.add(shard)
                self.mark_down(shard)
                continue
            self.stats[shard] = reply.stats
            if reply.eviction_ages:
                get_telemetry().metrics.record_block_ages("", "store", reply.eviction_ages, shard)
            for key, block, was_evicted in zip(
                groups[shard], reply.blocks, reply.evicted, strict=True
            ):
                if block is not None:
                    found[key] = block
                elif was_evicted:
                    evicted.add(key)

    def put_many(
        self, keys: Sequence[BlockKey], blocks: Sequence[np.ndarray], pin_ttl_s: float = 0.0
    ) -> list[Future[int]]:
        """Send each block to its owners; the futures say when each shard took its share."""
        down = self.down()
        groups: dict[str, tuple[list[BlockKey], list[np.ndarray]]] = {}
        for key, block in zip(keys, blocks, strict=True):
            for shard in self.owners(key, down):
                group = groups.setdefault(shard, ([], []))
                group[0].append(key)
                group[1].append(block)
        return [self._put(s, k, b, pin_ttl_s) for s, (k, b) in groups.items()]

    def _put(
        self, shard: str, keys: list[BlockKey], blocks: list[np.ndarray], pin_ttl_s: float
    ) -> Future[int]:
        future = self.calls.put(shard, keys, blocks, pin_ttl_s)
        future.add_done_callback(lambda f: self._after_put(shard, f))
        return future

    def _after_put(self, shard: str, future: Future[int]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.mark_down(shard)


def wait_puts(futures: Sequence[Future[int]], timeout_s: float) -> bool:
    """Wait for a put's shard calls; False if one failed or did not finish in time."""
    done, late = wait(futures, timeout=timeout_s, return_when=FIRST_EXCEPTION)
    return not late and all(f.exception() is None for f in done)


class ShardDownError(ConnectionError):
    """An in-process shard that was made unreachable (a test's dead node)."""


class LocalShardCalls:
    """``ShardCalls`` to ``StoreShard``s in this process, answered on a small thread pool
    (tests and benchmarks; ``kill`` makes one unreachable, like a lost node)."""

    def __init__(self, shards: Mapping[str, StoreShard], latency_s: float = 0.0) -> None:
        self.shards = dict(shards)
        self.latency_s = latency_s
        self.killed: set[str] = set()
        self._locks = {s: threading.Lock() for s in self.shards}
        self._pool = ThreadPoolExecutor(max_workers=max(2, len(self.shards)))

    def kill(self, shard: str) -> None:
        self.killed.add(shard)
        self.shards[shard].clear()

    def add(self, shard: StoreShard) -> None:
        """A shard on a node that joined (before the client's ``set_shards``)."""
        self._locks[shard.shard_id] = threading.Lock()
        self.shards[shard.shard_id] = shard

    def _run(self, shard: str, fn: Callable[[StoreShard], T]) -> T:
        if self.latency_s:
            time.sleep(self.latency_s)
        if shard in self.killed:
            raise ShardDownError(f"store shard {shard!r} is unreachable")
        with self._locks[shard]:
            return fn(self.shards[shard])

    def get(self, shard: str, keys: list[BlockKey]) -> Future[GetReply]:
        return self._pool.submit(self._run, shard, lambda s: s.get_many(keys))

    def put(
        self, shard: str, keys: list[BlockKey], blocks: list[np.ndarray], pin_ttl_s: float
    ) -> Future[int]:
        return self._pool.submit(self._run, shard, lambda s: s.put_many(keys, blocks, pin_ttl_s))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def local_store(
    num_shards: int,
    capacity_bytes: int,
    replication: int = 1,
    latency_s: float = 0.0,
    max_pinned_share: float = 0.25,
    max_tenant_share: float = 1.0,
) -> tuple[StoreClient, LocalShardCalls]:
    """An in-process store of ``num_shards`` shards and its client (tests, benchmarks)."""
    shards = {
        f"shard-{i}": StoreShard(
            f"shard-{i}", capacity_bytes, max_pinned_share, max_tenant_share=max_tenant_share
        )
        for i in range(num_shards)
    }
    calls = LocalShardCalls(shards, latency_s)
    return StoreClient(calls, list(shards), replication), calls
