"""Per-request KV retention policies: keep everything, or a window with sinks and anchors.

``full`` keeps every token. ``window`` keeps at most ``window`` tokens in the
cache: the first ``sinks`` tokens (attention sinks), every block touching a
pinned ``anchors`` span (e.g. the system prompt), and the most recent tokens.
As the sequence grows, whole blocks are evicted oldest first. Kept keys keep
the rotary positions they were computed at, and new tokens keep counting
positions, so a windowed sequence sees exactly the attention a dense model
would with the evicted keys masked out. A windowed prompt is prefilled in
chunks of at most ``window`` tokens, evicting between chunks.

Relative to a model's context (``max_position_embeddings``): a ``full``
sequence must fit the context. A ``window`` sequence may run past it, which
is what the window is for (streaming generation with sinks), but only so far:
its prompt, window, sinks and anchors must fit the context (the model was
trained to attend that far, no further), and prompt plus generated tokens
must stay within ``window_position_limit(context)`` positions, so the
rotary tables that cover them stay bounded. The engine checks this at
admission (``cluster.engine.llm_engine.validate_request``); a policy on its own is held
to the hard bounds below whatever the model, so that no computation here
depends on the size of a span.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

KV_POLICIES = ("full", "window")
# A windowed sequence's positions may run to this many times the model's context: room
# for streaming generation, while rotary positions past the context are extrapolation
# (kept keys keep their positions) and their tables grow with the positions covered.
WINDOW_CONTEXT_FACTOR = 8
# No sequence reaches this position on any model (about 1M): the hard bound on a window,
# on sinks and on anchor ends, and on positions unless the context itself is longer.
MAX_POSITIONS = 1 << 20
MAX_ANCHORS = 64  # pinned spans per request
_SHOWN_SPANS = 3  # spans quoted in a message; the count says how many there are


def window_position_limit(context: int) -> int:
    """Most positions (prompt + generated tokens) a windowed sequence may reach on a model
    with a context of ``context`` tokens: ``WINDOW_CONTEXT_FACTOR`` contexts, at most
    ``MAX_POSITIONS``, never less than the context itself."""
    return max(context, min(WINDOW_CONTEXT_FACTOR * context, MAX_POSITIONS))


def spans_text(spans: Sequence[tuple[int, int]]) -> str:
    """Spans for a message, the first few only: a request may send many."""
    if len(spans) <= _SHOWN_SPANS:
        return str(list(spans))
    return f"{len(spans)} spans, first {list(spans[:_SHOWN_SPANS])}"


@dataclass(frozen=True)
class KVPolicy:
    """A request's KV retention, ``full`` or ``window``; checked against the hard bounds
    here, against a model's context at admission."""

    kind: str = "full"
    window: int = 0  # most tokens kept (window only)
    sinks: int = 0  # first tokens always kept (window only)
    anchors: tuple[tuple[int, int], ...] = ()  # [start, end) token spans always kept

    def __post_init__(self) -> None:
        if self.kind not in KV_POLICIES:
            kind = self.kind if len(self.kind) <= 32 else self.kind[:32] + "..."
            raise ValueError(f"kv_policy {kind!r} is unknown; known: {', '.join(KV_POLICIES)}")
        if len(self.anchors) > MAX_ANCHORS:
            raise ValueError(
                f"anchors: {len(self.anchors)} spans is too many: allowed at most {MAX_ANCHORS}"
            )
        if self.kind == "full":
            if self.window or self.sinks or self.anchors:
                raise ValueError(
                    f"window={self.window}, sinks={self.sinks}, "
                    f"anchors={spans_text(self.anchors)} apply only to kv_policy 'window'"
                )
            return
        if self.window <= 0:
            raise ValueError(f"window={self.window} must be > 0 for kv_policy 'window'")
        if self.window > MAX_POSITIONS:
            raise ValueError(f"window={self.window} is out of range: allowed [1, {MAX_POSITIONS}]")
        if self.sinks < 0:
            raise ValueError(f"sinks={self.sinks} must be >= 0")
        if self.sinks > MAX_POSITIONS:
            raise ValueError(f"sinks={self.sinks} is out of range: allowed [0, {MAX_POSITIONS}]")
        for start, end in self.anchors:
            if not 0 <= start < end:
                raise ValueError(f"anchor span [{start}, {end}) must satisfy 0 <= start < end")
            if end > MAX_POSITIONS:
                raise ValueError(
                    f"anchor span [{start}, {end}) ends past position {MAX_POSITIONS}, "
                    "which no sequence reaches"
                )

    @property
    def is_window(self) -> bool:
        return self.kind == "window"

    @cached_property
    def _pinned(self) -> tuple[list[int], list[int]]:
        """Sinks and anchors as disjoint token intervals, sorted: (starts, ends).

        Sorting and merging once makes ``protected`` a bisection and ``min_window`` a walk
        over at most ``MAX_ANCHORS + 1`` intervals, whatever the spans' lengths.
        """
        sinks = [(0, self.sinks)] if self.sinks else []
        spans = sorted([*sinks, *self.anchors])
        starts: list[int] = []
        ends: list[int] = []
        for start, end in spans:
            if ends and start <= ends[-1]:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
        return starts, ends

    def protected(self, logical_block: int, block_size: int) -> bool:
        """Whether a block holds a sink or anchor token: the first pinned interval ending
        after the block's first token must start before the block's end."""
        lo, hi = logical_block * block_size, (logical_block + 1) * block_size
        starts, ends = self._pinned
        i = bisect.bisect_right(ends, lo)
        return i < len(starts) and starts[i] < hi

    def min_window(self, block_size: int) -> int:
        """Smallest workable window: protected blocks plus two blocks of recent tokens.

        Each pinned interval covers the blocks [start // size, ceil(end / size)); intervals
        are sorted and disjoint, so only neighbours can share a block.
        """
        num_pinned = 0
        covered = 0  # blocks before this one are counted
        for start, end in zip(*self._pinned, strict=True):
            first, stop = max(start // block_size, covered), -(-end // block_size)
            num_pinned += max(0, stop - first)
            covered = max(covered, stop)
        return (num_pinned + 2) * block_size

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
