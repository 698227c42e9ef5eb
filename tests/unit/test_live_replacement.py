"""Live re-placement: the controller's move order (load, publish, wait for every engine,
drop), and a re-plan under concurrent requests whose outputs stay those of the colocated
engine, with no failed request. In one process: shards through ``InProcessPool`` (the shard
actor body, no Ray), the engine on its in-process transport swapping tables between steps."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.client import EngineClient
from cluster.engine.config import EngineConfig
from cluster.engine.launch import EngineLaunch
from cluster.engine.requests import EngineRequest
from cluster.expert_parallel.expert_pool import InProcessPool
from cluster.expert_parallel.placement_controller import (
    InProcessShards,
    TierPlacement,
    TierSetup,
)
from cluster.expert_parallel.remote_experts import RemoteExperts
from experts.checkpoint import CheckpointReader
from experts.sampling_params import SamplingParams
from router.replan_policy import ReplanConfig
from router.routing_table import round_robin
from tests.checkpoints import BuildCheckpoint

Slot = tuple[int, int]
EAGER = ReplanConfig(
    enabled=True,
    min_tokens=1,
    imbalance_threshold=1.0,
    margin=0.0,
    min_interval_s=0.0,
    extra_slots=1.0,
    report_interval_s=0.05,
    ack_timeout_s=30.0,
)


class RecordingShards:
    """A fake ``ShardControl`` that logs each call, in order, with the table then published."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[Slot]]] = []

    def load(self, shard_id: str, slots: Sequence[Slot]) -> list[Slot]:
        self.calls.append(("load", shard_id, list(slots)))
        return list(slots)

    def drop(self, shard_id: str, slots: Sequence[Slot]) -> list[Slot]:
        self.calls.append(("drop", shard_id, list(slots)))
        return list(slots)


def _skewed(layers: Sequence[int]) -> dict[Slot, int]:
    """Experts 0 and 2 hot: both on shard a under round robin, so one must move to b."""
    return {(layer, e): (1000 if e in (0, 2) else 10) for layer in layers for e in range(8)}


def _placement(
    shards: RecordingShards, clock: Callable[[], float] = time.monotonic
) -> TierPlacement:
    layers = (0, 1)
    config = replace(EAGER, extra_slots=0.0)  # no spare slot: a move must drop what it loads
    setup = TierSetup("t", layers, 8, {"a": "n0", "b": "n1"}, 100, config)
    return TierPlacement(setup, round_robin(layers, 8, ["a", "b"]), shards, clock)


def test_old_slots_are_dropped_only_after_every_engine_swapped() -> None:
    shards = RecordingShards()
    placement = _placement(shards)
    first = placement.report("r1", {}, 0)  # two replicas on v0
    assert first.table is None
    placement.report("r2", {}, 0)
    placement.report("r1", _skewed((0, 1)), 0)  # the hot expert 0 triggers a move
    deadline = time.monotonic() + 10
    while placement.table.version == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    version = placement.table.version
    assert version == 1
    assert [c[0] for c in shards.calls] and all(c[0] == "load" for c in shards.calls)
    reply = placement.report("r1", {}, 0)
    assert reply.table is not None and reply.version == 1  # r1 is told the new table
    placement.report("r1", {}, 1)  # r1 swapped; r2 has not: nothing dropped yet
    time.sleep(0.1)
    assert all(c[0] == "load" for c in shards.calls)
    placement.report("r2", {}, 1)
    assert placement.wait_idle(10)
    kinds = [c[0] for c in shards.calls]
    assert "drop" in kinds and kinds.index("drop") > max(
        i for i, k in enumerate(kinds) if k == "load"
    )
    hot = {placement.table.shards_for(0, 0), placement.table.shards_for(0, 2)}
    assert hot == {("a",), ("b",)}, placement.table.placement  # the hot experts split
    assert placement.stats.num_replans == 1 and placement.stats.moved_slots > 0
    assert placement.stats.planned_balancedness < placement.stats.balancedness + 1e-9


def test_a_silent_replica_stops_holding_drops_back() -> None:
    now = [0.0]
    shards = RecordingShards()
    placement = _placement(shards, clock=lambda: now[0])
    placement.report("gone", {}, 0)
    now[0] = 100.0  # past replica_ttl_s: "gone" no longer counts
    placement.report("r1", _skewed((0, 1)), 0)
    placement.report("r1", {}, 1)
    assert placement.wait_idle(10)
    assert any(c[0] == "drop" for c in shards.calls)


# --- live, with a real model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(shared_checkpoint: BuildCheckpoint) -> Path:
    return shared_checkpoint("mixtral", seed=3)


def _requests(n: int) -> list[EngineRequest]:
    return [
        EngineRequest(
            f"r{i}",
            [5 + i, 17, 3 + 2 * i, 40, 9, 11 + i],
            SamplingParams(max_tokens=24, ignore_eos=True),
        )
        for i in range(n)
    ]


async def _run_all(engine: EngineClient, requests: list[EngineRequest]) -> dict[str, list[int]]:
    async def one(r: EngineRequest) -> tuple[str, list[int]]:
        return r.request_id, [e.token_id async for e in engine.generate(r)]

    return dict(await asyncio.gather(*(one(r) for r in requests)))


def test_live_replan_under_concurrent_requests_keeps_outputs(model_dir: Path) -> None:
    spec = CheckpointReader(model_dir).spec
    config = EngineConfig(num_blocks=128, max_num_seqs=8)
    requests = _requests(8)
    colocated = AsyncEngine.start(EngineLaunch(str(model_dir), config))
    try:
        expected = asyncio.run(_run_all(colocated, requests))
    finally:
        colocated.shutdown()

    shard_ids = ["s0", "s1"]
    table = round_robin(spec.moe_layers, spec.num_experts, shard_ids)
    pool = InProcessPool.start(str(model_dir), {s: table.experts_on(s) for s in shard_ids})
    setup = TierSetup(
        "strong",
        tuple(spec.moe_layers),
        spec.num_experts,
        {"s0": "n0", "s1": "n1"},
        1,
        EAGER,
    )
    placement = TierPlacement(setup, table, InProcessShards(pool.shards))
    experts = RemoteExperts(pool, table, "strong")
    engine = AsyncEngine.start(
        EngineLaunch(str(model_dir), config, count_routing=True), experts=experts
    )
    stop = threading.Event()
    versions: list[int] = []

    def reporter() -> None:  # what a replica's reporter does, off the engine's thread
        hot = {(layer, 0): 5000 for layer in spec.moe_layers}  # a skew to move for
        placement.window.add(hot, time.monotonic())
        while not stop.is_set():
            reply = placement.report("replica-0", engine.take_routed_counts(), engine.table_version)
            if reply.table is not None:
                engine.set_routing_table(reply.version, reply.placement)
            versions.append(engine.table_version)
            time.sleep(0.01)

    thread = threading.Thread(target=reporter, daemon=True)
    try:
        rounds = []
        thread.start()
        for _ in range(3):  # before, during and after the move
            rounds.append(asyncio.run(_run_all(engine, requests)))
        assert placement.wait_idle(30)
        rounds.append(asyncio.run(_run_all(engine, requests)))  # after the drops
    finally:
        stop.set()
        thread.join(5)
        engine.shutdown()
    for got in rounds:
        assert got == expected
    assert placement.stats.num_replans >= 1, placement.stats
    assert experts.table.version == placement.table.version >= 1
    assert any(len(s) > 1 for s in experts.table.placement.values())  # replicas in use
    held = {sid: set(shard.slots()) for sid, shard in pool.shards.items()}
    for slot, sids in placement.table.placement.items():  # shards hold exactly the table
        for sid in sids:
            assert slot in held[sid]
    assert sum(map(len, held.values())) == sum(map(len, placement.table.placement.values()))


def test_an_engine_process_takes_the_table_message_between_steps(model_dir: Path) -> None:
    """The message crosses the child's socket and the loop applies it between steps; with
    colocated experts there is no table to swap (version -1), and serving goes on."""
    from cluster.engine.engine_process import EngineProcess

    config = EngineConfig(num_blocks=64, max_num_seqs=4)
    engine = EngineProcess(EngineLaunch(str(model_dir), config))
    try:
        engine.set_routing_table(3, (((0, 0), ("s0",)),))
        got = asyncio.run(_run_all(engine, _requests(2)))
        assert all(len(ids) == 24 for ids in got.values())
        assert engine.table_version == -1 and engine.is_alive()
    finally:
        engine.shutdown()
