"""Continuous batching without a model: admission order, the token budget, chunked prefill,
max_num_seqs, and requests that can never fit (see ``tests/scheduler_harness.py``)."""

from __future__ import annotations

import pytest

from cache.kv_policy import KVPolicy
from cluster.engine.scheduler import SchedulerConfig
from tests.scheduler_harness import (
    Harness,
    chunk_sizes,
    expected_outputs,
    make_seq,
)


def test_scheduler_config_validation() -> None:
    with pytest.raises(ValueError, match="max_num_seqs=0 must be > 0"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens=-1 must be > 0"):
        SchedulerConfig(max_num_batched_tokens=-1)


def test_admission_is_first_come_first_served() -> None:
    h = Harness(num_blocks=64)
    a, b, c = (make_seq(n, [i + 1] * 3, max_tokens=2) for i, n in enumerate("abc"))
    h.add(a, b, c)
    out = h.step()
    assert chunk_sizes(out) == [("a", 3), ("b", 3), ("c", 3)]
    assert h.sched.running == [a, b, c] and not h.sched.waiting
    assert chunk_sizes(h.step()) == [("a", 1), ("b", 1), ("c", 1)]
    assert [s.finish_reason for s in h.finished] == ["length"] * 3
    assert not h.sched.has_unfinished() and h.blocks.num_held == 0


def test_nobody_overtakes_a_head_that_does_not_fit() -> None:
    h = Harness(num_blocks=8)
    a = make_seq("a", list(range(20)), max_tokens=4)  # 5 blocks, 6 at most
    h.add(a)
    assert chunk_sizes(h.step()) == [("a", 20)]
    big = make_seq("big", list(range(100, 116)), max_tokens=4)  # 4 blocks for its prompt
    small = make_seq("small", [7], max_tokens=1)  # 1 block: would fit
    h.add(big, small)
    out = h.step()  # a grows to 6 blocks: 2 left, too few for big
    assert chunk_sizes(out) == [("a", 1)]
    assert list(h.sched.waiting) == [big, small]
    assert h.blocks.num_available == 2
    h.run_until_done()
    assert h.finished[0] is a and {s.request_id for s in h.finished} == {"a", "big", "small"}
    assert h.blocks.num_held == 0


def test_max_num_seqs_limits_the_running_set() -> None:
    h = Harness(num_blocks=64, max_num_seqs=2)
    a = make_seq("a", [1, 2], max_tokens=1)
    b = make_seq("b", [3, 4], max_tokens=3)
    c = make_seq("c", [5, 6], max_tokens=2)
    h.add(a, b, c)
    assert chunk_sizes(h.step()) == [("a", 2), ("b", 2)]  # a finishes: 1 token
    assert list(h.sched.waiting) == [c] and a.is_finished
    assert chunk_sizes(h.step()) == [("b", 1), ("c", 2)]
    assert len(h.sched.running) == 2
    h.run_until_done()
    assert h.blocks.num_held == 0


def test_running_sequences_use_the_budget_before_newcomers() -> None:
    h = Harness(num_blocks=64, budget=2)
    a, b = make_seq("a", [1], max_tokens=5), make_seq("b", [2], max_tokens=5)
    h.add(a, b)
    assert chunk_sizes(h.step()) == [("a", 1), ("b", 1)]
    c = make_seq("c", [3], max_tokens=1)
    h.add(c)
    assert chunk_sizes(h.step()) == [("a", 1), ("b", 1)]
    assert list(h.sched.waiting) == [c]
    h.run_until_done()
    assert c.output_ids and h.blocks.num_held == 0


def test_chunked_prefill_is_mixed_with_decodes_within_the_budget() -> None:
    h = Harness(num_blocks=64, budget=16)
    a = make_seq("a", [1, 2, 3], max_tokens=10)
    b = make_seq("b", [4, 5, 6], max_tokens=10)
    c = make_seq("c", list(range(100, 150)), max_tokens=2)
    h.add(a, b, c)
    assert chunk_sizes(h.step()) == [("a", 3), ("b", 3), ("c", 10)]
    assert c.num_computed == 10 and c.output_ids == []
    assert len(c.block_table) == 3
    assert chunk_sizes(h.step()) == [("a", 1), ("b", 1), ("c", 14)]
    assert c.num_computed == 24 and c.output_ids == [] and len(c.block_table) == 6
    assert chunk_sizes(h.step()) == [("a", 1), ("b", 1), ("c", 14)]
    assert c.num_computed == 38 and c.output_ids == []
    assert chunk_sizes(h.step()) == [("a", 1), ("b", 1), ("c", 12)]
    assert c.num_computed == 50 and len(c.output_ids) == 1
    assert c.first_token_time == 1003.0  # the fake clock's 4th step
    assert chunk_sizes(h.step()) == [("a", 1), ("b", 1), ("c", 1)]
    assert c.is_finished and c.finish_reason == "length" and c.finish_time == 1004.0
    assert c.output_ids == expected_outputs(c.prompt_ids, 2)
    h.run_until_done()
    assert a.output_ids == expected_outputs([1, 2, 3], 10)
    assert h.blocks.num_held == 0


def test_a_lone_long_prompt_is_split_by_the_budget() -> None:
    h = Harness(num_blocks=16, budget=16)
    a = make_seq("a", list(range(40)), max_tokens=2)
    h.add(a)
    sizes = [chunk_sizes(h.step()) for _ in range(4)]
    assert sizes == [[("a", 16)], [("a", 16)], [("a", 8)], [("a", 1)]]
    assert a.is_finished and h.blocks.num_held == 0


def test_add_refuses_a_request_that_can_never_fit() -> None:
    h = Harness(num_blocks=4)
    with pytest.raises(
        ValueError, match=r"request 'big' needs up to 5 KV blocks but the pool has 4"
    ):
        h.add(make_seq("big", list(range(10)), max_tokens=7))  # 17 tokens
    assert not h.sched.has_unfinished()
    fits = make_seq("fits", list(range(10)), max_tokens=6)  # 16 tokens: exactly 4 blocks
    h.add(fits)
    # a window policy bounds the keys: a long prompt is accepted
    h.add(make_seq("win", list(range(30)), max_tokens=50, policy=KVPolicy("window", window=8)))
    assert [s.request_id for s in h.sched.waiting] == ["fits", "win"]
    h.sched.abort("win")
    h.run_until_done()
    assert fits.output_ids == expected_outputs(fits.prompt_ids, 6)
    assert h.blocks.num_held == 0


def test_ids_between_slices_the_history_without_joining_it() -> None:
    seq = make_seq("s", [10, 11, 12])
    seq.output_ids += [20, 21]
    spans = [(0, 5), (0, 2), (1, 3), (2, 4), (3, 5), (4, 5), (5, 5)]
    for start, end in spans:
        assert seq.ids_between(start, end) == seq.all_ids[start:end], (start, end)


def test_sequences_compare_by_identity() -> None:
    a, b = make_seq("s", [1, 2]), make_seq("s", [1, 2])
    assert a != b and a == a and a in [b, a] and b not in [a]
