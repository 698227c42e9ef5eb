"""What a process's telemetry exports: ``TelemetrySettings`` and the ``OTEL_*`` variables over it.

The standard ``OTEL_*`` environment variables win over ``TelemetrySettings``, as with any
OpenTelemetry SDK (see ``cluster.telemetry.setup``). This module only parses and checks names
and values; ``exporters`` builds what they name and ``setup`` starts it, both importing from
here, so the settings never import the exporters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

TRACES_EXPORTERS = ("otlp", "file", "console", "none")
METRICS_EXPORTERS = ("prometheus", "otlp", "none")
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
# The OTEL_TRACES_SAMPLER names of the SDK; ``exporters.SAMPLERS`` builds each.
SAMPLER_NAMES = (
    "always_on",
    "always_off",
    "parentbased_always_on",
    "parentbased_always_off",
    "traceidratio",
    "parentbased_traceidratio",
)


def parse_exporter_names(value: str, field: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """Parse a comma-separated exporter list, as OTEL_*_EXPORTER allows; "none" alone is empty."""
    names = tuple(n.strip().lower() for n in value.split(",") if n.strip())
    for name in names:
        if name not in allowed:
            raise ValueError(f"{field}={value!r}: unknown exporter {name!r}; allowed: {allowed}")
    if "none" in names and len(names) > 1:
        raise ValueError(f"{field}={value!r}: 'none' cannot be combined with other exporters")
    return tuple(n for n in names if n != "none")


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``TelemetrySettings`` fields that ``environ``'s OTEL_* variables set."""

    def get(name: str) -> str | None:
        return environ.get(name, "").strip() or None

    if (get("OTEL_SDK_DISABLED") or "").lower() == "true":
        return {"traces_exporter": "none", "metrics_exporter": "none"}
    out: dict[str, Any] = {}
    if value := get("OTEL_SERVICE_NAME"):
        out["service_name"] = value
    if value := get("OTEL_TRACES_EXPORTER"):
        parse_exporter_names(value, "OTEL_TRACES_EXPORTER", TRACES_EXPORTERS)
        out["traces_exporter"] = value
    if value := get("OTEL_METRICS_EXPORTER"):
        parse_exporter_names(value, "OTEL_METRICS_EXPORTER", METRICS_EXPORTERS)
        out["metrics_exporter"] = value
    if get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        out["otlp_endpoint"] = None  # the exporters read it themselves (and add /v1/* paths)
    if value := get("OTEL_EXPORTER_OTLP_PROTOCOL"):
        out["otlp_protocol"] = checked_protocol("OTEL_EXPORTER_OTLP_PROTOCOL", value)
    if value := get("OTEL_TRACES_SAMPLER"):
        if value.lower() not in SAMPLER_NAMES:
            raise ValueError(f"OTEL_TRACES_SAMPLER={value!r}; allowed: {SAMPLER_NAMES}")
        out["sampler"] = value.lower()
    if value := get("OTEL_TRACES_SAMPLER_ARG"):
        try:
            ratio = float(value)
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={value!r} is not a number") from None
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={value!r} must be in [0, 1]")
        out["sample_ratio"] = ratio
    if value := get("OTEL_EXPORTER_PROMETHEUS_HOST"):
        out["prometheus_host"] = value
    if value := get("OTEL_EXPORTER_PROMETHEUS_PORT"):
        if not value.isdigit():
            raise ValueError(f"OTEL_EXPORTER_PROMETHEUS_PORT={value!r} is not a port number")
        out["prometheus_port"] = int(value)
    return out


def checked_protocol(var: str, value: str) -> str:
    if value not in OTLP_PROTOCOLS:
        raise ValueError(f"{var}={value!r}; allowed: {OTLP_PROTOCOLS}")
    return value


@dataclass(frozen=True)
class TelemetrySettings:
    """What a process exports; ``OTEL_*`` variables override it (see the module docstring)."""

    service_name: str = "moe-cluster"
    traces_exporter: str = "none"  # otlp | file | console | none, or a comma-separated list
    otlp_endpoint: str | None = None  # None: the exporter's env variable or its default
    otlp_protocol: str = "grpc"  # grpc (port 4317) | http/protobuf (port 4318)
    file_path: str | None = None  # JSON-lines trace file, for traces_exporter="file"
    sampler: str = "parentbased_traceidratio"
    sample_ratio: float = 1.0  # fraction of new traces kept by the ratio samplers
    metrics_exporter: str = "none"  # prometheus | otlp | none, or a comma-separated list
    # this node only unless configured: a scraper on another node needs the node's address
    # (or 0.0.0.0, every interface); /metrics has no authentication
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int = 9464  # first port tried; taken ports are skipped, up to +32
    record_text: bool = False  # put prompt and completion text on spans
    token_events: int = 256  # most per-token span events per request; 0 = none
    dispatch_spans: int = 8  # most expert-dispatch spans (per MoE layer call) per request
    resource_attributes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.service_name:
            raise ValueError("service_name must not be empty")
        traces = parse_exporter_names(self.traces_exporter, "traces_exporter", TRACES_EXPORTERS)
        parse_exporter_names(self.metrics_exporter, "metrics_exporter", METRICS_EXPORTERS)
        if "file" in traces and not self.file_path:
            raise ValueError(f"traces_exporter={self.traces_exporter!r} needs file_path")
        if self.otlp_endpoint is not None and "://" not in self.otlp_endpoint:
            raise ValueError(
                f"otlp_endpoint={self.otlp_endpoint!r} must be a URL such as "
                "http://127.0.0.1:4317 (http:// means no TLS)"
            )
        if self.otlp_protocol not in OTLP_PROTOCOLS:
            raise ValueError(f"otlp_protocol={self.otlp_protocol!r}; allowed: {OTLP_PROTOCOLS}")
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"sampler={self.sampler!r}; allowed: {SAMPLER_NAMES}")
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio={self.sample_ratio!r} must be in [0, 1]")
        if not self.prometheus_host.strip():  # "" would bind every interface
            raise ValueError(
                f"prometheus_host={self.prometheus_host!r} must name an address "
                "(127.0.0.1: this node only; 0.0.0.0: every interface)"
            )
        if not 0 <= self.prometheus_port <= 65535:
            raise ValueError(f"prometheus_port={self.prometheus_port!r} must be in [0, 65535]")
        if self.token_events < 0:
            raise ValueError(f"token_events={self.token_events!r} must be >= 0")
        if self.dispatch_spans < 0:
            raise ValueError(f"dispatch_spans={self.dispatch_spans!r} must be >= 0")
        for pair in self.resource_attributes:
            if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
                raise ValueError(f"resource_attributes: {pair!r} is not a (key, value) pair")

    @property
    def traces_exporters(self) -> tuple[str, ...]:
        return parse_exporter_names(self.traces_exporter, "traces_exporter", TRACES_EXPORTERS)

    @property
    def metrics_exporters(self) -> tuple[str, ...]:
        return parse_exporter_names(self.metrics_exporter, "metrics_exporter", METRICS_EXPORTERS)


def settings_from_env(base: TelemetrySettings, environ: Mapping[str, str]) -> TelemetrySettings:
    """``base`` with the standard ``OTEL_*`` variables of ``environ`` applied (they win).

    Bad values raise ``ValueError`` naming the variable: a typo that silently turned tracing
    off would only be noticed when the traces are needed. ``OTEL_RESOURCE_ATTRIBUTES`` is
    left to the SDK's resource detector, which ``setup_telemetry`` runs last.
    """
    return replace(base, **env_overrides(environ))
