"""The in-process async API: submit a request, iterate its tokens, cancel it.

The synchronous ``LLMEngine`` runs on one background thread that steps while
any request is unfinished and sleeps otherwise. Callers never touch the
engine directly: additions and aborts go through an inbox the loop drains
between steps, and token events come back to each caller's event loop through
its own ``asyncio.Queue``. Leaving the stream early (break, ``aclose``, task
cancellation) aborts the request and frees its KV blocks.

``EngineCore`` is what a tier replica asks of an engine; ``AsyncEngine`` is
one, ``cluster.engine_process.EngineProcess`` (the engine in a child process)
the other.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from cluster.engine import EngineRequest, LLMEngine, TokenEvent
from cluster.engine_counters import EngineCounters
from experts.spec import ModelSpec


class EngineStoppedError(RuntimeError):
    """The engine loop stopped (shut down, or a step failed) before the request finished."""


@dataclass
class EventStream:
    """One request's events, delivered from the engine's thread to the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[TokenEvent | BaseException]

    def send(self, item: TokenEvent | BaseException) -> bool:
        """Deliver to the caller's loop; False if that loop is gone (the caller left)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # raised by a closed event loop
            return False
        return True


async def stream_events(
    stream: EventStream, abort: Callable[[], None]
) -> AsyncIterator[TokenEvent]:
    """A request's events as they arrive on its stream; leaving before the end calls ``abort``."""
    finished = False
    try:
        while True:
            item = await stream.events.get()
            if isinstance(item, BaseException):
                finished = True
                raise item
            finished = item.finish_reason is not None
            yield item
            if finished:
                return
    finally:
        if not finished:
            abort()


class EngineCore(Protocol):
    """What a tier replica needs of an engine, wherever it runs (this process or its own)."""

    @property
    def spec(self) -> ModelSpec: ...

    def validate(self, request: EngineRequest) -> None: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]: ...

    def counters(self) -> EngineCounters: ...

    def take_routed_counts(self) -> dict[tuple[int, int], int]: ...

    def is_alive(self) -> bool: ...

    def shutdown(self, timeout: float = 30.0) -> None: ...


@dataclass(frozen=True)
class _Add:
    request: EngineRequest
    stream: EventStream


@dataclass(frozen=True)
class _Abort:
    request_id: str


class AsyncEngine:
    """Drives an ``LLMEngine`` from a background thread; many concurrent async streams."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._streams: dict[str, EventStream] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        """Stream the request's tokens; bad input raises ``ValueError`` on first iteration."""
        if self._stopping:
            raise EngineStoppedError("the engine is shut down")
        stream = EventStream(asyncio.get_running_loop(), asyncio.Queue())
        self._post(_Add(request, stream))
        async for event in stream_events(stream, lambda: self.abort(request.request_id)):
            yield event

    @property
    def spec(self) -> ModelSpec:
        return self.engine.model.spec

    def validate(self, request: EngineRequest) -> None:
        self.engine.validate(request)

    def counters(self) -> EngineCounters:
        """Read from the caller's thread while the loop steps: a moment's figures, not exact."""
        return self.engine.counters()

    def take_routed_counts(self) -> dict[tuple[int, int], int]:
        return self.engine.runner.take_routed_counts()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def abort(self, request_id: str) -> None:
        self._post(_Abort(request_id))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; unfinished requests get ``EngineStoppedError``."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _post(self, message: _Add | _Abort) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, _Add):
                try:
                    self.engine.add_request(message.request)
                except ValueError as err:
                    message.stream.send(err)
                    continue
                self._streams[message.request.request_id] = message.stream
            else:
                self.engine.abort(message.request_id)
                self._streams.pop(message.request_id, None)

    def _loop(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as err:  # a broken step must not hang every caller
                self._fail_all(EngineStoppedError(f"engine step failed: {err!r}"))
                raise
            for event in events:
                stream = self._streams.get(event.request_id)
                if stream is not None and not stream.send(event):
                    self.engine.abort(event.request_id)  # nobody is listening any more
                    self._streams.pop(event.request_id)
                elif event.finish_reason is not None:
                    self._streams.pop(event.request_id, None)
        self._drain_inbox()
        self._fail_all(EngineStoppedError("the engine was shut down"))

    def _fail_all(self, error: EngineStoppedError) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            stream.send(error)
        self._streams.clear()
