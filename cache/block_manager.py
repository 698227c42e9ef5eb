"""KV blocks with prefix reuse: allocation, sharing, caching and LRU eviction.

Full blocks are registered under their chained prefix hash. A new sequence
looks up the hashes of its prompt's full blocks and takes every cached block
of its longest cached prefix (one more reference each), computing only the
rest. When the last holder frees a registered block it is not returned to the
free list: it stays cached and evictable, least recently used first, and is
only reclaimed when a fresh block is needed and the free list is empty.

A sequence's partly filled last block can be kept the same way, as a partial entry
under the hash of the full blocks before it, or the chain's root when there are none
(``release_partial``). It is never held
again: a later sequence whose cached chain ends at that hash finds it
(``match_partial``) and copies the slots it can use into a fresh block of its own
(the copy is the engine's), so a cached block is never written. Partial and full
cached blocks share one LRU order. Every chain starts at its tenant's root
(``prefix_hash.root_hash``), so tenants never share or time each other's blocks.

Pins (``pin``): a prefix someone asked to keep, by its blocks' hashes, until a time. An unheld
pinned block waits in an LRU order of its own, evicted only when no unpinned block is left;
pins are soft: at most ``max_pinned_share`` of the pool's blocks are pinned at once (further
pins are ignored), and an expired pin (``expire_pins``) makes its block ordinary again.

KV groups (``windows``, see ``cache.kv_groups``): with more than one, each group's blocks come
from the one pool and are named under ``group_key`` of the chain hash; ``match_prefix`` trims
a hit to what every group serves, and ``window_hits`` gives a sliding group's blocks of it.
Evictions are reported, and snapshots, pins given and partial entries kept, for group 0 only
(a sliding group's blocks are pinned with their prefix's, by ``pin``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from cache.block_allocator import BlockAllocator, OutOfBlocksError
from cache.kv_groups import Windows, group_key, servable_prefix, window_blocks
from cache.partial_blocks import PartialBlocks
from cache.prefix_hash import hash_blocks


class BlockManager:
    """Block tables' storage: free blocks, held blocks, and cached unheld blocks."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        max_pinned_share: float = 0.25,
        windows: Windows = (None,),
    ):
        if block_size <= 0:
            raise ValueError(f"block_size={block_size} must be > 0")
        assert windows and windows[0] is None, f"windows={windows}: group 0 is full attention"
        self.block_size = block_size
        self.windows = tuple(windows)
        self.enable_prefix_caching = enable_prefix_caching
        self.allocator = BlockAllocator(num_blocks)
        self._block_of: dict[int, int] = {}  # prefix hash -> block
        self._hash_of: dict[int, int] = {}  # block -> prefix hash (its group's key)
        self._group_of: dict[int, int] = {}  # named block -> its group, for groups past 0
        self._partials = PartialBlocks()  # cached partial blocks, all unheld and evictable
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unheld; LRU first
        self._pinned: OrderedDict[int, None] = OrderedDict()  # the same, of pinned hashes
        self._pins: dict[int, float] = {}  # prefix hash -> pinned until (the caller's clock)
        self._next_expiry = float("inf")
        self.max_pinned_blocks = int(num_blocks * max_pinned_share)
        self.num_evictions = 0
        # with track_evictions, the hashes of evicted full blocks, for whoever drains them (KV
        # events, miss reasons); off, nothing is kept
        self.track_evictions = False
        self.evicted: list[int] = []

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_available(self) -> int:
        """Blocks a caller could get now: free plus evictable."""
        return self.allocator.num_free + len(self._evictable) + len(self._pinned)

    @property
    def num_held(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_available

    @property
    def num_cached(self) -> int:
        """Cached full blocks (held or not)."""
        return len(self._block_of)

    @property
    def num_cached_partial(self) -> int:
        """Cached partial blocks (never held)."""
        return len(self._partials)

    def can_allocate(self, count: int) -> bool:
        return count <= self.num_available

    def allocate(self, count: int) -> list[int]:
        """Fresh blocks, evicting least recently used cached blocks when the free list is short."""
        if not self.can_allocate(count):
            raise OutOfBlocksError(f"asked for {count} blocks, {self.num_available} available")
        while self.allocator.num_free < count:
            source = self._evictable if self._evictable else self._pinned
            block, _ = source.popitem(last=False)
            if block in self._partials:
                self._partials.remove(block)
            else:
                block_hash = self._hash_of.pop(block)
                del self._block_of[block_hash]
                if self._group_of.pop(block, 0) == 0 and self.track_evictions:
                    self.evicted.append(block_hash)
            self.allocator.release(block)
            self.num_evictions += 1
        return self.allocator.allocate(count)

    def match_prefix(
        self, token_ids: Sequence[int], max_blocks: int, root: int | None = None
    ) -> tuple[list[int], list[int]]:
        """(blocks, hashes) of the longest cached prefix of full blocks, at most ``max_blocks``,
        in the hash chain that starts at ``root`` (``root_hash`` of the tenant's salt).

        With KV groups the prefix is one every group serves (``kv_groups.servable_prefix``):
        the blocks are group 0's, ``window_hits`` gives the others'. Nothing is acquired;
        pass the blocks to ``acquire`` to hold them.
        """
        if not self.enable_prefix_caching:
            return [], []
        blocks: list[int] = []
        hashes = hash_blocks(token_ids, self.block_size, max_blocks, root)
        for block_hash in hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        if self.num_groups > 1:
            n = servable_prefix(
                len(blocks),
                self.windows,
                self.block_size,
                lambda group, j: group_key(hashes[j], group) in self._block_of,
            )
            blocks = blocks[:n]
        return blocks, hashes[: len(blocks)]

    def window_hits(self, hashes: Sequence[int], group: int) -> tuple[int, list[int]]:
        """(first, blocks): the cached blocks of ``group`` that continue the prefix ``hashes``
        names (as ``match_prefix`` returned it), from logical block ``first`` on."""
        window = self.windows[group]
        needed = window_blocks(len(hashes), window, self.block_size)
        blocks = [self._block_of[group_key(hashes[j], group)] for j in needed]
        return needed.start, blocks

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """The cached blocks of the longest prefix of ``hashes`` found in the cache (none
        acquired)."""
        blocks: list[int] = []
        for block_hash in hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def acquire_cost(self, blocks: Sequence[int]) -> int:
        """How many available blocks holding ``blocks`` would use up (the evictable ones)."""
        return sum(1 for b in blocks if b in self._evictable or b in self._pinned)

    def acquire(self, blocks: Sequence[int]) -> None:
        """Hold cached blocks (one more reference each)."""
        for block in blocks:
            assert block not in self._partials, f"block {block} is a partial entry: copy it"
            self._evictable.pop(block, None)
            self._pinned.pop(block, None)
            self.allocator.incref(block)

    def match_partial(
        self, parent_hash: int | None, token_ids: Sequence[int], max_tokens: int
    ) -> tuple[int, int] | None:
        """(block, m): the cached partial block after the prefix ``parent_hash`` names (at
        the start: the chain's root, ``root_hash`` of the tenant's salt) that holds the K/V
        of the longest prefix of ``token_ids``, m tokens with 1 <= m <= ``max_tokens``; None
        if there is none.

        Nothing is held: copy its first m slots into a block of your own before anything
        writes to the pool, and call ``touch`` first so allocation evicts it last.
        """
        if not self.enable_prefix_caching:
            return None
        return self._partials.longest_match(parent_hash, token_ids, max_tokens)

    def touch(self, block: int) -> None:
        """Mark an evictable cached block as just used (evicted last)."""
        if block in self._pinned:
            self._pinned.move_to_end(block)
        else:
            self._evictable.move_to_end(block)

    def register(self, block: int, block_hash: int, group: int = 0) -> bool:
        """Name a full, computed block of ``group`` by its prefix hash so later sequences can
        reuse it; False when it stays private (caching off, or a twin already has the name)."""
        key = group_key(block_hash, group)
        if not self.enable_prefix_caching or key in self._block_of:
            return False  # a twin computed concurrently keeps the name; this block stays private
        assert block not in self._hash_of, f"block {block} is already registered"
        self._block_of[key] = block
        self._hash_of[block] = key
        if group:
            self._group_of[block] = group
        return True

    def pin(self, hashes: Sequence[int], until: float) -> int:
        """Pin these prefix hashes until ``until`` (a later pin extends one); returns how
        many are pinned now, fewer once ``max_pinned_blocks`` is reached (soft pins).

        A sliding group's blocks that continue the whole prefix are pinned with it."""
        pinned = 0
        window_keys = [
            group_key(hashes[j], group)
            for group in range(1, self.num_groups)
            for j in window_blocks(len(hashes), self.windows[group], self.block_size)
        ]
        for block_hash in [*hashes, *window_keys]:
            if block_hash not in self._pins and len(self._pins) >= self.max_pinned_blocks:
                break
            self._pins[block_hash] = max(until, self._pins.get(block_hash, 0.0))
            block = self._block_of.get(block_hash)
            if block is not None and block in self._evictable:
                del self._evictable[block]
                self._pinned[block] = None
            pinned += 1
        self._next_expiry = min(self._next_expiry, until)
        return pinned

    def pinned_until(self, block_hash: int) -> float:
        """When the pin of a prefix hash ends (0: not pinned)."""
        return self._pins.get(block_hash, 0.0)

    @property
    def num_pins(self) -> int:
        return len(self._pins)

    def expire_pins(self, now: float) -> None:
        """Drop the pins that ended by ``now``; their unheld blocks become ordinary cached
        blocks, first in line for eviction."""
        if now < self._next_expiry:
            return
        for block_hash in [h for h, until in self._pins.items() if until <= now]:
            del self._pins[block_hash]
            block = self._block_of.get(block_hash)
            if block is not None and block in self._pinned:
                del self._pinned[block]
                self._evictable[block] = None
                self._evictable.move_to_end(block, last=False)
        self._next_expiry = min(self._pins.values(), default=float("inf"))

    def cached_hashes(self) -> list[int]:
        """The prefix hashes of every cached full block of group 0 (held or not): a snapshot."""
        if not self._group_of:
            return list(self._block_of)
        return [h for h, b in self._block_of.items() if b not in self._group_of]

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; cached ones become evictable, others free.

        Freed in reverse so a sequence's later blocks are evicted before its prefix.
        """
        for block in reversed(blocks):
            if self.allocator.decref(block) > 0:
                continue
            if block in self._hash_of:
                pinned = self._hash_of[block] in self._pins
                (self._pinned if pinned else self._evictable)[block] = None
            else:
                self.allocator.release(block)

    def release_partial(
        self, block: int, parent_hash: int | None, token_ids: Sequence[int]
    ) -> None:
        """Drop the only reference to a partly filled block, keeping the K/V of its first
        ``len(token_ids)`` slots (``token_ids``, after the prefix ``parent_hash`` names)
        cached and evictable, unless an entry already holds them; an entry holding a proper
        prefix of them is dropped instead.
        """
        assert 0 < len(token_ids) < self.block_size, f"{len(token_ids)} tokens are not partial"
        assert block not in self._hash_of, f"block {block} is a named full block"
        assert self.allocator.refcount(block) == 1, f"block {block} is shared or free"
        if not self.enable_prefix_caching:
            self.free([block])
            return
        covers, covered = self._partials.covering(parent_hash, token_ids)
        if covers:  # an equal or longer twin is cached: keep that one
            self.touch(covers[0])
            self.free([block])
            return
        for old in covered:
            self._partials.remove(old)
            del self._evictable[old]
            self.allocator.release(old)
        self.allocator.decref(block)
        self._partials.add(block, parent_hash, token_ids)
        self._evictable[block] = None
