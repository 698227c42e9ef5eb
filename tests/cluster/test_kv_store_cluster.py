"""The cluster KV store and prefix-aware routing on a 3-node Ray cluster, through Serve.

Two single-replica tiers of the same model on different nodes share the store (one shard
per node): a conversation's turn 2 on the other node's replica computes only its new tokens,
with the output of a no-cache run; a store shard killed makes the next turn recompute what it
held, with the right tokens. A two-replica tier with the prefix-aware request router sends
each conversation's next turn back to the replica whose cache holds its history.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest
from cluster.faults import actors_named, kill_actor_process
from cluster.kv_store.config import KVStoreConfig
from cluster.kv_store.shard_actor import SHARD_NAME_PREFIX
from cluster.serving.tier_messages import TierRequest, TierTokens
from deploy.app import prefix_router_config
from deploy.config import TierConfig
from deploy.tier_hosts import TierDeployment
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.checkpoints import BuildCheckpoint
from tests.engine_runs import run_to_end

KV = KVStoreConfig(enabled=True, capacity_bytes=64 << 20, min_fetch_tokens=16, fetch_timeout_s=5.0)
NEW = 6


@pytest.fixture(scope="module")
def path(shared_checkpoint: BuildCheckpoint) -> Path:
    return shared_checkpoint("mixtral", seed=3)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    c.add_node(num_cpus=1, resources={"node_a": 1, "routed": 1})
    c.add_node(num_cpus=1, resources={"node_b": 1, "routed": 1})
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    c.wait_for_nodes()
    serve.start(proxy_location="Disabled")
    yield c
    serve.shutdown()
    ray.shutdown()
    c.shutdown()


def tier(name: str, path: Path) -> TierConfig:
    engine = {"block_size": 16, "num_blocks": 128}
    return TierConfig(name=name, model=str(path), num_cpus=0, engine=engine)  # type: ignore[arg-type]


def deploy(name: str, path: Path, resource: str, replicas: int = 1, routed: bool = False) -> Any:
    config = tier(name, path)
    options: dict[str, Any] = {
        "name": f"tier-{name}",
        "num_replicas": replicas,
        "ray_actor_options": {"num_cpus": 0, "resources": {resource: 0.5}},
    }
    if routed:
        options["request_router_config"] = prefix_router_config(config)
    app = TierDeployment.options(**options).bind(config, None, None, KV)
    return serve.run(app, name=name, route_prefix=None)


def ask(handle: Any, rid: str, ids: list[int]) -> TierTokens:
    request = TierRequest(
        rid, SamplingParams(max_tokens=NEW, ignore_eos=True), token_ids=tuple(ids)
    )
    items = list(handle.options(method_name="generate", stream=True).remote(request))
    assert all(isinstance(i, TierTokens) for i in items), items
    tokens = [t for i in items for t in i.token_ids]
    last = items[-1]
    return TierTokens(
        tokens,
        [],
        "",
        last.finish_reason,
        last.num_prompt_tokens,
        last.num_cached_prompt_tokens,
        0,
        num_store_cached_tokens=last.num_store_cached_tokens,
        kv_miss=last.kv_miss,
    )


def reference(path: Path, ids: list[int]) -> list[int]:
    engine = LLMEngine(
        MoEModel.from_checkpoint(path), EngineConfig(num_blocks=128, enable_prefix_caching=False)
    )
    request = EngineRequest("ref", ids, SamplingParams(max_tokens=NEW, ignore_eos=True))
    return [e.token_id for e in run_to_end(engine, [request])["ref"]]


def stored_blocks() -> int:
    shards = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(SHARD_NAME_PREFIX)
    ]
    total = 0
    for info in shards:
        actor = ray.get_actor(info["name"], namespace=info["namespace"])
        stats: Any = ray.get(actor.stats.remote(), timeout=30)
        total += stats.num_blocks
    return total


def wait_for(condition: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def conversation(seed: int) -> list[int]:
    return [3 + (i * 53 + seed * 17) % 250 for i in range(70)]  # 4 full blocks and 6 tokens


def test_turn_two_on_the_other_node_reads_the_store_then_a_lost_shard_recomputes(
    cluster: Cluster, path: Path
) -> None:
    a = deploy("a", path, "node_a")
    b = deploy("b", path, "node_b")
    history = conversation(1)
    first = ask(a, "t1", history)
    assert first.num_store_cached_tokens == 0
    wait_for(lambda: stored_blocks() >= 4)  # published from node a's engine process
    turn2 = [*history, *first.token_ids, 7, 8, 9]
    second = ask(b, "t2", turn2)
    assert second.token_ids == reference(path, turn2)
    assert second.num_cached_prompt_tokens == 64 and second.num_store_cached_tokens == 64
    # a shard is lost: the next turn recomputes what it held, and its tokens are right
    other = conversation(2)
    ask(a, "o1", other)
    wait_for(lambda: stored_blocks() >= 8)
    for victim in actors_named(SHARD_NAME_PREFIX)[:2]:  # two of the three nodes' shards
        kill_actor_process(victim)  # SIGKILL: a crash (they restart empty)
    again = ask(b, "o2", other)
    assert again.token_ids == reference(path, other)
    assert again.num_store_cached_tokens < 64
    serve.delete("a")
    serve.delete("b")


def test_prefix_router_sends_the_next_turn_to_the_replica_holding_it(
    cluster: Cluster, path: Path
) -> None:
    handle = deploy("r", path, "routed", replicas=2, routed=True)
    histories = [conversation(10 + s) for s in range(4)]
    firsts = [ask(handle, f"s{s}t1", h) for s, h in enumerate(histories)]
    time.sleep(1.5)  # events: pushed every 50 ms, polled every 50 ms
    for s, (history, first) in enumerate(zip(histories, firsts, strict=True)):
        turn2 = [*history, *first.token_ids, 5, 6, 7]
        second = ask(handle, f"s{s}t2", turn2)
        # its history's blocks were local where it went: nothing from the store
        assert second.num_cached_prompt_tokens >= 64, (s, second)
        assert second.num_store_cached_tokens == 0, (s, second)
    serve.delete("r")
