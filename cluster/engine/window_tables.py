"""A sequence's sliding KV groups' block tables (``Sequence.window_tables``), for the scheduler
and the engine: what a step needs, what it frees, what the model reads. Ids and integers.

Group 0 (full attention) is ``Sequence.block_table``; each sliding group g keeps the blocks
from logical block ``window_starts[g - 1]`` on, the ones its window still sees
(``cache.kv_groups``).
"""

from __future__ import annotations

from cache.block_allocator import blocks_for
from cache.block_manager import BlockManager
from cache.kv_groups import first_kept_block
from cluster.engine.sequence import Sequence


def window_needs(seq: Sequence, count: int, block_size: int) -> list[int]:
    """Fresh blocks each sliding group needs to compute ``count`` more tokens."""
    end = blocks_for(seq.num_computed + count, block_size)
    return [
        end - start - len(table)
        for start, table in zip(seq.window_starts, seq.window_tables, strict=True)
    ]


def slide_windows(blocks: BlockManager, seq: Sequence) -> None:
    """Free each sliding group's blocks that no later query sees (named ones stay cached,
    for a shorter prefix's reuse)."""
    for group, table in enumerate(seq.window_tables, 1):
        window = blocks.windows[group]
        first = first_kept_block(seq.num_computed, window, blocks.block_size)
        drop = first - seq.window_starts[group - 1]
        if drop > 0:
            blocks.free(table[:drop])
            seq.window_tables[group - 1] = table[drop:]
            seq.window_starts[group - 1] = first


def release_groups(blocks: BlockManager, seq: Sequence) -> None:
    """Free every group's blocks, the last logical block's first in every group, so that a
    prefix's blocks of all groups leave the cache together, its end first."""
    order = [(j, 0, block) for j, block in enumerate(seq.block_table)]
    for group, (start, table) in enumerate(
        zip(seq.window_starts, seq.window_tables, strict=True), 1
    ):
        order.extend((start + i, group, block) for i, block in enumerate(table))
    order.sort()
    blocks.free([block for _, _, block in order])  # freed last first


def window_inputs(seq: Sequence, block_size: int) -> tuple[tuple[list[int], int], ...]:
    """Per sliding group of a sequence: (its kept blocks, how many computed keys they hold)."""
    return tuple(
        (table, seq.num_computed - start * block_size)
        for start, table in zip(seq.window_starts, seq.window_tables, strict=True)
    )


def chunk_slots(seq: Sequence, num_tokens: int, block_size: int) -> list[int]:
    """The pool slots, in every group, that the sequence's next ``num_tokens`` keys fill."""
    keys = range(seq.num_keys, seq.num_keys + num_tokens)
    slots = [seq.block_table[k // block_size] * block_size + k % block_size for k in keys]
    for table, cached in window_inputs(seq, block_size):
        for k in range(cached, cached + num_tokens):
            slots.append(table[k // block_size] * block_size + k % block_size)
    return slots
