"""The engine loop: commands applied between steps, one result out per step.

Both transports run this one loop: the in-process one (``cluster.engine.async_engine``) on
a background thread, the engine process (``cluster.engine.engine_process``) in its child.
Only the channel differs: where commands come from (a queue, a socket) and where results
go (the stream registry, the socket back to it). While any request is unfinished the loop
applies every command that came, steps, and publishes one ``StepResult``; when idle it
waits for a command. The messages here are plain dataclasses (torch-free, picklable): the
engine process sends them over its socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cluster.engine.counters import EngineCounters
from cluster.engine.kv_events import KVEventBatch
from cluster.engine.requests import EngineRequest, TokenEvent

if TYPE_CHECKING:
    from cluster.engine.llm_engine import LLMEngine

SHUT_DOWN = "the engine was shut down"
_MAX_ERROR_CHARS = 200  # of an exception's repr quoted in a stopped engine's reason


@dataclass(frozen=True)
class AddRequest:
    """Queue a request; one the engine refuses comes back in ``StepResult.rejected``."""

    request: EngineRequest


@dataclass(frozen=True)
class AbortRequest:
    """Stop a request and free its blocks (its caller left); unknown ids are ignored."""

    request_id: str


@dataclass(frozen=True)
class StopEngine:
    """Abort every request (freeing its blocks) and end the loop."""


@dataclass(frozen=True)
class SetRoutingTable:
    """Swap the expert backend's routing table, between two steps (a live re-placement).

    The table travels as its version and placement items (plain data, picklable); one not
    newer than the running table is ignored (a late duplicate). ``StepResult.table_version``
    then reports the version the engine runs, which is the acknowledgement the placement
    controller waits for before it drops the old slots.
    """

    version: int
    placement: tuple[tuple[tuple[int, int], tuple[str, ...]], ...]


@dataclass(frozen=True)
class JoinShards:
    """Join fresh data-plane pairs to expert shards (restarted ones), between two steps.

    The replica started the shards' sides (Ray calls) and hosts the rendezvous at ``host``;
    ``tickets`` are (shard id, ``ChannelTicket``) pairs. The expert backend adopts the new
    pairs in place of its old ones (``RemoteExperts.join_shards``); a backend without shards
    ignores it. Sent before a routing table that lists those shards again.
    """

    host: str
    tickets: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class SnapshotKV:
    """Have the next result's KV events be a snapshot of the whole cache (a router that
    missed events, or just started, resynchronises from it)."""


Command = AddRequest | AbortRequest | StopEngine | SetRoutingTable | JoinShards | SnapshotKV


@dataclass(frozen=True)
class StepResult:
    """What one pass of the loop did: after a step, or after commands while idle."""

    events: list[TokenEvent]
    rejected: list[tuple[str, str]]  # (request id, why): add_request refused it (ValueError)
    failed: list[tuple[str, str]]  # (request id, why): the engine failed it alone
    counters: EngineCounters
    # tokens routed per (layer, expert), handed over when a request ends or the engine goes
    # idle (a caller records them as its request ends); {} otherwise
    routed: dict[tuple[int, int], int]
    # the routing table version the expert backend runs after this pass (-1: no table)
    table_version: int = -1
    # the blocks its cache gained and lost in this pass (None: nothing, or no KV link)
    kv_events: KVEventBatch | None = None


@dataclass(frozen=True)
class EngineStopped:
    """The loop ended: shut down, or a step raised (``reason`` says which)."""

    reason: str


class EngineChannel(Protocol):
    """Where a loop's commands come from and its results go."""

    def receive(self, wait: bool) -> Command | None:
        """The next command; None when there is none and ``wait`` is false."""
        ...

    def publish(self, result: StepResult) -> None: ...

    def stopped(self, reason: str) -> None:
        """The loop ends: every open request is over (``reason`` says why)."""
        ...


def describe_step_error(err: BaseException) -> str:
    """Why an engine stopped, after a step raised ``err`` (bounded: never a whole input)."""
    return f"engine step failed: {err!r}"[:_MAX_ERROR_CHARS]


def run_engine_loop(engine: LLMEngine, channel: EngineChannel) -> None:
    """Apply commands between steps, step, publish; until a ``StopEngine``.

    A step that raises is reported (``channel.stopped``) and re-raised: the engine's state
    is then unknown, so nothing more is asked of it. Errors of the channel itself (its
    peer gone) propagate untouched.
    """
    while True:
        rejected: list[tuple[str, str]] = []
        command = channel.receive(wait=not engine.has_unfinished())
        while command is not None:
            if isinstance(command, StopEngine):
                engine.abort_all()
                if engine.kv is not None:
                    engine.kv.close()
                channel.stopped(SHUT_DOWN)
                return
            _apply(engine, command, rejected)
            command = channel.receive(wait=False)
        events: list[TokenEvent] = []
        failed: list[tuple[str, str]] = []
        if engine.has_unfinished():
            try:
                events = engine.step()
            except Exception as err:
                channel.stopped(describe_step_error(err))
                raise
            failed = [(f.request_id, f.reason) for f in engine.failures]
        ended = bool(failed) or any(e.finish_reason for e in events)
        routed = _routed(engine, ended)
        version = _table_version(engine)
        kv_events = engine.kv.take_events() if engine.kv is not None else None
        channel.publish(
            StepResult(events, rejected, failed, engine.counters(), routed, version, kv_events)
        )


def _apply(engine: LLMEngine, command: Command, rejected: list[tuple[str, str]]) -> None:
    if isinstance(command, AddRequest):
        try:
            engine.add_request(command.request)
        except ValueError as err:
            rejected.append((command.request.request_id, str(err)))
    elif isinstance(command, AbortRequest):
        engine.abort(command.request_id)
    elif isinstance(command, SetRoutingTable):
        _set_table(engine, command)
    elif isinstance(command, JoinShards):
        join = getattr(engine.model.experts, "join_shards", None)
        if join is not None:  # colocated experts have no shards to join
            join(command.host, dict(command.tickets))
    elif isinstance(command, SnapshotKV) and engine.kv is not None:
        engine.kv.events.request_snapshot()


def _set_table(engine: LLMEngine, command: SetRoutingTable) -> None:
    """Install a newer table in the expert backend; no step is running (between steps)."""
    from router.routing_table import RoutingTable

    backend = engine.model.experts
    set_table = getattr(backend, "set_table", None)
    if set_table is None or command.version <= _table_version(engine):
        return  # colocated experts have no table; an older or equal one is stale
    set_table(RoutingTable(command.version, dict(command.placement)))


def _table_version(engine: LLMEngine) -> int:
    table = getattr(engine.model.experts, "table", None)
    version = getattr(table, "version", -1)
    return version if isinstance(version, int) else -1


def _routed(engine: LLMEngine, ended: bool) -> dict[tuple[int, int], int]:
    """The routing counts to hand over now: when a request ``ended`` or the engine is idle
    (a caller takes them as its request ends), so that not every step pays the copy."""
    if not engine.runner.count_routing or not (ended or not engine.has_unfinished()):
        return {}
    return engine.runner.take_routed_counts()
