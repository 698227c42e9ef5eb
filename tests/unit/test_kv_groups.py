"""KV groups without a model: group keys, window bounds, trimmed prefix hits in the block
manager, and the scheduler's per-group block tables (sliding blocks freed as the window
moves, every block back in the pool when requests end)."""

from __future__ import annotations

import random

import pytest

from cache.block_allocator import blocks_for
from cache.block_manager import BlockManager
from cache.kv_groups import first_kept_block, group_key, servable_prefix, window_blocks
from cache.prefix_hash import hash_blocks
from cluster.engine.scheduler import (
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    chunk_slots,
    window_inputs,
)
from cluster.engine.sequence import Sequence
from tests.scheduler_harness import FakeClock, make_seq

BS = 4
WINDOW = 6  # a query sees itself and the 5 keys before it
BOUND = -(-WINDOW // BS) + 1  # most sliding blocks a decoding sequence holds


def test_group_keys_name_group_zero_by_its_hash_and_others_apart() -> None:
    h = hash_blocks(list(range(8)), BS)[1]
    assert group_key(h, 0) == h
    assert len({group_key(h, 0), group_key(h, 1), group_key(h, 2)}) == 3


@pytest.mark.parametrize(
    ("computed", "expected"), [(0, 0), (5, 0), (6, 0), (8, 0), (9, 1), (12, 1), (13, 2)]
)
def test_first_kept_block_is_the_block_of_the_oldest_key_in_view(
    computed: int, expected: int
) -> None:
    # a query at position p sees keys p - 5 .. p
    assert first_kept_block(computed, WINDOW, BS) == expected
    assert first_kept_block(computed, None, BS) == 0


def test_servable_prefix_trims_to_where_the_window_blocks_are_cached() -> None:
    windows = (None, WINDOW)
    present = {0, 1, 2, 4, 5}  # sliding blocks cached (block 3 is not)

    def cached(group: int, j: int) -> bool:
        return group == 0 or j in present

    # 6 blocks (24 tokens): the window needs blocks 4..5, cached
    assert servable_prefix(6, windows, BS, cached) == 6
    # 5 blocks: needs 3..4, 3 missing; 4 blocks: needs 2..3, 3 missing; 3 blocks: 1..2 cached
    assert servable_prefix(5, windows, BS, cached) == 3
    assert list(window_blocks(3, WINDOW, BS)) == [1, 2]
    assert servable_prefix(2, windows, BS, lambda g, j: g == 0) == 0


def _manager(num_blocks: int = 32) -> BlockManager:
    return BlockManager(num_blocks, BS, windows=(None, WINDOW))


def _cache_prefix(manager: BlockManager, ids: list[int], sliding: set[int]) -> list[int]:
    """Cache group 0's blocks of ``ids`` and the sliding group's blocks in ``sliding``."""
    hashes = hash_blocks(ids, BS)
    full = manager.allocate(len(hashes))
    for block, h in zip(full, hashes, strict=True):
        assert manager.register(block, h)
    window = manager.allocate(len(sliding))
    for block, j in zip(window, sorted(sliding), strict=True):
        assert manager.register(block, hashes[j], group=1)
    manager.free(full + window)
    return hashes


def test_match_prefix_takes_only_a_prefix_every_group_serves() -> None:
    manager = _manager()
    ids = list(range(100, 124))  # 6 blocks
    hashes = _cache_prefix(manager, ids, {0, 1, 2, 4, 5})
    blocks, got = manager.match_prefix([*ids, 7], 10)
    assert got == hashes and len(blocks) == 6
    assert manager.window_hits(hashes, 1)[0] == 4  # blocks 4..5 continue it
    assert len(manager.window_hits(hashes, 1)[1]) == 2
    blocks, got = manager.match_prefix(ids[:21], 10)  # 5 blocks asked: trimmed to 3
    assert got == hashes[:3] and len(blocks) == 3
    first, window = manager.window_hits(got, 1)
    assert first == 1 and len(window) == 2


def test_group_blocks_are_apart_in_snapshots_evictions_and_pins() -> None:
    manager = _manager(num_blocks=8)
    manager.track_evictions = True
    ids = list(range(8))
    hashes = _cache_prefix(manager, ids, {0, 1})
    assert sorted(manager.cached_hashes()) == sorted(hashes)  # group 0's names only
    assert manager.num_cached == 4
    manager.allocate(8)  # evicts all four; only group 0's are reported
    assert sorted(manager.evicted) == sorted(hashes)
    manager2 = _manager(num_blocks=16)  # up to 4 pinned
    hashes = _cache_prefix(manager2, ids, {0, 1})
    assert manager2.pin(hashes, until=10.0) == 4  # the prefix and its window's blocks
    assert manager2.num_pins == 4


def _scheduler(num_blocks: int, budget: int = 64, caching: bool = True) -> Scheduler:
    blocks = BlockManager(num_blocks, BS, caching, windows=(None, WINDOW))
    return Scheduler(SchedulerConfig(8, budget), blocks, FakeClock())


def _step(sched: Scheduler, out: SchedulerOutput) -> None:
    """Book a step: a token for each chunk that reached its sequence's end."""
    tokens = {
        row: 50 + len(c.seq.output_ids)
        for row, c in enumerate(out.chunks)
        if c.seq.num_uncomputed == c.num_tokens
    }
    sched.update(out, tokens, set())


def _run(sched: Scheduler, seqs: list[Sequence], bound: bool = True) -> None:
    for seq in seqs:
        sched.add(seq)
    while sched.has_unfinished():
        out = sched.schedule()
        for chunk in out.chunks:  # the chunk's keys all have slots, in every group
            seq = chunk.seq
            assert len(chunk_slots(seq, chunk.num_tokens, BS)) == 2 * chunk.num_tokens
            ((table, cached),) = window_inputs(seq, BS)
            assert len(table) * BS >= cached + chunk.num_tokens
        _step(sched, out)
        for seq in sched.running:
            assert len(seq.block_table) == blocks_for(seq.num_computed, BS)  # group 0: all
            start, table = seq.window_starts[0], seq.window_tables[0]
            assert start == first_kept_block(seq.num_computed, WINDOW, BS)
            assert start + len(table) == blocks_for(seq.num_computed, BS)
            if bound:
                assert len(table) <= BOUND


@pytest.mark.parametrize("budget", [64, 5, 1])
def test_a_sliding_group_holds_its_window_and_gives_every_block_back(budget: int) -> None:
    sched = _scheduler(64, budget, caching=False)
    seqs = [make_seq(str(i), list(range(10 * i, 10 * i + 30)), max_tokens=9) for i in range(3)]
    _run(sched, seqs)
    assert all(s.finish_reason == "length" for s in seqs)
    assert sched.blocks.num_available == 64 and sched.blocks.num_held == 0


def test_preemption_frees_every_group_and_recomputes() -> None:
    sched = _scheduler(18, budget=8, caching=False)  # not enough for three at once
    seqs = [make_seq(str(i), list(range(i, i + 18)), max_tokens=12) for i in range(3)]
    _run(sched, seqs)
    assert sched.num_preemptions > 0
    assert all(s.finish_reason == "length" for s in seqs)
    assert sched.blocks.num_held == 0


def test_a_later_request_reuses_a_trimmed_prefix_of_both_groups() -> None:
    sched = _scheduler(64)
    first = make_seq("a", list(range(100, 126)), max_tokens=4)  # 26 + 4 tokens
    _run(sched, [first])
    # 7 full blocks were named in both groups as they filled; the sliding ones before the
    # window were freed early and stay cached, so a longer prompt with the same start hits
    second = make_seq("b", [*first.all_ids[:28], 9, 9, 9], max_tokens=2)
    sched.add(second)
    out = sched.schedule()
    assert second.num_computed == 28 and second.window_starts == [first_kept_block(28, 6, BS)]
    _step(sched, out)
    # evict the sliding group's blocks 4..6: a prompt ending at block 7 can no longer be
    # served whole, and is trimmed to a shorter prefix whose window blocks are cached
    _run(sched, [])
    manager = sched.blocks
    hashes = hash_blocks(first.all_ids, BS)
    for j in (5, 6):
        _evict(manager, group_key(hashes[j], 1))
    third = make_seq("c", [*first.all_ids[:28], 8], max_tokens=2)
    sched.add(third)
    sched.schedule()
    assert third.num_computed == 20  # 5 blocks: its window needs sliding blocks 3..4
    assert third.window_starts == [3] and len(third.block_table) == 8
    sched.finish(third, "abort")
    assert manager.num_held == 0


def _evict(manager: BlockManager, key: int) -> None:
    """Evict one cached, unheld block by its name, as allocation would."""
    block = manager._block_of.pop(key)
    del manager._hash_of[block], manager._group_of[block], manager._evictable[block]
    manager.allocator.release(block)


def test_a_request_is_refused_when_its_groups_could_never_fit() -> None:
    sched = _scheduler(15)
    with pytest.raises(ValueError, match="needs up to 16 KV blocks"):
        sched.add(make_seq("x", list(range(30)), max_tokens=2))  # 8 blocks in each group


class _GroupedKV:
    """Fake K/V per pool slot: (group, the sequence's ids up to that key). Before a chunk
    runs, every key its queries see, in each group, must be its own; then it writes its keys."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, tuple[int, ...]]] = {}

    def run(self, seq: Sequence, count: int) -> None:
        ids, start = seq.all_ids, seq.num_computed
        tables: list[tuple[int, int, list[int], int | None]] = [(0, 0, seq.block_table, None)]
        tables += [
            (g, first, table, WINDOW)
            for g, (first, table) in enumerate(
                zip(seq.window_starts, seq.window_tables, strict=True), 1
            )
        ]
        for group, first, table, window in tables:
            oldest = 0 if window is None else max(0, start - window + 1)
            for key in range(start + count):
                if key < oldest:
                    continue
                index = key - first * BS
                assert index >= 0, f"{seq.request_id}: key {key} in view was freed"
                slot = table[index // BS] * BS + index % BS
                if key < start:  # cached: must be this sequence's own K/V of this group
                    assert self.slots[slot] == (group, tuple(ids[: key + 1])), (seq, key)
                else:
                    self.slots[slot] = (group, tuple(ids[: key + 1]))


@pytest.mark.parametrize("num_blocks", [200, 30])
def test_random_traffic_reuses_only_each_groups_own_blocks(num_blocks: int) -> None:
    rng = random.Random(num_blocks)
    sched = _scheduler(num_blocks, budget=10)
    kv = _GroupedKV()
    prefixes = [[rng.randrange(1, 40) for _ in range(rng.randint(4, 30))] for _ in range(4)]
    hits = 0
    for wave in range(6):
        seqs = []
        for i in range(5):
            prompt = [
                *rng.choice(prefixes),
                *[rng.randrange(1, 40) for _ in range(rng.randint(1, 9))],
            ]
            seq = make_seq(f"w{wave}s{i}", prompt, max_tokens=rng.randint(1, 8))
            sched.add(seq)
            seqs.append(seq)
        while sched.has_unfinished():
            out = sched.schedule()
            for chunk in out.chunks:
                kv.run(chunk.seq, chunk.num_tokens)
            _step(sched, out)
            for seq in sched.running:
                assert len(seq.window_tables[0]) <= BOUND
            if rng.random() < 0.05 and sched.running:
                sched.abort(rng.choice(sched.running).request_id)
        assert sched.blocks.num_held == 0
        hits += sum(s.num_cached_prompt_tokens > 0 for s in seqs)
        longest = 60 - 9 - 8  # a request of up to 60 tokens fits the smaller pool alone
        prefixes += [s.all_ids for s in seqs[:2] if len(s.all_ids) <= longest]  # conversations
    assert hits > 5
    if num_blocks == 30:
        assert sched.num_preemptions > 0 and sched.blocks.num_evictions > 0
