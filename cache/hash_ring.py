"""Consistent hashing with virtual nodes: which store shards own a block key.

Each shard puts ``virtual_nodes`` points on a 64-bit ring (blake2b of its id and the point's
index); a key's owners are the first ``replicas`` distinct shards met walking clockwise from
the key's point. Adding or losing a shard moves only the keys next to its points (about 1/N of
them), so a node loss costs the blocks it held and no more; with 2 replicas a key's second
owner still has it. Shards can be skipped (``down``) without rebuilding the ring: the walk
passes them, so a dead shard's keys fall to the shards that would own them without it.
Membership changes (``with_shards``: a node joined or left for good) build a new ring whose
points for the shards that stay are the same, so only the keys next to a joining shard's points
move to it, and only a leaving shard's keys move away. Pure logic: ids and integers.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Collection, Sequence

MAX_VIRTUAL_NODES = 4096


def _point(shard: str, index: int) -> int:
    digest = hashlib.blake2b(f"{shard}#{index}".encode(), digest_size=8, person=b"kv-ring")
    return int.from_bytes(digest.digest(), "little")


class HashRing:
    """A ring of shard ids; ``owners(point, n)`` walks it."""

    def __init__(self, shards: Sequence[str], virtual_nodes: int = 64) -> None:
        if not shards:
            raise ValueError("shards=[] is empty: a ring needs at least one shard")
        if len(set(shards)) != len(shards):
            raise ValueError("shards must be distinct")
        if not 1 <= virtual_nodes <= MAX_VIRTUAL_NODES:
            raise ValueError(
                f"virtual_nodes={virtual_nodes} is out of range: allowed [1, {MAX_VIRTUAL_NODES}]"
            )
        self.shards = tuple(shards)
        self.virtual_nodes = virtual_nodes
        ring = sorted((_point(s, i), s) for s in shards for i in range(virtual_nodes))
        self._points = [p for p, _ in ring]
        self._owners = [s for _, s in ring]

    def owners(self, point: int, count: int, down: Collection[str] = ()) -> list[str]:
        """The first ``count`` distinct shards clockwise from ``point`` (fewer when fewer
        shards are up), skipping the ``down`` ones."""
        want = min(count, len(self.shards) - sum(1 for s in self.shards if s in down))
        found: list[str] = []
        if want <= 0:
            return found
        start = bisect.bisect_left(self._points, point)
        size = len(self._owners)
        for step in range(size):
            shard = self._owners[(start + step) % size]
            if shard not in found and shard not in down:
                found.append(shard)
                if len(found) == want:
                    break
        return found

    def with_shards(self, shards: Sequence[str]) -> HashRing:
        """The ring of ``shards`` (a membership change); the same points for shards in both."""
        return HashRing(shards, self.virtual_nodes)
