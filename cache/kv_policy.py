"""Per-request KV retention policies: keep everything, or a window with sinks and anchors.

``full`` keeps every token. ``window`` keeps at most ``window`` tokens in the
cache: the first ``sinks`` tokens (attention sinks), every block touching a
pinned ``anchors`` span (e.g. the system prompt), and the most recent tokens.
As the sequence grows, whole blocks are evicted oldest first. Kept keys keep
the rotary positions they were computed at, and new tokens keep counting
positions, so a windowed sequence sees exactly the attention a dense model
would with the evicted keys masked out. A windowed prompt is prefilled in
chunks of at most ``window`` tokens, evicting between chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

KV_POLICIES = ("full", "window")


@dataclass(frozen=True)
class KVPolicy:
    kind: str = "full"
    window: int = 0  # most tokens kept (window only)
    sinks: int = 0  # first tokens always kept (window only)
    anchors: tuple[tuple[int, int], ...] = ()  # [start, end) token spans always kept

    def __post_init__(self) -> None:
        if self.kind not in KV_POLICIES:
            raise ValueError(f"kv_policy {self.kind!r} is unknown; known: {', '.join(KV_POLICIES)}")
        if self.kind == "full":
            if self.window or self.sinks or self.anchors:
                raise ValueError(
                    f"window={self.window}, sinks={self.sinks}, anchors={list(self.anchors)} "
                    "apply only to kv_policy 'window'"
                )
            return
        if self.window <= 0:
            raise ValueError(f"window={self.window} must be > 0 for kv_policy 'window'")
        if self.sinks < 0:
            raise ValueError(f"sinks={self.sinks} must be >= 0")
        for start, end in self.anchors:
            if not 0 <= start < end:
                raise ValueError(f"anchor span [{start}, {end}) must satisfy 0 <= start < end")

    @property
    def is_window(self) -> bool:
        return self.kind == "window"

    def protected(self, logical_block: int, block_size: int) -> bool:
        """Whether a block holds a sink or anchor token."""
        lo, hi = logical_block * block_size, (logical_block + 1) * block_size
        if lo < self.sinks:
            return True
        return any(start < hi and lo < end for start, end in self.anchors)

    def min_window(self, block_size: int) -> int:
        """Smallest workable window: protected blocks plus two blocks of recent tokens."""
        pinned = {b for b in range(-(-self.sinks // block_size))}
        for start, end in self.anchors:
            pinned.update(range(start // block_size, -(-end // block_size)))
        return (len(pinned) + 2) * block_size

    def blocks_to_evict(
        self, logical_blocks: Sequence[int], num_keys: int, block_size: int
    ) -> list[int]:
        """Indices into the block table to drop so at most ``window`` keys remain.

        ``logical_blocks[i]`` is the logical block held at table index i; all but
        the last are full. The last (current) block is never evicted.
        """
        if not self.is_window:
            return []
        drop: list[int] = []
        for index, block in enumerate(logical_blocks[:-1]):
            if num_keys <= self.window:
                break
            if not self.protected(block, block_size):
                drop.append(index)
                num_keys -= block_size
        return drop
