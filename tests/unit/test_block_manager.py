"""Block manager: allocation, prefix matching, sharing, cached blocks and LRU eviction."""

from __future__ import annotations

import pytest

from cache.block_allocator import OutOfBlocksError, blocks_for
from cache.block_manager import BlockManager
from cache.prefix_hash import hash_block, hash_blocks
from tests.unit.kv_checks import check_partition

BS = 4


def compute(manager: BlockManager, ids: list[int]) -> tuple[list[int], list[int]]:
    """Allocate blocks for ``ids`` and register the full ones, as the engine does."""
    blocks = manager.allocate(blocks_for(len(ids), BS))
    hashes = hash_blocks(ids, BS)
    for index, block_hash in enumerate(hashes):
        manager.register(blocks[index], block_hash)
    return blocks, hashes


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="block_size=0 must be > 0"):
        BlockManager(8, 0)


def test_allocate_and_free_back_to_all_available() -> None:
    manager = BlockManager(8, BS)
    a = manager.allocate(3)
    assert manager.num_available == 5 and manager.num_held == 3
    b = manager.allocate(5)
    assert len(set(a + b)) == 8
    assert manager.num_available == 0 and manager.num_held == 8
    assert not manager.can_allocate(1) and manager.can_allocate(0)
    with pytest.raises(OutOfBlocksError, match="asked for 1 blocks, 0 available"):
        manager.allocate(1)
    check_partition(manager)
    manager.free(a)
    assert manager.num_available == 3
    manager.free(b)
    assert manager.num_available == 8 and manager.num_held == 0
    assert manager.num_cached == 0 and manager.num_evictions == 0
    check_partition(manager)


def test_a_shared_block_is_released_by_its_last_holder() -> None:
    manager = BlockManager(4, BS)
    (block,) = manager.allocate(1)
    manager.acquire([block])
    assert manager.allocator.refcount(block) == 2
    manager.free([block])
    assert manager.num_held == 1 and manager.allocator.refcount(block) == 1
    manager.free([block])
    assert manager.num_held == 0 and manager.num_available == 4
    with pytest.raises(AssertionError, match="freed twice"):
        manager.free([block])
    assert manager.num_held == 0


def test_prefix_match_returns_the_longest_cached_prefix_of_full_blocks() -> None:
    manager = BlockManager(16, BS)
    ids = list(range(100, 110))  # 2 full blocks and 2 tokens in a third
    blocks, hashes = compute(manager, ids)
    assert len(blocks) == 3 and len(hashes) == 2
    assert manager.num_cached == 2  # the partial block is never named

    assert manager.match_prefix(ids, 10) == (blocks[:2], hashes)
    # a longer query that agrees on the partial block's tokens still stops at 2
    assert manager.match_prefix([*ids, 110, 111], 10) == (blocks[:2], hashes)
    # diverging inside block 1 keeps block 0 only; inside block 0 keeps nothing
    assert manager.match_prefix([*ids[:5], 0, 0, 0, 0], 10) == (blocks[:1], hashes[:1])
    assert manager.match_prefix([0, *ids[1:]], 10) == ([], [])
    # a short query has only one full block to look up
    assert manager.match_prefix(ids[:7], 10) == (blocks[:1], hashes[:1])
    assert manager.match_prefix(ids[:3], 10) == ([], [])
    # capped by max_blocks
    assert manager.match_prefix(ids, 1) == (blocks[:1], hashes[:1])
    assert manager.match_prefix(ids, 0) == ([], [])
    # matching holds nothing
    assert manager.num_held == 3
    assert [manager.allocator.refcount(b) for b in blocks] == [1, 1, 1]

    manager.free(blocks)
    assert manager.num_held == 0 and manager.num_cached == 2
    check_partition(manager)


def test_a_missing_block_ends_the_match_even_if_later_blocks_are_cached() -> None:
    manager = BlockManager(3, BS)
    ids = list(range(12))
    blocks, hashes = compute(manager, ids)
    manager.free(blocks)
    assert list(manager._evictable) == [blocks[2], blocks[1], blocks[0]]
    manager.acquire(blocks[2:])  # touch the last block: block 1 is now the LRU
    manager.free(blocks[2:])
    assert manager.allocate(1) == [blocks[1]]
    assert manager.num_cached == 2  # blocks 0 and 2 are still named
    assert manager.match_prefix(ids, 3) == (blocks[:1], hashes[:1])
    manager.free([blocks[1]])
    assert manager.num_held == 0
    check_partition(manager)


def test_hashes_are_chained_so_equal_blocks_after_different_prefixes_do_not_match() -> None:
    manager = BlockManager(16, BS)
    first, second, other = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    blocks, hashes = compute(manager, first + second)
    assert hashes[1] == hash_block(hashes[0], second)
    assert hashes[1] != hash_block(None, second)
    assert hashes[1] != hash_block(hash_block(None, other), second)
    # the second block's tokens behind another first block match nothing
    assert manager.match_prefix(other + second, 4) == ([], [])
    # nor does that block on its own
    assert manager.match_prefix(second, 4) == ([], [])
    # once the other prefix is cached it matches, but not the first prefix's second block
    other_blocks, other_hashes = compute(manager, other)
    assert manager.match_prefix(other + second, 4) == (other_blocks, other_hashes)
    manager.free(blocks)
    manager.free(other_blocks)
    assert manager.num_held == 0
    check_partition(manager)


def test_acquiring_an_evictable_block_takes_it_out_of_the_evictable_set() -> None:
    manager = BlockManager(8, BS)
    ids = list(range(8))
    blocks, _ = compute(manager, ids)
    manager.free(blocks)
    assert manager.num_held == 0 and manager.num_available == 8
    assert set(manager._evictable) == set(blocks)

    hits, _ = manager.match_prefix(ids, 2)
    assert hits == blocks
    assert manager.acquire_cost(hits) == 2
    manager.acquire(hits)
    assert set(manager._evictable) == set()
    assert manager.num_held == 2 and manager.num_available == 6
    assert manager.acquire_cost(hits) == 0  # held blocks cost nothing more
    assert [manager.allocator.refcount(b) for b in hits] == [1, 1]

    # a second holder of held blocks uses up no available block
    manager.acquire(hits)
    assert [manager.allocator.refcount(b) for b in hits] == [2, 2]
    assert manager.num_held == 2 and manager.num_available == 6
    check_partition(manager)

    # one held, one evictable: only the evictable one costs
    manager.free(hits)
    manager.free(hits[1:])
    assert manager.acquire_cost(hits) == 1
    manager.free(hits[:1])
    assert manager.acquire_cost(hits) == 2
    assert manager.num_held == 0
    check_partition(manager)


def test_acquired_blocks_are_never_evicted_by_allocation() -> None:
    manager = BlockManager(3, BS)
    ids = list(range(8))
    blocks, hashes = compute(manager, ids)
    manager.free(blocks)
    hits, _ = manager.match_prefix(ids, 2)
    manager.acquire(hits[:1])
    fresh = manager.allocate(2)  # must evict hits[1], never the held hits[0]
    assert hits[0] not in fresh and hits[1] in fresh
    assert manager.num_evictions == 1
    assert manager.match_prefix(ids, 2) == ([hits[0]], hashes[:1])
    with pytest.raises(OutOfBlocksError):
        manager.allocate(1)
    manager.free(fresh)
    manager.free(hits[:1])
    assert manager.num_held == 0
    check_partition(manager)


def test_freed_registered_blocks_become_evictable_and_are_reclaimed_only_when_short() -> None:
    manager = BlockManager(6, BS)
    ids = list(range(50, 59))  # 2 full blocks and 1 partial
    blocks, hashes = compute(manager, ids)
    manager.free(blocks)
    # the partial block went back to the free list, the full ones stay cached
    assert manager.allocator.num_free == 4
    assert list(manager._evictable) == [blocks[1], blocks[0]]  # later blocks go first
    assert manager.num_available == 6 and manager.num_held == 0

    taken = manager.allocate(4)  # the free list suffices: no eviction
    assert set(taken).isdisjoint(blocks[:2])
    assert manager.num_evictions == 0
    assert manager.match_prefix(ids, 2) == (blocks[:2], hashes)

    one = manager.allocate(1)  # free list empty: evict the least recently used
    assert one == [blocks[1]]
    assert manager.num_evictions == 1 and manager.num_cached == 1
    assert manager.match_prefix(ids, 2) == (blocks[:1], hashes[:1])

    # a refused allocation evicts nothing
    with pytest.raises(OutOfBlocksError, match="asked for 2 blocks, 1 available"):
        manager.allocate(2)
    assert manager.num_evictions == 1 and manager.num_cached == 1

    # a reused evicted block can be registered anew
    manager.register(one[0], hash_block(None, [7, 7, 7, 7]))
    assert manager.match_prefix([7, 7, 7, 7], 1) == (one, [hash_block(None, [7, 7, 7, 7])])
    manager.free(taken)
    manager.free(one)
    assert manager.num_held == 0
    check_partition(manager)


def test_eviction_is_least_recently_used_first() -> None:
    manager = BlockManager(4, BS)
    ids_a, ids_b = [1] * 8, [2] * 8
    a, _ = compute(manager, ids_a)
    b, _ = compute(manager, ids_b)
    manager.free(a)
    manager.free(b)
    assert list(manager._evictable) == [a[1], a[0], b[1], b[0]]

    # reusing A makes it the most recently used
    hits, _ = manager.match_prefix(ids_a, 2)
    assert hits == a
    manager.acquire(hits)
    manager.free(hits)
    assert list(manager._evictable) == [b[1], b[0], a[1], a[0]]

    assert manager.allocate(1) == [b[1]]
    assert manager.match_prefix(ids_b, 2)[0] == b[:1]
    assert manager.match_prefix(ids_a, 2)[0] == a
    fresh = manager.allocate(2)
    assert sorted(fresh) == sorted([b[0], a[1]])
    assert manager.num_evictions == 3
    assert manager.match_prefix(ids_b, 2)[0] == []
    assert manager.match_prefix(ids_a, 2)[0] == a[:1]
    manager.free([b[1], *fresh])
    assert manager.num_held == 0 and manager.num_cached == 1
    check_partition(manager)


def test_registering_an_existing_hash_is_a_no_op() -> None:
    manager = BlockManager(8, BS)
    ids = [3, 1, 4, 1]
    (owner,), (block_hash,) = compute(manager, ids)
    (twin,) = manager.allocate(1)  # computed the same prefix concurrently
    manager.register(twin, block_hash)
    manager.register(owner, block_hash)  # the owner again: also nothing
    assert manager.num_cached == 1
    assert manager.match_prefix(ids, 1) == ([owner], [block_hash])
    manager.free([twin])  # private: straight back to the free list
    assert twin not in manager._evictable
    assert manager.allocator.num_free == 7
    # the twin is not registered, so it can take another name later
    (again,) = manager.allocate(1)
    other = hash_block(None, [2, 7, 1, 8])
    manager.register(again, other)
    assert manager.num_cached == 2
    with pytest.raises(AssertionError, match="already registered"):
        manager.register(again, hash_block(None, [0, 0, 0, 0]))
    manager.free([owner, again])
    assert manager.num_held == 0 and manager.num_cached == 2
    check_partition(manager)


def test_without_prefix_caching_nothing_is_matched_or_kept() -> None:
    manager = BlockManager(4, BS, enable_prefix_caching=False)
    ids = list(range(16))
    blocks, _ = compute(manager, ids)
    assert manager.num_cached == 0
    assert manager.match_prefix(ids, 4) == ([], [])
    manager.free(blocks)
    assert manager.allocator.num_free == 4 and len(manager._evictable) == 0
    assert manager.match_prefix(ids, 4) == ([], [])
    again = manager.allocate(4)
    assert sorted(again) == [0, 1, 2, 3] and manager.num_evictions == 0
    manager.free(again)
    assert manager.num_held == 0
    check_partition(manager)


# --- partial tail blocks -------------------------------------------------------------------------


def computed_tail(manager: BlockManager, ids: list[int]) -> tuple[int, int | None]:
    """Compute ``ids`` as a sequence would and let go of its blocks, keeping the partial tail:
    (the tail block, its parent hash)."""
    blocks, hashes = compute(manager, ids)
    tail = len(hashes)
    assert len(ids) % BS and len(blocks) == tail + 1
    parent = hashes[-1] if hashes else None
    manager.release_partial(blocks[tail], parent, ids[tail * BS :])
    manager.free(blocks[:tail])
    return blocks[tail], parent


def test_a_partial_tail_is_found_by_the_longest_common_prefix_under_its_parent() -> None:
    manager = BlockManager(16, BS)
    ids = [10, 11, 12, 13, 20, 21, 22]  # 1 full block, then 3 tokens
    tail, parent = computed_tail(manager, ids)
    assert parent == hash_block(None, ids[:4])
    assert manager.num_cached == 1 and manager.num_cached_partial == 1
    assert manager.num_held == 0 and manager.num_available == 16
    assert manager.allocator.refcount(tail) == 0 and tail in manager._evictable
    check_partition(manager)

    assert manager.match_partial(parent, [20, 21, 22, 99], 3) == (tail, 3)
    assert manager.match_partial(parent, [20, 21, 22], 3) == (tail, 3)
    assert manager.match_partial(parent, [20, 21, 22], 2) == (tail, 2)  # capped
    assert manager.match_partial(parent, [20, 21, 9], 3) == (tail, 2)  # diverges at the third
    assert manager.match_partial(parent, [20, 21], 3) == (tail, 2)  # a shorter query
    assert manager.match_partial(parent, [20], 3) == (tail, 1)
    assert manager.match_partial(parent, [21, 22], 3) is None  # no common first token
    assert manager.match_partial(parent, [20, 21], 0) is None
    assert manager.match_partial(parent, [], 3) is None
    # the same tokens after another prefix, or at the start, are other K/V
    assert manager.match_partial(None, [20, 21, 22], 3) is None
    assert manager.match_partial(hash_block(None, [10, 11, 12, 14]), [20, 21, 22], 3) is None
    # it is never a full block: prefix matching stops at the full blocks
    assert manager.match_prefix([*ids, 23], 2) == ([manager._block_of[parent]], [parent])

    # at the start of a sequence the parent is None
    head, none = computed_tail(manager, [30, 31])
    assert none is None and manager.match_partial(None, [30, 31, 32], 3) == (head, 2)
    assert manager.match_partial(parent, [30, 31], 3) is None
    # matching holds nothing
    assert manager.num_held == 0 and manager.num_cached_partial == 2
    check_partition(manager)


def test_the_longest_of_several_partial_tails_under_one_parent_wins() -> None:
    manager = BlockManager(16, BS)
    prefix = [1, 2, 3, 4]
    two, parent = computed_tail(manager, [*prefix, 5, 6])
    other, _ = computed_tail(manager, [*prefix, 5, 7, 8])
    assert manager.num_cached_partial == 2 and two != other
    assert manager.match_partial(parent, [5, 7, 8], 3) == (other, 3)
    assert manager.match_partial(parent, [5, 6, 8], 3) == (two, 2)
    assert manager.match_partial(parent, [5, 9], 3) in {(two, 1), (other, 1)}
    check_partition(manager)


def test_a_partial_block_is_never_handed_out_for_writing() -> None:
    manager = BlockManager(4, BS)
    tail, parent = computed_tail(manager, [1, 2, 3, 4, 5, 6])
    with pytest.raises(AssertionError, match="partial entry"):
        manager.acquire([tail])
    assert manager.allocator.refcount(tail) == 0
    # allocation takes it only by evicting it: the entry is gone before anyone writes
    fresh = manager.allocate(2)
    assert tail not in fresh and manager.num_evictions == 0  # the free list sufficed
    last = manager.allocate(2)
    assert tail in last and manager.num_evictions == 2
    assert manager.num_cached_partial == 0 and manager.num_cached == 0
    assert manager.match_partial(parent, [5, 6], 3) is None
    manager.free(fresh + last)
    check_partition(manager)


def test_partial_and_full_cached_blocks_are_evicted_in_one_lru_order() -> None:
    manager = BlockManager(6, BS)
    a_tail, a_parent = computed_tail(manager, [1, 1, 1, 1, 7])  # a: full, then its tail
    b_tail, b_parent = computed_tail(manager, [2, 2, 2, 2, 8, 8])
    a_full, b_full = manager._block_of[a_parent], manager._block_of[b_parent]
    # a sequence's tail goes before its prefix; a before b
    assert list(manager._evictable) == [a_tail, a_full, b_tail, b_full]
    manager.touch(a_tail)  # a newcomer is about to copy it
    assert list(manager._evictable) == [a_full, b_tail, b_full, a_tail]
    taken = manager.allocate(2)  # the free list has 2
    assert manager.num_evictions == 0 and manager.num_available == 4
    assert manager.allocate(1) == [a_full]
    assert manager.allocate(1) == [b_tail]
    assert manager.num_evictions == 2 and manager.num_cached_partial == 1
    assert manager.match_partial(b_parent, [8, 8], 3) is None
    assert manager.match_partial(a_parent, [7], 3) == (a_tail, 1)  # survives its parent block
    assert manager.num_available == 2 and manager.num_held == 4
    manager.free([*taken, a_full, b_tail])
    assert manager.num_held == 0
    check_partition(manager)


def test_releasing_a_partial_tail_keeps_one_entry_per_content() -> None:
    manager = BlockManager(8, BS)
    prefix = [4, 4, 4, 4]
    short, parent = computed_tail(manager, [*prefix, 5])
    free_before = manager.allocator.num_free
    # the same tail again (a twin computed concurrently): its block goes back to the free list
    twin, _ = computed_tail(manager, [*prefix, 5])
    assert twin != short and manager.num_cached_partial == 1
    assert manager.allocator.num_free == free_before  # the twin's blocks: tail freed, full kept
    assert list(manager._evictable)[-2:] == [manager._block_of[parent], short]  # touched
    # a longer tail replaces the shorter one, whose block is freed
    longer, _ = computed_tail(manager, [*prefix, 5, 6])
    assert manager.num_cached_partial == 1 and short not in manager._evictable
    assert manager.match_partial(parent, [5, 6, 7], 3) == (longer, 2)
    # a tail that an entry already covers is not kept
    again, _ = computed_tail(manager, [*prefix, 5])
    assert manager.num_cached_partial == 1 and again not in manager._evictable
    # a diverging tail is another entry
    other, _ = computed_tail(manager, [*prefix, 5, 9])
    assert manager.num_cached_partial == 2
    assert manager.match_partial(parent, [5, 9], 3) == (other, 2)
    assert manager.num_held == 0 and manager.num_evictions == 0
    check_partition(manager)


def test_partial_tails_are_not_kept_without_prefix_caching() -> None:
    manager = BlockManager(4, BS, enable_prefix_caching=False)
    blocks = manager.allocate(2)
    manager.release_partial(blocks[1], None, [1, 2])
    manager.free(blocks[:1])
    assert manager.num_cached_partial == 0 and manager.allocator.num_free == 4
    assert manager.match_partial(None, [1, 2], 3) is None
    check_partition(manager)


def test_release_partial_checks_its_block() -> None:
    manager = BlockManager(4, BS)
    (block,) = manager.allocate(1)
    with pytest.raises(AssertionError, match="not partial"):
        manager.release_partial(block, None, [1, 2, 3, 4])
    manager.acquire([block])
    with pytest.raises(AssertionError, match="shared or free"):
        manager.release_partial(block, None, [1])
    manager.free([block, block])
    with pytest.raises(AssertionError, match="shared or free"):
        manager.release_partial(block, None, [1])
    check_partition(manager)


def test_pinned_blocks_are_evicted_last_capped_and_expire() -> None:
    from cache.block_manager import BlockManager

    blocks = BlockManager(num_blocks=8, block_size=4, max_pinned_share=0.25)  # 2 pins at most
    held = blocks.allocate(4)
    for i, block in enumerate(held):
        blocks.register(block, 100 + i)
    assert blocks.pin([100, 101, 102], until=10.0) == 2  # the cap: soft pins
    blocks.free(held)
    assert blocks.num_available == 8
    check_partition(blocks)
    fresh = blocks.allocate(6)  # 4 free + 2 evicted: the unpinned 102 and 103 go first
    assert blocks.lookup([100, 101]) == held[:2] and blocks.lookup([102]) == []
    blocks.free(fresh)
    blocks.expire_pins(5.0)  # not yet
    assert blocks.num_pins == 2
    blocks.expire_pins(10.0)  # ended: ordinary blocks, first in line for eviction
    assert blocks.num_pins == 0
    blocks.allocate(7)  # the free six, then one of the two: no longer kept apart
    assert len(blocks.lookup([100]) + blocks.lookup([101])) == 1
    check_partition(blocks)
