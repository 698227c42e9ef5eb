"""Faults at expert grain on a 4-node Ray cluster on one machine, under concurrent traffic.

Four shards on three worker nodes hold two copies of every expert; the cluster's placement
controller watches them. Shards, the controller and a whole node are killed the way a crash
does (SIGKILL, ``cluster.faults``) while backbones generate; every completed output must equal
an unfaulted run's, token for token. Recovery times are printed (``-s``), never asserted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from cluster.engine.config import EngineConfig
from cluster.engine.engine_process import EngineProcess
from cluster.engine.generator import generate
from cluster.engine.launch import EngineLaunch
from cluster.engine.requests import EngineRequest
from cluster.expert_parallel.engine_experts import EngineShardRejoiner, arrange_engine_experts
from cluster.expert_parallel.expert_pool import ExpertPool, ShardSpec
from cluster.expert_parallel.placement_controller import TierSetup, table_from_slots
from cluster.expert_parallel.placement_host import start_controller
from cluster.expert_parallel.remote_experts import RemoteExperts
from cluster.expert_parallel.transports import TorchDistTransport
from cluster.faults import actors_of_class, kill_actor_process, live_actors, wait_until
from cluster.serving.placement_reporter import PlacementReporter
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from router.replan_policy import ReplanConfig
from router.routing_table import RoutingTable, replicated
from tests.checkpoints import build_family_checkpoint

NEW = 12
TIER = "faulty"
NODES = {"s0": "expert_node_a", "s1": "expert_node_b", "s2": "expert_node_c", "s3": "expert_node_b"}


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint("mixtral", tmp_path_factory.mktemp("faults") / "m", seed=5)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for resource in sorted(set(NODES.values())):
        cluster.add_node(num_cpus=1, resources={resource: 1})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def colocated(path: Path) -> MoEModel:
    return MoEModel.from_checkpoint(path)


@pytest.fixture(scope="module")
def expected(colocated: MoEModel) -> list[list[int]]:
    return _greedy(colocated)


@pytest.fixture(scope="module")
def setup(
    path: Path, ray_cluster: Cluster, colocated: MoEModel
) -> Iterator[tuple[ExpertPool, Any, RoutingTable]]:
    """The pool (two copies of every expert) and the controller in charge of it."""
    spec = colocated.spec
    table = replicated(spec.moe_layers, spec.num_experts, sorted(NODES), 2)
    pool = ExpertPool.start(
        str(path),
        [
            ShardSpec(sid, tuple(table.experts_on(sid)), resources=((NODES[sid], 0.01),))
            for sid in sorted(NODES)
        ],
    )
    controller = start_controller()
    _register(controller, pool, table, spec)
    yield pool, controller, table
    pool.shutdown()


def _register(controller: Any, pool: ExpertPool, table: RoutingTable, spec: Any) -> int:
    """What ``ExpertPoolHost`` does at start, and again when its controller restarted."""
    tier = TierSetup(
        TIER,
        tuple(spec.moe_layers),
        spec.num_experts,
        {sid: NODES[sid] for sid in pool.handles},
        1,
        ReplanConfig(enabled=True),
    )
    placement = tuple(table.placement.items())
    version: int = ray.get(controller.register_tier.remote(tier, 0, placement, pool.handles))
    return version


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (23, 7, 40)]


def _greedy(model: MoEModel) -> list[list[int]]:
    prompts = _prompts()
    params = [SamplingParams(max_tokens=NEW, ignore_eos=True)] * len(prompts)
    return [r.token_ids for r in generate(model, prompts, params)]


class Traffic:
    """Backbones generating in threads until stopped; each keeps its outputs and errors. A
    pump per backbone takes the controller's newer tables, as a tier replica's reporter does."""

    def __init__(
        self,
        path: Path,
        pool: ExpertPool,
        controller: Any,
        table: RoutingTable,
        backbones: int = 2,
        wait_s: float = 60.0,
        pump: bool = True,
    ) -> None:
        self.backends = [
            RemoteExperts(pool, table, unavailable_wait_s=wait_s) for _ in range(backbones)
        ]
        self.models = [MoEModel.from_checkpoint(path, experts=b) for b in self.backends]
        self.controller = controller
        self.outputs: list[list[list[int]]] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(m,)) for m in self.models]
        if pump:
            self.threads += [
                threading.Thread(target=self._pump, args=(b, i))
                for i, b in enumerate(self.backends)
            ]

    def _run(self, model: MoEModel) -> None:
        while not self.stop.is_set():
            try:
                self.outputs.append(_greedy(model))
            except Exception as err:  # kept for the test to look at
                self.errors.append(err)

    def _pump(self, backend: RemoteExperts, i: int) -> None:
        while not self.stop.wait(0.2):
            try:
                reply = ray.get(
                    self.controller.report.remote(TIER, f"bb{i}", {}, backend.table.version),
                    timeout=5,
                )
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue  # the controller is down: serving goes on with the last table
            table = reply.table
            if table is not None and table.version > backend.table.version:
                backend.set_table(table)

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        wait_until(lambda: sum(b.num_shard_calls for b in self.backends) > 50, 120, "traffic")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=300)

    @property
    def failures(self) -> int:
        return sum(b.num_shard_failures for b in self.backends)


def _shard_actor(pool: ExpertPool, sid: str) -> Any:
    actor_id = pool.handles[sid]._actor_id.hex()
    (actor,) = live_actors(lambda a: a.actor_id == actor_id)
    return actor


def _held(pool: ExpertPool) -> dict[str, list[tuple[int, int]]]:
    """What each live shard holds (a shard whose node was removed is left out)."""
    return {sid: state[1] for sid, state in pool.states().items() if state is not None}


def _controller_table(controller: Any) -> RoutingTable:
    version, placement = ray.get(controller.table.remote(TIER), timeout=30)
    return RoutingTable(version, dict(placement))


def _busiest(table: RoutingTable) -> str:
    """The shard holding the most slots (the one whose loss hurts most)."""
    return max(table.shards, key=lambda s: (len(table.experts_on(s)), s))


def _single_copy(controller: Any) -> tuple[RoutingTable, str]:
    """The controller's table cut to one copy of every expert, and the shard to kill."""
    current = _controller_table(controller)
    single = RoutingTable(current.version, {k: v[:1] for k, v in current.placement.items()})
    return single, _busiest(single)


def _wait_restart(pool: ExpertPool, shard: str) -> None:
    wait_until(lambda: pool.states().get(shard) is not None, 120, f"{shard} restart")


def _restored(controller: Any, spec: Any, dead: set[str], copies: int = 2) -> bool:
    """Every expert has ``copies`` replicas again, none on a dead shard."""
    table = _controller_table(controller)
    wanted = len(spec.moe_layers) * spec.num_experts
    held = table.placement.values()
    return len(held) == wanted and all(len(s) >= copies and not set(s) & dead for s in held)


def test_a_removed_node_takes_its_shard_and_the_rest_serve(
    path: Path,
    ray_cluster: Cluster,
    setup: tuple[ExpertPool, Any, RoutingTable],
    expected: list[list[int]],
    colocated: MoEModel,
) -> None:
    pool, controller, _ = setup
    node_id = pool.node_ids()["s2"]
    (node,) = [n for n in ray_cluster.worker_nodes if n.node_id == node_id]
    current = _controller_table(controller)
    assert current.experts_on("s2")  # it holds copies the others must take over
    (host,) = actors_of_class("PlacementControllerHost")
    assert host.node_id == ray.get_runtime_context().get_node_id()  # the head: not lost with a node
    with Traffic(path, pool, controller, current) as traffic:
        removed = time.monotonic()
        ray_cluster.remove_node(node, allow_graceful=False)
        restored = wait_until(
            lambda: _restored(controller, colocated.spec, {"s2"}), 120, "replicas restored"
        )
        done = len(traffic.outputs)
        wait_until(lambda: len(traffic.outputs) >= done + 2, 120, "requests after the removal")
    print(f"\nnode removed: replicas restored {time.monotonic() - removed:.2f}s ({restored:.2f}s)")
    assert not traffic.errors and all(out == expected for out in traffic.outputs)
    assert "s2" not in _controller_table(controller).shards
    assert pool.states()["s2"] is None  # its node is gone: it cannot restart anywhere


def test_a_killed_shard_is_routed_around_and_its_replicas_restored(
    path: Path,
    setup: tuple[ExpertPool, Any, RoutingTable],
    expected: list[list[int]],
    colocated: MoEModel,
) -> None:
    pool, controller, _ = setup
    victim = _shard_actor(pool, "s1")
    before = pool.states()["s1"]
    with Traffic(path, pool, controller, _controller_table(controller)) as traffic:
        killed = time.monotonic()
        kill_actor_process(victim)
        routed = wait_until(lambda: traffic.failures > 0, 60, "a layer meeting the dead shard")
        restored = wait_until(
            lambda: _restored(controller, colocated.spec, {"s1"}), 60, "replicas restored"
        )
        wait_until(
            lambda: (s := pool.states().get("s1")) is not None and s != before, 120, "s1 restart"
        )
        restarted = time.monotonic() - killed
        done = len(traffic.outputs)
        wait_until(lambda: len(traffic.outputs) >= done + 2, 120, "requests after the restart")
    print(
        f"\nshard SIGKILL: first layer rerouted {routed:.2f}s after the kill, replicas restored "
        f"{restored:.2f}s, shard restarted {restarted:.2f}s"
    )
    assert not traffic.errors
    assert traffic.outputs and all(out == expected for out in traffic.outputs)
    reconciled = wait_until(
        lambda: (
            set(_held(pool).get("s1", ())) == set(_controller_table(controller).experts_on("s1"))
        ),
        60,
        "s1 reconciled to the table",
    )
    print(f"restarted shard reconciled to the table {reconciled:.2f}s after the test saw it")


def test_over_ray_actor_calls_a_killed_shard_is_routed_around_too(
    path: Path, setup: tuple[ExpertPool, Any, RoutingTable], expected: list[list[int]]
) -> None:
    pool, controller, _ = setup
    over_ray = ExpertPool(pool.handles, data_plane="ray")  # the same shard actors
    current = _controller_table(controller)
    victim = _busiest(current)
    with Traffic(path, over_ray, controller, current) as traffic:
        kill_actor_process(_shard_actor(pool, victim))
        routed = wait_until(lambda: traffic.failures > 0, 60, "a layer meeting the dead shard")
        done = len(traffic.outputs)
        wait_until(lambda: len(traffic.outputs) >= done + 2, 120, "requests after the kill")
    print(f"\nray data plane, shard SIGKILL: first layer rerouted {routed:.2f}s after the kill")
    assert not traffic.errors and all(out == expected for out in traffic.outputs)
    _wait_restart(pool, victim)


def test_without_a_replica_a_request_fails_within_the_bound_naming_the_expert(
    path: Path,
    setup: tuple[ExpertPool, Any, RoutingTable],
    expected: list[list[int]],
) -> None:
    pool, controller, _ = setup
    single, victim = _single_copy(controller)
    backend = RemoteExperts(pool, single, unavailable_wait_s=1.0)
    model = MoEModel.from_checkpoint(path, experts=backend)
    assert _greedy(model) == expected
    kill_actor_process(_shard_actor(pool, victim))
    started = time.monotonic()
    with pytest.raises(
        Exception, match=r"have no live replica.*experts.unavailable_wait_s=1s"
    ) as err:
        _greedy(model)
    print(f"\nno replica: failed {time.monotonic() - started:.2f}s after the kill ({err.value})")
    assert "(layer, expert)" in str(err.value)
    _wait_restart(pool, victim)


def test_without_a_replica_requests_wait_for_the_restart(
    path: Path,
    setup: tuple[ExpertPool, Any, RoutingTable],
    expected: list[list[int]],
) -> None:
    pool, controller, _ = setup
    single, victim = _single_copy(controller)
    with Traffic(path, pool, controller, single, backbones=1, wait_s=60.0, pump=True) as traffic:
        kill_actor_process(_shard_actor(pool, victim))
        wait_until(lambda: traffic.failures > 0, 60, "a layer meeting the dead shard")
        done = len(traffic.outputs)
        wait_until(lambda: len(traffic.outputs) >= done + 2, 180, "requests after the kill")
    assert not traffic.errors and all(out == expected for out in traffic.outputs)


def test_a_killed_controller_resumes_from_the_shards(
    path: Path,
    setup: tuple[ExpertPool, Any, RoutingTable],
    expected: list[list[int]],
    colocated: MoEModel,
) -> None:
    pool, controller, table = setup
    before = _controller_table(controller)
    (actor,) = actors_of_class("PlacementControllerHost")
    with Traffic(path, pool, controller, before) as traffic:
        killed = time.monotonic()
        kill_actor_process(actor)
        wait_until(
            lambda: any(a.pid != actor.pid for a in actors_of_class("PlacementControllerHost")),
            60,
            "controller restart",
        )
        back = time.monotonic() - killed
        version = _register(controller, pool, table, colocated.spec)  # as the pool host would
        done = len(traffic.outputs)
        wait_until(lambda: len(traffic.outputs) >= done + 2, 120, "requests after the restart")
    print(f"\ncontroller SIGKILL: restarted and re-registered in {back:.2f}s")
    assert not traffic.errors and all(out == expected for out in traffic.outputs)
    resumed = _controller_table(controller)
    assert resumed.placement == table_from_slots(_held(pool), 0).placement  # what shards hold
    assert version >= 0 and resumed.version >= version


def test_an_engine_process_rejoins_a_restarted_replicated_shard(
    path: Path, ray_cluster: Cluster, expected: list[list[int]], colocated: MoEModel
) -> None:
    """Two shards, two copies of every expert, the backbone an engine process (no Ray calls)
    driven as a tier replica drives it (its placement reporter, with the replica's rejoiner).
    SIGKILL one shard: routed around; it restarts and the controller lists it again for every
    expert; the child joins a fresh pair to it before it installs that table. Then SIGKILL
    the other: only the restarted one's pairs can serve. Every request completes with the
    unfaulted tokens."""
    spec, tier = colocated.spec, "faulty-engine"
    nodes = {"e0": "expert_node_a", "e1": "expert_node_b"}
    table = replicated(spec.moe_layers, spec.num_experts, sorted(nodes), 2)
    pool = ExpertPool.start(
        str(path),
        [
            ShardSpec(s, tuple(table.experts_on(s)), resources=((n, 0.01),))
            for s, n in nodes.items()
        ],
    )
    controller = start_controller()
    setup = TierSetup(
        tier, tuple(spec.moe_layers), spec.num_experts, nodes, 1, ReplanConfig(enabled=True)
    )
    ray.get(controller.register_tier.remote(setup, 0, tuple(table.placement.items()), pool.handles))
    starts = {sid: state[0] if state else None for sid, state in pool.states().items()}
    arranged = arrange_engine_experts(pool.transport, table, tier)
    assert isinstance(pool.transport, TorchDistTransport)
    rejoiner = EngineShardRejoiner(pool.transport, pool.states, starts)
    engine = EngineProcess(
        EngineLaunch(str(path), EngineConfig(num_blocks=64), experts=arranged.factory)
    )

    async def send(t: str, rid: str, counts: dict[tuple[int, int], int], v: int) -> Any:
        return await controller.report.remote(t, rid, counts, v)

    async def rejoin() -> None:
        fresh = await asyncio.to_thread(rejoiner.arrange)
        if fresh is not None:
            engine.join_shards(*fresh)

    reporter = PlacementReporter(tier, "bb", engine, send, 0.2, None, table.version, rejoin)
    outputs: list[list[list[int]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    async def one(i: int, prompt: list[int]) -> list[int]:
        request = EngineRequest(f"r{i}", prompt, SamplingParams(max_tokens=NEW, ignore_eos=True))
        return [event.token_id async for event in engine.generate(request)]

    async def drive() -> None:
        reports = asyncio.create_task(reporter.run())
        n = 0
        while not stop.is_set():
            try:
                outputs.append(
                    list(await asyncio.gather(*(one(n + i, p) for i, p in enumerate(_prompts()))))
                )
            except Exception as err:  # kept for the asserts
                errors.append(err)
            n += 10
        reports.cancel()

    def served_more(count: int = 2) -> None:
        done = len(outputs)
        wait_until(lambda: len(outputs) >= done + count or bool(errors), 120, "requests served")

    def listed_twice(dead: str) -> bool:
        held = _tier_table(controller, tier).placement.values()
        return (
            all(sorted(s) == sorted(nodes) for s in held)
            and rejoiner.stale({dead: pool.states().get(dead)}) == []
            and engine.table_version == _tier_table(controller, tier).version
        )

    def restarted(victim: str, before: Any) -> bool:
        state = pool.states().get(victim)
        return state is not None and state != before

    driver = threading.Thread(target=lambda: asyncio.run(drive()))
    driver.start()
    try:
        served_more(1)
        for victim in ("e1", "e0"):  # the second kill leaves only the rejoined shard's pairs
            before = pool.states()[victim]
            kill_actor_process(_shard_actor(pool, victim))
            wait_until(partial(restarted, victim, before), 120, f"{victim} restarted")
            back = wait_until(partial(listed_twice, victim), 120, f"{victim} listed and joined")
            served_more()
            print(
                f"\nengine process, {victim} SIGKILL: listed again and rejoined after {back:.1f}s"
            )
    finally:
        stop.set()
        driver.join(timeout=300)
        engine.shutdown()
        pool.shutdown()
    assert not errors, errors[:1]
    assert outputs and all(out == expected for out in outputs)
    assert rejoiner.num_rejoined == 2


def _tier_table(controller: Any, tier: str) -> RoutingTable:
    version, placement = ray.get(controller.table.remote(tier), timeout=30)
    return RoutingTable(version, dict(placement))
