"""Prefix reuse in the scheduler: cached full blocks, partial tails copied slot by slot, and
the order of copies and evictions (see ``tests/scheduler_harness.py``)."""

from __future__ import annotations

from cache.kv_policy import KVPolicy
from cluster.engine.scheduler import SlotCopy
from tests.scheduler_harness import (
    Harness,
    check_plan,
    chunk_sizes,
    expected_outputs,
    make_seq,
)


def test_a_newcomer_with_a_cached_prefix_computes_only_its_suffix() -> None:
    h = Harness(num_blocks=32)
    prompt = list(range(200, 210))  # 2 full blocks + 2 tokens
    first = make_seq("first", prompt, max_tokens=1)
    h.add(first)
    h.step()
    assert first.is_finished and first.num_cached_prompt_tokens == 0
    cached, _ = h.blocks.match_prefix(prompt, 2)
    assert len(cached) == 2 and h.blocks.num_held == 0

    suffix = make_seq("suffix", [*prompt[:8], 90, 91, 92])  # reuses 2 blocks, computes 3
    whole = make_seq("whole", prompt[:8])  # all cached: keeps the last block to compute
    nine = make_seq("nine", prompt[:9])  # 2 cached blocks, 1 token to compute
    short = make_seq("short", prompt[:3])  # no full block: nothing to reuse
    h.add(suffix, whole, nine, short)
    out = h.sched.schedule()
    check_plan(h, out)
    assert chunk_sizes(out) == [("suffix", 3), ("whole", 4), ("nine", 1), ("short", 3)]
    assert (suffix.num_computed, suffix.num_cached_prompt_tokens) == (8, 8)
    assert (whole.num_computed, whole.num_cached_prompt_tokens) == (4, 4)
    assert (nine.num_computed, nine.num_cached_prompt_tokens) == (8, 8)
    assert (short.num_computed, short.num_cached_prompt_tokens) == (0, 0)
    assert suffix.block_table[:2] == cached and nine.block_table[:2] == cached
    assert whole.block_table[:1] == cached[:1] and whole.block_table[1] != cached[1]
    assert h.blocks.allocator.refcount(cached[0]) == 3
    assert h.blocks.allocator.refcount(cached[1]) == 2
    assert suffix.block_hashes == h.blocks.match_prefix(prompt, 2)[1]
    h.run(out)
    h.run_until_done()
    assert nine.output_ids == expected_outputs(prompt[:9], 4)
    assert h.blocks.num_held == 0


def test_without_prefix_caching_the_whole_prompt_is_computed() -> None:
    h = Harness(num_blocks=32, prefix_caching=False)
    prompt = list(range(200, 210))
    h.add(make_seq("first", prompt, max_tokens=1))
    h.step()
    again = make_seq("again", prompt)
    h.add(again)
    assert chunk_sizes(h.step()) == [("again", 10)]
    assert again.num_cached_prompt_tokens == 0
    h.run_until_done()
    assert h.blocks.num_held == 0 and h.blocks.num_cached == 0


def test_admission_counts_evictable_cached_blocks_against_the_pool() -> None:
    h = Harness(num_blocks=4)
    prompt = list(range(8))
    h.add(make_seq("a", prompt, max_tokens=1))
    h.step()  # a leaves 2 cached, evictable blocks: 4 available
    keeper = make_seq("keeper", [50, 51, 52, 53, 54], max_tokens=3)
    h.add(keeper)
    assert chunk_sizes(h.step()) == [("keeper", 5)]  # takes the 2 free blocks
    b = make_seq("b", [*prompt, 9], max_tokens=2)  # 2 cached blocks + 1 fresh one
    h.add(b)
    hits, _ = h.blocks.match_prefix(b.all_ids, 2)
    assert len(hits) == 2 and h.blocks.acquire_cost(hits) == 2
    assert h.blocks.num_available == 2  # 1 fresh block would fit, 3 would not
    assert chunk_sizes(h.step()) == [("keeper", 1)]
    assert list(h.sched.waiting) == [b]
    assert chunk_sizes(h.step()) == [("keeper", 1)]  # keeper finishes in this step
    out = h.sched.schedule()
    check_plan(h, out)
    assert chunk_sizes(out) == [("b", 1)]
    assert b.block_table[:2] == hits and b.num_cached_prompt_tokens == 8
    h.run(out)
    h.run_until_done()
    assert h.blocks.num_held == 0


def test_the_next_turn_copies_the_finished_turns_partial_tail() -> None:
    h = Harness(num_blocks=32)
    turn1 = make_seq("t1", list(range(200, 209)), max_tokens=2)  # 9 tokens: 2 blocks + 1
    h.add(turn1)
    h.run_until_done()
    # 10 computed tokens (the last output has no K/V): 2 full blocks, 2 slots in the third
    assert h.blocks.num_cached == 2 and h.blocks.num_cached_partial == 1
    (source,) = h.blocks._partials._entry_of
    assert h.blocks._partials.entry(source)[1] == (208, turn1.output_ids[0])
    full, _ = h.blocks.match_prefix(turn1.all_ids, 2)

    turn2 = make_seq("t2", [*turn1.all_ids, 90, 91], max_tokens=3)  # 13 tokens
    h.add(turn2)
    out = h.sched.schedule()
    check_plan(h, out)
    # 8 tokens in full blocks + 2 copied: it computes the unfed output and its 2 new tokens
    assert chunk_sizes(out) == [("t2", 3)]
    assert (turn2.num_computed, turn2.num_cached_prompt_tokens) == (10, 10)
    assert turn2.block_table[:2] == full and len(turn2.block_table) == 4
    assert out.copies == [SlotCopy(source, turn2.block_table[2], 2)]
    # the source stays cached and unheld for others
    assert h.blocks.allocator.refcount(source) == 0 and source in h.blocks._partials
    h.run(out)
    h.run_until_done()
    assert turn2.output_ids == expected_outputs(turn2.prompt_ids, 3)
    # turn 2's tail (15 computed tokens: 3 slots) joins turn 1's, under another parent
    assert h.blocks.num_cached_partial == 2 and h.blocks.num_evictions == 0

    # a prompt that agrees with the tail on one token copies one slot; a prompt whose tail
    # could be copied whole still computes its last token
    one = make_seq("one", [*turn1.prompt_ids, 77, 78])
    whole = make_seq("whole", turn1.prompt_ids + turn1.output_ids[:1])  # 10 tokens
    h.add(one, whole)
    out = h.sched.schedule()
    check_plan(h, out)
    assert chunk_sizes(out) == [("one", 2), ("whole", 1)]
    assert one.num_cached_prompt_tokens == 9 and whole.num_cached_prompt_tokens == 9
    assert [c.num_slots for c in out.copies] == [1, 1]
    h.run(out)
    h.run_until_done()
    assert whole.output_ids == expected_outputs(whole.prompt_ids, 4)


def test_a_copy_reads_its_source_before_a_later_admission_reuses_it() -> None:
    h = Harness(num_blocks=6)
    x = make_seq("x", [1, 2, 3, 4, 5], max_tokens=2)  # 6 computed: a full block + 2 slots
    h.add(x)
    h.run_until_done()
    (source,) = h.blocks._partials._entry_of
    assert h.blocks.allocator.num_free == 4 and next(iter(h.blocks._evictable)) == source
    a = make_seq("a", [*x.all_ids, 90])  # 1 cached block + 2 copied slots, 1 fresh block
    b = make_seq("b", list(range(100, 116)))  # 4 fresh blocks: the 3 free ones and the source
    h.add(a, b)
    out = h.sched.schedule()
    check_plan(h, out)  # a's slots hold the right keys once the copies are made
    assert chunk_sizes(out) == [("a", 2), ("b", 16)]
    assert out.copies == [SlotCopy(source, a.block_table[1], 2)]
    assert source in b.block_table and h.blocks.num_evictions == 1
    assert h.blocks.num_cached_partial == 0
    h.run(out)  # copies first, then b writes its keys over the old source
    h.run_until_done()
    assert a.output_ids == expected_outputs(a.prompt_ids, 4)
    assert b.output_ids == expected_outputs(b.prompt_ids, 4)


def test_a_newcomer_may_evict_the_source_it_copies_into_itself() -> None:
    h = Harness(num_blocks=4)
    x = make_seq("x", [1, 2, 3, 4, 5], max_tokens=2)
    h.add(x)
    h.run_until_done()
    (source,) = h.blocks._partials._entry_of
    keeper = make_seq("keeper", list(range(50, 58)), max_tokens=2)
    h.add(keeper)
    h.step()  # keeper holds the 2 free blocks: only x's 2 cached blocks are available
    assert h.blocks.allocator.num_free == 0 and h.blocks.num_available == 2
    a = make_seq("a", [*x.all_ids, 90])
    h.add(a)
    out = h.sched.schedule()  # keeper needs a 3rd block: it evicts the source; a must wait
    check_plan(h, out)
    assert chunk_sizes(out) == [("keeper", 1)] and list(h.sched.waiting) == [a]
    assert h.blocks.num_cached_partial == 0 and h.blocks.num_evictions == 1
    h.run(out)  # keeper finishes: its tail is cached, x's full block still is
    out = h.sched.schedule()
    check_plan(h, out)
    assert chunk_sizes(out) == [("a", 4)] and out.copies == []
    assert a.num_cached_prompt_tokens == 4
    h.run(out)
    h.run_until_done()

    # once more with the source the only block left: the newcomer's fresh block is the source
    h = Harness(num_blocks=3)
    x = make_seq("x", [1, 2, 3, 4, 5], max_tokens=2)
    h.add(x)
    h.run_until_done()
    (source,) = h.blocks._partials._entry_of
    keeper = make_seq("keeper", [60], max_tokens=3)
    h.add(keeper)
    h.step()
    assert h.blocks.allocator.num_free == 0 and h.blocks.num_available == 2
    a = make_seq("a", [*x.all_ids, 90])
    h.add(a)
    out = h.sched.schedule()
    check_plan(h, out)
    assert chunk_sizes(out) == [("keeper", 1), ("a", 2)]
    assert out.copies == [SlotCopy(source, source, 2)] and a.block_table[1] == source
    assert a.num_cached_prompt_tokens == 6 and h.blocks.num_evictions == 1
    h.run(out)
    h.run_until_done()
    assert a.output_ids == expected_outputs(a.prompt_ids, 4)


def test_windowed_sequences_neither_leave_nor_copy_partial_tails() -> None:
    h = Harness(num_blocks=32)
    policy = KVPolicy("window", window=16)
    w = make_seq("w", list(range(9)), max_tokens=2, policy=policy)
    h.add(w)
    h.run_until_done()
    assert h.blocks.num_cached == 2 and h.blocks.num_cached_partial == 0
    full = make_seq("full", list(range(9)), max_tokens=2)
    h.add(full)
    h.run_until_done()
    assert h.blocks.num_cached_partial == 1
    w2 = make_seq("w2", [*full.all_ids, 5], max_tokens=2, policy=policy)
    h.add(w2)
    out = h.step()
    assert out.copies == [] and w2.num_cached_prompt_tokens == 8
    h.run_until_done()
    assert w2.output_ids == expected_outputs(w2.prompt_ids, 2)


def test_a_preempted_sequence_copies_back_its_own_partial_tail() -> None:
    h = Harness(num_blocks=6, budget=16)
    a = make_seq("a", [1, 2, 3], max_tokens=2)
    c = make_seq("c", list(range(300, 323)), max_tokens=1)  # 23 tokens
    h.add(a, c)
    assert chunk_sizes(h.step()) == [("a", 3), ("c", 13)]  # c: 13 computed in 4 blocks
    out = h.sched.schedule()  # c's next 10 tokens need 2 blocks, 1 is left: c preempts itself
    check_plan(h, out)
    assert out.preempted == [c] and chunk_sizes(out) == [("a", 1)]
    (tail,) = h.blocks._partials._entry_of  # c's 13th computed token, in its 4th block
    assert h.blocks._partials.entry(tail)[1] == (312,)
    h.run(out)  # a finishes
    out = h.sched.schedule()
    check_plan(h, out)
    assert chunk_sizes(out) == [("c", 10)]  # 12 in full blocks, 1 copied
    assert c.num_computed == 13 and out.copies == [SlotCopy(tail, c.block_table[3], 1)]
    assert c.num_cached_prompt_tokens == 0  # set at first admission only
    # the pool was short: c's own fresh blocks evicted a's block and then the source
    assert tail in c.block_table[4:] and h.blocks.num_evictions == 2
    h.run(out)
    h.run_until_done()
    assert c.output_ids == expected_outputs(c.prompt_ids, 1)
