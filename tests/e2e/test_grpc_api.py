"""A real gRPC client against the Serve application on a local Ray instance.

Two applications share one Ray instance: ``open`` (fast and strong tiers,
cascade on, no auth) and ``secured`` (one fast tier with an API key and a
queue of one, to reach RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
from ray import serve
from ray.serve.config import gRPCOptions

from cluster.tier_messages import TierStats
from deploy.app import GRPC_SERVICER, build_app
from deploy.config import parse_config
from deploy.demo_model import build_demo_model
from deploy.proto import moecluster_v1_pb2 as pb
from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc

API_KEY = "s3cret-key"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
OPEN = [("application", "open")]  # two apps: Serve's gRPC proxy needs the app named
SECURED = [("application", "secured")]
RPC_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    stub: pb_grpc.MoEClusterStub

    def stats(self, app: str, tier: str) -> TierStats:
        handle = serve.get_deployment_handle(f"tier-{tier}", app_name=app)
        result: TierStats = handle.stats.remote().result()
        return result

    def wait_idle(self, app: str, tier: str, timeout: float = 30.0) -> TierStats:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats(app, tier)
            if stats.num_running == 0 and stats.num_waiting == 0 and stats.num_blocks_held == 0:
                return stats
            assert time.monotonic() < deadline, f"{app}/{tier} never went idle: {stats}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    models = tmp_path_factory.mktemp("models")
    fast = build_demo_model(models / "fast", "fast")
    tiny = build_demo_model(models / "tiny", "tiny")
    no_auth: dict[str, Any] = {"api_keys": [], "api_keys_env": None}
    open_config = parse_config(
        {
            "tiers": [
                {"name": "fast", "model": str(fast), "num_cpus": 0},
                {"name": "strong", "model": str(tiny), "num_cpus": 0},
            ],
            "auth": no_auth,
        },
        base_dir=models,
    )
    secured_config = parse_config(
        {
            "tiers": [
                {
                    "name": "fast",
                    "model": str(fast),
                    "num_cpus": 0,
                    "max_ongoing_requests": 1,
                    "max_queued_requests": 1,
                }
            ],
            "policy": {"default_tier": "fast", "cascade": {"enabled": False}},
            "auth": {"api_keys": [API_KEY], "api_keys_env": None},
        },
        base_dir=models,
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(
        grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[GRPC_SERVICER]),
        http_options={"host": "127.0.0.1", "port": _free_port()},
    )
    try:
        serve.run(build_app(open_config), name="open", route_prefix="/")
        serve.run(build_app(secured_config), name="secured", route_prefix="/secured")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield Cluster(pb_grpc.MoEClusterStub(channel))
        channel.close()
    finally:
        serve.shutdown()
        ray.shutdown()


def _generate(
    cluster: Cluster, metadata: list[tuple[str, str]] | None = None, **fields: Any
) -> list[pb.GenerateChunk]:
    request = pb.GenerateRequest(**fields)
    metadata = metadata or []
    if not any(key == "application" for key, _ in metadata):
        metadata = [*OPEN, *metadata]
    return list(cluster.stub.Generate(request, metadata=metadata, timeout=RPC_TIMEOUT))


def _error(cluster: Cluster, metadata: list[tuple[str, str]] | None = None, **fields: Any) -> Any:
    with pytest.raises(grpc.RpcError) as info:
        _generate(cluster, metadata, **fields)
    details = info.value.details()
    assert "Traceback" not in details and "ray::" not in details, details
    return info.value


def test_streaming_with_usage_and_tier(cluster: Cluster) -> None:
    chunks = _generate(
        cluster,
        [("traceparent", TRACEPARENT), ("request_id", "req-stream-1")],
        prompt="The experts of a mixture",
        tier="strong",
        max_tokens=20,
        ignore_eos=True,
    )
    assert len(chunks) >= 2, "tokens were not streamed"
    assert all(not c.finish_reason for c in chunks[:-1])
    last = chunks[-1]
    tokens = [t for c in chunks for t in c.token_ids]
    assert last.finish_reason == "length" and len(tokens) == 20
    assert last.usage.completion_tokens == 20 and last.usage.prompt_tokens > 0
    assert "".join(c.text for c in chunks), "no text came back"
    assert (last.tier.name, last.tier.reason, last.tier.escalated) == ("strong", "explicit", False)
    assert last.request_id == "req-stream-1" and last.trace_id == TRACE_ID


def test_return_routing_gives_per_token_experts(cluster: Cluster) -> None:
    chunks = _generate(cluster, prompt="route", tier="strong", max_tokens=6, return_routing=True)
    routing = [r for c in chunks for r in c.routing]
    assert [r.index for r in routing] == list(range(6))
    for token in routing:
        assert [layer.layer for layer in token.layers] == [0, 1, 2, 3]  # the tiny preset
        assert all(len(layer.experts) == 2 and max(layer.experts) < 8 for layer in token.layers)
    dense = _generate(cluster, prompt="route", tier="fast", max_tokens=3, return_routing=True)
    assert not [r for c in dense for r in c.routing]


def test_prefix_reuse_shows_in_usage(cluster: Cluster) -> None:
    ids = list(range(100, 180))
    first = _generate(cluster, token_ids=ids, tier="fast", max_tokens=4, ignore_eos=True)
    # continue with a token the first reply did not start with: only the 5 full blocks match
    # (a tail block holding the reply's first tokens is reused too, when the prompt agrees)
    other = 7 if first[0].token_ids[0] != 7 else 8
    last = _generate(
        cluster, token_ids=[*ids, other, 9], tier="fast", max_tokens=4, ignore_eos=True
    )[-1]
    assert last.usage.cached_prompt_tokens == 80
    replies = [t for c in first for t in c.token_ids]
    again = _generate(
        cluster, token_ids=[*ids, *replies[:2], 9], tier="fast", max_tokens=4, ignore_eos=True
    )[-1]
    assert again.usage.cached_prompt_tokens == 82  # 5 blocks + the reply's 2 tokens in the tail


def test_cascade_escalates_when_the_fast_tier_is_unsure(cluster: Cluster) -> None:
    # the demo models' weights are random: their log-probabilities sit near -log(2048)
    last = _generate(cluster, prompt="Route me", max_tokens=12, ignore_eos=True)[-1]
    assert (last.tier.name, last.tier.reason, last.tier.escalated) == (
        "strong",
        "low_confidence",
        True,
    )
    assert last.tier.HasField("confidence") and last.tier.confidence < -2.5
    assert last.usage.completion_tokens == 12


def test_low_retrieval_confidence_goes_straight_to_strong(cluster: Cluster) -> None:
    last = _generate(cluster, prompt="Route me", max_tokens=4, retrieval_confidence=0.1)[-1]
    assert (last.tier.name, last.tier.reason) == ("strong", "low_retrieval_confidence")
    assert last.tier.confidence == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"prompt": "x", "top_p": 3.0}, "top_p=3"),
        ({"prompt": "x", "token_ids": [5]}, "exactly one of 'prompt'"),
        ({"prompt": "x", "tier": "huge"}, "unknown tier 'huge'"),
        ({"prompt": "x", "max_tokens": 100000}, "max_tokens=100000"),
        ({"token_ids": [5] * 5000, "tier": "fast"}, "exceeds the model's context of 4096"),
        ({"prompt": "x", "kv_policy": {"kind": "sliding"}}, "kv_policy 'sliding' is unknown"),
        ({"token_ids": [99999], "tier": "fast"}, "outside the vocabulary"),
    ],
)
def test_invalid_argument(cluster: Cluster, fields: dict[str, Any], needle: str) -> None:
    err = _error(cluster, **fields)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.details()


def test_auth_off_and_on(cluster: Cluster) -> None:
    assert _generate(cluster, prompt="open", tier="fast", max_tokens=2)[-1].finish_reason
    err = _error(cluster, SECURED, prompt="x", max_tokens=2)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in err.details()
    err = _error(cluster, [*SECURED, ("authorization", "Bearer wrong")], prompt="x", max_tokens=2)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "invalid API key" in err.details()
    good = [*SECURED, ("authorization", f"Bearer {API_KEY}")]
    last = _generate(cluster, good, prompt="x", max_tokens=2)[-1]
    assert last.tier.name == "fast" and last.tier.reason == "default"


def test_full_queue_is_resource_exhausted(cluster: Cluster) -> None:
    """One running and one queued request fill the secured tier; the next is refused."""
    good = [*SECURED, ("authorization", f"Bearer {API_KEY}")]
    request = pb.GenerateRequest(prompt="long", max_tokens=3000, ignore_eos=True)
    running = cluster.stub.Generate(request, metadata=good, timeout=RPC_TIMEOUT)
    next(running)  # it holds the replica's only seat
    queued = cluster.stub.Generate(request, metadata=good, timeout=RPC_TIMEOUT)
    queued_codes: list[grpc.StatusCode] = []

    def wait_in_queue() -> None:
        try:
            next(queued, None)
        except grpc.RpcError as err:  # the cancel below ends it
            queued_codes.append(err.code())

    waiter = threading.Thread(target=wait_in_queue, daemon=True)
    waiter.start()  # it waits in the queue of one
    time.sleep(1.0)
    err = _error(cluster, good, prompt="one too many", max_tokens=2)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at capacity" in err.details()
    running.cancel()
    queued.cancel()
    waiter.join(timeout=30)
    assert queued_codes == [grpc.StatusCode.CANCELLED]
    cluster.wait_idle("secured", "fast")


def _until_aborted(
    cluster: Cluster, tier: str, end_early: Callable[[], None], what: str, timeout: float
) -> None:
    """Run ``end_early`` (a call the client ends before it finishes) until the replica aborts.

    Ray Serve 2.60's gRPC proxy can drop a cancel that arrives while it hands a chunk to
    gRPC (README, status codes): the gateway is never told, and the request runs on to
    ``max_tokens`` and finishes normally. Such an attempt is told apart by the abort count,
    and is tried again. Each attempt must leave the tier idle (no blocks held) within
    ``timeout`` seconds.
    """
    for _ in range(3):
        aborted = cluster.wait_idle("open", tier, timeout=timeout).num_aborted
        end_early()
        stats = cluster.wait_idle("open", tier, timeout=timeout)  # idle: no blocks held
        if stats.num_aborted == aborted + 1:
            return
        assert stats.num_aborted == aborted, stats  # the cancel was lost: it ran to the end
    pytest.fail(f"in 3 attempts, the {what} never reached the replica")


def test_deadline_is_honoured_and_frees_blocks(cluster: Cluster) -> None:
    """The client sees DEADLINE_EXCEEDED; the replica aborts the request and frees its blocks.

    A deadline reaches Serve's gRPC proxy as a cancel, so the proxy can lose it as it can
    lose a cancel (see ``_until_aborted``).
    """
    request = pb.GenerateRequest(prompt="slow", tier="fast", max_tokens=1000, ignore_eos=True)

    def past_the_deadline() -> None:
        with pytest.raises(grpc.RpcError) as info:
            list(cluster.stub.Generate(request, metadata=OPEN, timeout=1.5))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    _until_aborted(cluster, "fast", past_the_deadline, "deadline's cancel", timeout=90)


def test_cancel_stops_generation_and_frees_blocks(cluster: Cluster) -> None:
    """The replica aborts the request (not finishing it) and frees its blocks."""
    request = pb.GenerateRequest(prompt="cancel me", tier="strong", max_tokens=400, ignore_eos=True)

    def cancel_after_three_chunks() -> None:
        call = cluster.stub.Generate(request, metadata=OPEN, timeout=RPC_TIMEOUT)
        stream = iter(call)
        for _ in range(3):
            next(stream)
        call.cancel()

    _until_aborted(cluster, "strong", cancel_after_three_chunks, "cancel", timeout=60)


def test_list_tiers_and_health(cluster: Cluster) -> None:
    tiers = {
        t.name: t
        for t in cluster.stub.ListTiers(pb.ListTiersRequest(), metadata=OPEN, timeout=60).tiers
    }
    assert set(tiers) == {"fast", "strong"}
    assert (tiers["fast"].family, tiers["fast"].moe, tiers["fast"].state) == (
        "llama",
        False,
        "ready",
    )
    assert (tiers["strong"].family, tiers["strong"].moe) == ("mixtral", True)
    assert tiers["fast"].role == "cascade start" and tiers["strong"].role == "escalation target"
    health = cluster.stub.Health(pb.HealthRequest(), metadata=OPEN, timeout=60)
    assert health.serving and "2 tier(s) ready" in health.detail


def _engine_process_of(app: str, tier: str) -> int:
    """The pid of the engine child of the tier's replica (Linux ``/proc``)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            parent_command = Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "cluster.engine_process" in command and f"ServeReplica:{app}:tier-{tier}" in (
            parent_command
        ):
            return int(entry.name)
    raise AssertionError(f"no engine process under the {app}/{tier} replica")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_dead_engine_process_gives_unavailable_and_serve_replaces_the_replica(
    cluster: Cluster,
) -> None:
    """Runs last: the tier is unavailable until Serve's health check replaces its replica."""
    request = pb.GenerateRequest(prompt="doomed", tier="fast", max_tokens=400, ignore_eos=True)
    call = cluster.stub.Generate(request, metadata=OPEN, timeout=RPC_TIMEOUT)
    stream = iter(call)
    next(stream)
    os.kill(_engine_process_of("open", "fast"), signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert "stopped generating" in info.value.details()
    deadline = time.monotonic() + 180
    while True:  # UNAVAILABLE until the health check fails and a new replica is up
        try:
            chunks = _generate(cluster, prompt="again", tier="fast", max_tokens=3)
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert time.monotonic() < deadline, "Serve never replaced the replica"
            time.sleep(1)
    assert chunks[-1].usage.completion_tokens == 3
