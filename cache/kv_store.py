"""One shard of the cluster KV store: blocks in host memory under a byte budget, LRU eviction.

A block is an opaque buffer (a flat ``uint8`` numpy array holding one block's K/V in the
writer's layout, which its key's namespace names) under its ``BlockKey``. The shard keeps at
most ``capacity_bytes`` of them; storing past the budget evicts least recently used blocks
first. Pinned blocks (a prefix someone asked to keep, for a time to live) sit in an LRU order of
their own and are evicted only when no unpinned block is left; pins are soft: pinned bytes are
capped at ``max_pinned_share`` of the budget (a block past the cap is stored unpinned) and an
expired pin is an ordinary block again. Evicted keys are remembered (a bounded set), so a miss
can say whether the store once had the block.

Tenant occupancy: a namespace (one tenant of one model and layout: the key's first bytes)
holding ``max_tenant_share`` of the budget or more makes room by evicting its own oldest blocks,
never another's: one tenant's traffic displaces at most that share of the others' blocks. Under
its share it evicts by the shard's LRU as usual, and with free room anyone may grow past it, so
a shard with one tenant still uses its whole budget.

Plain logic: no Ray, no torch (``cluster.kv_store`` hosts it in an actor). Not thread-safe:
the actor holds a lock around it. Messages on the store channel are below.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from cache.block_key import KEY_BYTES, NAMESPACE_BYTES, BlockKey

MAX_KEYS_PER_CALL = 4096  # a request for more is refused (a bounded message)
_REMEMBER_EVICTED = 16_384  # evicted keys remembered for miss reasons (~1.5 MiB)
_EVICTION_AGES_KEPT = 1024  # ages at eviction kept between two ``take_eviction_ages``


@dataclass(frozen=True)
class ShardStats:
    """A shard's occupancy and totals at one moment."""

    shard_id: str
    num_blocks: int
    num_bytes: int
    capacity_bytes: int
    num_pinned_bytes: int
    num_lookups: int  # keys asked for by get_many
    num_hits: int
    num_stored: int
    num_evictions: int

    @property
    def hit_rate(self) -> float:
        return self.num_hits / self.num_lookups if self.num_lookups else 0.0


@dataclass(frozen=True)
class GetReply:
    """``blocks[i]`` for ``keys[i]`` (None: a miss); ``evicted[i]``: a miss of a key this shard
    evicted (as far as it remembers); and the shard's stats, for metrics without extra calls."""

    blocks: list[np.ndarray | None]
    evicted: list[bool]
    stats: ShardStats
    # seconds each block evicted since the shard's last reply had been stored (each age goes
    # to one reader only, which exports it)
    eviction_ages: tuple[float, ...] = ()


@dataclass(frozen=True)
class FetchResult:
    """What a store client found for some keys (the keys it was not asked for are absent)."""

    blocks: dict[BlockKey, np.ndarray] = field(default_factory=dict)
    evicted: frozenset[BlockKey] = frozenset()  # misses some owner had evicted
    failed_shards: tuple[str, ...] = ()  # shards that failed or did not answer in time


class BlockStore(Protocol):
    """What an engine asks of the cluster KV store (a client over its shards)."""

    def get_many(self, keys: Sequence[BlockKey], timeout_s: float) -> FetchResult:
        """Look the keys up on their owners in parallel; misses, late or failed shards are
        simply absent from the result (never an exception)."""
        ...

    def put_many(
        self, keys: Sequence[BlockKey], blocks: Sequence[np.ndarray], pin_ttl_s: float = 0.0
    ) -> Sequence[Future[int]]:
        """Store blocks on their owners; each future says when one shard took its share
        (a caller that does not care drops them)."""
        ...


class _Entry(NamedTuple):
    block: np.ndarray
    stored_at: float
    pinned_until: float  # 0: not pinned


def check_keys(keys: Sequence[BlockKey]) -> None:
    """Refuse a malformed or oversized key list (the caller's bug, never silently served)."""
    if len(keys) > MAX_KEYS_PER_CALL:
        raise ValueError(f"{len(keys)} keys in one call: allowed <= {MAX_KEYS_PER_CALL}")
    for key in keys:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a block key is {KEY_BYTES} bytes")


class StoreShard:
    """Blocks under a byte budget: unpinned LRU first, then pinned LRU (see the module doc)."""

    def __init__(
        self,
        shard_id: str,
        capacity_bytes: int,
        max_pinned_share: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        max_tenant_share: float = 1.0,
    ) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes={capacity_bytes} is out of range: allowed >= 1")
        if not 0.0 <= max_pinned_share <= 1.0:
            raise ValueError(f"max_pinned_share={max_pinned_share} is out of range: [0, 1]")
        self.shard_id = shard_id
        self.capacity_bytes = capacity_bytes
        self.max_pinned_bytes = int(capacity_bytes * max_pinned_share)
        if not 0.0 < max_tenant_share <= 1.0:
            raise ValueError(f"max_tenant_share={max_tenant_share} is out of range: (0, 1]")
        self.max_tenant_bytes = int(capacity_bytes * max_tenant_share)
        # per namespace: its keys, least recently used first, and their bytes
        self._tenant_keys: dict[bytes, OrderedDict[BlockKey, None]] = {}
        self._tenant_bytes: dict[bytes, int] = {}
        self.clock = clock
        self._lru: OrderedDict[BlockKey, _Entry] = OrderedDict()  # unpinned, LRU first
        self._pinned: OrderedDict[BlockKey, _Entry] = OrderedDict()
        self._evicted: OrderedDict[BlockKey, None] = OrderedDict()
        self._ages: list[float] = []
        self._next_expiry = float("inf")  # the earliest pin's end
        self.num_bytes = 0
        self.num_pinned_bytes = 0
        self.num_lookups = self.num_hits = self.num_stored = self.num_evictions = 0

    def __len__(self) -> int:
        return len(self._lru) + len(self._pinned)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._lru or key in self._pinned

    def put_many(
        self, keys: Sequence[BlockKey], blocks: Sequence[np.ndarray], pin_ttl_s: float = 0.0
    ) -> int:
        """Store each block (a present key is refreshed, its bytes kept); returns how many
        were new. A block larger than the whole budget is refused."""
        check_keys(keys)
        if len(keys) != len(blocks):
            raise ValueError(f"{len(keys)} keys for {len(blocks)} blocks")
        now = self.clock()
        if now >= self._next_expiry:
            self._expire_pins(now)
        pinned_until = now + pin_ttl_s if pin_ttl_s > 0 else 0.0
        stored = 0
        for key, block in zip(keys, blocks, strict=True):
            size = block.nbytes
            if size > self.capacity_bytes:
                raise ValueError(
                    f"a block of {size} bytes is over capacity_bytes={self.capacity_bytes}"
                )
            old = self._pop(key)
            if old is not None:  # refreshed: same key, same K/V (a twin's); keep the oldest
                block, now_at = old.block, old.stored_at
                size = block.nbytes
            else:
                now_at = now
                stored += 1
            self._make_room(size, key[:NAMESPACE_BYTES])
            pin = pinned_until if self.num_pinned_bytes + size <= self.max_pinned_bytes else 0.0
            pin = max(pin, old.pinned_until if old is not None else 0.0)
            self._insert(key, _Entry(block, now_at, pin))
            self._evicted.pop(key, None)
        self.num_stored += stored
        return stored

    def get_many(self, keys: Sequence[BlockKey]) -> GetReply:
        """The blocks of ``keys`` (None for misses), each hit made most recently used."""
        check_keys(keys)
        blocks: list[np.ndarray | None] = []
        evicted: list[bool] = []
        for key in keys:
            entry = self._lru.get(key)
            if entry is not None:
                self._lru.move_to_end(key)
            else:
                entry = self._pinned.get(key)
                if entry is not None:
                    self._pinned.move_to_end(key)
            if entry is not None:
                self._tenant_keys[key[:NAMESPACE_BYTES]].move_to_end(key)
            blocks.append(None if entry is None else entry.block)
            evicted.append(entry is None and key in self._evicted)
        self.num_lookups += len(keys)
        self.num_hits += sum(1 for b in blocks if b is not None)
        return GetReply(blocks, evicted, self.stats(), tuple(self.take_eviction_ages()))

    def stats(self) -> ShardStats:
        return ShardStats(
            self.shard_id,
            len(self),
            self.num_bytes,
            self.capacity_bytes,
            self.num_pinned_bytes,
            self.num_lookups,
            self.num_hits,
            self.num_stored,
            self.num_evictions,
        )

    def take_eviction_ages(self) -> list[float]:
        """Seconds each block evicted since the last call had been stored (the last 1024)."""
        ages, self._ages = self._ages, []
        return ages

    def clear(self) -> None:
        self._lru.clear()
        self._pinned.clear()
        self.num_bytes = self.num_pinned_bytes = 0
        self._next_expiry = float("inf")
        self._tenant_keys.clear()
        self._tenant_bytes.clear()

    def tenant_bytes(self, namespace: bytes) -> int:
        """Bytes held for one namespace (a key's first ``NAMESPACE_BYTES``)."""
        return self._tenant_bytes.get(namespace, 0)

    def _insert(self, key: BlockKey, entry: _Entry) -> None:
        self.num_bytes += entry.block.nbytes
        ns = key[:NAMESPACE_BYTES]
        self._tenant_keys.setdefault(ns, OrderedDict())[key] = None
        self._tenant_bytes[ns] = self._tenant_bytes.get(ns, 0) + entry.block.nbytes
        if entry.pinned_until:
            self._pinned[key] = entry
            self.num_pinned_bytes += entry.block.nbytes
            self._next_expiry = min(self._next_expiry, entry.pinned_until)
        else:
            self._lru[key] = entry

    def _pop(self, key: BlockKey) -> _Entry | None:
        entry = self._lru.pop(key, None)
        if entry is None:
            entry = self._pinned.pop(key, None)
            if entry is not None:
                self.num_pinned_bytes -= entry.block.nbytes
        if entry is not None:
            self.num_bytes -= entry.block.nbytes
            ns = key[:NAMESPACE_BYTES]
            self._tenant_bytes[ns] -= entry.block.nbytes
            del self._tenant_keys[ns][key]
            if not self._tenant_keys[ns]:
                del self._tenant_keys[ns], self._tenant_bytes[ns]
        return entry

    def _make_room(self, size: int, namespace: bytes) -> None:
        """Evict until ``size`` more bytes fit: unpinned LRU (expired pins first), then pins;
        a namespace at its share evicts its own blocks (module doc)."""
        while self.num_bytes + size > self.capacity_bytes:
            own = self._tenant_keys.get(namespace)
            if own and self.tenant_bytes(namespace) + size > self.max_tenant_bytes:
                key = self._oldest_of(namespace)
            else:
                key = next(iter(self._lru if self._lru else self._pinned))
            entry = self._pop(key)
            assert entry is not None, "an evicted key must be held"
            self.num_evictions += 1
            if len(self._ages) < _EVICTION_AGES_KEPT:
                self._ages.append(self.clock() - entry.stored_at)
            self._evicted[key] = None
            if len(self._evicted) > _REMEMBER_EVICTED:
                self._evicted.popitem(last=False)

    def _oldest_of(self, namespace: bytes) -> BlockKey:
        """The namespace's least recently used unpinned block, else its oldest pinned one."""
        keys = self._tenant_keys[namespace]
        return next((k for k in keys if k in self._lru), next(iter(keys)))

    def _expire_pins(self, now: float) -> None:
        """Expired pins become ordinary blocks, first in line for eviction."""
        for key in [k for k, e in self._pinned.items() if e.pinned_until <= now]:
            entry = self._pinned.pop(key)
            self.num_pinned_bytes -= entry.block.nbytes
            self._lru[key] = entry._replace(pinned_until=0.0)
            self._lru.move_to_end(key, last=False)
        self._next_expiry = min(
            (e.pinned_until for e in self._pinned.values()), default=float("inf")
        )
