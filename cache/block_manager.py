"""KV blocks with prefix reuse: allocation, sharing, caching and LRU eviction.

Full blocks are registered under their chained prefix hash. A new sequence
looks up the hashes of its prompt's full blocks and takes every cached block
of its longest cached prefix (one more reference each), computing only the
rest. When the last holder frees a registered block it is not returned to the
free list: it stays cached and evictable, least recently used first, and is
only reclaimed when a fresh block is needed and the free list is empty.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from cache.block_allocator import BlockAllocator, OutOfBlocksError
from cache.prefix_hash import hash_blocks


class BlockManager:
    """Block tables' storage: free blocks, held blocks, and cached unheld blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if block_size <= 0:
            raise ValueError(f"block_size={block_size} must be > 0")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.allocator = BlockAllocator(num_blocks)
        self._block_of: dict[int, int] = {}  # prefix hash -> block
        self._hash_of: dict[int, int] = {}  # block -> prefix hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unheld; LRU first
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_available(self) -> int:
        """Blocks a caller could get now: free plus evictable."""
        return self.allocator.num_free + len(self._evictable)

    @property
    def num_held(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_available

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def can_allocate(self, count: int) -> bool:
        return count <= self.num_available

    def allocate(self, count: int) -> list[int]:
        """Fresh blocks, evicting least recently used cached blocks when the free list is short."""
        if not self.can_allocate(count):
            raise OutOfBlocksError(f"asked for {count} blocks, {self.num_available} available")
        while self.allocator.num_free < count:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            self.allocator.release(block)
            self.num_evictions += 1
        return self.allocator.allocate(count)

    def match_prefix(
        self, token_ids: Sequence[int], max_blocks: int
    ) -> tuple[list[int], list[int]]:
        """(blocks, hashes) of the longest cached prefix of full blocks, at most ``max_blocks``.

        Nothing is acquired; pass the blocks to ``acquire`` to hold them.
        """
        if not self.enable_prefix_caching:
            return [], []
        blocks: list[int] = []
        hashes = hash_blocks(token_ids, self.block_size, max_blocks)
        for block_hash in hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, hashes[: len(blocks)]

    def acquire_cost(self, blocks: Sequence[int]) -> int:
        """How many available blocks holding ``blocks`` would use up (the evictable ones)."""
        return sum(1 for b in blocks if b in self._evictable)

    def acquire(self, blocks: Sequence[int]) -> None:
        """Hold cached blocks (one more reference each)."""
        for block in blocks:
            self._evictable.pop(block, None)
            self.allocator.incref(block)

    def register(self, block: int, block_hash: int) -> None:
        """Name a full, computed block by its prefix hash so later sequences can reuse it."""
        if not self.enable_prefix_caching or block_hash in self._block_of:
            return  # a twin computed concurrently keeps the name; this block stays private
        assert block not in self._hash_of, f"block {block} is already registered"
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; cached ones become evictable, others free.

        Freed in reverse so a sequence's later blocks are evicted before its prefix.
        """
        for block in reversed(blocks):
            if self.allocator.decref(block) > 0:
                continue
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self.allocator.release(block)
