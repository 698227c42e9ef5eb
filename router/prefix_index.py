"""Which replica holds which KV blocks, kept from the engines' own KV events.

Each replica's engine streams numbered batches of block keys stored and removed
(``cluster.engine.kv_events``). The index applies them per replica and answers, for a
request's chain of block keys, how many leading blocks each replica holds. A key maps to a
bitmask of the replicas holding it, so a lookup walks the chain once, intersecting masks, and
stops when no replica holds the next block: O(blocks + replicas), whatever the replica count.

Resynchronisation: a batch of a new epoch means the replica restarted with an empty cache (its
keys are dropped at once); a gap in sequence numbers means events were lost (its keys are kept,
stale but mostly right, and the replica is reported ``needs_snapshot`` until a snapshot batch
replaces them). Routed-but-unconfirmed blocks (``expect``) count as held for a short while, so
a burst of requests sharing a new prefix, or a session's next turn, does not outrun the events.
Pins: a batch's ``pinned`` (key, seconds left) marks blocks a replica keeps pinned; the index
keeps each pin until it ends (on its own clock), the block is removed, or a snapshot replaces
the replica's picture, and ``pinned_prefix`` says how many leading blocks each replica holds
pinned (a router's preference, never a requirement).
Torch-free and Ray-free: ids, keys and integers, with an injected clock.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat, takewhile
from operator import and_, neg
from typing import Protocol

from cache.block_key import BlockKey

WALK_CHUNK = 16  # keys walked per C pass
GALLOP_REPLICAS = 4  # at most this many replicas left: bisect each one's extent
CREDIT_SCAN = 8  # more replicas than this credited at once: one pass over the replicas


class KVEvents(Protocol):
    """A batch of an engine's KV events (``cluster.engine.kv_events.KVEventBatch``)."""

    @property
    def epoch(self) -> str: ...
    @property
    def seq_no(self) -> int: ...
    @property
    def stored(self) -> tuple[BlockKey, ...]: ...
    @property
    def removed(self) -> tuple[BlockKey, ...]: ...
    @property
    def snapshot(self) -> bool: ...


@dataclass
class _Replica:
    bit: int
    keys: set[BlockKey]
    epoch: str | None = None
    next_seq: int = 0
    needs_snapshot: bool = True  # nothing known yet
    pins: set[BlockKey] | None = None  # keys it announced pinned (None: none yet)


class PrefixIndex:
    """Block keys per replica (bitmasks per key), fed by KV events."""

    def __init__(
        self,
        expect_ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        exact: bool = False,
    ) -> None:
        self.expect_ttl_s = expect_ttl_s
        self.exact = exact  # walk every key, never bisect (see ``matches``)
        self.clock = clock
        self._replicas: dict[str, _Replica] = {}
        self._ids: list[str | None] = []  # bit -> replica id (None: a free bit)
        self._by_mask: dict[int, str] = {}  # 1 << bit -> replica id (live bits only)
        self._holders: dict[BlockKey, int] = {}  # key -> bitmask of replicas holding it
        self._either: dict[BlockKey, int] = {}  # key -> holders | expected (what lookups read)
        self._expiry: deque[tuple[float, tuple[BlockKey, ...], int]] = deque()
        # bit -> key -> latest expiry: the keys each replica is expected to hold (routed to it,
        # not confirmed yet); a key's expected mask is the bits whose dict has it
        self._until: dict[int, dict[BlockKey, float]] = {}
        self._alive = 0  # bitmask of the replicas known
        self._pins: dict[BlockKey, dict[int, float]] = {}  # key -> {bit: pinned until}

    @property
    def replicas(self) -> list[str]:
        return list(self._replicas)

    def add_replica(self, replica: str) -> None:
        if replica in self._replicas:
            return
        bit = self._ids.index(None) if None in self._ids else len(self._ids)
        if bit == len(self._ids):
            self._ids.append(replica)
        else:
            self._ids[bit] = replica
        self._by_mask[1 << bit] = replica
        self._replicas[replica] = _Replica(bit, set())
        self._alive |= 1 << bit

    def remove_replica(self, replica: str) -> None:
        state = self._replicas.pop(replica, None)
        if state is None:
            return
        self._drop_keys(state)
        self._ids[state.bit] = None
        self._by_mask.pop(1 << state.bit, None)
        self._alive &= ~(1 << state.bit)
        mask = ~(1 << state.bit)
        for key in self._until.pop(1 << state.bit, {}):
            if key in self._either:
                self._set(self._either, key, self._either[key] & mask)

    def cursors(self) -> dict[str, tuple[str, int]]:
        """Per replica, (epoch, next sequence number) of the events applied so far."""
        return {r: (s.epoch or "", s.next_seq) for r, s in self._replicas.items()}

    def needs_snapshot(self, replica: str) -> bool:
        state = self._replicas.get(replica)
        return state is not None and state.needs_snapshot

    def num_keys(self, replica: str) -> int:
        return len(self._replicas[replica].keys)

    def apply(self, replica: str, batch: KVEvents) -> bool:
        """Apply one batch; False when the replica's picture is now stale (a gap): ask it for
        a snapshot. A new epoch (a restart) clears the replica's keys first."""
        self.expire()
        state = self._replicas.get(replica)
        if state is None:
            self.add_replica(replica)
            state = self._replicas[replica]
        if batch.epoch != state.epoch:  # a restarted engine: its cache is empty now
            self._drop_keys(state)
            state.epoch, state.next_seq = batch.epoch, batch.seq_no
            state.needs_snapshot = not batch.snapshot and batch.seq_no != 0
        pinned: tuple[tuple[BlockKey, float], ...] = getattr(batch, "pinned", ())
        if batch.snapshot:
            self._drop_keys(state)
            self._store(state, batch.stored)
            self._pin(state, pinned)
            state.next_seq, state.needs_snapshot = batch.seq_no + 1, False
            return True
        if batch.seq_no < state.next_seq:
            return not state.needs_snapshot  # an old duplicate
        if batch.seq_no > state.next_seq:
            state.needs_snapshot = True  # events were lost: keep what we know, resync
        self._store(state, batch.stored)
        self._remove(state, batch.removed)
        self._pin(state, pinned)
        state.next_seq = batch.seq_no + 1
        return not state.needs_snapshot

    def expect(self, replica: str, keys: Iterable[BlockKey]) -> None:
        """Count ``keys`` as held by ``replica`` until its events confirm them or
        ``expect_ttl_s`` passes (a request was just routed there)."""
        state = self._replicas.get(replica)
        if state is None:
            return
        bit = 1 << state.bit
        batch = tuple(keys)
        until = self.clock() + self.expect_ttl_s
        either = self._either
        latest = self._until.get(bit)
        if latest is None:
            latest = self._until[bit] = {}
        for key in batch:
            either[key] = either.get(key, 0) | bit
            latest[key] = until
        self._expiry.append((until, batch, bit))

    def matches(self, keys: Sequence[BlockKey]) -> dict[str, int]:
        """Per replica holding at least the first key, how many leading ``keys`` it holds
        (or is expected to); replicas absent hold none. Expectations past their time are
        dropped by ``expire`` (called with every event batch), off the lookup's path.

        The chain is walked ``WALK_CHUNK`` keys at a time: per chunk, the running AND of the
        holders' masks (C loops: a map, an accumulate, a bisection per change). Unless
        ``exact``, once at most ``GALLOP_REPLICAS`` replicas are left, each one's extent is
        found by bisection, which assumes it holds a prefix of the rest of the chain: an
        engine frees a sequence's blocks last first, so its later blocks are evicted before
        its earlier ones, and a hole costs only an overestimate (a cost mistaken, never a
        wrong token)."""
        matched: dict[str, int] = {}
        get = self._either.get
        alive, pos, n = self._alive, 0, len(keys)
        while pos < n and alive:
            end = min(n, pos + WALK_CHUNK)
            held = map(get, keys[pos:end], repeat(0))
            running = list(takewhile(bool, accumulate(held, and_, initial=alive)))
            alive = self._walk(matched, running, pos)
            if len(running) <= end - pos:  # cut: nobody holds the next key
                if pos + len(running) - 1 > 0:
                    self._credit(matched, alive, pos + len(running) - 1)
                return matched
            pos = end
            if not self.exact and pos < n and alive.bit_count() <= GALLOP_REPLICAS:
                while alive:
                    low = alive & -alive
                    self._credit(matched, low, self._extent(keys, pos, low))
                    alive ^= low
                return matched
        if alive and n:
            self._credit(matched, alive, n)
        return matched

    def _walk(self, matched: dict[str, int], running: list[int], pos: int) -> int:
        """Credit the replicas that drop within one chunk's running AND (``running[i]``: the
        holders of every key up to ``pos + i - 1``); returns those left at its end."""
        alive, i, end = running[0], 1, len(running)
        while i < end:
            i = bisect_right(running, -alive, lo=i, key=neg)  # first index holding fewer
            if i == end:
                break
            now_alive = running[i]
            if pos + i - 1 > 0:  # (those that lack the first key match nothing: left out)
                self._credit(matched, alive & ~now_alive, pos + i - 1)
            alive = now_alive
        return alive

    def _extent(self, keys: Sequence[BlockKey], start: int, bit: int) -> int:
        """The first index from ``start`` whose key the replica of ``bit`` lacks, by
        bisection (the keys it holds taken as a prefix of ``keys[start:]``)."""
        get, low, high = self._either.get, start, len(keys)
        while low < high:
            mid = (low + high) // 2
            if get(keys[mid], 0) & bit:
                low = mid + 1
            else:
                high = mid
        return low

    def _credit(self, matched: dict[str, int], mask: int, count: int) -> None:
        by_mask = self._by_mask
        if mask.bit_count() > CREDIT_SCAN:  # many at once (a shared system prompt's holders)
            matched.update({r: count for low, r in by_mask.items() if low & mask})
            return
        while mask:
            low = mask & -mask
            replica = by_mask.get(low)
            if replica is not None:
                matched[replica] = count
            mask ^= low

    @property
    def has_pins(self) -> bool:
        return bool(self._pins)

    def pinned_prefix(self, keys: Sequence[BlockKey]) -> dict[str, int]:
        """Per replica, how many leading ``keys`` it holds pinned now (absent: none). Walks
        only while some replica has the next key pinned (pins cover a prompt's first blocks).
        """
        now, pins = self.clock(), self._pins
        counts: dict[str, int] = {}
        for i, key in enumerate(keys):
            held = pins.get(key)
            if not held:
                break
            grew = False
            for bit, until in held.items():
                replica = self._ids[bit]
                if until > now and replica is not None and counts.get(replica, 0) == i:
                    counts[replica] = i + 1
                    grew = True
            if not grew:
                break
        return counts

    def _pin(self, state: _Replica, pinned: Iterable[tuple[BlockKey, float]]) -> None:
        now = self.clock()
        for key, seconds_left in pinned:
            if key in state.keys and seconds_left > 0:
                self._pins.setdefault(key, {})[state.bit] = now + seconds_left
                if state.pins is None:
                    state.pins = set()
                state.pins.add(key)

    def _unpin(self, state: _Replica, keys: Iterable[BlockKey]) -> None:
        if not state.pins:
            return
        for key in keys:
            if key in state.pins:
                state.pins.discard(key)
                held = self._pins.get(key)
                if held is not None:
                    held.pop(state.bit, None)
                    if not held:
                        del self._pins[key]

    def _store(self, state: _Replica, keys: Iterable[BlockKey]) -> None:
        bit = 1 << state.bit
        holders, either = self._holders, self._either
        for key in keys:
            state.keys.add(key)
            holders[key] = holders.get(key, 0) | bit
            either[key] = either.get(key, 0) | bit

    def _remove(self, state: _Replica, keys: Iterable[BlockKey]) -> None:
        mask = ~(1 << state.bit)
        if state.pins:
            keys = list(keys)
            self._unpin(state, keys)
        expected = self._until.get(1 << state.bit, {})
        for key in keys:
            state.keys.discard(key)
            if key in self._holders:
                self._set(self._holders, key, self._holders[key] & mask)
                if key not in expected and key in self._either:  # (still expected: kept)
                    self._set(self._either, key, self._either[key] & mask)

    def _drop_keys(self, state: _Replica) -> None:
        self._remove(state, list(state.keys))
        state.keys.clear()

    def expire(self) -> None:
        """Drop the expectations whose time has passed."""
        now = self.clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, batch, bit = self._expiry.popleft()
            latest = self._until.get(bit, {})
            holders, either = self._holders, self._either
            for key in batch:
                if latest.get(key, 0.0) > now:
                    continue  # expected again since: the later expectation holds
                if latest.pop(key, None) is not None and not holders.get(key, 0) & bit:
                    self._set(either, key, either.get(key, 0) & ~bit)  # (not held: dropped)

    @staticmethod
    def _set(table: dict[BlockKey, int], key: BlockKey, mask: int) -> None:
        if mask:
            table[key] = mask
        else:
            table.pop(key, None)
