"""Continuous batching without a model: the harness the scheduler's tests share.

``Harness`` plays the model's part only: it runs each scheduled chunk (writing fake KV
"contents" into the chunk's blocks so reuse of a wrong block shows) and samples a
deterministic token for sequences that caught up; the scheduler itself books the step
(``Scheduler.update``: computed tokens, full blocks named for reuse, finishes, KV
policies), as it does for the engine. ``check_plan`` and ``check_state`` are the
invariants every step must keep.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence as Seq

from cache.block_allocator import blocks_for
from cache.block_manager import BlockManager
from cache.kv_policy import KVPolicy
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
    """A scheduler over a small block pool, a fake clock, and a fake model's KV writes."""

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
        """Play the model's part in a step, then let the scheduler book it (``update``)."""
        for copy in out.copies:  # as the engine does: in order, before any KV write
            assert copy.dst_block not in self.blocks._partials
            assert self.blocks.allocator.refcount(copy.dst_block) == 1
            src = self.kv[copy.src_block][: copy.num_slots]
            assert None not in src, f"copying uncomputed slots of block {copy.src_block}"
            dst = self.kv.setdefault(copy.dst_block, [None] * BS)
            dst[: copy.num_slots] = src
        for chunk in out.chunks:
            self.compute(chunk)
        # a chunk that reaches the end of its sequence gives a token
        tokens = {
            row: fake_token(c.seq)
            for row, c in enumerate(out.chunks)
            if c.seq.num_uncomputed == c.num_tokens
        }
        self.sched.update(out, tokens, failed=())
        self.finished += [c.seq for c in out.chunks if c.seq.is_finished]
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

    def compute(self, chunk: ScheduledChunk) -> None:
        """Write the chunk's tokens into its blocks, as the model's KV writes would (before
        ``update`` counts them computed)."""
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
    free, evictable = set(blocks.allocator._free), set(blocks._evictable) | set(blocks._pinned)
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
