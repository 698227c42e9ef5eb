"""The gRPC front door (``deploy/front_door.py``) with a real ``grpc.aio`` server and client,
the real ``Gateway``, and a scripted tier that streams one token every few milliseconds
until ``max_tokens`` (no Ray, no model)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from cluster.serving.tier_client import TierBusyError
from cluster.serving.tier_messages import TierInfo, TierItem, TierRequest, TierStats, TierTokens
from deploy.app import with_driver_keys
from deploy.config import ClusterConfig, parse_config
from deploy.edge_config import ExposureError, GrpcConfig, check_exposure, is_loopback, tenant_of
from deploy.front_door import start_server
from deploy.gateway import Gateway
from deploy.proto import moecluster_v1_pb2 as pb
from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc
from tests.listening_sockets import free_port, is_loopback_address, listening_on

KEY = "front-door-key"


class PacedTier:
    """A tier streaming one token per ``pace_s`` up to ``max_tokens``; counts open streams."""

    def __init__(self, pace_s: float = 0.002) -> None:
        self.pace_s = pace_s
        self.requests: list[TierRequest] = []
        self.num_open = 0
        self.num_closed = 0
        self.busy = False
        self.fail = False

    async def generate(self, tier: str, request: TierRequest) -> AsyncGenerator[TierItem, None]:
        self.requests.append(request)
        self.num_open += 1
        try:
            if self.fail:
                raise RuntimeError("scripted failure with /secret/path in it")
            total = request.params.max_tokens
            for i in range(total):
                finish = "length" if i == total - 1 else None
                yield TierTokens([1 + i % 50], [-0.1], "a", finish, 3, 0, 0)
                await asyncio.sleep(self.pace_s)
        finally:
            self.num_closed += 1

    async def info(self, tier: str) -> TierInfo:
        if self.busy:
            raise TierBusyError(f"tier {tier!r} is at capacity")
        return TierInfo(tier, "/abs/models/fast", "llama", False, 4096)

    async def stats(self, tier: str) -> TierStats:
        return TierStats(0, 0, 64, 0, 0, 0, 0, 0, num_aborted=0)


def make_config(keys: tuple[str, ...] = (), **grpc_fields: Any) -> ClusterConfig:
    data = {
        "grpc": {"port": free_port(), **grpc_fields},
        "auth": {"api_keys": list(keys), "api_keys_env": None},
        "tiers": [{"name": "fast", "model": "models/fast"}],
        "policy": {"default_tier": "fast", "cascade": {"enabled": False}},
    }
    return parse_config(data, base_dir=Path("/srv/cluster"))


Body = Callable[[pb_grpc.MoEClusterStub, PacedTier], Awaitable[None]]


def serve(body: Body, config: ClusterConfig | None = None, tier: PacedTier | None = None) -> None:
    """Run ``body(stub, tier)`` against a front door serving ``config`` on loopback."""
    config = config or make_config()
    tier = tier or PacedTier()

    async def main() -> None:
        gateway = Gateway(config, tier)
        server = await start_server(gateway, config.grpc)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{config.grpc.port}") as channel:
                await body(pb_grpc.MoEClusterStub(channel), tier)
        finally:
            await server.stop(None)

    asyncio.run(main())


async def settled(tier: PacedTier) -> None:
    """Wait (bounded) until every tier stream the gateway opened is closed."""
    for _ in range(500):
        if tier.num_closed == tier.num_open:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{tier.num_open - tier.num_closed} tier stream(s) left open")


def request(**fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"prompt": "hi", "max_tokens": 4, **fields})


def test_generate_streams_and_the_request_id_is_the_servers() -> None:
    async def body(stub: pb_grpc.MoEClusterStub, tier: PacedTier) -> None:
        call = stub.Generate(request(), metadata=(("request_id", "client-chosen"),))
        chunks = [chunk async for chunk in call]
        trailer = dict(await call.trailing_metadata())
        assert [t for c in chunks for t in c.token_ids] == [1, 2, 3, 4]
        last = chunks[-1]
        assert last.finish_reason == "length" and last.tier.model == "fast"
        assert last.request_id != "client-chosen" and len(last.request_id) == 32
        assert trailer["request-id"] == last.request_id
        assert tier.requests[0].request_id == last.request_id

    serve(body)


def test_a_cancel_always_reaches_the_tier_50_times_under_load() -> None:
    """Serve's proxy lost about 1 cancel in 10; here every one closes the tier stream."""

    async def body(stub: pb_grpc.MoEClusterStub, tier: PacedTier) -> None:
        load = [stub.Generate(request(max_tokens=100_000 // 25)) for _ in range(4)]
        for call in load:
            await call.read()
        for attempt in range(50):
            call = stub.Generate(request(max_tokens=4000))
            for _ in range(1 + attempt % 3):
                await call.read()
            call.cancel()
        for call in load:
            call.cancel()
        await settled(tier)
        assert tier.num_open == 54

    serve(body)


def test_the_clients_deadline_stops_generation() -> None:
    async def body(stub: pb_grpc.MoEClusterStub, tier: PacedTier) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(request(max_tokens=4000), timeout=0.3):
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await settled(tier)
        assert tier.num_open == 1

    serve(body)


def test_the_servers_request_timeout_stops_a_call_without_a_deadline() -> None:
    async def body(stub: pb_grpc.MoEClusterStub, tier: PacedTier) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(request(max_tokens=4000)):
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "request_timeout_s of 0.3 s" in info.value.details()
        await settled(tier)

    serve(body, make_config(request_timeout_s=0.3))


def test_a_message_over_the_limit_is_refused_and_the_server_goes_on() -> None:
    async def body(stub: pb_grpc.MoEClusterStub, tier: PacedTier) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(request(prompt="x" * (2 * 2**20))):
                pass
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert tier.num_open == 0  # never reached the gateway
        chunks = [chunk async for chunk in stub.Generate(request())]
        assert chunks[-1].finish_reason == "length"

    serve(body, make_config(max_message_bytes=2**20))


def test_calls_beyond_max_concurrent_streams_are_resource_exhausted() -> None:
    async def body(stub: pb_grpc.MoEClusterStub, tier: PacedTier) -> None:
        running = [stub.Generate(request(max_tokens=4000)) for _ in range(2)]
        for call in running:
            await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(request()):
                pass
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in running:
            call.cancel()
        await settled(tier)
        chunks = [chunk async for chunk in stub.Generate(request())]
        assert chunks[-1].finish_reason == "length"

    serve(body, make_config(max_concurrent_streams=2))


def test_an_internal_error_names_the_request_and_nothing_else() -> None:
    tier = PacedTier()
    tier.fail = True

    async def body(stub: pb_grpc.MoEClusterStub, tier: PacedTier) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(request()):
                pass
        assert info.value.code() == grpc.StatusCode.INTERNAL
        details = info.value.details()
        assert "RuntimeError" in details and "request id" in details
        assert "/secret/path" not in details and "Traceback" not in details

    serve(body, tier=tier)


def test_list_tiers_needs_the_key_health_does_not_and_says_only_serving() -> None:
    async def body(stub: pb_grpc.MoEClusterStub, tier: PacedTier) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListTiers(pb.ListTiersRequest())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = await stub.ListTiers(
            pb.ListTiersRequest(), metadata=(("authorization", f"Bearer {KEY}"),)
        )
        assert [(t.name, t.model, t.state) for t in listed.tiers] == [("fast", "fast", "ready")]
        health = await stub.Health(pb.HealthRequest())
        assert (health.serving, health.detail) == (True, "serving")
        tier.busy = True  # a full queue: not serving, not an internal error
        health = await stub.Health(pb.HealthRequest())
        assert (health.serving, health.detail) == (False, "not serving")

    serve(body, make_config(keys=(KEY,)))


def test_the_tenant_is_the_keys_identity_never_the_key() -> None:
    async def body(stub: pb_grpc.MoEClusterStub, tier: PacedTier) -> None:
        metadata = (("authorization", f"Bearer {KEY}"),)
        [chunk async for chunk in stub.Generate(request(), metadata=metadata)]
        salt = tier.requests[0].cache_salt
        assert salt == tenant_of(KEY) and KEY not in salt

    serve(body, make_config(keys=(KEY,)))


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net")
def test_the_front_door_listens_on_loopback_only() -> None:
    config = make_config()

    async def body(stub: pb_grpc.MoEClusterStub, tier: PacedTier) -> None:
        found = listening_on(config.grpc.port)
        assert found and all(is_loopback_address(a) for a in found), found

    serve(body, config)


def test_an_open_door_beyond_loopback_is_refused_unless_allowed() -> None:
    exposed = GrpcConfig(host="0.0.0.0")
    config = make_config()
    with pytest.raises(ExposureError, match="allow_unauthenticated"):
        check_exposure(exposed, config.auth, frozenset())
    allowed = config.auth.model_copy(update={"allow_unauthenticated": True})
    assert "auth OFF" in check_exposure(exposed, allowed, frozenset())
    assert "auth on" in check_exposure(exposed, config.auth, frozenset({KEY}))
    assert "this machine only" in check_exposure(GrpcConfig(), config.auth, frozenset())
    assert [is_loopback(h) for h in ("127.0.0.2", "::1", "localhost", "0.0.0.0", "::")] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_keys_in_the_drivers_environment_reach_the_gateways_config() -> None:
    config = parse_config(
        {
            "tiers": [{"name": "fast", "model": "m"}],
            "auth": {"api_keys_env": "KEYS"},
            "policy": {"cascade": {"enabled": False}},
        },
        base_dir=Path("/srv"),
    )
    carried = with_driver_keys(config, {"KEYS": "a, b"})
    assert carried.auth.resolve_api_keys({}) == {"a", "b"}  # without the environment
    assert "'a'" not in repr(carried) and "'b'" not in repr(carried)
    assert with_driver_keys(config, {}) is config


def test_gateway_replicas_on_one_node_share_the_port() -> None:
    config = make_config()

    async def main() -> None:
        first = await start_server(Gateway(config, PacedTier()), config.grpc)
        second = await start_server(Gateway(config, PacedTier()), config.grpc)  # SO_REUSEPORT
        await first.stop(None)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{config.grpc.port}") as channel:
            chunks = [c async for c in pb_grpc.MoEClusterStub(channel).Generate(request())]
        assert chunks[-1].finish_reason == "length"  # the second one serves
        await second.stop(None)

    asyncio.run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_serves_only_clients_that_speak_it(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -addext"
    names = "subjectAltName=DNS:localhost,IP:127.0.0.1"
    subprocess.run(
        ["openssl", *command.split(), names, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    config = make_config(tls={"cert_file": str(cert), "key_file": str(key)})
    address = f"localhost:{config.grpc.port}"

    async def main() -> None:
        server = await start_server(Gateway(config, PacedTier()), config.grpc)
        try:
            credentials = grpc.ssl_channel_credentials(cert.read_bytes())
            async with grpc.aio.secure_channel(address, credentials) as channel:
                chunks = [c async for c in pb_grpc.MoEClusterStub(channel).Generate(request())]
            assert chunks[-1].finish_reason == "length"
            async with grpc.aio.insecure_channel(address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.MoEClusterStub(channel).Health(pb.HealthRequest(), timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(main())
