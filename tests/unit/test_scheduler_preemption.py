"""Preemption and abort in the scheduler: the newest running sequence goes, its blocks are
freed and its cached prefix reused; an abort frees blocks wherever the request is."""

from __future__ import annotations

from cache.block_allocator import blocks_for
from cluster.engine.sequence import SequenceStatus
from tests.scheduler_harness import (
    BS,
    Harness,
    check_plan,
    check_state,
    chunk_sizes,
    expected_outputs,
    make_seq,
)


def test_preemption_takes_the_newest_and_admits_nobody_that_step() -> None:
    h = Harness(num_blocks=7, budget=16, prefix_caching=False)
    a = make_seq("a", [1, 2, 3], max_tokens=12)
    b = make_seq("b", [5], max_tokens=12)
    c = make_seq("c", list(range(300, 318)), max_tokens=8)
    h.add(a, b, c)
    assert chunk_sizes(h.step()) == [("a", 3), ("b", 1), ("c", 12)]
    assert chunk_sizes(h.step()) == [("a", 1), ("b", 1), ("c", 6)]
    # a has 4 keys in 1 block and needs a 2nd; b and c fit; the pool is full
    assert h.blocks.num_available == 0 and len(a.block_table) == 1
    assert len(c.block_table) == blocks_for(c.num_keys + 1, BS) == 5
    c_blocks = list(c.block_table)
    out = h.sched.schedule()
    check_plan(h, out)
    assert out.preempted == [c]  # the newest goes, not b, not a
    assert chunk_sizes(out) == [("a", 1), ("b", 1)]
    assert h.sched.running == [a, b] and list(h.sched.waiting) == [c]
    assert (c.status, c.block_table, c.logical_blocks) == (SequenceStatus.WAITING, [], [])
    assert (c.num_computed, c.num_preemptions, h.sched.num_preemptions) == (0, 1, 1)
    # c's 5 blocks were freed; a took one of them
    assert h.blocks.num_held == 7 - 5 + 1
    assert all(
        h.blocks.allocator.refcount(block) == 0 for block in set(c_blocks) - {a.block_table[1]}
    )
    # c would fit now (14 tokens of budget left, 4 blocks for them), but is not admitted
    assert h.blocks.num_available == 4 == blocks_for(16 - out.num_tokens, BS)
    h.run(out)
    recompute = len(c.all_ids)
    assert recompute == 19  # its prompt and its one output
    out = h.sched.schedule()
    check_plan(h, out)
    assert chunk_sizes(out) == [("a", 1), ("b", 1), ("c", 14)]
    assert c.num_computed == 0 and c.status is SequenceStatus.RUNNING
    h.run(out)
    h.run_until_done()
    assert [c.finish_reason, a.finish_reason, b.finish_reason] == ["length"] * 3
    assert c.output_ids == expected_outputs(c.prompt_ids, 8)
    assert a.output_ids == expected_outputs(a.prompt_ids, 12)
    assert b.output_ids == expected_outputs(b.prompt_ids, 12)
    assert a.num_preemptions == 0 and c.num_preemptions >= 1
    assert h.sched.num_preemptions == a.num_preemptions + b.num_preemptions + c.num_preemptions
    assert h.blocks.num_held == 0


def test_the_newest_preempts_itself_and_reuses_its_cached_prefix() -> None:
    h = Harness(num_blocks=6, budget=16)
    a = make_seq("a", [1, 2, 3], max_tokens=3)
    c = make_seq("c", list(range(300, 316)), max_tokens=8)
    h.add(a, c)
    assert chunk_sizes(h.step()) == [("a", 3), ("c", 13)]
    assert chunk_sizes(h.step()) == [("a", 1), ("c", 3)]
    assert h.blocks.num_available == 1 and len(c.output_ids) == 1
    out = h.sched.schedule()  # a takes the last block; c needs one too and is the newest
    check_plan(h, out)
    assert out.preempted == [c] and chunk_sizes(out) == [("a", 1)]
    assert list(h.sched.waiting) == [c] and c.num_preemptions == 1
    h.run(out)  # a finishes
    assert a.is_finished and h.blocks.num_held == 0
    cached, _ = h.blocks.match_prefix(c.all_ids, 4)
    assert len(cached) == 4  # c's 4 full prompt blocks stayed cached
    out = h.sched.schedule()
    check_plan(h, out)
    # 16 of its 17 tokens are cached: it recomputes only its output token
    assert chunk_sizes(out) == [("c", 1)]
    assert c.num_computed == 16 and c.block_table[:4] == cached
    assert c.num_cached_prompt_tokens == 0  # set at first admission only
    # the pool was all cached blocks: c's fresh block evicted a's partial tail, the LRU
    assert h.blocks.num_evictions == 1 and h.blocks.num_cached_partial == 0
    h.run(out)
    h.run_until_done()
    assert c.output_ids == expected_outputs(c.prompt_ids, 8)
    assert h.sched.num_preemptions == 1 and h.blocks.num_held == 0


def test_abort_of_waiting_and_running_sequences_frees_their_blocks() -> None:
    h = Harness(num_blocks=16, max_num_seqs=1, budget=8)
    a = make_seq("a", list(range(20)), max_tokens=4)
    b = make_seq("b", [1, 2], max_tokens=4)
    h.add(a, b)
    h.step()  # a mid-prefill: 8 of 20
    assert a.num_computed == 8 and h.blocks.num_held == 2 and list(h.sched.waiting) == [b]
    h.clock.now = 5000.0
    assert h.sched.abort("b") is b
    assert (b.status, b.finish_reason, b.finish_time) == (SequenceStatus.FINISHED, "abort", 5000.0)
    assert not h.sched.waiting and h.blocks.num_held == 2
    assert h.sched.abort("a") is a
    assert a.is_finished and a.finish_reason == "abort" and a.block_table == []
    assert not h.sched.running and not h.sched.has_unfinished()
    assert h.blocks.num_held == 0 and h.blocks.num_available == 16
    assert h.sched.abort("a") is None and h.sched.abort("nope") is None
    check_state(h)
    assert h.sched.schedule().chunks == []


def test_abort_of_a_decoding_sequence_with_shared_blocks() -> None:
    h = Harness(num_blocks=16)
    prompt = list(range(12))
    x, y = make_seq("x", prompt, max_tokens=5), make_seq("y", prompt, max_tokens=5)
    h.add(x)
    h.step()
    h.add(y)
    h.step()  # y shares x's first 2 blocks
    shared = x.block_table[:2]
    assert y.block_table[:2] == shared
    assert [h.blocks.allocator.refcount(b) for b in shared] == [2, 2]
    h.sched.abort("x")
    check_state(h)
    assert [h.blocks.allocator.refcount(b) for b in shared] == [1, 1]
    h.run_until_done()
    assert h.blocks.num_held == 0
