"""Faults at expert grain without Ray: dispatch around a dead shard, the wait for a missing
expert, and the controller's re-placement of a lost shard's slots."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.expert_parallel import data_plane as dp
from cluster.expert_parallel import wire
from cluster.expert_parallel.data_plane import DataPlaneError
from cluster.expert_parallel.placement_controller import (
    InProcessShards,
    TierPlacement,
    TierSetup,
)
from cluster.expert_parallel.remote_experts import RemoteExperts
from cluster.expert_parallel.shard_actor import ShardActorImpl
from cluster.expert_parallel.transports import ShardCall, ShardsFailed
from experts.shard import ExpertShard
from router.dispatch import ExpertUnavailableError, plan_dispatch
from router.placement.recover import lost_slots, replace_lost
from router.replan_policy import ReplanConfig
from router.routing_table import RoutingTable, replicated, round_robin
from tests.checkpoints import build_family_checkpoint

NUM_EXPERTS = 8
LAYERS = (0, 1)
SHARDS = ["s0", "s1", "s2", "s3"]
HOST = "127.0.0.1"


class _Dying:
    """A ``ShardCaller`` over in-process shards; a shard in ``dying`` fails its next answer
    (as a killed process: its pair closes mid-layer), then every send to it fails at once."""

    def __init__(self, shards: dict[str, ExpertShard]) -> None:
        self.shards = shards
        self.dying: set[str] = set()
        self.dead: set[str] = set()
        self.calls: list[str] = []
        self.back_after = -1  # reconnect answers True from this try on (-1: never)
        self.tries = 0

    def send(self, call: ShardCall) -> Any:
        if call.shard_id in self.dead:
            raise DataPlaneError(f"expert shard {call.shard_id!r} is not connected")
        self.calls.append(call.shard_id)
        if call.shard_id in self.dying:
            return call.shard_id  # the answer never comes
        shard = self.shards[call.shard_id]
        return shard.compute(call.layer, call.hidden, call.expert_ids, call.weights)

    def wait(self, pending: Sequence[Any]) -> list[torch.Tensor]:
        return [out for out, _ in self.wait_timed(pending)]

    def wait_timed(self, pending: Sequence[Any]) -> list[tuple[torch.Tensor, float]]:
        answers: list[tuple[torch.Tensor, float] | None] = []
        failed: dict[int, Exception] = {}
        for i, item in enumerate(pending):
            if isinstance(item, str):
                self.dying.discard(item)
                self.dead.add(item)
                failed[i] = DataPlaneError(f"expert shard {item!r} closed its socket")
                answers.append(None)
            else:
                answers.append((item, 0.0))
        if failed:
            raise ShardsFailed(answers, failed)
        return [a for a in answers if a is not None]

    def reconnect(self, shard_id: str, timeout_s: float) -> bool:
        self.tries += 1
        if self.back_after >= 0 and self.tries > self.back_after:
            self.dead.discard(shard_id)
            return True
        return False


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint("mixtral", tmp_path_factory.mktemp("faults") / "m", seed=5)


def _routing(seed: int, tokens: int = 24, k: int = 2) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 64, generator=gen)
    ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    return hidden, ids, weights


def _shards(path: Path, table: RoutingTable) -> dict[str, ExpertShard]:
    return {s: ExpertShard(path, slots=table.experts_on(s)) for s in table.shards}


# --- routing table and dispatch ----------------------------------------------------------------


def test_replicated_tables_put_copies_on_distinct_shards() -> None:
    table = replicated(LAYERS, NUM_EXPERTS, SHARDS, 2)
    assert all(len(set(s)) == 2 for s in table.placement.values())
    assert table.excluding(["s1"]).shards == ("s0", "s2", "s3")
    table.excluding(["s1"]).validate(LAYERS, NUM_EXPERTS)  # every expert still has a copy
    assert replicated(LAYERS, NUM_EXPERTS, SHARDS, 1) == round_robin(LAYERS, NUM_EXPERTS, SHARDS)
    with pytest.raises(ValueError, match=r"replicas=5 must be between 1 and .* \(4\)"):
        replicated(LAYERS, NUM_EXPERTS, SHARDS, 5)


def test_a_plan_without_the_dead_shard_names_what_has_no_replica() -> None:
    table = round_robin(LAYERS, NUM_EXPERTS, SHARDS)
    view = table.excluding(["s2"])
    with pytest.raises(ExpertUnavailableError, match=r"\(layer 1, expert 2\)") as err:
        plan_dispatch(1, [[0, 2], [1, 3]], view)
    assert err.value.missing == ((1, 2),)
    plan = plan_dispatch(1, [[0, 1], [3, 4]], view)
    assert "s2" not in plan.per_shard


# --- the remote backend around a dead shard ----------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_a_shard_dying_mid_layer_is_recomputed_on_its_replicas(path: Path, seed: int) -> None:
    table = replicated(LAYERS, NUM_EXPERTS, SHARDS, 2)
    shards = _shards(path, table)
    hidden, ids, weights = _routing(seed)
    expected = RemoteExperts(_Dying(shards), table).forward(1, hidden, ids, weights)
    pool = _Dying(shards)
    backend = RemoteExperts(pool, table)
    victim = plan_dispatch(1, ids.tolist(), table).per_shard
    dying = sorted(victim)[seed % len(victim)]
    pool.dying.add(dying)
    got = backend.forward(1, hidden, ids, weights)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert set(backend.dead) == {dying} and backend.num_shard_failures == 1
    sent = len(pool.calls)
    again = backend.forward(1, hidden, ids, weights)  # it stays out: no call to it at all
    assert dying not in pool.calls[sent:]
    torch.testing.assert_close(again, expected, rtol=1e-6, atol=1e-6)
    backend.set_table(RoutingTable(table.version + 1, table.placement))  # a newer table
    assert backend.dead == {}
    sent = len(pool.calls)
    pool.back_after = pool.tries  # restarted: the next try joins a fresh pair to it
    torch.testing.assert_close(backend.forward(1, hidden, ids, weights), expected)
    assert dying in pool.calls[sent:] and backend.dead == {}


def test_a_missing_expert_waits_for_its_shard_then_is_computed(path: Path) -> None:
    table = round_robin(LAYERS, NUM_EXPERTS, SHARDS)
    shards = _shards(path, table)
    hidden, ids, weights = _routing(7)
    expected = RemoteExperts(_Dying(shards), table).forward(0, hidden, ids, weights)
    pool = _Dying(shards)
    pool.dying.add("s1")
    pool.back_after = 3  # the restarted shard answers on the fourth try
    now = [0.0]
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        now[0] += seconds

    backend = RemoteExperts(pool, table, unavailable_wait_s=10.0, clock=lambda: now[0], sleep=nap)
    got = backend.forward(0, hidden, ids, weights)
    assert torch.equal(got, expected)  # the same shard, the same pairs: bit for bit
    assert len(naps) == 3 and backend.dead == {}


def test_a_missing_expert_fails_within_the_bound_naming_it_and_the_field(path: Path) -> None:
    table = round_robin(LAYERS, NUM_EXPERTS, SHARDS)
    pool = _Dying(_shards(path, table))
    pool.dying.add("s3")
    now = [0.0]
    backend = RemoteExperts(
        pool,
        table,
        unavailable_wait_s=2.0,
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
    )
    hidden, ids, weights = _routing(3)
    with pytest.raises(ExpertUnavailableError, match=r"experts.unavailable_wait_s=2s") as err:
        backend.forward(0, hidden, ids, weights)
    wanted = {e for e in ids.view(-1).tolist() if e % 4 == 3}
    assert set(err.value.missing) == {(0, e) for e in wanted}
    # the tokens that chose them, for the engine to end only their requests
    chose = tuple(i for i, row in enumerate(ids.tolist()) if wanted & set(row))
    assert err.value.token_rows == chose and err.value.num_tokens == 24
    assert now[0] == pytest.approx(2.0)  # waited the bound, not the layer timeout
    # a step whose tokens need nothing from s3 still runs
    hidden, ids, weights = hidden[:2], torch.tensor([[0, 1], [2, 4]]), weights[:2]
    assert backend.forward(0, hidden, ids, weights).shape == (2, 64)


# --- re-placing a lost shard's slots -----------------------------------------------------------


def test_replace_lost_restores_every_replica_count_on_survivors() -> None:
    table = replicated(LAYERS, NUM_EXPERTS, SHARDS, 2)
    nodes = {"s0": "a", "s1": "a", "s2": "b", "s3": "b"}
    add, remove = replace_lost(table, ["s2"], SHARDS, nodes)
    after = table.with_changes(add, remove)
    assert "s2" not in after.shards and {r[2] for r in remove} == {"s2"}
    assert all(len(s) == 2 for s in after.placement.values())
    for layer, expert, sid in add:  # the new copy on the other node than the surviving one
        other = next(s for s in after.shards_for(layer, expert) if s != sid)
        assert nodes[sid] != nodes[other]
    per_shard = [len(after.experts_on(s)) for s in ("s0", "s1", "s3")]
    assert max(per_shard) - min(per_shard) <= 2 * len(LAYERS)
    assert lost_slots(table, ["s2"]) == []


def test_replace_lost_places_an_unreplicated_experts_only_copy() -> None:
    table = round_robin(LAYERS, NUM_EXPERTS, SHARDS)
    assert lost_slots(table, ["s1"]) == [(0, 1), (0, 5), (1, 1), (1, 5)]
    add, remove = replace_lost(table, ["s1"], SHARDS)
    after = table.with_changes(add, remove)
    after.validate(LAYERS, NUM_EXPERTS)
    gone = table.excluding(["s1"])  # a controller that read the table after the loss
    required = [(lyr, e) for lyr in LAYERS for e in range(NUM_EXPERTS)]
    add, remove = replace_lost(gone, ["s1"], SHARDS, required=required)
    assert remove == [] and len(add) == 4
    gone.with_changes(add, remove).validate(LAYERS, NUM_EXPERTS)


def test_the_controller_re_places_a_lost_shard_and_reconciles_it_when_back(path: Path) -> None:
    table = replicated(LAYERS, NUM_EXPERTS, SHARDS, 2)
    impls = {s: ShardActorImpl(str(path), "cpu", table.experts_on(s), s) for s in SHARDS}
    shards = InProcessShards(impls)
    setup = TierSetup(
        "t",
        LAYERS,
        NUM_EXPERTS,
        {s: "n" for s in SHARDS},
        1,
        ReplanConfig(enabled=True),
    )
    tier = TierPlacement(setup, table, shards, background=lambda work: work())
    states: dict[str, Any] = dict(shards.states())
    tier.observe(states)
    assert tier.table == table  # all answer: nothing to do
    states["s1"] = None  # died
    tier.observe(states)
    after = tier.table
    assert after.version == table.version + 1 and "s1" not in after.shards
    assert all(len(s) == 2 for s in after.placement.values())
    for sid in ("s0", "s2", "s3"):  # the shards hold what the table says
        assert sorted(impls[sid].slots()) == after.experts_on(sid)
    assert tier.stats.lost_shards == ("s1",) and tier.stats.num_recoveries == 1
    tier.observe(states)  # still dead: nothing more
    assert tier.table.version == after.version
    # Ray restarted it: a new incarnation holding its first slots; the table gives it none
    impls["s1"] = ShardActorImpl(str(path), "cpu", table.experts_on("s1"), "s1")
    shards.shards["s1"] = impls["s1"]
    tier.observe(shards.states())
    assert impls["s1"].slots() == [] and tier.stats.lost_shards == ()
    # restarted unseen (no probe caught it dead) while the table still gives it slots
    held = after.experts_on("s0")
    impls["s0"] = ShardActorImpl(str(path), "cpu", held[:1], "s0")
    shards.shards["s0"] = impls["s0"]
    tier.observe(shards.states())
    assert sorted(impls["s0"].slots()) == held and tier.table.version == after.version


# --- the data plane loses one pair, not the channel --------------------------------------------


def test_a_vanished_shard_loses_only_its_pair_and_a_fresh_one_is_adopted(path: Path) -> None:
    spec = ExpertShard(path, slots=[]).reader.spec
    table = round_robin(spec.moe_layers, spec.num_experts, ["s0", "s1"])
    real = {s: ShardActorImpl(str(path), "cpu", table.experts_on(s), s) for s in ("s0", "s1")}
    limits = wire.PayloadLimits(spec.hidden_size, spec.num_experts)

    def start(shard_id: str, ticket: wire.ChannelTicket) -> None:
        if shard_id == "s0":
            real["s0"].open_channel(ticket, 20.0)
            return

        def join_then_leave() -> None:  # as a shard whose process dies after the handshake
            store = wire.dist.TCPStore(ticket.store_host, ticket.store_port, is_master=False)
            group = wire.pair_group(store, ticket.prefix, 1, HOST, 20.0)
            wire.answer_backbone(group, ticket.key, ticket.prefix, limits, 20.0)
            del group, store

        threading.Thread(target=join_then_leave, daemon=True).start()

    layer = spec.moe_layers[0]
    hidden, ids, weights = (
        torch.randn(2, spec.hidden_size),
        torch.tensor([[0], [2]]),
        torch.ones(2, 1),
    )
    odd = ids + 1  # s1's experts
    chan = dp.Channel.open(["s0", "s1"], start, HOST, 20.0)
    try:
        time.sleep(0.5)  # s1's side is gone by now
        first = chan.send("s0", layer, hidden, ids, weights)
        started = time.monotonic()
        with pytest.raises(dp.DataPlaneError, match=r"expert shard 's1'"):
            chan.send("s1", layer, hidden, odd, weights).result()
        assert time.monotonic() - started < 10  # a closed connection, not the 20 s timeout
        assert set(chan.lost) == {"s1"} and not chan.unusable
        expected = real["s0"].shard.compute(layer, hidden, ids, weights)
        assert torch.equal(first.result(), expected)  # the other pair kept serving
        with pytest.raises(dp.DataPlaneError, match=r"'s1' is not connected"):
            chan.send("s1", layer, hidden, odd, weights)
        fresh = dp.Channel.open(
            ["s1"], lambda _, ticket: real["s1"].open_channel(ticket, 20.0), HOST, 20.0
        )
        chan.adopt(fresh)
        assert chan.lost == {}
        got = chan.send("s1", layer, hidden, odd, weights).result()
        assert torch.equal(got, real["s1"].shard.compute(layer, hidden, odd, weights))
    finally:
        chan.close()


def test_a_channel_opens_without_a_shard_that_cannot_be_asked(path: Path) -> None:
    """A dead or restarting shard's actor call fails at once: the channel opens without it."""
    spec = ExpertShard(path, slots=[]).reader.spec
    table = round_robin(spec.moe_layers, spec.num_experts, ["s0", "s1"])
    s0 = ShardActorImpl(str(path), "cpu", table.experts_on("s0"), "s0")

    def start(shard_id: str, ticket: wire.ChannelTicket) -> None:
        if shard_id == "s1":
            raise RuntimeError("actor s1 is restarting")
        s0.open_channel(ticket, 20.0)

    chan = dp.Channel.open(["s0", "s1"], start, HOST, 20.0)
    try:
        assert set(chan.groups) == {"s0"} and "restarting" in chan.lost["s1"]
        hidden, ids, weights = (
            torch.randn(1, spec.hidden_size),
            torch.tensor([[0]]),
            torch.ones(1, 1),
        )
        got = chan.send("s0", spec.moe_layers[0], hidden, ids, weights).result()
        assert torch.equal(got, s0.shard.compute(spec.moe_layers[0], hidden, ids, weights))
    finally:
        chan.close()
    with pytest.raises(dp.DataPlaneError, match=r"no expert shard could be asked"):
        dp.Channel.open(["s1"], start, HOST, 20.0)
