"""Window KV policies in the scheduler: bounded blocks while decoding, prefill in chunks of at
most the window, bounded reuse, and every accepted request running to completion."""

from __future__ import annotations

import pytest

from cache.block_allocator import blocks_for
from cache.kv_policy import KVPolicy
from tests.scheduler_harness import (
    BS,
    Harness,
    check_plan,
    chunk_sizes,
    expected_outputs,
    make_seq,
)


def test_a_window_sequence_decodes_in_bounded_blocks() -> None:
    h = Harness(num_blocks=16, budget=8)
    policy = KVPolicy("window", window=12, sinks=2)
    w = make_seq("w", list(range(28)), max_tokens=30, policy=policy)
    h.add(w)
    most = 0
    while h.sched.has_unfinished():
        out = h.sched.schedule()
        check_plan(h, out)
        most = max(most, h.blocks.num_held)
        h.run(out)
        if not w.is_finished:
            assert w.num_keys <= 12 and w.logical_blocks[0] == 0  # the sink block stays
    assert most == blocks_for(12 + 8, BS)  # a full window plus one chunk, never more
    assert w.output_ids == expected_outputs(w.prompt_ids, 30)
    assert h.blocks.num_held == 0


def test_a_window_request_that_add_accepts_is_eventually_scheduled() -> None:
    # The 40-token prompt is longer than the 8-block pool (32 keys) but its window is
    # not, so add() accepts it; the scheduler must then run it and what queues behind.
    # (Regression: chunks were sized by the token budget alone, so the first chunk
    # needed 10 blocks and the queue waited forever.)
    h = Harness(num_blocks=8, budget=64)
    w = make_seq("w", list(range(40)), max_tokens=4, policy=KVPolicy("window", window=16))
    after = make_seq("after", [1, 2, 3], max_tokens=2)
    h.add(w, after)  # accepted: no ValueError
    h.run_until_done(max_steps=50)
    assert w.finish_reason == "length" and after.finish_reason == "length"
    assert w.output_ids == expected_outputs(w.prompt_ids, 4)


def test_a_windowed_prompt_is_prefilled_in_chunks_of_at_most_the_window() -> None:
    h = Harness(num_blocks=16, budget=64)
    w = make_seq("w", list(range(40)), max_tokens=2, policy=KVPolicy("window", window=16))
    h.add(w)
    sizes = []
    while h.sched.has_unfinished():
        sizes.append(chunk_sizes(h.step()))
        assert w.is_finished or w.num_keys <= 16
    assert sizes == [[("w", 16)], [("w", 16)], [("w", 8)], [("w", 1)]]
    assert h.blocks.num_held == 0


def test_a_windowed_newcomer_reuses_at_most_a_window_of_cached_blocks() -> None:
    h = Harness(num_blocks=16, budget=64)
    prompt = list(range(40))
    h.add(make_seq("full", prompt, max_tokens=1))
    h.step()
    assert len(h.blocks.match_prefix(prompt, 10)[0]) == 10
    w = make_seq("w", prompt, max_tokens=2, policy=KVPolicy("window", window=8))
    h.add(w)
    out = h.sched.schedule()
    check_plan(h, out)
    assert chunk_sizes(out) == [("w", 8)]
    assert w.num_computed == 8 and w.num_cached_prompt_tokens == 8
    h.run(out)
    h.run_until_done()
    assert w.output_ids == expected_outputs(prompt, 2)


@pytest.mark.parametrize("budget", [4, 16, 64])
def test_every_request_that_add_accepts_runs_alone_to_completion(budget: int) -> None:
    policies = [
        KVPolicy(),
        KVPolicy("window", window=8),
        KVPolicy("window", window=12, sinks=2),
        KVPolicy("window", window=16),
        KVPolicy("window", window=24),
    ]
    accepted_longer_than_pool = 0
    for policy in policies:
        for prompt_len in (1, 5, 16, 31, 40, 90):
            for max_tokens in (1, 3, 20):
                h = Harness(num_blocks=8, budget=budget)
                prompt = [(7 * i) % 50 for i in range(prompt_len)]
                seqs = [make_seq(f"r{n}", prompt, max_tokens, policy) for n in range(2)]
                fits = blocks_for(prompt_len + max_tokens, BS) <= 8
                try:
                    h.add(seqs[0])
                except ValueError as err:
                    assert not fits
                    assert "request 'r0' needs up to" in str(err)
                    assert "but the pool has 8" in str(err)
                    continue
                if not policy.is_window:
                    assert fits
                if prompt_len > 32:
                    accepted_longer_than_pool += 1
                h.run_until_done(max_steps=200)
                h.add(seqs[1])  # again, with its prefix cached
                h.run_until_done(max_steps=200)
                for seq in seqs:
                    assert seq.output_ids == expected_outputs(prompt, max_tokens)
    assert accepted_longer_than_pool >= 6
