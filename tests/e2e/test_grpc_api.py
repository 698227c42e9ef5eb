"""A real gRPC client against the Serve application on a local Ray instance.

Two applications share one Ray instance, each gateway serving gRPC on its own port:
``open`` (fast and strong tiers, cascade on, no auth) and ``secured`` (one fast tier
with an API key and a queue of one, to reach RESOURCE_EXHAUSTED). Metadata
``application: <name>`` in these tests picks the application's channel.
"""

from __future__ import annotations

import os
import signal
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

from cluster.serving.tier_messages import TierStats
from deploy.app import build_app
from deploy.config import parse_config
from deploy.demo_model import build_demo_model
from deploy.proto import moecluster_v1_pb2 as pb
from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc
from tests.listening_sockets import free_port, is_loopback_address, listening_on

API_KEY = "s3cret-key"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
OPEN = [("application", "open")]  # picks the application's channel (see _stub)
SECURED = [("application", "secured")]
RPC_TIMEOUT = 120.0


@dataclass
class Cluster:
    stubs: dict[str, pb_grpc.MoEClusterStub]
    address: dict[str, str]

    @property
    def stub(self) -> pb_grpc.MoEClusterStub:
        return self.stubs["open"]

    def stub_for(
        self, metadata: list[tuple[str, str]]
    ) -> tuple[pb_grpc.MoEClusterStub, list[tuple[str, str]]]:
        """The stub of the application named in ``metadata`` (default ``open``), and the
        metadata to send."""
        app = next((value for key, value in metadata if key == "application"), "open")
        return self.stubs[app], [(k, v) for k, v in metadata if k != "application"]

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
    serve.start(proxy_location="Disabled")  # each gateway serves gRPC itself
    channels, addresses = {}, {}
    try:
        for name, config in (("open", open_config), ("secured", secured_config)):
            port = free_port()
            config = config.model_copy(
                update={"grpc": config.grpc.model_copy(update={"port": port})}
            )
            serve.run(build_app(config), name=name, route_prefix=None)
            addresses[name] = f"127.0.0.1:{port}"
            channels[name] = grpc.insecure_channel(addresses[name])
        stubs = {name: pb_grpc.MoEClusterStub(ch) for name, ch in channels.items()}
        yield Cluster(stubs, addresses)
    finally:
        for channel in channels.values():
            channel.close()
        serve.shutdown()
        ray.shutdown()


def _generate(
    cluster: Cluster, metadata: list[tuple[str, str]] | None = None, **fields: Any
) -> list[pb.GenerateChunk]:
    request = pb.GenerateRequest(**fields)
    stub, metadata = cluster.stub_for(metadata or [])
    return list(stub.Generate(request, metadata=metadata, timeout=RPC_TIMEOUT))


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
    # the request id is the server's: a client's request_id metadata is ignored
    assert last.request_id != "req-stream-1" and len(last.request_id) == 32
    assert last.trace_id == TRACE_ID


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
        ({"token_ids": [5] * 4090, "tier": "fast"}, "exceeds the model's context of 4096"),
        (
            {"token_ids": [5] * 5000, "tier": "fast"},
            "token_ids has 5000 token ids: allowed at most",
        ),
        ({"prompt": "x", "stop": ["s"] * 1000}, "stop has 1000 stop strings: allowed at most 16"),
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
    secured = cluster.stubs["secured"]
    key = good[1:]
    request = pb.GenerateRequest(prompt="long", max_tokens=3000, ignore_eos=True)
    running = secured.Generate(request, metadata=key, timeout=RPC_TIMEOUT)
    next(running)  # it holds the replica's only seat
    queued = secured.Generate(request, metadata=key, timeout=RPC_TIMEOUT)
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


def _aborted_once(
    cluster: Cluster, tier: str, end_early: Callable[[], None], timeout: float
) -> None:
    """``end_early`` (a call the client ends before it finishes) aborts the request on its
    replica exactly once, and the tier goes idle (no blocks held) within ``timeout`` s."""
    aborted = cluster.wait_idle("open", tier, timeout=timeout).num_aborted
    end_early()
    stats = cluster.wait_idle("open", tier, timeout=timeout)
    assert stats.num_aborted == aborted + 1, f"the request was not aborted: {stats}"


def test_deadline_is_honoured_and_frees_blocks(cluster: Cluster) -> None:
    """The client sees DEADLINE_EXCEEDED; the replica aborts the request and frees its blocks."""
    request = pb.GenerateRequest(prompt="slow", tier="fast", max_tokens=1000, ignore_eos=True)

    def past_the_deadline() -> None:
        with pytest.raises(grpc.RpcError) as info:
            list(cluster.stub.Generate(request, timeout=1.5))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    _aborted_once(cluster, "fast", past_the_deadline, timeout=90)


def test_cancel_stops_generation_and_frees_blocks(cluster: Cluster) -> None:
    """The replica aborts the request (not finishing it) and frees its blocks."""
    request = pb.GenerateRequest(prompt="cancel me", tier="strong", max_tokens=400, ignore_eos=True)

    def cancel_after_three_chunks() -> None:
        call = cluster.stub.Generate(request, timeout=RPC_TIMEOUT)
        stream = iter(call)
        for _ in range(3):
            next(stream)
        call.cancel()

    _aborted_once(cluster, "strong", cancel_after_three_chunks, timeout=60)


def test_every_cancel_reaches_the_replica_50_times_under_load(cluster: Cluster) -> None:
    """Serve's gRPC proxy lost about 1 cancel in 10 under this load (a cancel arriving as a
    chunk was handed to gRPC); the gateway's own server loses none."""
    stop = threading.Event()

    def load() -> None:
        request = pb.GenerateRequest(prompt="load", tier="strong", max_tokens=24, ignore_eos=True)
        while not stop.is_set():
            list(cluster.stub.Generate(request, timeout=RPC_TIMEOUT))

    aborted = cluster.wait_idle("open", "strong").num_aborted
    workers = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        request = pb.GenerateRequest(
            prompt="cancel", tier="strong", max_tokens=400, ignore_eos=True
        )
        for attempt in range(50):
            call = cluster.stub.Generate(request, timeout=RPC_TIMEOUT)
            stream = iter(call)
            for _ in range(1 + attempt % 3):
                next(stream)
            call.cancel()
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=RPC_TIMEOUT)
    stats = cluster.wait_idle("open", "strong", timeout=120)
    assert stats.num_aborted == aborted + 50, stats


def test_a_message_over_the_limit_is_refused_and_the_gateway_goes_on(cluster: Cluster) -> None:
    err = _error(cluster, prompt="x" * (5 * 2**20), tier="fast", max_tokens=2)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert _generate(cluster, prompt="still here", tier="fast", max_tokens=2)[-1].finish_reason


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net")
def test_nothing_of_the_app_listens_beyond_loopback(cluster: Cluster) -> None:
    """The gateway's port is bound on loopback only, and Serve runs no proxy at all."""
    from ray.serve.context import _get_global_client

    port = int(cluster.address["open"].rsplit(":", 1)[1])
    found = listening_on(port)
    assert found and all(is_loopback_address(a) for a in found), found
    assert not _get_global_client().get_serve_details().get("proxies"), "a Serve proxy runs"


def test_list_tiers_and_health(cluster: Cluster) -> None:
    tiers = {t.name: t for t in cluster.stub.ListTiers(pb.ListTiersRequest(), timeout=60).tiers}
    assert set(tiers) == {"fast", "strong"}
    assert (tiers["fast"].family, tiers["fast"].moe, tiers["fast"].state) == (
        "llama",
        False,
        "ready",
    )
    assert (tiers["strong"].family, tiers["strong"].moe) == ("mixtral", True)
    assert tiers["fast"].role == "cascade start" and tiers["strong"].role == "escalation target"
    assert {t.model for t in tiers.values()} == {"fast", "tiny"}  # never an absolute path
    health = cluster.stub.Health(pb.HealthRequest(), timeout=60)
    assert (health.serving, health.detail) == (True, "serving")


def test_list_tiers_needs_the_key_and_health_does_not(cluster: Cluster) -> None:
    secured = cluster.stubs["secured"]
    with pytest.raises(grpc.RpcError) as info:
        secured.ListTiers(pb.ListTiersRequest(), timeout=60)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    key = [("authorization", f"Bearer {API_KEY}")]
    listed = secured.ListTiers(pb.ListTiersRequest(), metadata=key, timeout=60)
    assert [t.name for t in listed.tiers] == ["fast"]
    assert secured.Health(pb.HealthRequest(), timeout=60).serving


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
        if "cluster.engine.engine_process" in command and f"ServeReplica:{app}:tier-{tier}" in (
            parent_command
        ):
            return int(entry.name)
    raise AssertionError(f"no engine process under the {app}/{tier} replica")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_dead_engine_process_is_survived_by_resubmission(cluster: Cluster) -> None:
    """Runs last. The tier's only replica loses its engine mid-stream: the replica exits, Serve
    starts another, and the gateway resubmits the request there with the tokens already sent,
    so the client's stream goes on to its end, equal to an unfaulted run of the same request."""
    request = pb.GenerateRequest(prompt="doomed", tier="fast", max_tokens=200, ignore_eos=True)
    stream = iter(cluster.stub.Generate(request, timeout=RPC_TIMEOUT))
    chunks = [next(stream)]
    os.kill(_engine_process_of("open", "fast"), signal.SIGKILL)
    chunks += list(stream)  # no RpcError: resubmitted
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == 200 and chunks[-1].usage.completion_tokens == 200
    assert chunks[-1].finish_reason == "length"
    again = _generate(cluster, prompt="doomed", tier="fast", max_tokens=200, ignore_eos=True)
    assert tokens == [t for c in again for t in c.token_ids]  # none repeated, none missing
