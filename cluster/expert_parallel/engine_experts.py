"""Remote experts for an engine process: the replica arranges the channel, the child joins it.

An engine process (``cluster.engine.engine_process``) makes no Ray call: it has no Ray worker
of its own. So its tier replica, a Ray worker, does the Ray half of opening a data-plane
channel (``arrange_engine_experts``): it hosts the channel's rendezvous store on this node and
has every shard actor start its side (the ``open_channel`` call, as ``TorchDistTransport``
does). It then hands the engine process an ``EngineExpertsFactory``: the routing table, tier
name, the layer timeout and, per shard, its ``ChannelTicket`` (whose key crosses only the
replica's socket pair to its child). In the child, ``build`` joins every pair, runs the key
handshake (learning each shard's payload limits) and returns a ``RemoteExperts`` over that
one channel. The wire, HMAC and failure rules are those of ``cluster.expert_parallel.data_plane``;
shards on the replica's node get shared-memory pairs (``shm_link``), which the child connects
to as the replica would (the ticket says which kind each pair is).

Only the ``torch_dist`` data plane can work so: ``ray`` needs Ray calls on every layer, and
``arrange_engine_experts`` refuses it (the config refuses ``engine_process: true`` with it, and
its default runs such a tier's engine in the replica).

Failures. A dead shard loses only its own pair: ``RemoteExperts`` recomputes its share on
other replicas in the same layer, so with replication no request notices. The child cannot
join a fresh pair by itself (that takes Ray calls), so its replica does it: an
``EngineShardRejoiner`` there remembers which start of each shard the child's pair reaches,
and before the replica forwards a routing table (on every placement report) it probes the
shards and, for each restarted one, opens the shard's side of a fresh pair as above and sends
the tickets down the engine loop's command path (``JoinShards``, ahead of the table), where
``JoinedChannel.adopt`` joins them. A table that would leave some (layer, expert) only on shards
the child cannot reach is deferred while the running table has a reachable replica of it
(``RemoteExperts.set_table``). When some expert has no reachable replica at all, the layer
raises at once (naming the missing (layer, expert): the child cannot wait for a pair within a
step), the step fails and the engine process stops; its requests end with
``EngineStoppedError`` giving that reason, the replica's health check fails and Serve replaces
the replica, whose new engine process gets a fresh channel.

Telemetry. The child has no telemetry of its own, so ``build`` sets it up from the factory's
settings (role ``tier``, the replica's attributes): the ``moe.expert_dispatch`` spans and
per-shard round-trip metrics are made where the layers run, and the dispatch spans' context
still reaches the shards' spans. With a Prometheus exporter the child serves its own
``/metrics`` on the next free port from the configured one, as each shard actor does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch.distributed as dist

from cluster.expert_parallel.data_plane import (
    Channel,
    ChannelTicket,
    DataPlaneError,
    host_rendezvous,
    tolerant,
)
from cluster.expert_parallel.remote_experts import RemoteExperts
from cluster.expert_parallel.transports import ChannelCalls, PoolTransport, TorchDistTransport
from cluster.telemetry.setup import TelemetrySettings, setup_telemetry
from router.routing_table import RoutingTable

log = logging.getLogger(__name__)

# how long the shards wait for an engine process to join: it starts an interpreter and
# imports torch first, slowly on a busy node
ENGINE_JOIN_TIMEOUT_S = 300.0


class JoinedChannel(ChannelCalls):
    """The one channel an engine process joined; a broken one cannot be reopened there."""

    can_reconnect = False  # a layer missing an expert fails at once: waiting cannot help

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def reconnect(self, shard_id: str, timeout_s: float = 5.0) -> bool:
        """Whether the channel still reaches ``shard_id`` (a lost pair stays lost here until
        the replica hands over a fresh one: ``adopt``)."""
        return self.reaches(shard_id)

    def reaches(self, shard_id: str) -> bool:
        """Whether the channel holds a pair to ``shard_id`` (not lost, not never joined)."""
        return shard_id in self._channel.groups or shard_id in self._channel.links

    def adopt(self, host: str, tickets: Mapping[str, ChannelTicket]) -> list[str]:
        """Join fresh pairs whose shard sides the replica started (no Ray call here) and use
        them in place of the old ones; a shard that does not join stays as it was (logged).
        Returns the shards joined."""
        joined = []
        for sid, ticket in sorted(tickets.items()):  # one at a time: one failure loses one
            try:
                fresh = Channel.join({sid: ticket}, host, self._channel.timeout_s)
            except DataPlaneError as err:
                log.warning("engine process: expert shard %s not rejoined: %s", sid, err)
                self._channel.lost[sid] = str(err).splitlines()[0]
                continue
            old = self._channel.links.pop(sid, None)
            if old is not None:  # the restarted shard's old segment: nobody serves it now
                old.close(stop=False)
            self._channel.groups.pop(sid, None)
            self._channel.adopt(fresh)
            joined.append(sid)
        if joined:
            log.warning("engine process: rejoined expert shards %s", joined)
        return joined

    def channel(self) -> Channel:
        if self._channel.unusable:
            raise DataPlaneError(
                "the data-plane channel to the expert shards broke on an earlier layer; an "
                "engine process cannot reopen it (that takes Ray calls): restart the replica"
            )
        return self._channel

    def close(self) -> None:
        self._channel.close()


@dataclass(frozen=True)
class EngineExpertsFactory:
    """A picklable recipe for ``RemoteExperts`` over a channel its replica arranged.

    Plain data only (the routing table travels as its version and placement items), so it
    crosses to the engine process with the launch message.
    """

    tier: str
    table_version: int
    placement: tuple[tuple[tuple[int, int], tuple[str, ...]], ...]  # ((layer, expert), shards)
    host: str  # this node's cluster address: where the store and the gloo devices listen
    timeout_s: float  # how long a layer waits for a shard's answer
    tickets: tuple[tuple[str, ChannelTicket], ...]  # per shard id
    telemetry: TelemetrySettings | None = None
    telemetry_attributes: tuple[tuple[str, str], ...] = ()
    near: tuple[str, ...] = ()  # shards on this node (preferred among equal replicas)
    unavailable_wait_s: float = 30.0  # experts.unavailable_wait_s

    @property
    def table(self) -> RoutingTable:
        return RoutingTable(self.table_version, dict(self.placement))

    def build(self) -> RemoteExperts:
        """Join the channel (no Ray call) and return the backend the model calls per layer."""
        if self.telemetry is not None:  # a no-op where this process has telemetry already
            setup_telemetry(self.telemetry, role="tier", attributes=dict(self.telemetry_attributes))
        channel = Channel.join(dict(self.tickets), self.host, self.timeout_s)
        return RemoteExperts(
            JoinedChannel(channel), self.table, self.tier, self.near, self.unavailable_wait_s
        )


@dataclass(frozen=True)
class EngineExperts:
    """What a replica arranged for its engine process: the recipe to hand over, and the
    rendezvous store (``None`` when every shard is on this node), which the replica keeps
    for as long as the engine process runs."""

    factory: EngineExpertsFactory
    store: dist.TCPStore | None


def arrange_engine_experts(
    transport: PoolTransport,
    table: RoutingTable,
    tier: str,
    telemetry: TelemetrySettings | None = None,
    telemetry_attributes: Mapping[str, str] | None = None,
    join_timeout_s: float = ENGINE_JOIN_TIMEOUT_S,
    unavailable_wait_s: float = 30.0,
) -> EngineExperts:
    """Open the shards' sides of a channel (Ray calls, here in the replica) for a child to join.

    ``transport`` is the pool's; only a ``TorchDistTransport`` can serve an engine process.
    The shards wait up to ``join_timeout_s`` (at least the layer timeout) for the child.
    """
    if not isinstance(transport, TorchDistTransport):
        raise ValueError(
            f"tier {tier!r}: an engine process can reach expert shards over the torch_dist "
            f"data plane only, not {type(transport).__name__} (it makes Ray calls on every "
            "layer); set experts.data_plane: torch_dist, or engine_process: false"
        )
    wait_s = max(transport.timeout_s, join_timeout_s)
    host = transport.host()
    near = transport.same_node()
    failed: dict[str, str] = {}  # shards dead or restarting now: the child goes without them
    store, tickets = host_rendezvous(
        list(transport.handles),
        tolerant(transport.start_peer(wait_s), failed),
        host,
        wait_s,
        near if transport.same_node_shm else (),
    )
    if len(failed) == len(tickets):
        raise DataPlaneError(f"tier {tier!r}: no expert shard could be asked to join: {failed}")
    tickets = {sid: ticket for sid, ticket in tickets.items() if sid not in failed}
    factory = EngineExpertsFactory(
        tier=tier,
        table_version=table.version,
        placement=tuple(table.placement.items()),
        host=host,
        timeout_s=transport.timeout_s,
        tickets=tuple(tickets.items()),
        telemetry=telemetry,
        telemetry_attributes=tuple(sorted((telemetry_attributes or {}).items())),
        near=tuple(sorted(near)),
        unavailable_wait_s=unavailable_wait_s,
    )
    return EngineExperts(factory, store)


ShardState = tuple[str, list[tuple[int, int]]] | None  # (start id, slots held); None: no answer
Tickets = tuple[tuple[str, ChannelTicket], ...]


class EngineShardRejoiner:
    """The replica's half of rejoining restarted shards for its engine process (Ray calls).

    It remembers which start of each shard (the incarnation its actor answers with) the
    child's pair reaches. ``arrange`` probes the shards; for every one answering as another
    start (restarted), or answering after it could not be asked at first, it opens the
    shards' sides of fresh pairs as ``arrange_engine_experts`` does (this replica hosts the
    rendezvous, each shard is asked through Ray) and returns the host and tickets for the
    child (``EngineClient.join_shards``). The replica calls it before it forwards a routing
    table, so the child has joined a restarted shard before it sees a table listing it.
    """

    def __init__(
        self,
        transport: TorchDistTransport,
        states: Callable[[], Mapping[str, ShardState]],
        starts: Mapping[str, str | None],
        join_timeout_s: float = ENGINE_JOIN_TIMEOUT_S,
    ) -> None:
        self._transport = transport
        self._states = states
        self._starts = dict(starts)  # shard id -> the start the child's pair reaches (None: none)
        self._wait_s = max(transport.timeout_s, join_timeout_s)
        self._stores: list[dist.TCPStore] = []  # kept while the child may use their pairs
        self.num_rejoined = 0

    def stale(self, states: Mapping[str, ShardState]) -> list[str]:
        """Shards that answer as a start the child has no pair to, sorted."""
        return sorted(
            sid
            for sid, state in states.items()
            if state is not None and self._starts.get(sid) != state[0]
        )

    def arrange(self) -> tuple[str, Tickets] | None:
        """Start fresh pairs' shard sides to restarted shards; None when none restarted."""
        states = self._states()
        stale = self.stale(states)
        if not stale:
            return None
        transport = self._transport
        host = transport.host()
        near = transport.same_node() if transport.same_node_shm else ()
        failed: dict[str, str] = {}
        store, tickets = host_rendezvous(
            stale, tolerant(transport.start_peer(self._wait_s), failed), host, self._wait_s, near
        )
        if store is not None:
            self._stores.append(store)
        started = tuple(sorted((s, t) for s, t in tickets.items() if s not in failed))
        for sid, _ in started:
            state = states[sid]
            self._starts[sid] = state[0] if state is not None else None
        self.num_rejoined += len(started)
        if failed:
            log.warning("replica: restarted shards %s could not be asked to rejoin", failed)
        return (host, started) if started else None
