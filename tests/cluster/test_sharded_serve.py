"""The Serve application with a sharded tier on a 3-node Ray cluster, called over gRPC.

Each backbone replica runs its engine in a child process, which reaches the shards itself
over the data plane (the replica only opens the shards' side of its channel).

The application writes its traces to a JSON-lines file and keeps an audit log, so the
tests also check telemetry across processes: one trace holds the gateway's request span,
the tier replica's spans and the expert shards' work; ``traces report`` reads the file;
``replay`` re-runs a sampled request from its audit record.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from cluster.engine.generator import generate
from cluster.faults import actors_of_class
from cluster.telemetry.trace_file import SpanRecord, read_spans
from deploy.app import build_app
from deploy.audit import find
from deploy.cli import main as cli_main
from deploy.config import parse_config
from deploy.demo_model import build_demo_model
from deploy.proto import moecluster_v1_pb2 as pb
from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.listening_sockets import free_port

T = TypeVar("T")
PROMPTS = ([5, 17, 300, 42, 99, 1024, 7, 8, 9, 10, 11, 12, 13], [1500, 3, 4], list(range(40, 80)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("serve-shards") / "tiny", "tiny")


@dataclass
class Served:
    stub: pb_grpc.MoEClusterStub
    address: str
    spans: Path
    audit: Path


@pytest.fixture(scope="module")
def served(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    out = tmp_path_factory.mktemp("telemetry")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=1, resources={"expert_node_a": 1})
    cluster.add_node(num_cpus=1, resources={"expert_node_b": 1})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    port = free_port()
    config = parse_config(
        {
            "tiers": [
                {
                    "name": "strong",
                    "model": str(model_dir),
                    "replicas": 2,
                    "num_cpus": 0,
                    "engine_process": True,  # the default: said here, as it is tested
                    "experts": {
                        "placement": "sharded",
                        "num_shards": 2,
                        "shard_resources": [{"expert_node_a": 0.01}, {"expert_node_b": 0.01}],
                        # re-places live as soon as the gate's load is at all uneven, so the
                        # tests below run across table swaps (test_a_live_replan_...)
                        "replan": {
                            "enabled": True,
                            "report_interval_s": 0.2,
                            "window_s": 1.0,
                            "min_tokens": 1,
                            "imbalance_threshold": 1.0,
                            "margin": 0.0,
                            "min_interval_s": 1.0,
                            "extra_slots": 0.5,
                            "copy_bandwidth_bytes_per_s": 1e12,
                            "ack_timeout_s": 30.0,
                        },
                    },
                }
            ],
            "policy": {"default_tier": "strong", "cascade": {"enabled": False}},
            "auth": {"api_keys": [], "api_keys_env": None},
            "telemetry": {"traces_exporter": "file", "file_path": str(out / "spans.jsonl")},
            "audit": {"enabled": True, "path": str(out / "audit.jsonl"), "record_text": True},
            "grpc": {"port": port},
        },
        base_dir=model_dir,
    )
    serve.start(proxy_location="Disabled")  # the gateway serves gRPC itself
    try:
        serve.run(build_app(config), name="sharded", route_prefix=None)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield Served(
            pb_grpc.MoEClusterStub(channel),
            f"127.0.0.1:{port}",
            out / "spans.jsonl",
            out / "audit.jsonl",
        )
        channel.close()
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def _tokens(stub: pb_grpc.MoEClusterStub, prompt: list[int]) -> list[int]:
    request = pb.GenerateRequest(token_ids=prompt, max_tokens=12, ignore_eos=True)
    return [t for chunk in stub.Generate(request, timeout=120) for t in chunk.token_ids]


def test_sharded_tier_serves_the_colocated_tokens(served: Served, model_dir: Path) -> None:
    stub = served.stub
    pool: Any = serve.get_deployment_handle("experts-strong", app_name="sharded")
    nodes = pool.node_ids.remote().result()
    assert len(set(nodes.values())) == 2, nodes
    # the placement controller, started from the pool's replica, escapes its placement group
    # (whose bundles are on the expert nodes) and runs on the head
    (host,) = actors_of_class("PlacementControllerHost")
    assert host.node_id == ray.get_runtime_context().get_node_id()
    colocated = MoEModel.from_checkpoint(model_dir)
    params = [SamplingParams(max_tokens=12, ignore_eos=True)] * len(PROMPTS)
    expected = [r.token_ids for r in generate(colocated, [list(p) for p in PROMPTS], params)]
    # several calls, so both backbone replicas (sharing the one pool) serve some
    for _ in range(2):
        assert [_tokens(stub, list(p)) for p in PROMPTS] == expected
    if os.path.isdir("/proc"):  # each replica's engine runs in a child of its own
        assert _engine_children("ServeReplica:sharded:tier-strong") == 2


def test_a_live_replan_keeps_every_output_and_moves_slots(served: Served, model_dir: Path) -> None:
    """Concurrent requests while the placement controller re-places the tier's experts (its
    thresholds are set so that any uneven load re-plans): every output stays the colocated
    one, no request fails, and the shards end up holding what the controller's table says."""
    from concurrent.futures import ThreadPoolExecutor

    from cluster.expert_parallel.placement_host import CONTROLLER_NAME

    colocated = MoEModel.from_checkpoint(model_dir)
    params = [SamplingParams(max_tokens=12, ignore_eos=True)] * len(PROMPTS)
    expected = [r.token_ids for r in generate(colocated, [list(p) for p in PROMPTS], params)]
    controller = ray.get_actor(CONTROLLER_NAME)
    deadline = time.monotonic() + 120
    stats: Any = {"num_replans": 0}
    with ThreadPoolExecutor(4) as workers:
        while True:
            futures = [workers.submit(_tokens, served.stub, list(p)) for p in PROMPTS * 2]
            assert [f.result() for f in futures] == expected * 2
            stats = ray.get(controller.stats.remote("strong"))
            if stats["num_replans"] >= 1 and stats["table_version"] >= 1:
                break
            assert time.monotonic() < deadline, f"no re-plan within 120 s: {stats}"
        # and after the move: the new table serves the same tokens
        futures = [workers.submit(_tokens, served.stub, list(p)) for p in PROMPTS * 2]
        assert [f.result() for f in futures] == expected * 2
    assert stats["moved_slots"] >= 1, stats
    version, placement = ray.get(controller.table.remote("strong"))
    assert version >= 1 and placement  # the planner may rebalance without replicas here
    pool: Any = serve.get_deployment_handle("experts-strong", app_name="sharded")

    def settled() -> bool | None:  # old slots are dropped once every engine swapped
        held = pool.slots.remote().result()
        wanted: dict[str, set[tuple[int, int]]] = {}
        for slot, shards in ray.get(controller.table.remote("strong"))[1]:
            for sid in shards:
                wanted.setdefault(sid, set()).add(tuple(slot))
        return {sid: set(map(tuple, s)) for sid, s in held.items()} == wanted or None

    _wait_for("shards holding the controller's table", settled)


def _engine_children(replica_title: str) -> int:
    """Engine processes whose parent's process title names ``replica_title``."""
    found = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"cluster.engine.engine_process" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            found += replica_title.encode() in Path(f"/proc/{parent}/cmdline").read_bytes()
        except OSError:  # the process ended meanwhile
            continue
    return found


def _wait_for(what: str, found: Callable[[], T | None], timeout: float = 60.0) -> T:
    """Exporters batch (spans every few seconds) and audit writes run off the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = found()
        if value is not None:
            return value
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f}s"
        time.sleep(0.5)


def test_one_trace_spans_gateway_replica_and_shards(served: Served) -> None:
    trace_id = "5af7183fc1d34b8fa25c2e8f1a7f9e01"
    request = pb.GenerateRequest(token_ids=PROMPTS[0], max_tokens=4, ignore_eos=True)
    traceparent = f"00-{trace_id}-b7ad6b7169203331-01"
    chunks = list(served.stub.Generate(request, metadata=[("traceparent", traceparent)]))
    assert chunks[-1].trace_id == trace_id

    def chain_of(span: SpanRecord, by_id: dict[str, SpanRecord]) -> list[SpanRecord]:
        chain = [span]  # walk up to the root: every hop is a recorded span
        while chain[-1].parent_span_id in by_id:
            chain.append(by_id[chain[-1].parent_span_id])
        return chain

    def spans() -> list[SpanRecord] | None:
        """The trace once every process exported its part: the replica, its engine process
        (the dispatch spans) and the shards export on their own batch timers."""
        if not served.spans.exists():
            return None
        mine = [s for s in read_spans(served.spans) if s.trace_id == trace_id]
        names = {s.name.split(" ")[0] for s in mine}
        wanted = {"text_completion", "moe.tier_request", "moe.decode", "moe.expert_shard"}
        if not wanted <= names:
            return None
        by_id = {s.span_id: s for s in mine}
        shard_spans = [s for s in mine if s.name.startswith("moe.expert_shard")]
        linked = all(
            chain_of(s, by_id)[-1].parent_span_id == "b7ad6b7169203331" for s in shard_spans
        )
        return mine if linked else None

    mine = _wait_for("complete trace", spans)
    by_id = {s.span_id: s for s in mine}
    roles = {s.resource.get("moe.role") for s in mine}
    assert {"gateway", "tier", "expert_shard"} <= roles, roles
    root = next(s for s in mine if s.name.startswith("text_completion"))
    assert root.parent_span_id == "b7ad6b7169203331"
    for shard_span in (s for s in mine if s.name.startswith("moe.expert_shard")):
        chain = chain_of(shard_span, by_id)
        assert chain[-1] is root, [s.name for s in chain]

    assert cli_main(["traces", "report", str(served.spans)]) == 0


def test_replay_of_a_sampled_request_is_identical(served: Served, capsys: Any) -> None:
    request = pb.GenerateRequest(token_ids=PROMPTS[1], max_tokens=10, temperature=1.0)
    chunks = list(served.stub.Generate(request))
    request_id = chunks[-1].request_id
    _wait_for(
        "audit record", lambda: find(served.audit, request_id) if served.audit.exists() else None
    )
    code = cli_main(
        ["replay", request_id, "--audit-log", str(served.audit), "--server", served.address]
    )
    assert code == 0, capsys.readouterr().out
    assert "identical" in capsys.readouterr().out


def test_a_killed_shard_restarts_alone_and_serving_recovers(
    served: Served, model_dir: Path
) -> None:
    """SIGKILL one expert shard (no replica here): Ray restarts that actor alone, the pool's
    replica stays (no gang restart), the controller re-places its experts, and requests that
    fail meanwhile fail with UNAVAILABLE; none gets a wrong token, and serving recovers."""
    from cluster.faults import actors_named, kill_actor_process, live_actors, wait_until

    colocated = MoEModel.from_checkpoint(model_dir)
    params = [SamplingParams(max_tokens=12, ignore_eos=True)]
    expected = generate(colocated, [list(PROMPTS[0])], params)[0].token_ids
    pool: Any = serve.get_deployment_handle("experts-strong", app_name="sharded")
    (host,) = actors_named("SERVE_REPLICA::sharded#experts-strong")
    handles, _ = pool.describe.remote().result()
    victim = sorted(handles)[-1]
    before = pool.shard_states.remote().result()[victim]
    actor_id = handles[victim]._actor_id.hex()
    (shard,) = live_actors(lambda a: a.actor_id == actor_id)
    kill_actor_process(shard)
    outcomes: list[str] = []

    def serves_again() -> bool:
        try:
            got = _tokens(served.stub, list(PROMPTS[0]))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            outcomes.append("unavailable")
            return False
        outcomes.append("ok")
        assert got == expected  # never a wrong token
        return True

    recovered = wait_until(serves_again, 180, "requests served again after the shard kill", 1.0)

    def restarted() -> bool:
        state = pool.shard_states.remote().result()[victim]
        return state is not None and state[0] != before[0]

    wait_until(restarted, 120, f"{victim} restarted")
    assert [a.pid for a in actors_named("SERVE_REPLICA::sharded#experts-strong")] == [host.pid]
    print(f"\nserve, shard SIGKILL (no replica): served again after {recovered:.1f}s ({outcomes})")
