"""Each request's stream of events, from the engine's side to its caller's event loop.

``StreamRegistry`` holds the open streams of one engine by request id, with the engine's
counters and routing counts as of its last ``StepResult``. The engine's side (the loop's
thread in this process, or the reader of an engine process) hands it each step's result;
it fans the events out with one wake-up per event loop per step, however many of that
loop's streams got a token. Once the engine stops, every open stream ends with
``EngineStoppedError`` and new ones are refused with it at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable

from cluster.engine.counters import EngineCounters
from cluster.engine.loop import StepResult
from cluster.engine.requests import TokenEvent

_Item = TokenEvent | BaseException
_Delivery = tuple["EventStream", _Item]


class EngineStoppedError(RuntimeError):
    """The engine stopped generating the request: its loop stopped (shut down, or a step
    failed), or (``RequestFailedError``) it failed this request alone."""


class RequestFailedError(EngineStoppedError):
    """The engine could not go on with this one request (its row could not be sampled); it
    freed its blocks and went on with the others."""


class EventStream:
    """One request's events on its caller's event loop, read a batch at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: asyncio.Queue[_Item] = asyncio.Queue()
        self._error: BaseException | None = None  # raised once the events before it are out
        self.ended = False  # its last event or its error has arrived

    def put(self, item: _Item) -> None:
        """Called on the stream's event loop."""
        self._items.put_nowait(item)

    @property
    def done(self) -> bool:
        """Nothing more to read: it ended, and any error was raised."""
        return self.ended and self._error is None

    async def next_batch(self) -> list[TokenEvent]:
        """Every event that has arrived, waiting for the first. The error that ends the
        stream (refused, failed, engine stopped) is raised after the events before it."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        batch: list[TokenEvent] = []
        item = await self._items.get()
        while True:
            if isinstance(item, BaseException):
                self.ended = True
                if not batch:
                    raise item
                self._error = item
                return batch
            batch.append(item)
            if item.finish_reason is not None:
                self.ended = True
                return batch
            if self._items.empty():
                return batch
            item = self._items.get_nowait()


class StreamRegistry:
    """The open streams of one engine, and its figures as of its last step.

    Thread-safe: callers open and close streams on their event loops while the engine's side
    delivers. ``abort`` is called with a request whose caller's event loop is gone.
    """

    def __init__(self, counters: EngineCounters, abort: Callable[[str], None]) -> None:
        self.counters = counters
        self._abort = abort
        self._lock = threading.Lock()
        self._streams: dict[str, EventStream] = {}
        self._routed: Counter[tuple[int, int]] = Counter()
        self.stopped_because = ""  # set once the engine stopped: new streams are refused

    def open(self, request_id: str) -> EventStream:
        """A stream for a new request, on the running event loop."""
        stream = EventStream(asyncio.get_running_loop())
        with self._lock:
            if self.stopped_because:
                raise EngineStoppedError(self.stopped_because)
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        return stream

    def close(self, request_id: str) -> None:
        """Forget a stream whose caller left; later events for it are dropped."""
        with self._lock:
            self._streams.pop(request_id, None)

    def take_routed_counts(self) -> dict[tuple[int, int], int]:
        with self._lock:
            counts, self._routed = dict(self._routed), Counter()
        return counts

    def deliver(self, result: StepResult) -> None:
        """Hand a step's events, refusals and failures to their streams."""
        batches: dict[asyncio.AbstractEventLoop, list[_Delivery]] = {}
        with self._lock:
            self._routed.update(result.routed)
            # after the routed counts (idle counters mean every count is here) and before
            # the events: a caller whose stream just ended reads this step's counters
            self.counters = result.counters
            ended: list[tuple[str, Exception]] = [(r, ValueError(w)) for r, w in result.rejected]
            ended += [(r, RequestFailedError(why)) for r, why in result.failed]
            for request_id, error in ended:
                stream = self._streams.pop(request_id, None)
                if stream is not None:
                    batches.setdefault(stream.loop, []).append((stream, error))
            for event in result.events:
                stream = self._streams.get(event.request_id)
                if stream is None:
                    continue  # aborted meanwhile
                if event.finish_reason is not None:
                    del self._streams[event.request_id]
                batches.setdefault(stream.loop, []).append((stream, event))
        self._wake(batches)

    def stop(self, reason: str) -> None:
        """Refuse new streams and end every open one with ``EngineStoppedError(reason)``;
        the first reason given stays."""
        with self._lock:
            self.stopped_because = self.stopped_because or reason
            streams, self._streams = self._streams, {}
        batches: dict[asyncio.AbstractEventLoop, list[_Delivery]] = {}
        for stream in streams.values():
            error = EngineStoppedError(self.stopped_because)
            batches.setdefault(stream.loop, []).append((stream, error))
        self._wake(batches)

    def _wake(self, batches: dict[asyncio.AbstractEventLoop, list[_Delivery]]) -> None:
        """One wake-up per event loop, however many of its streams got something."""
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: its callers left
                for _, item in items:
                    if isinstance(item, TokenEvent) and item.finish_reason is None:
                        self._abort(item.request_id)


def _put_all(items: list[_Delivery]) -> None:
    for stream, item in items:
        stream.put(item)
