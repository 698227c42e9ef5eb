"""The in-process async API: submit a request, iterate its tokens, cancel it.

The synchronous ``LLMEngine`` runs on one background thread that steps while
any request is unfinished and sleeps otherwise. Callers never touch the
engine directly: additions and aborts go through an inbox the loop drains
between steps, and token events come back to each caller's event loop through
its own ``asyncio.Queue``. Leaving the stream early (break, ``aclose``, task
cancellation) aborts the request and frees its KV blocks. A request the engine
fails alone ends with ``RequestFailedError``; once the loop stops (shut down, or a
step raised) every request, present or new, gets ``EngineStoppedError`` at once.

``EngineCore`` is what a tier replica asks of an engine; ``AsyncEngine`` is
one, ``cluster.engine.engine_process.EngineProcess`` (the engine in a child process)
the other.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from cluster.engine.counters import EngineCounters
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, RequestFailure, TokenEvent
from experts.spec import ModelSpec


class EngineStoppedError(RuntimeError):
    """The engine stopped generating the request: its loop stopped (shut down, or a step
    failed), or (``RequestFailedError``) it failed this request alone."""


class RequestFailedError(EngineStoppedError):
    """The engine could not go on with this one request (its row could not be sampled); it
    freed its blocks and went on with the others."""


_MAX_ERROR_CHARS = 200  # of an exception's repr quoted in a stopped engine's reason


def describe_step_error(err: BaseException) -> str:
    """Why an engine stopped, after a step raised ``err`` (bounded: never a whole input)."""
    return f"engine step failed: {err!r}"[:_MAX_ERROR_CHARS]


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
        # set once by the loop as it ends; under _lock with every _Add posted, so an _Add is
        # either refused here or in the inbox the loop drains after setting it
        self._stopped_because = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        """Stream the request's tokens; bad input raises ``ValueError`` on first iteration,
        a stopped engine ``EngineStoppedError`` (at once)."""
        stream = EventStream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self._stopping or self._stopped_because:
                raise EngineStoppedError(self._stopped_because or "the engine was shut down")
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
        return not self._stopped_because and self._thread.is_alive()

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
        try:
            self._run()
        except Exception as err:  # a broken step must not hang any caller, now or later
            self._stop(describe_step_error(err), engine_usable=False)
            raise  # the thread's excepthook logs the traceback
        self._stop("the engine was shut down", engine_usable=True)

    def _run(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            events = self.engine.step()
            for event in events:
                stream = self._streams.get(event.request_id)
                if stream is not None and not stream.send(event):
                    self.engine.abort(event.request_id)  # nobody is listening any more
                    self._streams.pop(event.request_id)
                elif event.finish_reason is not None:
                    self._streams.pop(event.request_id, None)
            for failure in self.engine.failures:
                self._fail_one(failure)

    def _fail_one(self, failure: RequestFailure) -> None:
        stream = self._streams.pop(failure.request_id, None)
        if stream is not None:
            stream.send(RequestFailedError(failure.reason))

    def _stop(self, reason: str, engine_usable: bool) -> None:
        """Refuse new requests, then fail every request the loop had or was sent.

        After a failed step the engine's state is unknown: nothing more is asked of it."""
        with self._lock:
            self._stopped_because = reason
        error = EngineStoppedError(reason)
        while True:  # no _Add can arrive any more: each one posted is here
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(message, _Add):
                message.stream.send(error)
                continue
            if engine_usable:
                self.engine.abort(message.request_id)
            self._streams.pop(message.request_id, None)  # its caller left: nothing to send
        for request_id, stream in list(self._streams.items()):
            if engine_usable:
                self.engine.abort(request_id)  # frees its blocks
            stream.send(error)
        self._streams.clear()
