"""Randomized traffic through the scheduler: conversations reusing their tails, arrivals,
aborts, windows and preemption, with every invariant checked at every step."""

from __future__ import annotations

import random

import pytest

from cache.kv_policy import KVPolicy
from cluster.engine.sequence import Sequence
from tests.scheduler_harness import (
    Harness,
    check_plan,
    expected_outputs,
    make_seq,
)


@pytest.mark.parametrize("num_blocks", [120, 20])
def test_random_conversations_reuse_their_tails_and_keep_every_invariant(num_blocks: int) -> None:
    rng = random.Random(7)
    h = Harness(num_blocks=num_blocks, max_num_seqs=4, budget=12)
    histories: dict[int, list[int]] = {i: [] for i in range(6)}
    turns: list[tuple[int, Sequence]] = []
    messages: dict[str, list[int]] = {}
    copies = 0
    for _ in range(6):
        for conv in histories:
            message = [rng.randrange(1, 50) for _ in range(rng.randint(1, 7))]
            seq = make_seq(f"c{conv}t{len(turns)}", histories[conv] + message, rng.randint(1, 6))
            messages[seq.request_id] = message
            h.add(seq)
            turns.append((conv, seq))
        while h.sched.has_unfinished():
            out = h.step()
            copies += len(out.copies)
        for conv, seq in turns[-len(histories) :]:
            assert seq.output_ids == expected_outputs(seq.prompt_ids, seq.params.max_tokens)
            histories[conv] = seq.all_ids
    assert h.blocks.num_held == 0
    # later turns compute only the new message and the unfed last output token, unless the
    # pool was short and evicted their history's tail
    exact = [
        seq
        for conv, seq in turns[len(histories) :]
        if seq.num_cached_prompt_tokens == len(seq.prompt_ids) - len(messages[seq.request_id]) - 1
    ]
    if num_blocks == 120:  # room for every history: only stale tails are evicted
        assert len(exact) == len(turns) - len(histories) and copies > 15
        assert h.sched.num_preemptions == 0
    else:
        assert h.sched.num_preemptions > 0 and h.blocks.num_evictions > 0 and copies > 0


def test_random_traffic_keeps_every_invariant() -> None:
    rng = random.Random(20240611)
    h = Harness(num_blocks=12, max_num_seqs=4, budget=16)
    prefixes = [[rng.randrange(1, 50) for _ in range(12)] for _ in range(3)]
    live: list[Sequence] = []
    all_seqs: list[Sequence] = []
    admitted_from_waiting = 0
    preempting_steps = 0
    dropped: set[str] = set()
    aborted = 0
    copies = continued = 0
    for step in range(200):
        done = [s for s in all_seqs if s.finish_reason == "length" and s.num_tokens <= 30]
        if done and rng.random() < 0.15:  # the next turn of a conversation: history + message
            history = rng.choice(done).all_ids
            message = [rng.randrange(1, 50) for _ in range(rng.randint(1, 6))]
            seq = make_seq(f"r{step}", history + message, rng.randint(1, 8), None, float(step))
            h.add(seq)
            live.append(seq)
            all_seqs.append(seq)
            continued += 1
        elif rng.random() < 0.45:
            shared = rng.choice(prefixes)[: rng.choice([0, 4, 8, 12])]
            windowed = rng.random() < 0.2
            tail = [rng.randrange(1, 50) for _ in range(rng.randint(1, 40 if windowed else 16))]
            policy = KVPolicy("window", window=12, sinks=2) if windowed else KVPolicy()
            seq = make_seq(f"r{step}", shared + tail, rng.randint(1, 12), policy, float(step))
            h.add(seq)
            live.append(seq)
            all_seqs.append(seq)
        live = [s for s in live if not s.is_finished]
        if live and rng.random() < 0.08:
            victim = rng.choice(live)
            assert h.sched.abort(victim.request_id) is victim
            assert victim.finish_reason == "abort" and victim.block_table == []
            aborted += 1

        waiting_before = list(h.sched.waiting)
        running_before = {id(s) for s in h.sched.running}
        out = h.sched.schedule()
        check_plan(h, out)
        assert len(h.sched.running) <= 4 and out.num_tokens <= 16
        newcomers = [c.seq for c in out.chunks if id(c.seq) not in running_before]
        if out.preempted:
            preempting_steps += 1
            assert newcomers == []
            assert list(h.sched.waiting)[: len(out.preempted)] == out.preempted[::-1]
        else:
            assert newcomers == waiting_before[: len(newcomers)]  # FIFO
        admitted_from_waiting += len(newcomers)
        copies += len(out.copies)
        h.run(out)
        dropped |= {s.request_id for s in h.sched.running if s.num_dropped}
        h.clock.now += 0.5

    h.run_until_done(max_steps=2000)
    assert h.blocks.num_held == 0
    assert all(s.is_finished for s in all_seqs)
    for seq in all_seqs:
        if seq.finish_reason == "length":
            assert seq.output_ids == expected_outputs(seq.prompt_ids, seq.params.max_tokens)
    # the traffic exercised what it is meant to
    assert len(all_seqs) > 50 and admitted_from_waiting > 50
    assert h.sched.num_preemptions > 10 and preempting_steps > 10
    assert any(s.num_cached_prompt_tokens > 0 for s in all_seqs)
    assert dropped and aborted > 5
    assert h.blocks.num_evictions > 0
    assert continued > 20 and copies > 5  # the pool is tight: most partial tails are evicted
