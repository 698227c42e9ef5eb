"""An engine-process tier without live re-placement (no placement controller, no reports)
still rejoins restarted expert shards: its replica probes them on its own and hands the
child fresh pairs. Two shards on two nodes each hold every expert (``replication`` 2); one
is SIGKILLed and comes back, then the other is: requests still get the unfaulted tokens,
which is only possible if the first one's restarted copy is in use again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from cluster.engine.generator import generate
from cluster.faults import kill_actor_process, live_actors, wait_until
from deploy.app import build_app
from deploy.config import parse_config
from deploy.demo_model import build_demo_model
from deploy.proto import moecluster_v1_pb2 as pb
from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.listening_sockets import free_port

APP = "rejoin"
PROMPT = [5, 17, 300, 42, 99, 1024, 7, 8, 9, 10, 11, 12, 13]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("rejoin") / "tiny", "tiny")


@pytest.fixture(scope="module")
def stub(model_dir: Path) -> Iterator[pb_grpc.MoEClusterStub]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=1, resources={"expert_node_a": 1})
    cluster.add_node(num_cpus=1, resources={"expert_node_b": 1})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    port = free_port()
    tier = {
        "name": "strong",
        "model": str(model_dir),
        "replicas": 1,
        "num_cpus": 0,
        "engine_process": True,
        "experts": {
            "placement": "sharded",
            "num_shards": 2,
            "replication": 2,
            "shard_resources": [{"expert_node_a": 0.01}, {"expert_node_b": 0.01}],
        },
    }
    config = parse_config(
        {
            "tiers": [tier],
            "policy": {"default_tier": "strong", "cascade": {"enabled": False}},
            "auth": {"api_keys": [], "api_keys_env": None},
            "grpc": {"port": port},
        },
        base_dir=model_dir,
    )
    assert not config.tiers[0].experts.replan.enabled  # the case under test
    serve.start(proxy_location="Disabled")
    try:
        serve.run(build_app(config), name=APP, route_prefix=None)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.MoEClusterStub(channel)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def _tokens(stub: pb_grpc.MoEClusterStub) -> list[int]:
    request = pb.GenerateRequest(token_ids=PROMPT, max_tokens=12, ignore_eos=True)
    return [t for chunk in stub.Generate(request, timeout=120) for t in chunk.token_ids]


def _kill_and_wait_restart(pool: Any, handles: dict[str, Any], victim: str) -> None:
    before = pool.shard_states.remote().result()[victim]
    actor_id = handles[victim]._actor_id.hex()
    (shard,) = live_actors(lambda a: a.actor_id == actor_id)
    kill_actor_process(shard)

    def restarted() -> bool:
        state = pool.shard_states.remote().result()[victim]
        return state is not None and state[0] != before[0]

    wait_until(restarted, 120, f"{victim} restarted")


def test_a_restarted_shard_is_rejoined_without_a_controller(
    stub: pb_grpc.MoEClusterStub, model_dir: Path
) -> None:
    colocated = MoEModel.from_checkpoint(model_dir)
    params = [SamplingParams(max_tokens=12, ignore_eos=True)]
    expected = generate(colocated, [PROMPT], params)[0].token_ids
    assert _tokens(stub) == expected
    pool: Any = serve.get_deployment_handle("experts-strong", app_name=APP)
    tier: Any = serve.get_deployment_handle("tier-strong", app_name=APP)
    handles, _ = pool.describe.remote().result()
    first, second = sorted(handles)
    _kill_and_wait_restart(pool, handles, first)
    assert _tokens(stub) == expected  # routed around it, or through its restarted copy
    wait_until(
        lambda: tier.stats.remote().result().num_shards_rejoined >= 1, 60, "the child rejoined"
    )
    _kill_and_wait_restart(pool, handles, second)
    for _ in range(3):  # the first shard's restarted copy serves every expert now
        assert _tokens(stub) == expected
