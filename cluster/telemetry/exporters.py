"""Registries behind ``TelemetrySettings``: samplers, span exporters, metric readers.

Each swappable piece is a name in a small table, so an unknown name fails with the known ones
and adding an exporter is one entry. Exporter modules are imported when chosen: the gRPC and
HTTP stacks cost start-up time in every actor that does not export.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)

from cluster.telemetry.settings import SAMPLER_NAMES, TelemetrySettings, checked_protocol
from cluster.telemetry.trace_file import JsonLinesSpanExporter

logger = logging.getLogger(__name__)

PROMETHEUS_PORT_SPAN = 32  # several actors per node each export: try this many ports above

# The OTEL_TRACES_SAMPLER names of the SDK; each takes the ratio, used or not.
SAMPLERS: dict[str, Callable[[float], Sampler]] = {
    "always_on": lambda _: ALWAYS_ON,
    "always_off": lambda _: ALWAYS_OFF,
    "parentbased_always_on": lambda _: DEFAULT_ON,
    "parentbased_always_off": lambda _: DEFAULT_OFF,
    "traceidratio": TraceIdRatioBased,
    "parentbased_traceidratio": ParentBasedTraceIdRatio,
}
assert tuple(SAMPLERS) == SAMPLER_NAMES, "a sampler name without a builder, or the reverse"


def build_sampler(settings: TelemetrySettings) -> Sampler:
    return SAMPLERS[settings.sampler](settings.sample_ratio)


def _otlp_target(
    signal: str, settings: TelemetrySettings, environ: Mapping[str, str]
) -> tuple[str, str | None]:
    """(protocol, endpoint) for ``signal`` (TRACES or METRICS); a None endpoint defers to env.

    The signal-specific variables beat the generic ones, which beat the settings.
    """
    var = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    protocol = environ.get(var, "").strip()
    protocol = checked_protocol(var, protocol) if protocol else settings.otlp_protocol
    env_endpoint = (
        environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )
    endpoint = None if env_endpoint else settings.otlp_endpoint
    if endpoint is not None and protocol == "http/protobuf":
        endpoint = f"{endpoint.rstrip('/')}/v1/{signal.lower()}"
    return protocol, endpoint


def build_span_exporter(
    name: str, settings: TelemetrySettings, environ: Mapping[str, str]
) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter(service_name=settings.service_name)
    if name == "file":
        assert settings.file_path is not None  # TelemetrySettings checks it
        return JsonLinesSpanExporter(settings.file_path)
    assert name == "otlp", name
    protocol, endpoint = _otlp_target("TRACES", settings, environ)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter(endpoint=endpoint)


@dataclass
class PrometheusEndpoint:
    """The HTTP server exposing /metrics, and the port it got."""

    server: WSGIServer
    port: int

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the listening socket, as the kernel reports it."""
        host, port = self.server.socket.getsockname()[:2]
        return str(host), int(port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def build_metric_reader(
    name: str, settings: TelemetrySettings, environ: Mapping[str, str]
) -> tuple[MetricReader | None, PrometheusEndpoint | None]:
    """A reader for exporter ``name``; (None, None) when no Prometheus port could be bound.

    Metrics are observability, not service: a node out of ports logs an error and serves on.
    """
    if name == "otlp":
        protocol, endpoint = _otlp_target("METRICS", settings, environ)
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
                OTLPMetricExporter,
            )
        return PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint)), None
    assert name == "prometheus", name
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry

    # A registry of our own: only this process's OTel metrics, and no clash with another setup.
    registry = CollectorRegistry(auto_describe=True)
    server = start_prometheus_server(settings.prometheus_host, settings.prometheus_port, registry)
    if server is None:
        return None, None
    return PrometheusMetricReader(registry=registry), server


def start_prometheus_server(host: str, port: int, registry: Any) -> PrometheusEndpoint | None:
    """Serve ``registry`` on the first free port of port..port+32 (port 0: any free port)."""
    from prometheus_client import start_http_server

    last = port if port == 0 else min(port + PROMETHEUS_PORT_SPAN, 65535)
    for candidate in range(port, last + 1):
        try:
            server, _thread = start_http_server(candidate, addr=host, registry=registry)
        except OSError as err:
            logger.debug("Prometheus port %s:%d unavailable: %s", host, candidate, err)
            continue
        bound = server.server_address[1]
        note = "" if candidate == port else f" ({port}..{candidate - 1} taken)"
        logger.info("Prometheus metrics on http://%s:%d/metrics%s", host, bound, note)
        if not _is_loopback(host):
            logger.warning(
                "Prometheus /metrics on %s is reachable beyond this node, without "
                "authentication; set prometheus_host to 127.0.0.1 to keep it local",
                host,
            )
        return PrometheusEndpoint(server=server, port=bound)
    logger.error("no free Prometheus port in %s:%d..%d; metrics not exported", host, port, last)
    return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: "localhost" is the only one known to stay local
        return host == "localhost"
