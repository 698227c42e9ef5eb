"""KV groups: layers whose KV blocks are allocated, named and freed together.

A model with full-attention and sliding-window layers (gpt-oss) keeps one block table per
group, as vLLM's hybrid KV cache manager does. Group 0 (full attention) keeps every block of
a sequence. A sliding group of window W keeps only the blocks a query can still see: a query
at position p sees keys (p - W, p], so once a sequence has computed p tokens its blocks
wholly before ``p - W + 1`` are freed (``first_kept_block``). A decoding sequence then holds
at most ceil(W / block_size) + 1 blocks of the group; a prefill chunk of c tokens briefly
holds the chunk's blocks too.

A cached prefix of L tokens serves a sliding group only if the group's blocks of the keys
that the query at L sees, [L - W + 1, L), are cached; a hit is trimmed to the longest
length every group can serve (``servable_prefix``). Group 0's blocks are named by the
chain hash itself; another group's by that hash tagged with the group (``group_key``), so a
block of sliding-layer KV is never taken for one of full-layer KV. Ids and integers only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cache.prefix_hash import hash_block

Windows = tuple[int | None, ...]  # per group: its window, None for full attention


def group_key(block_hash: int, group: int) -> int:
    """The name of group ``group``'s block under the prefix ``block_hash``: the hash itself
    for group 0, else a hash of it and the group (a one-token block of a negative id, which
    no real block has)."""
    return block_hash if group == 0 else hash_block(block_hash, (-group,))


def first_kept_block(num_computed: int, window: int | None, block_size: int) -> int:
    """The first logical block a group must still hold once ``num_computed`` tokens are
    computed: 0 for full attention, else the block of key ``num_computed - window + 1``."""
    if window is None:
        return 0
    return max(0, num_computed - window + 1) // block_size


def servable_prefix(
    num_blocks: int,
    windows: Windows,
    block_size: int,
    cached: Callable[[int, int], bool],
) -> int:
    """The most full blocks (at most ``num_blocks``, all cached in group 0) of a prefix that
    every sliding group can serve: ``cached(group, j)`` says whether the group holds logical
    block j cached. O(num_blocks) lookups per sliding group."""
    best = num_blocks
    for group, window in enumerate(windows):
        if window is None or best == 0:
            continue
        run = 0  # cached blocks in a row, ending at block j
        runs = []
        for j in range(best):
            run = run + 1 if cached(group, j) else 0
            runs.append(run)
        n = best
        while n > 0 and runs[n - 1] < n - first_kept_block(n * block_size, window, block_size):
            n -= 1
        best = n
    # a shorter prefix needs other window blocks: settle on one every group serves
    if best < num_blocks and sum(w is not None for w in windows) > 1:
        return servable_prefix(best, windows, block_size, cached)
    return best


def window_blocks(num_blocks: int, window: int | None, block_size: int) -> range:
    """The logical blocks of a ``num_blocks``-block prefix a group needs to continue it."""
    return range(first_kept_block(num_blocks * block_size, window, block_size), num_blocks)


def blocks_to_hold(windows: Windows, block_size: int, num_tokens: int) -> int:
    """Most blocks one sequence of ``num_tokens`` tokens can hold over all groups (a sliding
    group may hold them all while they are one prefill chunk)."""
    return len(windows) * -(-num_tokens // block_size)


def is_grouped(windows: Sequence[int | None]) -> bool:
    return len(windows) > 1
