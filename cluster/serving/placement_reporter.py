"""A tier replica's link to the placement controller, off the hot path.

The replica hands over its engine's routed counts as requests end (``add``); a task on the
replica's event loop sends what gathered every ``report_interval_s`` (sooner when the
controller asks: a move is waiting for this replica), with the routing table version its
engine runs. A reply carrying a newer table goes to the engine, which swaps it in between
two steps; the next report acknowledges it. Nothing here ever blocks a step or a stream:
the engine only receives a command, and a report that fails (the controller died or
restarts) is logged and dropped, so serving goes on with the last table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from cluster.engine.client import EngineCore
from cluster.expert_parallel.placement_controller import ReportReply

log = logging.getLogger(__name__)

Slot = tuple[int, int]
# (tier, replica id, counts, table version) -> the controller's reply
SendReport = Callable[[str, str, dict[Slot, int], int], Awaitable[ReportReply]]


class PlacementReporter:
    """Gathers a replica's routed counts and reports them; swaps in the tables it gets back."""

    def __init__(
        self,
        tier: str,
        replica_id: str,
        engine: EngineCore,
        send: SendReport,
        interval_s: float,
        flush: Callable[[], None] | None = None,
        initial_version: int = -1,
        before_table: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.tier = tier
        self.replica_id = replica_id
        self.engine = engine
        self.send = send
        self.interval_s = interval_s
        self.flush = flush  # takes the engine's counts now (they reach ``add``)
        # the table the engine was built with: the engine shows its version only once it has
        # stepped, and an idle engine's reports must still acknowledge it
        self.initial_version = initial_version
        # run before every newer table is forwarded (and on every report): an engine process
        # joins restarted shards' fresh pairs here, before it sees a table listing them
        self.before_table = before_table
        self._pending: dict[Slot, int] = {}
        self.num_reports = 0
        self.num_failed = 0
        self.num_tables = 0
        self._task: asyncio.Task[None] | None = None

    def add(self, counts: Mapping[Slot, int]) -> None:
        for slot, n in counts.items():
            self._pending[slot] = self._pending.get(slot, 0) + n

    def start(self) -> None:
        """Start the report task on the running event loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def report_once(self) -> float:
        """Send what gathered; apply a newer table. Returns how soon to report again."""
        if self.flush is not None:
            self.flush()
        counts, self._pending = self._pending, {}
        version = max(self.engine.table_version, self.initial_version)
        try:
            reply = await self.send(self.tier, self.replica_id, counts, version)
        except Exception as err:  # the controller is gone or restarting: serving goes on
            self.num_failed += 1
            log.warning("tier %s: placement report failed (%r); retrying", self.tier, err)
            return self.interval_s
        self.num_reports += 1
        if self.before_table is not None:
            try:
                await self.before_table()
            except Exception as err:  # a shard died again meanwhile: the next report retries
                log.warning("tier %s: rejoining restarted shards failed (%r)", self.tier, err)
        if reply.version > version:
            self.engine.set_routing_table(reply.version, reply.placement)
            self.num_tables += 1
        return reply.next_report_s

    async def run(self) -> None:
        wait_s = self.interval_s
        while self.engine.is_alive():
            await asyncio.sleep(wait_s)
            wait_s = await self.report_once()
