"""The publisher of an engine's computed KV blocks to the cluster store (``EngineKV``).

Blocks come in already copied out of the pool (the pool block may be reused next step); a
thread sends each batch to its owners. The queue is bounded in blocks: past it, blocks are
dropped (counted), never waited for; a failed or slow shard only means fewer stored blocks.
"""

from __future__ import annotations

import threading
from collections import deque

import torch

from cache.block_key import BlockKey
from cache.kv_store import BlockStore
from cluster.kv_store.client import wait_puts
from cluster.kv_store.config import KVStoreConfig


class Publisher:
    """A thread that sends queued blocks to the store; the queue is bounded in blocks."""

    def __init__(self, store: BlockStore, config: KVStoreConfig) -> None:
        self.store = store
        self.config = config
        self._queue: deque[tuple[list[BlockKey], torch.Tensor, float]] = deque()
        self._queued_blocks = 0
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False  # a batch is being sent
        self.num_published = 0
        self.num_dropped = 0
        self.num_failed = 0
        self._thread = threading.Thread(target=self._run, name="kv-publish", daemon=True)
        self._thread.start()

    def offer(self, keys: list[BlockKey], blocks: torch.Tensor, pin_ttl_s: float = 0.0) -> bool:
        """Queue blocks for the store (pinned there for ``pin_ttl_s``); False (dropped,
        counted) when the queue is full."""
        with self._cond:
            if self._queued_blocks + len(keys) > self.config.publish_queue_blocks:
                self.num_dropped += len(keys)
                return False
            self._queue.append((keys, blocks, pin_ttl_s))
            self._queued_blocks += len(keys)
            self._cond.notify()
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                keys, blocks, pin_ttl_s = self._queue.popleft()
                self._queued_blocks -= len(keys)
                self._busy = True
            # [n, bytes]: each row one block's K/V, views of one buffer (no copy)
            rows = blocks.view(torch.uint8).reshape(len(keys), -1).numpy()
            try:
                blocks_np = [rows[i] for i in range(len(keys))]
                futures = self.store.put_many(keys, blocks_np, pin_ttl_s)
                ok = wait_puts(futures, self.config.put_timeout_s)
            except Exception:  # a broken store client must not end publishing for good
                ok = False
            with self._cond:
                self._busy = False
                if ok:
                    self.num_published += len(keys)
                else:
                    self.num_failed += len(keys)
                self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued block was sent (tests, benchmarks); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout_s)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5.0)
