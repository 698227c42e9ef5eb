"""Block ids and reference counts for the paged KV cache; no tensors.

A block is ``block_size`` token slots in the KV pool. Sequences hold blocks
through their block tables; a block shared by several sequences (a common
prefix) carries one reference per holder. When the last holder lets go the
owner decides: ``release`` it to the free list, or keep it as a cached
prefix block until it is evicted (see ``cache.block_manager``).
"""

from __future__ import annotations

from collections import deque


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than asked for."""


class BlockAllocator:
    """A free list of block ids with a reference count per block."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks} must be > 0")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        if not self.can_allocate(count):
            raise OutOfBlocksError(f"asked for {count} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def incref(self, block: int) -> None:
        """Add a holder; a block at zero references may be revived (a cached prefix block)."""
        self._refs[block] += 1

    def decref(self, block: int) -> int:
        """Drop a holder; returns the references left."""
        assert self._refs[block] > 0, f"block {block} freed twice"
        self._refs[block] -= 1
        return self._refs[block]

    def release(self, block: int) -> None:
        """Return an unreferenced block to the free list."""
        assert self._refs[block] == 0, f"block {block} still has {self._refs[block]} holders"
        self._free.append(block)

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block, releasing those nobody holds."""
        for block in blocks:
            if self.decref(block) == 0:
                self.release(block)


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)
