"""One request's state inside the engine: tokens, blocks, progress and timings.

Torch-free (ids and integers): the scheduler and the block bookkeeping work on it without a
model. What samples its next token (a seeded ``torch.Generator``) is the engine's, kept by
request id.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from collections.abc import Sequence as Ids
from dataclasses import dataclass, field

from cache import prefix_hash
from cache.kv_policy import KVPolicy
from experts.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request being generated (compared by identity: the scheduler looks sequences up in
    its queues every step, and field-by-field equality would compare their token lists).

    ``num_computed`` counts tokens whose K/V have been computed (they are
    positions 0..num_computed-1). ``num_dropped`` of them were evicted by a
    window policy, so the cache holds ``num_keys`` keys in ``block_table``,
    whose entries are the logical blocks listed in ``logical_blocks``. Its block hashes
    chain from ``root_hash``, its tenant's root, so only its tenant can reuse its blocks.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    kv_policy: KVPolicy
    arrival_time: float
    return_routing: bool = False
    trace_parent: str = ""  # W3C traceparent of the request's span; "" when not traced
    attention_first_tokens: int = 0  # N of the attention diagnostics asked for; 0: none
    cache_salt: str = ""  # the tenant's prefix-cache salt; "" : the default tenant
    root_hash: int | None = field(init=False)  # where its chain of block hashes starts
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    logical_blocks: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # registered prefix hashes, in order
    # per KV group past 0 (sliding layers, ``cache.kv_groups``): its kept blocks, and the
    # logical index of the first (the blocks before it were freed); block_table is group 0's
    window_tables: list[list[int]] = field(default_factory=list)
    window_starts: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_dropped: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    num_store_cached_tokens: int = 0  # of those, tokens whose K/V came from the cluster store
    kv_miss: str = ""  # why some prompt block was computed (cluster.engine.engine_kv MISS_*)
    num_preemptions: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    first_scheduled_time: float | None = None  # end of its queueing
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        self.root_hash = prefix_hash.root_hash(self.cache_salt)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def ids_between(self, start: int, end: int) -> list[int]:
        """``all_ids[start:end]`` without copying the whole history (a decode step's chunk)."""
        num_prompt = len(self.prompt_ids)
        if start >= num_prompt:
            return self.output_ids[start - num_prompt : end - num_prompt]
        if end <= num_prompt:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - num_prompt]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def num_keys(self) -> int:
        return self.num_computed - self.num_dropped

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_keys_before(self, position: int, num_keys: int, block_size: int) -> int:
        """How many of the first ``num_keys`` keys in ``block_table`` hold positions < position.

        Key j sits in logical block ``logical_blocks[j // block_size]`` (every block but the
        last is full), and kept blocks stay in order, so those keys are a prefix.
        """
        count = 0
        for index, block in enumerate(self.logical_blocks):
            in_block = min(block_size, num_keys - index * block_size)
            if in_block <= 0 or block * block_size >= position:
                break
            count += min(in_block, position - block * block_size)
        return count

    def reset_computation(self) -> None:
        """Forget all computed KV (after preemption); its tokens stay."""
        self.block_table = []
        self.logical_blocks = []
        self.block_hashes = []
        self.window_tables = []
        self.window_starts = []
        self.num_computed = 0
        self.num_dropped = 0


def finish_reason(
    eos_ids: Collection[int], params: SamplingParams, generated: Ids[int]
) -> str | None:
    """ "stop" on a stop or (unless ignored) end-of-sequence token, "length" at max_tokens."""
    last = generated[-1]
    if last in params.stop_token_ids or (not params.ignore_eos and last in eos_ids):
        return "stop"
    if len(generated) >= params.max_tokens:
        return "length"
    return None
