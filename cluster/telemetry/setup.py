"""OpenTelemetry for one process of the cluster: settings, exporters, and the process's tracer.

Each process (driver, gateway replica, tier replica, shard pool) calls ``setup_telemetry`` once
with its role; later calls return the same ``Telemetry``, because a Ray actor may build several
objects that each ask for it. Code that only records asks ``get_telemetry()``, which is a no-op
``Telemetry`` until something was set up, so instrumentation never checks whether it is on.

The standard ``OTEL_*`` environment variables win over ``TelemetrySettings``, as with any
OpenTelemetry SDK, so an SRE can redirect or silence a deployment without editing its config:
``OTEL_SDK_DISABLED``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_EXPORTER`` (otlp, console, none, and our ``file``), ``OTEL_METRICS_EXPORTER``
(otlp, prometheus, none), ``OTEL_EXPORTER_OTLP[_TRACES|_METRICS]_ENDPOINT`` and ``_PROTOCOL``,
``OTEL_TRACES_SAMPLER`` with ``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_EXPORTER_PROMETHEUS_HOST`` and
``_PORT``, and the SDK's own ``OTEL_BSP_*`` / ``OTEL_METRIC_EXPORT_*`` tuning variables. The
Prometheus endpoint listens on 127.0.0.1 unless ``prometheus_host`` (or the variable) says
otherwise.

The providers are kept here and never installed as the API's global providers: the API lets a
process set those only once, which would pin tests (and any re-setup) to the first provider.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import NoOpMeter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cluster.telemetry.exporters import (
    PrometheusEndpoint,
    build_metric_reader,
    build_sampler,
    build_span_exporter,
)
from cluster.telemetry.metrics import Metrics
from cluster.telemetry.settings import TelemetrySettings, settings_from_env
from cluster.telemetry.span_batch import SpanBatcher, SpanFactory
from cluster.telemetry.trace_file import (
    JsonLinesSpanExporter,
    SpanEvent,
    SpanRecord,
    TraceFileStats,
    read_spans,
)

__all__ = [
    "JsonLinesSpanExporter",
    "Metrics",
    "SpanEvent",
    "SpanRecord",
    "Telemetry",
    "TraceFileStats",
    "context_from_traceparent",
    "get_telemetry",
    "read_spans",
    "reset_telemetry",
    "setup_telemetry",
    "traceparent_of",
]

logger = logging.getLogger(__name__)

SCOPE_NAME = "moe-cluster"


class Telemetry:
    """A process's tracer and metrics, and the providers to flush and shut down."""

    def __init__(
        self,
        settings: TelemetrySettings,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        prometheus: PrometheusEndpoint | None = None,
        span_processors: Sequence[SpanProcessor] = (),
    ) -> None:
        self.settings = settings
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._prometheus = prometheus
        self.tracer: trace.Tracer = (
            tracer_provider.get_tracer(SCOPE_NAME) if tracer_provider else trace.NoOpTracer()
        )
        # spans of hot paths: recorded as plain data, built and exported off the caller's thread
        self.span_factory: SpanFactory | None = None
        self.span_batcher: SpanBatcher | None = None
        if tracer_provider is not None:
            self.span_factory = SpanFactory(
                tracer_provider.resource,
                InstrumentationScope(SCOPE_NAME),
                tracer_provider.sampler,
                tracer_provider.id_generator,
            )
            self.span_batcher = SpanBatcher(span_processors)
        meter = meter_provider.get_meter(SCOPE_NAME) if meter_provider else NoOpMeter(SCOPE_NAME)
        self.metrics = Metrics(meter)

    @property
    def tracing(self) -> bool:
        """False when spans go nowhere: instrumentation can skip building costly attributes."""
        return self._tracer_provider is not None

    @property
    def metrics_enabled(self) -> bool:
        """False when metrics go nowhere: callers can skip measuring (e.g. per-shard timing)."""
        return self._meter_provider is not None

    @property
    def prometheus_port(self) -> int | None:
        """The port actually serving /metrics (the configured one may have been taken)."""
        return self._prometheus.port if self._prometheus else None

    @property
    def prometheus_address(self) -> tuple[str, int] | None:
        """(host, port) that /metrics listens on, read from the bound socket."""
        return self._prometheus.address if self._prometheus else None

    @property
    def resource(self) -> Resource | None:
        return self._tracer_provider.resource if self._tracer_provider else None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export everything recorded so far, the batched spans first."""
        ok = True
        if self.span_batcher is not None:
            self.span_batcher.flush()
        if self._tracer_provider is not None:
            ok = self._tracer_provider.force_flush(timeout_millis) and ok
        if self._meter_provider is not None:
            ok = self._meter_provider.force_flush(timeout_millis) and ok
        return ok

    def shutdown(self) -> None:
        if self.span_batcher is not None:
            self.span_batcher.shutdown()
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()
        if self._prometheus is not None:
            self._prometheus.close()


_lock = threading.Lock()
_current: Telemetry | None = None
_noop: Telemetry | None = None


def setup_telemetry(
    settings: TelemetrySettings,
    *,
    role: str,
    attributes: Mapping[str, str] | None = None,
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
) -> Telemetry:
    """Start this process's telemetry, or return what an earlier call started.

    ``role`` (gateway, tier, experts, driver) and ``attributes`` (node, tier, replica) go on the
    resource, so every span and metric says where it came from. ``span_exporter`` (exported
    synchronously) and ``metric_reader`` are added to the configured ones; tests pass
    in-memory ones.
    """
    global _current
    with _lock:
        effective = settings_from_env(settings, os.environ)
        if _current is not None:
            if _current.settings != effective:
                logger.warning("telemetry already set up; ignoring different settings %s", settings)
            return _current
        resource = _resource(effective, role, attributes or {})
        tracer_provider, processors = _tracer_provider(effective, resource, span_exporter)
        readers: list[MetricReader] = [] if metric_reader is None else [metric_reader]
        prometheus = None
        for name in effective.metrics_exporters:
            reader, endpoint = build_metric_reader(name, effective, os.environ)
            if reader is not None:
                readers.append(reader)
            prometheus = endpoint or prometheus
        meter_provider = None
        if readers:
            meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        _current = Telemetry(
            effective,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            prometheus=prometheus,
            span_processors=processors,
        )
        # after the provider's own exit hook, so it runs first (LIFO): batched spans reach
        # the processors before they shut down
        atexit.unregister(_flush_at_exit)
        atexit.register(_flush_at_exit)
        return _current


def _flush_at_exit() -> None:
    current = _current
    if current is not None and current.span_batcher is not None:
        current.span_batcher.flush()


def get_telemetry() -> Telemetry:
    """The process's telemetry, or a shared no-op one when ``setup_telemetry`` was not called."""
    global _noop
    current = _current
    if current is not None:
        return current
    if _noop is None:
        _noop = Telemetry(TelemetrySettings())
    return _noop


def reset_telemetry() -> None:
    """Shut down and forget the process's telemetry, so tests can set up another."""
    global _current
    with _lock:
        if _current is not None:
            _current.shutdown()
        _current = None


def _resource(settings: TelemetrySettings, role: str, attributes: Mapping[str, str]) -> Resource:
    ours: dict[str, Any] = {
        "service.name": settings.service_name,
        "moe.role": role,
        **attributes,
        **dict(settings.resource_attributes),
    }
    # Resource.create lets explicit attributes beat OTEL_RESOURCE_ATTRIBUTES; merging the env
    # detector's resource last restores the precedence users of the SDK expect.
    return Resource.create(ours).merge(OTELResourceDetector().detect())


def _tracer_provider(
    settings: TelemetrySettings, resource: Resource, injected: SpanExporter | None
) -> tuple[TracerProvider | None, list[SpanProcessor]]:
    processors: list[SpanProcessor] = []
    for name in settings.traces_exporters:
        exporter = build_span_exporter(name, settings, os.environ)
        # Console output is for a human watching; batching would only delay it.
        simple = name == "console"
        processors.append(SimpleSpanProcessor(exporter) if simple else BatchSpanProcessor(exporter))
    if injected is not None:
        processors.append(SimpleSpanProcessor(injected))
    if not processors:
        return None, []
    provider = TracerProvider(resource=resource, sampler=build_sampler(settings))
    for processor in processors:
        provider.add_span_processor(processor)
    return provider, processors


_PROPAGATOR = TraceContextTextMapPropagator()


def traceparent_of(span: trace.Span) -> str:
    """The W3C ``traceparent`` header for ``span``; "" when the span is not recorded anywhere.

    Passed in typed messages between actors, so a replica's spans join the gateway's trace.
    """
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def context_from_traceparent(traceparent: str) -> Context | None:
    """A context whose current span is the remote parent, or None for a missing/invalid header."""
    if not traceparent:
        return None
    return _parsed_traceparent(traceparent)


@functools.lru_cache(maxsize=1024)
def _parsed_traceparent(traceparent: str) -> Context | None:
    # cached: a traced step's traceparent comes back for every shard call of a layer, and
    # contexts are immutable, so one parse serves them all
    context = _PROPAGATOR.extract({"traceparent": traceparent})
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def span_context_of(traceparent: str) -> trace.SpanContext | None:
    """The remote parent a ``traceparent`` names, or None for a missing/invalid header."""
    context = context_from_traceparent(traceparent)
    return None if context is None else trace.get_current_span(context).get_span_context()


def traceparent_for(context: trace.SpanContext) -> str:
    """The ``traceparent`` of a span known only by its context (a span still to be built)."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
