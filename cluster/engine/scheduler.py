"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget. Running sequences go first, oldest first: a
decoding sequence takes one token, a prefilling one takes the next chunk of
its prompt that fits the budget (chunked prefill, mixed with decodes). Then
waiting sequences are admitted in arrival order while the budget, the block
pool and ``max_num_seqs`` allow; a newcomer first takes the cached blocks of
its longest cached prefix and computes only the rest. When a running
sequence needs a block and none is left, the newest running sequence is
preempted: its blocks are freed and it is recomputed later (its prefix may
still be cached). Ids and integers only: no tensors, no Ray.

Token-granular reuse of a tail: a sequence that lets go of its blocks leaves a
partly computed last block cached as a partial entry; a newcomer whose cached
chain of full blocks ends where that entry starts gets a fresh block and a
``SlotCopy`` of the entry's matching slots into it, which the engine performs
before the step's forward pass (in order: a later admission may evict and
reuse the source, but nothing writes the pool before the copies are done).

KV groups (``cache.kv_groups``; gpt-oss's sliding layers): each sliding group has a block
table of its own (``Sequence.window_tables``), grown with group 0's and trimmed after every
step to the blocks its window still sees; admission takes each group's cached blocks of a
prefix every group serves, and a sequence's need counts every group. Partial blocks are not
kept for such models (every group's tail would have to match).

A step is ``schedule``, the engine's forward pass and sampling, then ``update``: the
scheduler books what the step computed (full blocks named for prefix reuse, sampled tokens,
finished sequences retired, KV policies applied), so the whole bookkeeping runs without a
model in the tests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from cache.block_allocator import blocks_for
from cache.block_manager import BlockManager
from cache.kv_policy import KVPolicy
from cache.prefix_hash import hash_block
from cluster.engine.sequence import Sequence, SequenceStatus, finish_reason
from cluster.engine.window_tables import (
    chunk_slots,
    release_groups,
    slide_windows,
    window_inputs,
    window_needs,
)

__all__ = [  # chunk_slots and window_inputs: re-exported for the engine
    "ScheduledChunk",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SlotCopy",
    "check_fits",
    "chunk_slots",
    "max_blocks",
    "window_inputs",
]


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be > 0")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be > 0")


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed on


@dataclass(frozen=True)
class SlotCopy:
    """Copy the K/V of the first ``num_slots`` slots of ``src_block`` into ``dst_block``."""

    src_block: int
    dst_block: int
    num_slots: int


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[SlotCopy] = field(default_factory=list)  # before the forward pass, in order

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


def max_blocks(num_tokens: int, max_new_tokens: int, policy: KVPolicy, block_size: int) -> int:
    """Most blocks a request can ever hold at once."""
    most_keys = num_tokens + max_new_tokens
    if policy.is_window:  # kept keys (<= window) plus one chunk (<= window)
        most_keys = min(most_keys, 2 * policy.window)
    return blocks_for(most_keys, block_size)


def check_fits(
    request_id: str,
    num_tokens: int,
    max_new: int,
    policy: KVPolicy,
    block_size: int,
    num_blocks: int,
    num_groups: int = 1,
) -> None:
    """Refuse a request that could never fit in a pool of ``num_blocks`` on its own (each of
    ``num_groups`` KV groups may hold every block while they are one prefill chunk)."""
    need = max_blocks(num_tokens, max_new, policy, block_size) * num_groups
    if need > num_blocks:
        raise ValueError(
            f"request {request_id!r} needs up to {need} KV blocks but the pool has "
            f"{num_blocks}; shorten the prompt or max_tokens, use a window "
            "kv_policy, or give the engine more KV memory"
        )


class Scheduler:
    """Waiting and running queues over a ``BlockManager``; ``eos_token_ids`` end a sequence
    (unless its request ignores them)."""

    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        clock: Callable[[], float],
        eos_token_ids: Collection[int] = (),
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.clock = clock
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prompt_tokens_computed = 0
        # with track_stored, (sequence, block, hash, each sliding group's block at its place
        # or -1) of each group 0 block named by ``update``, for whoever drains it (the KV
        # store publisher, KV events); off, nothing is kept
        self.track_stored = False
        self.stored: list[tuple[Sequence, int, int, tuple[int, ...]]] = []

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    @property
    def num_groups(self) -> int:
        return self.blocks.num_groups

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; refuse one that could never fit in the pool on its own."""
        self.check(seq)
        self.waiting.append(seq)

    def check(self, seq: Sequence) -> None:
        """Refuse (``ValueError``) a sequence that could never fit in the pool on its own."""
        max_new = seq.params.max_tokens - len(seq.output_ids)
        check_fits(
            seq.request_id,
            seq.num_tokens,
            max_new,
            seq.kv_policy,
            self.block_size,
            self.blocks.num_blocks,
            self.blocks.num_groups,
        )

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is and free its blocks."""
        for seq in list(self.waiting) + self.running:
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.reset_computation()
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = self.clock()

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            count = min(seq.num_uncomputed, self._chunk_limit(seq, budget))
            assert count > 0, f"running sequence {seq.request_id} has nothing to compute"
            need = blocks_for(seq.num_keys + count, self.block_size) - len(seq.block_table)
            windows = window_needs(seq, count, self.block_size)
            total = need + sum(windows)
            while not self.blocks.can_allocate(total) and seq.status is SequenceStatus.RUNNING:
                out.preempted.append(self._preempt(self.running[-1]))
            if seq.status is not SequenceStatus.RUNNING:
                break  # it was the newest: preempted itself
            self._grow(seq, need, windows)
            out.chunks.append(ScheduledChunk(seq, count))
            budget -= count
            index += 1
        while self.waiting and budget > 0 and not out.preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            chunk = self._admit(self.waiting[0], budget, out.copies)
            if chunk is None:
                assert self.running, f"{self.waiting[0].request_id} can never be admitted"
                break  # FIFO: nobody overtakes the head of the queue
            self.waiting.popleft()
            out.chunks.append(chunk)
            budget -= chunk.num_tokens
        now = self.clock()
        for chunk in out.chunks:
            if chunk.seq.first_scheduled_time is None:  # the end of its queueing
                chunk.seq.first_scheduled_time = now
        return out

    def update(
        self, out: SchedulerOutput, tokens: Mapping[int, int], failed: Collection[int]
    ) -> None:
        """Book a step the model ran for ``out``: each chunk's tokens are computed and newly
        full blocks named for prefix reuse (but not for a ``failed`` row: its K/V may be what
        failed), each sampled token (``tokens``: row -> id) joins its sequence, which finishes
        on a stop token or at ``max_tokens``, then every unfinished sequence's KV policy
        evicts. A failed row's sequence is left as it was, for the engine to ``finish``."""
        for row, chunk in enumerate(out.chunks):
            if row not in failed:
                self._advance(chunk)
        now = self.clock()
        for row, token in tokens.items():
            seq = out.chunks[row].seq
            seq.output_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = finish_reason(self.eos_token_ids, seq.params, seq.output_ids)
            if reason is not None:
                self.finish(seq, reason)
        for row, chunk in enumerate(out.chunks):
            if row not in failed and not chunk.seq.is_finished:
                self._apply_kv_policy(chunk.seq)
                slide_windows(self.blocks, chunk.seq)

    def _advance(self, chunk: ScheduledChunk) -> None:
        """Count a chunk's tokens computed; name its newly full blocks by prefix hash (never
        after a window eviction: the chain of hashes would skip the evicted blocks)."""
        seq, size = chunk.seq, self.block_size
        prompt_left = max(0, len(seq.prompt_ids) - seq.num_computed)
        self.num_prompt_tokens_computed += min(chunk.num_tokens, prompt_left)
        seq.num_computed += chunk.num_tokens
        if seq.num_dropped or not self.blocks.enable_prefix_caching:
            return
        for j in range(len(seq.block_hashes), seq.num_computed // size):
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.root_hash
            block_hash = hash_block(parent, seq.ids_between(j * size, (j + 1) * size))
            window_blocks = []  # a sliding group frees a block only after the step filling it
            for group, table in enumerate(seq.window_tables, 1):
                index = j - seq.window_starts[group - 1]
                block = table[index] if 0 <= index < len(table) else -1
                if block >= 0:
                    self.blocks.register(block, block_hash, group)
                window_blocks.append(block)
            if self.blocks.register(seq.block_table[j], block_hash) and self.track_stored:
                self.stored.append((seq, seq.block_table[j], block_hash, tuple(window_blocks)))
            seq.block_hashes.append(block_hash)

    def _apply_kv_policy(self, seq: Sequence) -> None:
        """Free the blocks the sequence's KV policy evicts (a window's oldest)."""
        size = self.block_size
        drop = seq.kv_policy.blocks_to_evict(seq.logical_blocks, seq.num_keys, size)
        if not drop:
            return
        self.blocks.free([seq.block_table[i] for i in drop])
        dropped = set(drop)
        keep = [i for i in range(len(seq.block_table)) if i not in dropped]
        seq.block_table = [seq.block_table[i] for i in keep]
        seq.logical_blocks = [seq.logical_blocks[i] for i in keep]
        seq.num_dropped += len(drop) * size

    @staticmethod
    def _chunk_limit(seq: Sequence, budget: int) -> int:
        """Windowed sequences prefill at most ``window`` tokens a step, so they always fit."""
        return min(budget, seq.kv_policy.window) if seq.kv_policy.is_window else budget

    def _grow(self, seq: Sequence, count: int, windows: list[int] | None = None) -> None:
        """Add ``count`` blocks to group 0's table and ``windows[g - 1]`` to group g's."""
        first = seq.logical_blocks[-1] + 1 if seq.logical_blocks else 0
        seq.block_table.extend(self.blocks.allocate(count))
        seq.logical_blocks.extend(range(first, first + count))
        for table, more in zip(seq.window_tables, windows or (), strict=True):
            table.extend(self.blocks.allocate(more))

    def _admit(self, seq: Sequence, budget: int, copies: list[SlotCopy]) -> ScheduledChunk | None:
        """Take the cached prefix (full blocks, then a copied partial block), allocate blocks
        for the first chunk, start running; a copy to make is appended to ``copies``."""
        ids = seq.all_ids
        # keep at least one token to compute: its logits give the next token
        max_hits = (len(ids) - 1) // self.block_size
        if seq.kv_policy.is_window:  # beyond the window its own KV would differ (evictions)
            max_hits = min(max_hits, seq.kv_policy.window // self.block_size)
        hits, hashes = self.blocks.match_prefix(ids, max_hits, seq.root_hash)
        cached = len(hits) * self.block_size
        # every sliding group's cached blocks of that prefix: (first logical block, blocks)
        window_hits = [self.blocks.window_hits(hashes, g) for g in range(1, self.num_groups)]
        partial = None
        # a windowed sequence's blocks are never shared; grouped models keep no partials
        if not seq.kv_policy.is_window and self.num_groups == 1:
            room = min(self.block_size - 1, len(ids) - 1 - cached)
            parent = hashes[-1] if hashes else seq.root_hash  # per tenant from the start
            partial = self.blocks.match_partial(parent, ids[cached : cached + room], room)
        copied = partial[1] if partial is not None else 0
        count = min(len(ids) - cached - copied, self._chunk_limit(seq, budget))
        # with a copy, the first fresh block is its target
        need = blocks_for(cached + copied + count, self.block_size) - len(hits)
        windows = [need] * len(window_hits)  # each group continues the same prefix
        held = hits + [b for _, blocks in window_hits for b in blocks]
        if need + sum(windows) + self.blocks.acquire_cost(held) > self.blocks.num_available:
            return None
        self.blocks.acquire(held)
        seq.window_starts = [first for first, _ in window_hits]
        seq.window_tables = [list(blocks) for _, blocks in window_hits]
        seq.block_table = list(hits)
        seq.logical_blocks = list(range(len(hits)))
        seq.block_hashes = hashes
        seq.num_computed = cached + copied
        if seq.num_preemptions == 0:
            seq.num_cached_prompt_tokens = cached + copied
        if partial is not None:
            self.blocks.touch(partial[0])  # evicted last (even then the copy reads it intact)
        self._grow(seq, need, windows)
        if partial is not None:
            copies.append(SlotCopy(partial[0], seq.block_table[len(hits)], copied))
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return ScheduledChunk(seq, count)

    def _release(self, seq: Sequence) -> None:
        """Free a sequence's blocks; a partly computed last block stays cached for reuse.

        ``num_computed`` tokens have K/V (a just sampled token has none yet), so the block
        holding position ``num_computed`` keeps ``num_computed % block_size`` computed slots.
        Its parent is the hash of the full blocks before it, all registered by now (or the
        sequence's root: its tenant's partial entries are its own from the first block).
        """
        if seq.window_tables:
            release_groups(self.blocks, seq)
            return
        table, size = seq.block_table, self.block_size
        tail, slots = divmod(seq.num_computed, size)
        if (
            not slots
            or tail >= len(table)
            or seq.kv_policy.is_window
            or len(seq.block_hashes) != tail
        ):
            self.blocks.free(table)
            return
        self.blocks.free(table[tail + 1 :])  # allocated, nothing computed yet
        parent = seq.block_hashes[-1] if tail else seq.root_hash
        computed = seq.ids_between(tail * size, seq.num_computed)
        self.blocks.release_partial(table[tail], parent, computed)
        self.blocks.free(table[:tail])  # after the tail: the tail is evicted first

    def _preempt(self, seq: Sequence) -> Sequence:
        """Free a running sequence's blocks and put it back at the head of the queue."""
        self.running.remove(seq)
        self._release(seq)
        seq.reset_computation()
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        return seq
