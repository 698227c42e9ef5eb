"""The async API of an engine, whichever transport runs its loop: submit, stream, cancel.

``EngineCore`` is what a tier replica asks of an engine. ``EngineClient`` implements it
once over a ``StreamRegistry`` and a ``_post`` that hands a command to the loop: the
in-process transport (``cluster.engine.async_engine``) posts to a queue its thread reads,
the engine process (``cluster.engine.engine_process``) writes to its child's socket. Bad
input raises ``ValueError`` on a stream's first iteration; leaving a stream early (break,
``aclose``, task cancellation) aborts the request and frees its KV blocks; a request the
engine fails alone ends with ``RequestFailedError``; once the loop stops every request,
open or new, gets ``EngineStoppedError`` at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, Protocol

from cluster.engine.admission import validate_request
from cluster.engine.config import EngineConfig
from cluster.engine.counters import EngineCounters
from cluster.engine.kv_events import KVEventBatch
from cluster.engine.loop import (
    SHUT_DOWN,
    AbortRequest,
    AddRequest,
    Command,
    JoinShards,
    SetRoutingTable,
    SnapshotKV,
    StepResult,
)
from cluster.engine.requests import EngineRequest, TokenEvent
from cluster.engine.streams import EngineStoppedError, StreamRegistry
from experts.spec import ModelSpec

MAX_KV_EVENT_BATCHES = 4096  # untaken batches kept (one per step at most)


class EngineCore(Protocol):
    """What a tier replica needs of an engine, wherever it runs (this process or its own)."""

    @property
    def spec(self) -> ModelSpec: ...

    def validate(self, request: EngineRequest) -> None: ...

    def generate(self, request: EngineRequest) -> AsyncGenerator[TokenEvent, None]: ...

    def generate_batches(
        self, request: EngineRequest
    ) -> AsyncGenerator[list[TokenEvent], None]: ...

    def counters(self) -> EngineCounters: ...

    def take_routed_counts(self) -> dict[tuple[int, int], int]: ...

    def set_routing_table(
        self, version: int, placement: tuple[tuple[tuple[int, int], tuple[str, ...]], ...]
    ) -> None: ...

    @property
    def table_version(self) -> int: ...

    def take_kv_events(self) -> list[KVEventBatch]: ...

    def request_kv_snapshot(self) -> None: ...

    def is_alive(self) -> bool: ...

    def shutdown(self, timeout: float = 30.0) -> None: ...


class EngineClient(ABC):
    """Streams by request id over one engine loop; a transport supplies ``_post``,
    ``is_alive`` and ``shutdown``."""

    def __init__(self, spec: ModelSpec, config: EngineConfig, counters: EngineCounters) -> None:
        self._spec = spec
        self.config = config
        self._streams = StreamRegistry(counters, self.abort)
        self._table_version = -1  # as of the loop's last StepResult
        # KV event batches not yet taken; the oldest go first when nobody takes them (the
        # taker then sees a gap in sequence numbers and asks for a snapshot)
        self._kv_events: deque[KVEventBatch] = deque(maxlen=MAX_KV_EVENT_BATCHES)

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    def validate(self, request: EngineRequest) -> None:
        """Raise ``ValueError`` saying what is wrong with a request (before it is sent)."""
        num_blocks = self._streams.counters.num_blocks
        validate_request(request, self._spec, self.config.block_size, num_blocks)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[TokenEvent, None]:
        """Stream the request's tokens one by one (see ``generate_batches``)."""
        async with aclosing(self.generate_batches(request)) as batches:
            async for batch in batches:
                for event in batch:
                    yield event

    async def generate_batches(
        self, request: EngineRequest
    ) -> AsyncGenerator[list[TokenEvent], None]:
        """Stream the request's tokens, each time every one that has arrived (a caller busy
        elsewhere meanwhile gets them together). Bad input raises ``ValueError``, a
        stopped engine ``EngineStoppedError`` (at once)."""
        request_id = request.request_id
        stream = self._streams.open(request_id)
        try:
            self._post(AddRequest(request))
        except EngineStoppedError:
            self._streams.close(request_id)
            raise
        try:
            while not stream.done:
                yield await stream.next_batch()
        finally:
            if not stream.ended:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its stream gets nothing more."""
        self._streams.close(request_id)
        try:
            self._post(AbortRequest(request_id))
        except EngineStoppedError:
            pass  # the engine is gone, and the request with it

    def counters(self) -> EngineCounters:
        """As of the loop's last step (it publishes after every step or batch of commands)."""
        return self._streams.counters

    def take_routed_counts(self) -> dict[tuple[int, int], int]:
        """Tokens routed per (layer, expert) since the last call; complete once idle."""
        return self._streams.take_routed_counts()

    def set_routing_table(
        self, version: int, placement: tuple[tuple[tuple[int, int], tuple[str, ...]], ...]
    ) -> None:
        """Have the loop swap its experts' routing table between two steps (a re-placement);
        ``table_version`` shows it once done. ``EngineStoppedError`` if the loop is gone."""
        self._post(SetRoutingTable(version, placement))

    def join_shards(self, host: str, tickets: tuple[tuple[str, Any], ...]) -> None:
        """Have the loop's expert backend join fresh pairs to (restarted) shards between two
        steps (``JoinShards``); posted before a table listing them. ``EngineStoppedError`` if
        the loop is gone."""
        self._post(JoinShards(host, tickets))

    @property
    def table_version(self) -> int:
        """The routing table version the engine's experts run (-1: none), as of its last step."""
        return self._table_version

    def take_kv_events(self) -> list[KVEventBatch]:
        """The engine's KV event batches since the last call, in order."""
        batches = []
        while self._kv_events:
            batches.append(self._kv_events.popleft())
        return batches

    def request_kv_snapshot(self) -> None:
        """Have the engine's next KV event batch be a snapshot of its whole cache."""
        self._post(SnapshotKV())

    def _deliver(self, result: StepResult) -> None:
        """A loop result, from the transport: the table version, then the streams."""
        self._table_version = result.table_version
        if result.kv_events is not None:
            self._kv_events.append(result.kv_events)
        self._streams.deliver(result)

    @abstractmethod
    def is_alive(self) -> bool:
        """False once the loop stopped (shut down, a step failed, its process died)."""

    @abstractmethod
    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; unfinished requests get ``EngineStoppedError``."""

    def _refuse_new(self) -> None:
        """Shutting down: new requests are refused, open ones end with ``EngineStoppedError``."""
        self._streams.stop(SHUT_DOWN)

    @abstractmethod
    def _post(self, command: Command) -> None:
        """Hand a command to the loop; ``EngineStoppedError`` if it cannot be reached."""
