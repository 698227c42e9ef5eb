"""The Serve application with a sharded tier on a 3-node Ray cluster, called over gRPC."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve.config import gRPCOptions

from cluster.generator import generate
from deploy.app import GRPC_SERVICER, build_app
from deploy.config import parse_config
from deploy.demo_model import build_demo_model
from deploy.proto import moecluster_v1_pb2 as pb
from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc
from experts.model import MoEModel
from experts.sampling import SamplingParams

PROMPTS = ([5, 17, 300, 42, 99, 1024, 7, 8, 9, 10, 11, 12, 13], [1500, 3, 4], list(range(40, 80)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("serve-shards") / "tiny", "tiny")


@pytest.fixture(scope="module")
def stub(model_dir: Path) -> Iterator[pb_grpc.MoEClusterStub]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=1, resources={"expert_node_a": 1})
    cluster.add_node(num_cpus=1, resources={"expert_node_b": 1})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    config = parse_config(
        {
            "tiers": [
                {
                    "name": "strong",
                    "model": str(model_dir),
                    "replicas": 2,
                    "num_cpus": 0,
                    "experts": {
                        "placement": "sharded",
                        "num_shards": 2,
                        "shard_resources": [{"expert_node_a": 0.01}, {"expert_node_b": 0.01}],
                    },
                }
            ],
            "policy": {"default_tier": "strong", "cascade": {"enabled": False}},
            "auth": {"api_keys": [], "api_keys_env": None},
        },
        base_dir=model_dir,
    )
    port = _free_port()
    serve.start(
        grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[GRPC_SERVICER]),
        http_options={"host": "127.0.0.1", "port": _free_port()},
    )
    try:
        serve.run(build_app(config), name="sharded", route_prefix="/")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield pb_grpc.MoEClusterStub(channel)
        channel.close()
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def _tokens(stub: pb_grpc.MoEClusterStub, prompt: list[int]) -> list[int]:
    request = pb.GenerateRequest(token_ids=prompt, max_tokens=12, ignore_eos=True)
    return [t for chunk in stub.Generate(request, timeout=120) for t in chunk.token_ids]


def test_sharded_tier_serves_the_colocated_tokens(
    stub: pb_grpc.MoEClusterStub, model_dir: Path
) -> None:
    pool: Any = serve.get_deployment_handle("experts-strong", app_name="sharded")
    nodes = pool.node_ids.remote().result()
    assert len(set(nodes.values())) == 2, nodes
    colocated = MoEModel.from_checkpoint(model_dir)
    params = [SamplingParams(max_tokens=12, ignore_eos=True)] * len(PROMPTS)
    expected = [r.token_ids for r in generate(colocated, [list(p) for p in PROMPTS], params)]
    # several calls, so both backbone replicas (sharing the one pool) serve some
    for _ in range(2):
        assert [_tokens(stub, list(p)) for p in PROMPTS] == expected
