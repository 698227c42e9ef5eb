"""The rejoin task of an engine-process replica without a placement controller: it tries
every interval, outlives a failed try, and stops with its engine."""

from __future__ import annotations

import asyncio

from cluster.serving.shard_rejoin_loop import ShardRejoinLoop


def test_it_rejoins_every_interval_outlives_failures_and_stops_with_the_engine() -> None:
    calls: list[int] = []
    alive = [True]

    async def rejoin() -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("shard s1 died again")
        if len(calls) == 4:
            alive[0] = False  # the engine stopped: no more tries after this one

    async def main() -> ShardRejoinLoop:
        loop = ShardRejoinLoop("t", rejoin, lambda: alive[0], interval_s=0.001)
        loop.start()
        loop.start()  # once: a second start is a no-op
        assert loop._task is not None
        await asyncio.wait_for(loop._task, 5)
        return loop

    loop = asyncio.run(main())
    assert calls == [0, 1, 2, 3]
    assert (loop.num_tries, loop.num_failed) == (4, 1)
