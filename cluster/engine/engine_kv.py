"""An engine's link to the cluster's KV: block events for routers, the store's fetch and publish.

Admission (``admit``, from ``add_request``, before the sequence is ever scheduled): the prompt's
full blocks are named; the local cache's longest prefix is free; when at least
``min_fetch_tokens`` more prompt tokens could come from the store (below that, recomputing was
measured cheaper than fetching), the missing blocks' keys are asked of their store shards in
parallel on a fetch thread, and the sequence waits aside. ``ready`` (at the start of each
step) takes finished fetches, or ones past ``fetch_timeout_s``: the found blocks that continue
the local prefix are written into fresh pool blocks, named under their prefix hashes like
computed ones (cached and evictable, most recently used), and the sequence joins the waiting
queue, where admission takes them as local hits. A slow, failing or absent store only means
fewer hits: the step never waits for it, and a block is used only if its key (model, layout,
tenant, whole prefix) matched and its size is the layout's.

Publishing (``after_update``): each block the scheduler named this step is copied out of the
pool (one gather, on the engine's thread: the pool block may be reused next step) and queued
for the publisher thread (``kv_publisher``), which sends it to its owners. The queue is
bounded in blocks; past it, blocks are dropped (counted), never waited for.

A model with sliding KV groups (gpt-oss): each named block goes with every sliding group's
block at its place, under that group's keys; a fetch asks for group 0's blocks of the prefix
and the sliding groups' blocks of its window only, and the prefix is cut to one whose window
the store (or the cache) holds (``window_fetch``).

Events: every named, fetched or evicted block is recorded in a ``KVEventLog``; the loop hands
its batches to the replica, for the router. Each request gets its cached tokens split into
local and store hits and, when some prompt block had to be computed, why (``kv_miss``).

Legend: L layers, P planes (keys and values, or one latent entry), N pool blocks, B block
size, Hkv kv heads, D head dim, n blocks moved.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cache.block_key import BlockKey, KeySpace, KVLayout
from cache.block_manager import BlockManager
from cache.kv_groups import group_key
from cache.kv_pool import KVPool
from cache.kv_store import MAX_KEYS_PER_CALL, BlockStore, FetchResult
from cache.prefix_hash import hash_blocks
from cluster.engine.kv_events import KVEventBatch, KVEventLog
from cluster.engine.kv_publisher import Publisher
from cluster.engine.scheduler import Scheduler, SchedulerOutput
from cluster.engine.sequence import Sequence as Seq
from cluster.engine.window_fetch import (
    WindowPlan,
    WindowResult,
    fetch_windows,
    group_block_key,
    group_spaces,
    insert_windows,
    plan_windows,
)
from cluster.kv_store.config import KVStoreConfig

# why a request computed some of its prompt's full blocks (TokenEvent.kv_miss)
MISS_NONE = ""  # every full prompt block was cached
MISS_NEVER_SEEN = "never_seen"  # neither this engine nor the store had the first missing block
MISS_EVICTED_LOCAL = "evicted_local"  # this engine had it and evicted it
MISS_EVICTED_STORE = "evicted_store"  # the store had it and evicted it
MISS_STORE_UNAVAILABLE = "store_unavailable"  # a store shard failed or did not answer in time
_IDLE_WAIT_S = 0.005  # with only fetches pending, a step waits this long for one to finish
_FETCH_GRACE_S = 0.05  # past the store's own timeout, before a fetch is given up


def pool_layout(pool: KVPool, block_size: int) -> KVLayout:
    """The layout of the pool's blocks, from its storage."""
    layers, planes, _, heads, dim = pool._data.shape  # [L, P, S, Hkv, D]
    dtype = str(pool._data.dtype).removeprefix("torch.")
    return KVLayout(dtype, layers, heads, dim, block_size, planes)


def _blocks(pool: KVPool) -> torch.Tensor:  # [L, P, N, B, Hkv, D]: a view, no copy
    layers, planes, slots, heads, dim = pool._data.shape
    return pool._data.view(layers, planes, slots // pool.block_size, pool.block_size, heads, dim)


@dataclass
class _Prompt:
    """What admission learnt about a request's prompt, until it is first scheduled."""

    hashes: list[int]  # prefix hashes of its full blocks that could be hits
    local_blocks: int = 0  # cached here when the fetch was planned
    fetched_blocks: int = 0  # written from the store
    store_evicted: frozenset[BlockKey] = frozenset()
    store_failed: bool = False


@dataclass
class _Fetch:
    seq: Seq
    first: int  # index of the first block asked of the store
    keys: list[BlockKey]
    future: Future[FetchResult] | Future[WindowResult]
    deadline: float  # time.monotonic()
    prompt: _Prompt = field(repr=False, default_factory=lambda: _Prompt([]))
    plan: WindowPlan | None = None  # a model with sliding KV groups (window_fetch)


class EngineKV:
    """KV events, and the store's fetch and publish when a store is given (module doc)."""

    def __init__(
        self,
        pool: KVPool,
        blocks: BlockManager,
        scheduler: Scheduler,
        keyspace: KeySpace,
        clock: Callable[[], float],
        store: BlockStore | None = None,
        config: KVStoreConfig | None = None,
    ) -> None:
        self.pool = pool
        self.blocks = blocks
        self.scheduler = scheduler
        self.keyspace = keyspace
        self.config = config or KVStoreConfig()
        self.store = store
        self.events = KVEventLog(keyspace, clock)
        self.block_size = blocks.block_size
        self.block_bytes = keyspace.layout.bytes_per_block(pool._data.element_size())
        blocks.track_evictions = True
        blocks.max_pinned_blocks = int(blocks.num_blocks * self.config.max_pinned_share)
        scheduler.track_stored = True
        self.clock = clock
        self._prompts: dict[str, _Prompt] = {}
        self._fetches: dict[str, _Fetch] = {}
        self._fetcher: ThreadPoolExecutor | None = None
        self._publisher: Publisher | None = None
        # per KV group its keys (a model with sliding groups, gpt-oss: window_fetch)
        self.spaces = group_spaces(keyspace, blocks.windows)
        if store is not None:
            self._fetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-fetch")
            self._publisher = Publisher(store, self.config)
        self.num_fetches = 0
        self.num_fetched_blocks = 0
        self.num_fetch_timeouts = 0

    @property
    def num_published_blocks(self) -> int:
        return self._publisher.num_published if self._publisher is not None else 0

    @property
    def num_publish_dropped(self) -> int:
        return self._publisher.num_dropped if self._publisher is not None else 0

    # --- admission -----------------------------------------------------------------------------

    def admit(self, seq: Seq) -> bool:
        """Name the prompt's blocks; True when the sequence waits for a store fetch first."""
        ids, size = seq.all_ids, self.block_size
        if seq.kv_policy.is_window or not self.blocks.enable_prefix_caching:
            return False  # a windowed sequence's blocks are never shared
        prompt = _Prompt(hash_blocks(ids, size, (len(ids) - 1) // size, seq.root_hash))
        self._prompts[seq.request_id] = prompt
        if self.store is None or self._fetcher is None:
            return False
        if self.blocks.num_groups > 1:
            return self._admit_windows(seq, prompt)
        local = len(self.blocks.lookup(prompt.hashes))
        prompt.local_blocks = local
        missing = prompt.hashes[local : local + MAX_KEYS_PER_CALL]
        if not missing or len(missing) * size < self.config.min_fetch_tokens:
            return False
        keys = self.keyspace.keys(seq.cache_salt, missing)
        timeout = self.config.fetch_timeout_s
        future = self._fetcher.submit(self.store.get_many, keys, timeout)
        deadline = time.monotonic() + timeout + _FETCH_GRACE_S
        self._fetches[seq.request_id] = _Fetch(seq, local, keys, future, deadline, prompt)
        self.num_fetches += 1
        return True

    def _admit_windows(self, seq: Seq, prompt: _Prompt) -> bool:
        """A grouped model's admission: fetch every group's blocks of a longer prefix."""
        assert self.store is not None and self._fetcher is not None
        plan = plan_windows(self.blocks, self.spaces, seq.cache_salt, prompt.hashes)
        prompt.local_blocks = plan.floor
        if (plan.end - plan.floor) * self.block_size < self.config.min_fetch_tokens:
            return False
        timeout = self.config.fetch_timeout_s
        future = self._fetcher.submit(fetch_windows, self.store, plan, self.block_bytes, timeout)
        deadline = time.monotonic() + timeout + _FETCH_GRACE_S
        self._fetches[seq.request_id] = _Fetch(seq, plan.local0, [], future, deadline, prompt, plan)
        self.num_fetches += 1
        return True

    def has_pending(self) -> bool:
        return bool(self._fetches)

    def ready(self) -> list[Seq]:
        """Sequences whose fetch finished (or was given up), their blocks in the pool."""
        out: list[Seq] = []
        now = time.monotonic()
        for request_id, fetch in list(self._fetches.items()):
            if not fetch.future.done() and now < fetch.deadline:
                continue
            del self._fetches[request_id]
            result = _result(fetch.future)
            if result is None:
                self.num_fetch_timeouts += 1
                fetch.prompt.store_failed = True
            else:
                fetch.prompt.store_evicted = result.evicted
                fetch.prompt.store_failed = bool(result.failed_shards)
                if isinstance(result, WindowResult):
                    self._insert_windows(fetch, result)
                else:
                    self._insert(fetch, result)
            out.append(fetch.seq)
        return out

    def idle_wait(self) -> None:
        """Nothing to run but fetches: wait a moment for one, rather than spin."""
        if self._fetches:
            futures: list[Future[Any]] = [f.future for f in self._fetches.values()]
            wait(futures, timeout=_IDLE_WAIT_S, return_when=FIRST_COMPLETED)

    def drop(self, request_id: str) -> Seq | None:
        """Forget a request (aborted); the sequence if it was waiting for a fetch."""
        self._prompts.pop(request_id, None)
        fetch = self._fetches.pop(request_id, None)
        return fetch.seq if fetch is not None else None

    def _insert(self, fetch: _Fetch, result: FetchResult) -> None:
        """Write the found blocks that continue the cached prefix into fresh pool blocks."""
        found: list[np.ndarray] = []
        for key in fetch.keys:
            block = result.blocks.get(key)
            if block is None or block.dtype != np.uint8 or block.nbytes != self.block_bytes:
                break
            found.append(block)
        hashes = fetch.prompt.hashes
        end = fetch.first + len(found)
        held = self.blocks.lookup(hashes[:end])  # the cache may have grown while fetching
        local = len(held)
        if local >= end or local < fetch.first:  # nothing new, or a gap before the found
            return
        self.blocks.acquire(held)  # so that making room cannot evict the prefix
        try:
            use = found[local - fetch.first :]
            count = min(len(use), self.blocks.num_available)
            fresh = self.blocks.allocate(count)
            self._write(fresh, use[:count])
            named = [
                h for b, h in zip(fresh, hashes[local:], strict=False) if self.blocks.register(b, h)
            ]
            now = self.clock()
            ttls = [max(0.0, self.blocks.pinned_until(h) - now) for h in named]
            self.events.stored(fetch.seq.cache_salt, named, ttls)
            self.blocks.free(fresh)  # cached and evictable now, like computed blocks
        finally:
            self.blocks.free(held)
        fetch.prompt.local_blocks = local
        fetch.prompt.fetched_blocks = count
        self.num_fetched_blocks += count

    def _insert_windows(self, fetch: _Fetch, result: WindowResult) -> None:
        assert fetch.plan is not None
        floor, gained, written, named = insert_windows(self.blocks, fetch.plan, result, self._write)
        now = self.clock()
        ttls = [max(0.0, self.blocks.pinned_until(h) - now) for h in named]
        self.events.stored(fetch.seq.cache_salt, named, ttls)
        fetch.prompt.local_blocks = floor
        fetch.prompt.fetched_blocks = gained
        self.num_fetched_blocks += written

    @torch.inference_mode()
    def _write(self, targets: Sequence[int], arrays: Sequence[np.ndarray]) -> None:
        view = _blocks(self.pool)  # [L, P, N, B, Hkv, D]
        shape = view.shape[:2] + view.shape[3:]  # [L, P, B, Hkv, D]
        with warnings.catch_warnings():  # read-only object-store views: read, never written
            warnings.simplefilter("ignore", UserWarning)
            for target, array in zip(targets, arrays, strict=True):
                source = torch.from_numpy(array).view(view.dtype).view(shape)
                view[:, :, target].copy_(source)  # one copy, host to the pool's device

    # --- each step -------------------------------------------------------------------------------

    def after_schedule(self, plan: SchedulerOutput) -> None:
        """Newly admitted requests: split their cached tokens, name their miss reason."""
        for chunk in plan.chunks:
            prompt = self._prompts.pop(chunk.seq.request_id, None)
            if prompt is not None:
                self._classify(chunk.seq, prompt)

    def _classify(self, seq: Seq, prompt: _Prompt) -> None:
        size = self.block_size
        cached = seq.num_cached_prompt_tokens
        from_store = max(0, cached - prompt.local_blocks * size)
        seq.num_store_cached_tokens = min(from_store, prompt.fetched_blocks * size)
        first_missing = cached // size
        if first_missing >= len(prompt.hashes):
            seq.kv_miss = MISS_NONE
            return
        missing = prompt.hashes[first_missing]
        if self.keyspace.key(seq.cache_salt, missing) in prompt.store_evicted:
            seq.kv_miss = MISS_EVICTED_STORE
        elif self.events.was_evicted(missing):
            seq.kv_miss = MISS_EVICTED_LOCAL
        elif prompt.store_failed:
            seq.kv_miss = MISS_STORE_UNAVAILABLE
        else:
            seq.kv_miss = MISS_NEVER_SEEN

    def after_update(self) -> None:
        """Record (and publish) the blocks named this step, then the evictions."""
        stored, self.scheduler.stored = self.scheduler.stored, []
        by_salt: dict[str, list[tuple[int, int, tuple[int, ...]]]] = {}
        for seq, block, block_hash, window_blocks in stored:
            by_salt.setdefault(seq.cache_salt, []).append((block, block_hash, window_blocks))
        now = self.clock()
        for salt, named in by_salt.items():
            # pinned blocks are announced, and go to the store, pinned for what is left
            hashes = [h for _, h, _ in named]
            ttls = [max(0.0, self.blocks.pinned_until(h) - now) for h in hashes]
            self.events.stored(salt, hashes, ttls)
            if self._publisher is None:
                continue
            # (key, pool block, pin ttl): group 0's, then each sliding group's at its place
            sent = [
                (k, b, t)
                for k, (b, _, _), t in zip(
                    self.keyspace.keys(salt, hashes), named, ttls, strict=True
                )
            ]
            for _, block_hash, window_blocks in named:
                for group, block in enumerate(window_blocks, 1):
                    if block >= 0:
                        name = group_block_key(self.spaces, salt, block_hash, group)
                        pin = self.blocks.pinned_until(group_key(block_hash, group))
                        sent.append((name, block, max(0.0, pin - now)))
            for ttl in sorted({t for _, _, t in sent}):
                keys = [k for k, _, t in sent if t == ttl]
                pool_blocks = [b for _, b, t in sent if t == ttl]
                self._publisher.offer(keys, self._gather(pool_blocks), ttl)
        evicted, self.blocks.evicted = self.blocks.evicted, []
        self.events.evicted(evicted)

    @torch.inference_mode()
    def _gather(self, blocks: list[int]) -> torch.Tensor:  # [n, L, P, B, Hkv, D] on the host
        view = _blocks(self.pool)
        return torch.stack([view[:, :, b] for b in blocks]).cpu()  # one copy (two on a GPU)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the blocks queued for the store were sent (tests, benchmarks)."""
        return self._publisher.flush(timeout_s) if self._publisher is not None else True

    def take_events(self) -> KVEventBatch | None:
        return self.events.take()

    def snapshot(self) -> KVEventBatch:
        return self.events.snapshot()

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=False, cancel_futures=True)
        if self._publisher is not None:
            self._publisher.close()


def _result(
    future: Future[FetchResult] | Future[WindowResult],
) -> FetchResult | WindowResult | None:
    """A finished fetch's result; None for one still running (given up) or one that raised."""
    if not future.done():
        future.cancel()
        return None
    try:
        return future.result()
    except Exception:  # a store client bug or a broken relay: a miss, never a failed step
        return None
