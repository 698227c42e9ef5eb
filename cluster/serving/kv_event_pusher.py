"""A tier replica's link to its tier's KV event hub, off the hot path.

A task on the replica's event loop takes the engine's KV event batches every ``interval_s``
and pushes them to the hub (``cluster.kv_store.event_hub``); with nothing new it still
pushes an empty list every ``heartbeat_s``, so the hub keeps the replica. When the hub saw a
gap, the engine is asked for a snapshot. A push that fails (the hub restarting) is logged and
its batches dropped: the next push is then a gap, and the snapshot that follows resyncs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from cluster.engine.kv_events import KVEventBatch

log = logging.getLogger(__name__)

# (replica id, batches) -> whether the hub wants a snapshot
SendBatches = Callable[[str, list[KVEventBatch]], Awaitable[bool]]


class KVEventPusher:
    """Pushes a replica's KV event batches to its hub (see the module doc)."""

    def __init__(
        self,
        replica_id: str,
        take: Callable[[], list[KVEventBatch]],
        request_snapshot: Callable[[], None],
        send: SendBatches,
        interval_s: float = 0.05,
        heartbeat_s: float = 5.0,
    ) -> None:
        self.replica_id = replica_id
        self.take = take
        self.request_snapshot = request_snapshot
        self.send = send
        self.interval_s = interval_s
        self.heartbeat_s = heartbeat_s
        self.num_pushes = 0
        self.num_failed = 0
        self._last = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the push task on the running event loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def push_once(self) -> None:
        batches = self.take()
        if not batches and time.monotonic() - self._last < self.heartbeat_s:
            return
        self._last = time.monotonic()
        try:
            wants_snapshot = await self.send(self.replica_id, batches)
        except Exception as err:  # the hub is gone or restarting: routing falls back to load
            self.num_failed += 1
            log.warning("KV event push failed (%r); the next one resyncs", err)
            return
        self.num_pushes += 1
        if wants_snapshot:
            self.request_snapshot()

    async def run(self) -> None:
        while True:
            await self.push_once()
            await asyncio.sleep(self.interval_s)
