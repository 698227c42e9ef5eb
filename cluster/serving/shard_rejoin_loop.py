"""An engine process's restarted shards rejoined without a placement controller.

With ``experts.replan`` on, the replica's ``PlacementReporter`` has its engine process join
restarted shards before each report. Without it nothing reports, so this task does the same
on its own: every ``interval_s`` it runs ``rejoin`` (the replica probes its shards through
Ray and, for one that restarted, opens fresh pairs and hands them to the child,
``JoinShards``), so a replicated expert's restarted copy is used again and a step needing
an expert only it holds does not stop the engine. Never on a step's path: the engine only
receives a command. A failed try is logged; the next one tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

REJOIN_INTERVAL_S = 2.0  # between probes: one state call per shard (a restart takes seconds)


class ShardRejoinLoop:
    """Runs ``rejoin`` every ``interval_s`` while ``alive()`` says the engine lives."""

    def __init__(
        self,
        tier: str,
        rejoin: Callable[[], Awaitable[None]],
        alive: Callable[[], bool],
        interval_s: float = REJOIN_INTERVAL_S,
    ) -> None:
        self.tier = tier
        self.rejoin = rejoin
        self.alive = alive
        self.interval_s = interval_s
        self.num_tries = 0
        self.num_failed = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the task on the running event loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        while self.alive():
            await asyncio.sleep(self.interval_s)
            self.num_tries += 1
            try:
                await self.rejoin()
            except Exception as err:  # a shard died again meanwhile: the next try rejoins it
                self.num_failed += 1
                log.warning("tier %s: rejoining restarted shards failed (%r)", self.tier, err)
