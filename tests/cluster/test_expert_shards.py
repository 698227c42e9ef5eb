"""Expert shards on a 3-node Ray cluster on one machine: placement, exactness, sharing, loads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from cluster.engine.config import EngineConfig
from cluster.engine.engine_process import EngineProcess
from cluster.engine.generator import GenerationError, generate
from cluster.engine.launch import EngineLaunch
from cluster.engine.requests import EngineRequest
from cluster.engine.streams import EngineStoppedError
from cluster.expert_parallel.engine_experts import arrange_engine_experts
from cluster.expert_parallel.expert_pool import ExpertPool, ShardSpec
from cluster.expert_parallel.remote_experts import RemoteExperts
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from router.routing_table import round_robin
from tests.checkpoints import build_family_checkpoint
from tests.reference import reference_greedy, reference_model

NEW = 16


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint("mixtral", tmp_path_factory.mktemp("shards") / "m", seed=5)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, resources={"expert_node_a": 1})
    cluster.add_node(num_cpus=1, resources={"expert_node_b": 1})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def pool(path: Path, ray_cluster: Cluster) -> Iterator[tuple[ExpertPool, MoEModel]]:
    colocated = MoEModel.from_checkpoint(path)
    spec = colocated.spec
    table = round_robin(spec.moe_layers, spec.num_experts, ["s0", "s1"])
    specs = [
        ShardSpec("s0", tuple(table.experts_on("s0")), resources=(("expert_node_a", 0.01),)),
        ShardSpec("s1", tuple(table.experts_on("s1")), resources=(("expert_node_b", 0.01),)),
    ]
    expert_pool = ExpertPool.start(str(path), specs)
    yield expert_pool, colocated
    expert_pool.shutdown()


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (23, 7, 40)]


def _greedy(model: MoEModel) -> list[list[int]]:
    prompts = _prompts()
    params = [SamplingParams(max_tokens=NEW, ignore_eos=True)] * len(prompts)
    return [r.token_ids for r in generate(model, prompts, params)]


def _engine_process(
    path: Path, pool: ExpertPool, colocated: MoEModel, shards: tuple[str, ...] = ("s0", "s1")
) -> EngineProcess:
    """An engine process over the pool: this process (a Ray driver, as a replica is a worker)
    opens the shards' sides of its channel, the child joins it without any Ray call."""
    spec = colocated.spec
    table = round_robin(spec.moe_layers, spec.num_experts, list(shards))
    arranged = arrange_engine_experts(pool.transport, table, "t")
    launch = EngineLaunch(str(path), EngineConfig(num_blocks=64), experts=arranged.factory)
    return EngineProcess(launch)  # the shards' tickets are spent once it has joined


def _engine_greedy(engine: EngineProcess) -> list[list[int]]:
    async def one(i: int, prompt: list[int]) -> list[int]:
        request = EngineRequest(f"r{i}", prompt, SamplingParams(max_tokens=NEW, ignore_eos=True))
        return [event.token_id async for event in engine.generate(request)]

    async def every() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(_prompts()))))

    return asyncio.run(every())


def _remote_model(
    path: Path,
    pool: ExpertPool,
    colocated: MoEModel,
    shards: tuple[str, ...] = ("s0", "s1"),
    unavailable_wait_s: float = 60.0,
) -> MoEModel:
    spec = colocated.spec
    table = round_robin(spec.moe_layers, spec.num_experts, list(shards))
    backend = RemoteExperts(pool, table, unavailable_wait_s=unavailable_wait_s)
    return MoEModel.from_checkpoint(path, experts=backend)


def test_shards_live_on_different_nodes(
    pool: tuple[ExpertPool, MoEModel], ray_cluster: Cluster
) -> None:
    expert_pool, _ = pool
    nodes = expert_pool.node_ids()
    assert nodes["s0"] != nodes["s1"]
    resources = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert "expert_node_a" in resources[nodes["s0"]]
    assert "expert_node_b" in resources[nodes["s1"]]


def test_remote_output_matches_colocated_and_transformers(
    path: Path, pool: tuple[ExpertPool, MoEModel]
) -> None:
    expert_pool, colocated = pool
    remote = _remote_model(path, expert_pool, colocated)
    got = _greedy(remote)
    assert got == _greedy(colocated)
    ref = reference_model(path)
    assert got == [reference_greedy(ref, p, NEW) for p in _prompts()]
    assert isinstance(remote.experts, RemoteExperts) and remote.experts.num_shard_calls > 0


def test_both_data_planes_give_the_same_tokens(
    path: Path, pool: tuple[ExpertPool, MoEModel]
) -> None:
    expert_pool, colocated = pool
    assert expert_pool.data_plane == "torch_dist"  # the default
    over_ray = ExpertPool(expert_pool.handles, data_plane="ray")  # the same actors
    assert _greedy(_remote_model(path, over_ray, colocated)) == _greedy(colocated)


def test_an_engine_process_serves_over_the_shards(
    path: Path, pool: tuple[ExpertPool, MoEModel]
) -> None:
    expert_pool, colocated = pool
    engine = _engine_process(path, expert_pool, colocated)
    try:
        assert _engine_greedy(engine) == _greedy(colocated)
    finally:
        engine.shutdown()


def test_a_dead_shard_without_a_replica_is_waited_for_then_reconnected(
    path: Path, pool: tuple[ExpertPool, MoEModel]
) -> None:
    """Ray restarts a killed shard alone (same handle); a backbone needing its experts (no
    replica) waits for it, joins a fresh pair to it, and its tokens are unchanged.

    An engine process cannot join a fresh pair: it stops at once, naming the missing expert
    and the shard, never hangs."""
    expert_pool, colocated = pool
    remote = _remote_model(path, expert_pool, colocated)
    expected = _greedy(colocated)
    assert _greedy(remote) == expected  # this thread's channel is open
    engine = _engine_process(path, expert_pool, colocated)
    ray.kill(expert_pool.handles["s1"], no_restart=False)
    try:
        with pytest.raises(
            EngineStoppedError, match=r"ExpertUnavailableError.*no live replica.*expert shard .s1."
        ):
            _engine_greedy(engine)
        assert not engine.is_alive()
    finally:
        engine.shutdown()
    assert _greedy(remote) == expected
    backend = remote.experts
    assert isinstance(backend, RemoteExperts) and backend.num_shard_failures >= 1
    assert backend.dead == {}  # reconnected


def test_two_backbones_share_one_pool(path: Path, pool: tuple[ExpertPool, MoEModel]) -> None:
    expert_pool, colocated = pool
    expected = _greedy(colocated)
    backbones = [_remote_model(path, expert_pool, colocated) for _ in range(2)]
    results: dict[int, list[list[int]]] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, _greedy(backbones[i])))
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert results == {0: expected, 1: expected}


def test_loading_a_slot_while_serving(path: Path, pool: tuple[ExpertPool, MoEModel]) -> None:
    """Replicate an expert onto the other shard mid-traffic, then route to both copies."""
    expert_pool, colocated = pool
    expected = _greedy(colocated)
    remote = _remote_model(path, expert_pool, colocated)
    backend = remote.experts
    assert isinstance(backend, RemoteExperts)
    layer = colocated.spec.moe_layers[0]
    hot = next(e for (lyr, e) in backend.table.experts_on("s0") if lyr == layer)
    before = _greedy(remote)
    during: list[list[list[int]]] = []
    worker = threading.Thread(target=lambda: during.append(_greedy(remote)))
    worker.start()
    expert_pool.load("s1", [(layer, hot)])
    backend.set_table(backend.table.with_changes(add=[(layer, hot, "s1")]))
    worker.join(timeout=300)
    after = _greedy(remote)
    assert (layer, hot) in expert_pool.slots()["s1"]
    assert backend.table.shards_for(layer, hot) == ("s0", "s1")
    assert before == expected and during == [expected] and after == expected
    expert_pool.drop("s1", [(layer, hot)])


def test_a_shard_on_the_backbones_node_is_reached_over_shared_memory(
    path: Path, pool: tuple[ExpertPool, MoEModel]
) -> None:
    """h0 shares this driver's node (shared memory), s1 does not (gloo); a killed h0 fails the
    next layer at once, naming it, here and in an engine process."""
    _, colocated = pool
    spec, shards = colocated.spec, ("h0", "s1")
    table = round_robin(spec.moe_layers, spec.num_experts, list(shards))
    here = ray.get_runtime_context().get_node_id()
    mixed = ExpertPool.start(
        str(path),
        [
            ShardSpec("h0", tuple(table.experts_on("h0")), node_id=here),
            ShardSpec("s1", tuple(table.experts_on("s1")), resources=(("expert_node_b", 0.01),)),
        ],
    )
    try:
        remote = _remote_model(path, mixed, colocated, shards, unavailable_wait_s=0.0)
        expected = _greedy(colocated)
        assert _greedy(remote) == expected
        channel = mixed.transport.channel()  # type: ignore[attr-defined]
        assert set(channel.links) == {"h0"} and set(channel.groups) == {"s1"}
        engine = _engine_process(path, mixed, colocated, shards)
        try:
            assert _engine_greedy(engine) == expected
            ray.kill(mixed.handles["h0"], no_restart=True)
            start = time.monotonic()
            with pytest.raises(  # the requests that chose h0's experts fail, by name
                GenerationError,
                match=r"ExpertUnavailableError.*expert shard 'h0' (closed|cannot be)",
            ):
                _greedy(remote)
            assert time.monotonic() - start < 30  # the socket closed: no layer timeout
            with pytest.raises(
                EngineStoppedError, match=r"ExpertUnavailableError.*expert shard 'h0'"
            ):
                _engine_greedy(engine)
        finally:
            engine.shutdown()
    finally:
        mixed.shutdown()
