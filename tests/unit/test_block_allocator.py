"""Block bookkeeping: allocation, sharing by reference count, freeing."""

from __future__ import annotations

import pytest

from cache.block_allocator import BlockAllocator, OutOfBlocksError, blocks_for


def test_allocate_and_free_returns_everything() -> None:
    alloc = BlockAllocator(8)
    a, b = alloc.allocate(3), alloc.allocate(5)
    assert len(set(a + b)) == 8 and alloc.num_free == 0
    assert not alloc.can_allocate(1)
    with pytest.raises(OutOfBlocksError, match="asked for 1 blocks, 0 free"):
        alloc.allocate(1)
    alloc.free(a)
    alloc.free(b)
    assert alloc.num_free == 8


def test_shared_block_is_freed_by_its_last_holder() -> None:
    alloc = BlockAllocator(4)
    (block,) = alloc.allocate(1)
    alloc.incref(block)
    assert alloc.refcount(block) == 2
    alloc.free([block])
    assert alloc.num_free == 3
    alloc.free([block])
    assert alloc.num_free == 4


def test_double_free_and_bad_sizes_are_caught() -> None:
    alloc = BlockAllocator(2)
    blocks = alloc.allocate(1)
    alloc.free(blocks)
    with pytest.raises(AssertionError, match="freed twice"):
        alloc.free(blocks)
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockAllocator(0)


@pytest.mark.parametrize(("tokens", "blocks"), [(0, 0), (1, 1), (16, 1), (17, 2), (32, 2)])
def test_blocks_for(tokens: int, blocks: int) -> None:
    assert blocks_for(tokens, 16) == blocks
