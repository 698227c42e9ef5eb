"""The stream registry without an engine: one wake-up per event loop per step, batches of
what arrived, errors after the events before them, stop, counters and routing counts, and a
caller whose event loop is gone."""

from __future__ import annotations

import asyncio

import pytest

from cluster.engine.counters import EngineCounters
from cluster.engine.loop import StepResult
from cluster.engine.requests import TokenEvent
from cluster.engine.streams import (
    EngineStoppedError,
    EventStream,
    RequestFailedError,
    StreamRegistry,
)


def _counters(num_steps: int = 0) -> EngineCounters:
    return EngineCounters(0, 0, 8, 0, 0, num_steps, 0, 0)


def _event(request_id: str, index: int, last: bool = False) -> TokenEvent:
    reason = "length" if last else None
    return TokenEvent(request_id, 10 + index, index, -0.5, "", reason, 3, 0, 0, 0.0, 0.0)


def _result(
    events: list[TokenEvent],
    rejected: list[tuple[str, str]] | None = None,
    failed: list[tuple[str, str]] | None = None,
    routed: dict[tuple[int, int], int] | None = None,
    num_steps: int = 1,
) -> StepResult:
    return StepResult(events, rejected or [], failed or [], _counters(num_steps), routed or {})


async def _settle() -> None:
    for _ in range(3):  # let call_soon_threadsafe callbacks run
        await asyncio.sleep(0)


def test_one_wake_up_per_event_loop_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = StreamRegistry(_counters(), abort=lambda _: None)

    async def main() -> list[list[TokenEvent]]:
        loop = asyncio.get_running_loop()
        wakes = []
        real = loop.call_soon_threadsafe
        monkeypatch.setattr(loop, "call_soon_threadsafe", lambda *a: wakes.append(a) or real(*a))
        streams = [registry.open(rid) for rid in "abc"]
        registry.deliver(_result([_event(rid, 0) for rid in "abc"]))
        registry.deliver(_result([_event(rid, 1, last=True) for rid in "abc"]))
        await _settle()
        assert len(wakes) == 2  # one per step, for three streams
        return [await s.next_batch() for s in streams]

    batches = asyncio.run(main())
    assert [[e.index for e in b] for b in batches] == [[0, 1]] * 3
    assert registry.take_routed_counts() == {}


def test_an_error_comes_after_the_events_before_it() -> None:
    registry = StreamRegistry(_counters(), abort=lambda _: None)

    async def main() -> EventStream:
        stream = registry.open("r")
        registry.deliver(_result([_event("r", 0)]))
        registry.deliver(_result([], failed=[("r", "its logits are not finite")]))
        await _settle()
        assert [e.index for e in await stream.next_batch()] == [0]
        assert stream.ended and not stream.done
        with pytest.raises(RequestFailedError, match="not finite"):
            await stream.next_batch()
        return stream

    assert asyncio.run(main()).done


def test_a_refused_request_raises_value_error_and_frees_its_id() -> None:
    registry = StreamRegistry(_counters(), abort=lambda _: None)

    async def main() -> None:
        stream = registry.open("r")
        with pytest.raises(ValueError, match="already in use"):
            registry.open("r")
        registry.deliver(_result([], rejected=[("r", "prompt is empty")]))
        await _settle()
        with pytest.raises(ValueError, match="prompt is empty"):
            await stream.next_batch()
        registry.open("r")  # its id is free again

    asyncio.run(main())


def test_stop_ends_every_stream_and_refuses_new_ones_with_the_first_reason() -> None:
    registry = StreamRegistry(_counters(), abort=lambda _: None)

    async def main() -> None:
        streams = [registry.open(rid) for rid in "ab"]
        registry.stop("engine step failed: boom")
        registry.stop("the engine was shut down")  # too late: the first reason stays
        await _settle()
        for stream in streams:
            with pytest.raises(EngineStoppedError, match="boom"):
                await stream.next_batch()
        with pytest.raises(EngineStoppedError, match="boom"):
            registry.open("c")

    asyncio.run(main())
    assert registry.stopped_because == "engine step failed: boom"


def test_counters_and_routing_counts_come_with_each_step() -> None:
    registry = StreamRegistry(_counters(), abort=lambda _: None)

    async def main() -> None:
        registry.open("r")
        registry.deliver(_result([_event("r", 0)], routed={(1, 2): 3}, num_steps=1))
        registry.deliver(
            _result([_event("r", 1, True)], routed={(1, 2): 1, (1, 0): 4}, num_steps=2)
        )

    asyncio.run(main())
    assert registry.counters.num_steps == 2
    assert registry.take_routed_counts() == {(1, 2): 4, (1, 0): 4}
    assert registry.take_routed_counts() == {}


def test_a_stream_whose_event_loop_is_gone_is_aborted() -> None:
    aborted: list[str] = []
    registry = StreamRegistry(_counters(), abort=aborted.append)
    loop = asyncio.new_event_loop()

    async def open_streams() -> None:
        registry.open("gone")
        registry.open("finishing")

    loop.run_until_complete(open_streams())
    loop.close()
    registry.deliver(_result([_event("gone", 0), _event("finishing", 4, last=True)]))
    assert aborted == ["gone"]  # a finished request needs no abort
