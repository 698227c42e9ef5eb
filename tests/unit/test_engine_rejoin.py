"""An engine process rejoins a restarted expert shard: the replica arranges a fresh pair
(``EngineShardRejoiner``), the child adopts it through the loop's ``JoinShards`` command; a
table naming only shards the child cannot reach waits while the running one has a reachable
replica; the controller gives a shard back from a restart the replicas it lost. No Ray: the
shards are ``ShardActorImpl`` objects serving their sides of the data plane on threads."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from cluster.engine.loop import JoinShards, SetRoutingTable, _apply
from cluster.expert_parallel import data_plane as dp
from cluster.expert_parallel.engine_experts import EngineShardRejoiner, JoinedChannel
from cluster.expert_parallel.placement_controller import (
    InProcessShards,
    ReportReply,
    TierPlacement,
    TierSetup,
)
from cluster.expert_parallel.remote_experts import RemoteExperts
from cluster.expert_parallel.shard_actor import ShardActorImpl
from cluster.expert_parallel.transports import TorchDistTransport
from cluster.serving.placement_reporter import PlacementReporter
from experts.shard import ExpertShard
from router.dispatch import ExpertUnavailableError, unreachable_only
from router.placement.recover import restore_replication
from router.replan_policy import ReplanConfig
from router.routing_table import RoutingTable, replicated
from tests.checkpoints import build_family_checkpoint

HOST = "127.0.0.1"
SHARDS = ["s0", "s1"]


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint("mixtral", tmp_path_factory.mktemp("rejoin") / "m", seed=7)


class _Shards:
    """Shard actors as objects; ``restart`` replaces one with a fresh start (new incarnation,
    its first slots, none of its old pairs)."""

    def __init__(self, path: Path, table: RoutingTable) -> None:
        self.path, self.table = path, table
        self.impls = {s: self._start(s) for s in SHARDS}

    def _start(self, sid: str) -> ShardActorImpl:
        return ShardActorImpl(str(self.path), "cpu", self.table.experts_on(sid), sid)

    def restart(self, sid: str) -> None:
        self.impls[sid] = self._start(sid)

    def open(self, sid: str, ticket: dp.ChannelTicket, wait_s: float) -> None:
        self.impls[sid].open_channel(ticket, wait_s)

    def states(self) -> dict[str, Any]:
        return {sid: impl.state() for sid, impl in self.impls.items()}

    def transport(self) -> TorchDistTransport:
        handles = dict.fromkeys(SHARDS)
        return TorchDistTransport(handles, 20.0, self.open, lambda: HOST, lambda: ())


def _layer(path: Path) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = ExpertShard(path, slots=[]).reader.spec
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, spec.hidden_size, generator=gen)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3], [3, 1], [2, 0]])
    return spec.moe_layers[0], hidden, ids, torch.rand(6, 2, generator=gen)


def _expected(path: Path, layer: int, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor):
    every = ExpertShard(path, slots=[(layer, e) for e in range(4)])
    return every.compute(layer, hidden, ids, w)


def _child(shards: _Shards, table: RoutingTable) -> tuple[RemoteExperts, dp.Channel]:
    """What an engine process builds: a channel joined without a Ray call, over tickets the
    replica's side started."""
    chan = dp.Channel.open(SHARDS, shards.transport().start_peer(20.0), HOST, 20.0)
    return RemoteExperts(JoinedChannel(chan), table, "t"), chan


def test_a_restarted_shard_is_rejoined_before_the_table_listing_it_is_installed(
    path: Path,
) -> None:
    spec = ExpertShard(path, slots=[]).reader.spec
    table = replicated(spec.moe_layers, spec.num_experts, SHARDS, 2)
    shards = _Shards(path, table)
    experts, chan = _child(shards, table)
    engine = SimpleNamespace(model=SimpleNamespace(experts=experts))
    starts = {sid: state[0] for sid, state in shards.states().items()}
    rejoiner = EngineShardRejoiner(shards.transport(), shards.states, starts, join_timeout_s=20)
    layer, hidden, ids, w = _layer(path)
    try:
        assert rejoiner.arrange() is None  # nobody restarted
        # s1 dies (the child's pair is lost) and Ray restarts it; the controller then moves
        # expert 2's only copy there (the table the bench's failure came from)
        chan.lose("s1", "connection reset")
        shards.restart("s1")
        moved = table.with_changes(remove=[(lyr, 2, "s0") for lyr in spec.moe_layers])
        _apply(engine, SetRoutingTable(moved.version, tuple(moved.placement.items())), [])  # type: ignore[arg-type]
        assert experts.table.version == table.version  # deferred: s0 still holds expert 2
        assert experts.deferred_version == moved.version
        out = experts.forward(layer, hidden, ids, w)  # the replicas it reaches serve
        assert torch.allclose(out, _expected(path, layer, hidden, ids, w), atol=1e-5)
        arranged = rejoiner.arrange()
        assert arranged is not None and [sid for sid, _ in arranged[1]] == ["s1"]
        assert rejoiner.arrange() is None  # once per start
        _apply(engine, JoinShards(*arranged), [])  # type: ignore[arg-type]
        assert experts.table.version == moved.version and experts.deferred_version == -1
        assert JoinedChannel(chan).reaches("s1")
        out = experts.forward(layer, hidden, ids, w)  # expert 2 now only on the new s1
        assert torch.allclose(out, _expected(path, layer, hidden, ids, w), atol=1e-5)
    finally:
        chan.close()


def test_a_table_with_no_reachable_replica_anywhere_is_installed_and_fails_naming_it(
    path: Path,
) -> None:
    """Deferring helps only while the running table has a reachable replica: otherwise the
    table goes in and the layer fails at once (an engine process cannot wait for a pair)."""
    spec = ExpertShard(path, slots=[]).reader.spec
    table = replicated(spec.moe_layers, spec.num_experts, SHARDS, 1)
    shards = _Shards(path, table)
    experts, chan = _child(shards, table)
    layer, hidden, ids, w = _layer(path)
    try:
        chan.lose("s1", "connection reset")
        newer = RoutingTable(table.version + 1, dict(table.placement))
        experts.set_table(newer)
        assert experts.table.version == newer.version
        with pytest.raises(ExpertUnavailableError, match=r"cannot rejoin"):
            experts.forward(layer, hidden, ids, w)
    finally:
        chan.close()


def test_the_replica_joins_restarted_shards_before_it_forwards_a_table() -> None:
    calls: list[str] = []

    class Engine:
        table_version = 3

        def set_routing_table(self, version: int, placement: Any) -> None:
            calls.append(f"table v{version}")

        def is_alive(self) -> bool:
            return True

    async def send(tier: str, rid: str, counts: Any, v: int) -> ReportReply:
        return ReportReply(4, (((0, 0), ("s1",)),), 0.1)

    async def before() -> None:
        calls.append("join")

    reporter = PlacementReporter("t", "r", Engine(), send, 1.0, before_table=before)  # type: ignore[arg-type]
    asyncio.run(reporter.report_once())
    assert calls == ["join", "table v4"]


def test_unreachable_only_names_slots_a_table_would_take_from_reach() -> None:
    running = RoutingTable(1, {(0, 0): ("s0", "s1"), (0, 1): ("s1",), (0, 2): ("s0",)})
    table = RoutingTable(2, {(0, 0): ("s1",), (0, 1): ("s1",), (0, 2): ("s0", "s1")})
    reaches = {"s0": True, "s1": False}.__getitem__
    assert unreachable_only(table, running, reaches) == [(0, 0)]  # (0, 1): none reachable now
    assert unreachable_only(table, running, reaches, dead={"s0"}) == []
    assert unreachable_only(table, running, lambda s: True) == []


def test_restore_replication_gives_a_returning_shard_the_copies_it_lost() -> None:
    table = replicated((0, 1), 4, SHARDS, 2)
    alone = table.with_changes(remove=[(lyr, e, "s1") for lyr, e in table.experts_on("s1")])
    held = table.experts_on("s1")  # what it came back with
    add = restore_replication(alone, "s1", 2, capacity=4, held=held)
    assert add == [(lyr, e, "s1") for lyr, e in held]
    # capacity 3 per layer: what it holds already first, then the rest by (layer, expert)
    add = restore_replication(alone, "s1", 2, capacity=3, held=[(0, 3)])
    assert add == [
        (0, 0, "s1"),
        (0, 1, "s1"),
        (0, 3, "s1"),
        (1, 0, "s1"),
        (1, 1, "s1"),
        (1, 2, "s1"),
    ]
    assert restore_replication(table, "s1", 2, capacity=4) == []  # nothing below the floor


def test_the_controller_restores_replication_when_a_lost_shard_comes_back(path: Path) -> None:
    spec = ExpertShard(path, slots=[]).reader.spec
    layers = tuple(spec.moe_layers)
    table = replicated(layers, spec.num_experts, SHARDS, 2)
    impls = {s: ShardActorImpl(str(path), "cpu", table.experts_on(s), s) for s in SHARDS}
    shards = InProcessShards(impls)
    setup = TierSetup(
        "t", layers, spec.num_experts, dict.fromkeys(SHARDS, "n"), 1, ReplanConfig(enabled=True)
    )
    tier = TierPlacement(setup, table, shards, background=lambda work: work())
    tier.observe(shards.states())
    states: dict[str, Any] = dict(shards.states())
    states["s1"] = None
    tier.observe(states)  # lost: nowhere to re-place (s0 holds every expert already)
    assert all(list(shards_) == ["s0"] for shards_ in tier.table.placement.values())
    impls["s1"] = ShardActorImpl(str(path), "cpu", table.experts_on("s1"), "s1")
    shards.shards["s1"] = impls["s1"]
    tier.observe(shards.states())
    back = tier.table
    assert all(sorted(s) == SHARDS for s in back.placement.values())  # replication 2 again
    assert back.version == table.version + 2 and tier.stats.lost_shards == ()
    assert sorted(impls["s1"].slots()) == back.experts_on("s1")
