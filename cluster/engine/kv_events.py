"""KV events: which cluster block keys an engine's cache holds, as a numbered stream.

An engine tells request routers what its paged cache holds by events, not by a guess over
prompt text: blocks stored (computed and named, or fetched from the store), blocks removed
(evicted). Each ``KVEventBatch`` carries the engine's ``epoch`` (a fresh id per engine
instance: a restarted replica starts a new one) and a sequence number, so a consumer that sees
a gap, or a new epoch, knows its picture is stale and asks for a snapshot (``snapshot=True``:
``stored`` is then the whole cache, replacing what it knew). The first batch of an epoch is a
snapshot (empty: the cache starts cleared). When nobody drains the log, it does not grow
without bound: past ``max_pending`` keys it drops them and its next batch is a snapshot.

Pins travel with the blocks: a stored block that is pinned is also listed in ``pinned`` with
the seconds left of its pin (relative: clocks differ between processes), and a snapshot lists
every pin still running, so a router can prefer replicas holding pinned prefixes.

The log also remembers which prefix hashes this engine evicted lately and when each block was
stored, for a request's miss reason and the age of blocks at eviction. Torch-free: these
messages cross the engine process's socket and reach routers that never import torch.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cache.block_key import BlockKey, KeySpace, KVLayout

_REMEMBER_EVICTED = 16_384  # evicted prefix hashes kept for miss reasons
_AGES_KEPT = 1024  # ages at eviction kept between two ``take_eviction_ages``


@dataclass(frozen=True)
class KVEventBatch:
    """Blocks an engine's cache gained and lost since its previous batch."""

    epoch: str  # this engine instance's id: another one means a restart
    seq_no: int  # 0, 1, 2, ... within the epoch; a gap means events were missed
    stored: tuple[BlockKey, ...]
    removed: tuple[BlockKey, ...]
    snapshot: bool = False  # ``stored`` is the whole cache (and ``removed`` is empty)
    # seconds each block evicted since the previous batch had been cached (metrics)
    eviction_ages: tuple[float, ...] = ()
    # on snapshots: the engine's key space (model id, KV layout), so that a router names a
    # request's blocks as this engine does
    keyspace: tuple[str, KVLayout] | None = None
    # stored blocks that are pinned, with the seconds left of each pin at the batch's making
    pinned: tuple[tuple[BlockKey, float], ...] = ()


class KVEventLog:
    """The engine's side: records stores and evictions, hands them out as batches."""

    def __init__(
        self, keyspace: KeySpace, clock: Callable[[], float], max_pending: int = 65_536
    ) -> None:
        self.keyspace = keyspace
        self.clock = clock
        self.max_pending = max_pending
        self.epoch = uuid.uuid4().hex[:16]
        self._next_seq = 0
        self._key_of: dict[int, BlockKey] = {}  # prefix hash -> key, for cached blocks
        self._stored_at: dict[int, float] = {}
        self._stored: list[BlockKey] = []
        self._removed: list[BlockKey] = []
        self._need_snapshot = True  # the first batch: the cache starts empty
        self._evicted: OrderedDict[int, None] = OrderedDict()
        self._ages: list[float] = []
        self._pin_until: dict[int, float] = {}  # prefix hash -> its pin's end (this clock)
        self._pinned: list[int] = []  # pinned hashes stored since the last batch

    def stored(
        self, salt: str, hashes: Iterable[int], pin_ttls: Sequence[float] | None = None
    ) -> None:
        """Blocks of tenant ``salt`` named in the cache under these prefix hashes;
        ``pin_ttls[i]`` > 0: the i-th is pinned for that many more seconds."""
        now = self.clock()
        namespace = self.keyspace.namespace(salt)
        for i, block_hash in enumerate(hashes):
            key = namespace + block_hash.to_bytes(8, "little")
            self._key_of[block_hash] = key
            self._stored_at[block_hash] = now
            self._stored.append(key)
            self._evicted.pop(block_hash, None)
            if pin_ttls is not None and pin_ttls[i] > 0:
                self._pin_until[block_hash] = now + pin_ttls[i]
                self._pinned.append(block_hash)
        self._bound()

    def evicted(self, hashes: Iterable[int]) -> None:
        """Cached full blocks evicted from the cache."""
        now = self.clock()
        for block_hash in hashes:
            key = self._key_of.pop(block_hash, None)
            stored_at = self._stored_at.pop(block_hash, None)
            self._pin_until.pop(block_hash, None)
            if key is not None:
                self._removed.append(key)
            if stored_at is not None and len(self._ages) < _AGES_KEPT:
                self._ages.append(now - stored_at)
            self._evicted[block_hash] = None
            if len(self._evicted) > _REMEMBER_EVICTED:
                self._evicted.popitem(last=False)
        self._bound()

    def was_evicted(self, block_hash: int) -> bool:
        """Whether this engine evicted that block lately (and has not stored it since)."""
        return block_hash in self._evicted

    def key_of(self, block_hash: int) -> BlockKey | None:
        return self._key_of.get(block_hash)

    def take(self) -> KVEventBatch | None:
        """The events since the last batch (a snapshot when one is due); None if none."""
        if self._need_snapshot:
            return self.snapshot()
        if not self._stored and not self._removed:
            return None
        stored, removed = tuple(self._stored), tuple(self._removed)
        ages = tuple(self.take_eviction_ages())
        pinned = self._pins(self._pinned)
        batch = KVEventBatch(self.epoch, self._next_seq, stored, removed, False, ages, None, pinned)
        self._next_seq += 1
        self._stored, self._removed, self._pinned = [], [], []
        return batch

    def snapshot(self) -> KVEventBatch:
        """Every key the cache holds now, as the next batch (pending events are folded in)."""
        ages = tuple(self.take_eviction_ages())
        stored = tuple(self._key_of.values())
        space = (self.keyspace.model_id, self.keyspace.layout)
        pinned = self._pins(self._pin_until)
        batch = KVEventBatch(self.epoch, self._next_seq, stored, (), True, ages, space, pinned)
        self._next_seq += 1
        self._stored, self._removed, self._pinned = [], [], []
        self._need_snapshot = False
        return batch

    def request_snapshot(self) -> None:
        """Make the next batch a snapshot (a consumer asked to resynchronise)."""
        self._need_snapshot = True

    def take_eviction_ages(self) -> list[float]:
        """Seconds each block evicted since the last call had been cached (at most 1024)."""
        ages, self._ages = self._ages, []
        return ages

    def _pins(self, hashes: Iterable[int]) -> tuple[tuple[BlockKey, float], ...]:
        """(key, seconds left) of the hashes' pins still running; ended ones are forgotten."""
        now = self.clock()
        for ended in [h for h, until in self._pin_until.items() if until <= now]:
            del self._pin_until[ended]
        return tuple(
            (self._key_of[h], self._pin_until[h] - now)
            for h in dict.fromkeys(hashes)
            if h in self._pin_until and h in self._key_of
        )

    def _bound(self) -> None:
        if len(self._stored) + len(self._removed) > self.max_pending:
            self._stored, self._removed, self._pinned = [], [], []
            self._need_snapshot = True  # nobody is draining: whoever comes next resyncs
