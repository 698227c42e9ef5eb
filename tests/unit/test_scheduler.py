"""Continuous batching without a model: admission, chunked prefill, prefix reuse, preemption.

``Harness`` plays the engine's part: it runs each scheduled chunk (writing fake KV
"contents" into the chunk's blocks so reuse of a wrong block shows), advances
``num_computed``, registers full blocks, samples a deterministic token for
sequences that caught up, finishes them at ``max_tokens`` and applies the window
KV policy.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence as Seq

import pytest

from cache.block_allocator import blocks_for
from cache.block_manager import BlockManager
from cache.kv_policy import KVPolicy
from cache.prefix_hash import hash_block
from cluster.engine.scheduler import (
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    SlotCopy,
)
from cluster.engine.sequence import Sequence, SequenceStatus
from experts.sampling_params import SamplingParams

BS = 4


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_seq(
    request_id: str,
    prompt: list[int],
    max_tokens: int = 4,
    policy: KVPolicy | None = None,
    arrival_time: float = 0.0,
) -> Sequence:
    return Sequence(
        request_id,
        list(prompt),
        SamplingParams(max_tokens=max_tokens),
        policy or KVPolicy(),
        arrival_time,
    )


def fake_token(seq: Sequence) -> int:
    """The token the fake model samples: a function of the tokens so far."""
    return 1000 + (sum(seq.all_ids) * 31 + len(seq.output_ids)) % 997


def expected_outputs(prompt: list[int], max_tokens: int) -> list[int]:
    probe = make_seq("probe", prompt, max_tokens)
    for _ in range(max_tokens):
        probe.output_ids.append(fake_token(probe))
    return probe.output_ids


def chunk_sizes(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(c.seq.request_id, c.num_tokens) for c in out.chunks]


class Harness:
    def __init__(
        self,
        num_blocks: int,
        max_num_seqs: int = 8,
        budget: int = 64,
        prefix_caching: bool = True,
    ) -> None:
        self.clock = FakeClock()
        self.blocks = BlockManager(num_blocks, BS, prefix_caching)
        self.config = SchedulerConfig(max_num_seqs, budget)
        self.sched = Scheduler(self.config, self.blocks, self.clock)
        self.kv: dict[int, list[int | None]] = {}  # block -> token id per slot
        self.finished: list[Sequence] = []

    def add(self, *seqs: Sequence) -> None:
        for seq in seqs:
            self.sched.add(seq)

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        check_plan(self, out)
        self.run(out)
        return out

    def run(self, out: SchedulerOutput) -> None:
        for copy in out.copies:  # as the engine does: in order, before any KV write
            assert copy.dst_block not in self.blocks._partials
            assert self.blocks.allocator.refcount(copy.dst_block) == 1
            src = self.kv[copy.src_block][: copy.num_slots]
            assert None not in src, f"copying uncomputed slots of block {copy.src_block}"
            dst = self.kv.setdefault(copy.dst_block, [None] * BS)
            dst[: copy.num_slots] = src
        for chunk in out.chunks:
            self._compute(chunk)
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.num_computed == seq.num_tokens:
                seq.output_ids.append(fake_token(seq))
                if seq.first_token_time is None:
                    seq.first_token_time = self.clock()
                if len(seq.output_ids) >= seq.params.max_tokens:
                    self.sched.finish(seq, "length")
                    self.finished.append(seq)
        for chunk in out.chunks:
            if not chunk.seq.is_finished:
                self._apply_kv_policy(chunk.seq)
        check_state(self)
        self.clock.now += 1.0

    def run_until_done(self, max_steps: int = 500) -> int:
        steps = 0
        while self.sched.has_unfinished():
            assert steps < max_steps, (
                f"no progress after {steps} steps: waiting "
                f"{[s.request_id for s in self.sched.waiting]}, running "
                f"{[s.request_id for s in self.sched.running]}"
            )
            self.step()
            steps += 1
        assert self.blocks.num_held == 0
        return steps

    def _compute(self, chunk: ScheduledChunk) -> None:
        """Write the chunk's tokens into its blocks, as the model's KV writes would."""
        seq = chunk.seq
        ids = seq.all_ids
        for pos in range(seq.num_computed, seq.num_computed + chunk.num_tokens):
            index = seq.logical_blocks.index(pos // BS)
            block = seq.block_table[index]
            # never write into a block someone else holds or a named (immutable) block
            assert self.blocks.allocator.refcount(block) == 1, (seq.request_id, block)
            assert block not in self.blocks._hash_of, (seq.request_id, block)
            assert block not in self.blocks._partials, (seq.request_id, block)
            self.kv.setdefault(block, [None] * BS)[pos % BS] = ids[pos]
        seq.num_computed += chunk.num_tokens
        if seq.num_dropped == 0 and self.blocks.enable_prefix_caching:
            for j in range(len(seq.block_hashes), seq.num_computed // BS):
                parent = seq.block_hashes[-1] if seq.block_hashes else seq.root_hash
                block_hash = hash_block(parent, ids[j * BS : (j + 1) * BS])
                self.blocks.register(seq.block_table[j], block_hash)
                seq.block_hashes.append(block_hash)

    def _apply_kv_policy(self, seq: Sequence) -> None:
        drop = seq.kv_policy.blocks_to_evict(seq.logical_blocks, seq.num_keys, BS)
        if not drop:
            return
        self.blocks.free([seq.block_table[i] for i in drop])
        seq.block_table = [b for i, b in enumerate(seq.block_table) if i not in drop]
        seq.logical_blocks = [b for i, b in enumerate(seq.logical_blocks) if i not in drop]
        seq.num_dropped += len(drop) * BS


def check_plan(h: Harness, out: SchedulerOutput) -> None:
    """What a freshly scheduled step must satisfy before the model runs."""
    assert out.num_tokens <= h.config.max_num_batched_tokens
    seqs = [c.seq for c in out.chunks]
    assert len({id(s) for s in seqs}) == len(seqs), "a sequence scheduled twice"
    for chunk in out.chunks:
        seq = chunk.seq
        assert seq.status is SequenceStatus.RUNNING and seq in h.sched.running
        assert 1 <= chunk.num_tokens <= seq.num_uncomputed
        # exactly the blocks its keys plus this chunk need, no more
        assert len(seq.block_table) == blocks_for(seq.num_keys + chunk.num_tokens, BS)
    for seq in out.preempted:
        assert seq.status is SequenceStatus.WAITING and seq in h.sched.waiting
        assert seq.block_table == [] and seq.num_computed == 0
    for copy in out.copies:  # into the block where a scheduled sequence's computed keys end
        assert 1 <= copy.num_slots < BS
        targets = [
            s
            for s in seqs
            if not s.kv_policy.is_window
            and s.block_table[s.num_computed // BS] == copy.dst_block
            and s.num_computed % BS == copy.num_slots
        ]
        assert len(targets) == 1, copy
    check_state(h, out.copies)


def check_state(h: Harness, pending: Seq[SlotCopy] = ()) -> None:
    """Queue and block invariants; ``pending`` copies are made before the KV is checked."""
    sched, blocks = h.sched, h.blocks
    waiting_ids = {id(s) for s in sched.waiting}
    running_ids = {id(s) for s in sched.running}
    assert not waiting_ids & running_ids, "a sequence both waiting and running"
    assert len(waiting_ids) == len(sched.waiting) and len(running_ids) == len(sched.running)
    assert len(sched.running) <= h.config.max_num_seqs
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING
        assert seq.block_table == [] and seq.num_computed == 0
    appearances: Counter[int] = Counter()
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(seq.block_table) == len(set(seq.block_table)) == len(seq.logical_blocks)
        appearances.update(seq.block_table)
    for block in range(blocks.num_blocks):
        assert blocks.allocator.refcount(block) == appearances[block], block
    assert blocks.num_held == len(appearances)
    free, evictable = set(blocks.allocator._free), set(blocks._evictable)
    assert len(free) == blocks.allocator.num_free
    assert free | evictable | set(appearances) == set(range(blocks.num_blocks))
    assert not free & evictable and not (free | evictable) & set(appearances)
    kv = {block: list(slots) for block, slots in h.kv.items()}
    for copy in pending:
        kv.setdefault(copy.dst_block, [None] * BS)[: copy.num_slots] = kv[copy.src_block][
            : copy.num_slots
        ]
    for seq in sched.running:  # every computed key is in the right slot
        for index, logical in enumerate(seq.logical_blocks):
            slots = kv.get(seq.block_table[index], [None] * BS)
            for pos in range(logical * BS, min((logical + 1) * BS, seq.num_computed)):
                assert slots[pos % BS] == seq.all_ids[pos], (seq.request_id, pos)


# --- admission -----------------------------------------------------------------------------------


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


# --- prefix reuse --------------------------------------------------------------------------------


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


# --- preemption ----------------------------------------------------------------------------------


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


# --- abort, add ----------------------------------------------------------------------------------


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


# --- randomized stress ---------------------------------------------------------------------------


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
