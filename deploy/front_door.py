"""The gRPC front door: a ``grpc.aio`` server inside each gateway replica.

Serve's own gRPC proxy listens on every interface whatever the config says, accepts
messages up to 2 GiB and can lose a client's cancel (it closes its stream with
``GeneratorExit`` while handing a chunk to gRPC, and the call behind it runs on). So the
gateway serves ``moecluster.v1.MoECluster`` itself, one hop shorter:

- it binds ``grpc.host:grpc.port`` (127.0.0.1 by default; ``SO_REUSEPORT``, so several
  gateway replicas on one node share the port), with TLS when configured;
- it refuses messages over ``grpc.max_message_bytes`` and, beyond
  ``grpc.max_concurrent_streams`` calls at once, answers RESOURCE_EXHAUSTED at once;
- a Generate call runs as one task: the client's cancel or deadline cancels it (gRPC's
  own machinery, no proxy in between), and ``request_timeout_s`` (or the client's
  deadline, the shorter) ends it with DEADLINE_EXCEEDED; either way the tier streams are
  closed, which aborts the request on its replica and frees its KV blocks;
- every request id is the server's own (the client's ``request_id`` metadata is ignored),
  sent back in the last chunk and in the ``request-id`` trailing metadata.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from pathlib import Path
from typing import Any

import grpc

from deploy.api import ApiError
from deploy.edge_config import GrpcConfig
from deploy.gateway import Gateway
from deploy.proto import moecluster_v1_pb2 as pb
from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc

logger = logging.getLogger("moe_cluster.front_door")

GRACE_S = 5.0  # on stop: in-flight calls get this long before they are cancelled
MAX_METADATA_BYTES = 16 * 1024  # all of a call's metadata (gRPC's default is 8 KiB)


class FrontDoor(pb_grpc.MoEClusterServicer):
    """The ``MoECluster`` servicer: metadata and deadlines in, statuses out."""

    def __init__(self, gateway: Gateway, settings: GrpcConfig) -> None:
        self.gateway = gateway
        self.settings = settings

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> None:
        request_id = uuid.uuid4().hex
        trailer = (("request-id", request_id),)
        context.set_trailing_metadata(trailer)
        metadata = _metadata(context)
        budget = _time_budget(context, self.settings.request_timeout_s)
        try:
            async with asyncio.timeout(budget):
                async for chunk in self.gateway.generate(request, metadata, request_id, budget):
                    await context.write(chunk)
        except ApiError as err:
            await context.abort(err.code, err.message, trailer)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request ran past its deadline ({budget:.3g} s: the client's deadline or "
                f"the server's request_timeout_s of {self.settings.request_timeout_s:g} s); "
                f"generation stopped (request id {request_id})",
                trailer,
            )
        except asyncio.CancelledError:
            raise  # the client went away: the gateway's streams are closed on the way out
        except Exception as err:
            if isinstance(err, grpc.aio.AbortError):
                raise
            logger.exception("Generate failed (request id %s)", request_id)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error ({type(err).__name__}); the server log has details "
                f"(request id {request_id})",
                trailer,
            )

    async def ListTiers(self, request: pb.ListTiersRequest, context: Any) -> pb.ListTiersResponse:
        try:
            self.gateway.authenticate(_metadata(context))
        except ApiError as err:
            await context.abort(err.code, err.message)
        return await self.gateway.list_tiers()

    async def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthResponse:
        return await self.gateway.health()


def _metadata(context: Any) -> dict[str, str]:
    """The call's text metadata (binary ``-bin`` entries are not ours)."""
    return {
        key: value
        for key, value in (context.invocation_metadata() or ())
        if isinstance(value, str) and not key.endswith("-bin")
    }


def _time_budget(context: Any, request_timeout_s: float) -> float:
    """Seconds this call may run: the client's deadline or the server's limit, the shorter."""
    remaining = context.time_remaining()
    if remaining is None or not math.isfinite(remaining):
        return request_timeout_s
    return max(0.0, min(float(remaining), request_timeout_s))


def server_options(settings: GrpcConfig) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.so_reuseport", 1),  # several gateway replicas on one node share the port
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # a client may ping no more often than every 10 s without calls (gRPC's default 5 min
        # makes well-behaved keepalive clients get GOAWAY)
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def _credentials(settings: GrpcConfig) -> grpc.ServerCredentials | None:
    tls = settings.tls
    if tls is None:
        return None
    chain = Path(tls.cert_file).read_bytes()
    key = Path(tls.key_file).read_bytes()
    client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def start_server(gateway: Gateway, settings: GrpcConfig) -> grpc.aio.Server:
    """Bind and start the front door on the running event loop; raise if the address is
    taken or cannot be bound."""
    server = grpc.aio.server(
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_streams,
    )
    pb_grpc.add_MoEClusterServicer_to_server(FrontDoor(gateway, settings), server)
    credentials = _credentials(settings)
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.address)
        else:
            port = server.add_secure_port(settings.address, credentials)
    except RuntimeError as err:
        raise OSError(f"cannot listen for gRPC on {settings.address}: {err}") from None
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {settings.address}")
    await server.start()
    return server
