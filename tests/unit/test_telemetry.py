"""cluster.telemetry.setup: settings and OTEL_* overrides, exporters (memory, file, OTLP/gRPC,
Prometheus), metric instruments and W3C context propagation. No Ray, no torch."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToJson
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cluster.telemetry.metrics import TTFT_BUCKETS
from cluster.telemetry.settings import TelemetrySettings, settings_from_env
from cluster.telemetry.setup import (
    TraceFileStats,
    context_from_traceparent,
    get_telemetry,
    read_spans,
    reset_telemetry,
    setup_telemetry,
    traceparent_of,
)
from tests import listening_sockets
from tests.loopback_grpc import loopback_grpc_server


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No OTEL_* from the developer's shell, and no telemetry left over between tests."""
    import os

    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    reset_telemetry()
    yield
    reset_telemetry()


# --- settings ---------------------------------------------------------------------------------


def test_env_overrides_win_over_settings() -> None:
    base = TelemetrySettings(
        service_name="svc",
        traces_exporter="file",
        file_path="/tmp/t.jsonl",
        otlp_endpoint="http://collector:4317",
        sample_ratio=0.5,
        prometheus_port=9000,
    )
    env = {
        "OTEL_SERVICE_NAME": "from-env",
        "OTEL_TRACES_EXPORTER": "otlp,console",
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "TraceIdRatio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_EXPORTER_PROMETHEUS_PORT": "9100",
    }
    got = settings_from_env(base, env)
    assert got.service_name == "from-env"
    assert got.traces_exporters == ("otlp", "console")
    assert got.metrics_exporters == ("prometheus",)
    assert got.otlp_endpoint is None  # left to the exporter, which reads the variable
    assert got.otlp_protocol == "http/protobuf"
    assert (got.sampler, got.sample_ratio) == ("traceidratio", 0.25)
    assert got.prometheus_port == 9100
    assert settings_from_env(base, {}) == base
    assert settings_from_env(base, {"OTEL_SERVICE_NAME": "  "}) == base


def test_sdk_disabled_turns_everything_off() -> None:
    base = TelemetrySettings(traces_exporter="console", metrics_exporter="prometheus")
    got = settings_from_env(base, {"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"})
    assert (got.traces_exporters, got.metrics_exporters) == ((), ())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin'"),
        ({"OTEL_METRICS_EXPORTER": "console"}, "allowed: ('prometheus', 'otlp', 'none')"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER='sometimes'"),
        ({"OTEL_TRACES_SAMPLER_ARG": "half"}, "OTEL_TRACES_SAMPLER_ARG='half' is not a number"),
        ({"OTEL_TRACES_SAMPLER_ARG": "2"}, "must be in [0, 1]"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_PROMETHEUS_PORT": "x"}, "not a port number"),
    ],
)
def test_bad_env_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as err:
        settings_from_env(TelemetrySettings(), env)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"traces_exporter": "jaeger"}, "allowed: ('otlp', 'file', 'console', 'none')"),
        ({"metrics_exporter": "statsd"}, "unknown exporter 'statsd'"),
        ({"traces_exporter": "none,otlp"}, "'none' cannot be combined"),
        ({"traces_exporter": "file"}, "needs file_path"),
        ({"sample_ratio": 1.5}, "sample_ratio=1.5 must be in [0, 1]"),
        ({"sampler": "maybe"}, "sampler='maybe'"),
        ({"otlp_endpoint": "collector:4317"}, "must be a URL"),
        ({"otlp_protocol": "udp"}, "otlp_protocol='udp'"),
        ({"prometheus_port": 70000}, "prometheus_port=70000"),
        ({"token_events": -1}, "token_events=-1"),
        ({"service_name": ""}, "service_name"),
        ({"prometheus_host": ""}, "prometheus_host='' must name an address"),
    ],
)
def test_invalid_settings_explain_themselves(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        TelemetrySettings(**kwargs)
    assert message in str(err.value)


# --- setup, resource, idempotence, no-op ------------------------------------------------------


def test_noop_until_set_up() -> None:
    telemetry = get_telemetry()
    assert not telemetry.tracing and not telemetry.metrics_enabled
    span = telemetry.tracer.start_span("x")
    assert not span.is_recording()
    telemetry.metrics.record_request("fast", "m", 0.1, None, 0.2, "stop")  # no-op, no error
    telemetry.metrics.add_kv_source("fast", lambda: (1, 2))
    assert telemetry.force_flush()


def test_in_memory_setup_resource_and_idempotence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test,node=env-node")
    exporter = InMemorySpanExporter()
    settings = TelemetrySettings(service_name="svc", resource_attributes=(("region", "eu"),))
    telemetry = setup_telemetry(
        settings,
        role="gateway",
        attributes={"node": "n1", "moe.tier": "fast"},
        span_exporter=exporter,
    )
    assert setup_telemetry(TelemetrySettings(), role="other") is telemetry
    assert get_telemetry() is telemetry and telemetry.tracing
    with telemetry.tracer.start_as_current_span("outer"), telemetry.tracer.start_span("inner"):
        pass
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["inner", "outer"]
    assert spans[0].parent is not None and spans[0].parent.span_id == spans[1].context.span_id
    resource = dict(spans[0].resource.attributes)
    assert resource["service.name"] == "svc"
    assert resource["moe.role"] == "gateway"
    assert resource["moe.tier"] == "fast" and resource["region"] == "eu"
    assert resource["node"] == "env-node"  # OTEL_RESOURCE_ATTRIBUTES wins over code
    assert resource["deployment.environment"] == "test"

    reset_telemetry()
    assert not get_telemetry().tracing


def test_otel_service_name_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ops-name")
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(TelemetrySettings(), role="tier", span_exporter=exporter)
    telemetry.tracer.start_span("s").end()
    assert telemetry.settings.service_name == "ops-name"
    assert exporter.get_finished_spans()[0].resource.attributes["service.name"] == "ops-name"


def test_sampler_from_settings_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(
        TelemetrySettings(sample_ratio=0.0), role="t", span_exporter=exporter
    )
    for _ in range(20):
        telemetry.tracer.start_span("dropped").end()
    assert exporter.get_finished_spans() == ()
    reset_telemetry()

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")  # env beats sample_ratio=0
    exporter = InMemorySpanExporter()  # the reset shut the first one down
    telemetry = setup_telemetry(
        TelemetrySettings(sample_ratio=0.0), role="t", span_exporter=exporter
    )
    telemetry.tracer.start_span("kept").end()
    assert [s.name for s in exporter.get_finished_spans()] == ["kept"]


# --- JSON-lines file exporter -----------------------------------------------------------------


def test_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "traces.jsonl"
    settings = TelemetrySettings(traces_exporter="file", file_path=str(path))
    telemetry = setup_telemetry(settings, role="gateway", attributes={"node": "n1"})
    tracer = telemetry.tracer
    root = tracer.start_span(
        "text_completion m",
        kind=trace.SpanKind.SERVER,
        start_time=1_000,
        attributes={"moe.tier": "fast", "moe.escalated": True, "gen_ai.usage.output_tokens": 3},
    )
    child = tracer.start_span(
        "moe.decode", context=trace.set_span_in_context(root), start_time=2_000
    )
    child.set_attribute("moe.routing.layers", [1, 3])
    child.set_attribute("gen_ai.response.finish_reasons", ["stop"])
    child.add_event("moe.token", {"moe.token.index": 0, "moe.token.routing": [4, 5]}, 2_500)
    child.add_event("moe.token", {"moe.token.index": 1, "moe.token.itl_s": 0.25}, 2_750)
    child.set_status(trace.Status(trace.StatusCode.ERROR, "boom"))
    child.end(end_time=3_000)
    root.end(end_time=4_000)
    assert telemetry.force_flush()

    line = json.loads(path.read_text().splitlines()[0])
    wire = line["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert len(wire["traceId"]) == 32 and int(wire["traceId"], 16)  # hex, as OTLP/JSON says

    stats = TraceFileStats()
    spans = {s.name: s for s in read_spans(path, stats=stats)}
    assert (stats.num_spans, stats.num_malformed) == (2, 0)
    read_root, read_child = spans["text_completion m"], spans["moe.decode"]
    ctx = root.get_span_context()
    assert read_root.trace_id == trace.format_trace_id(ctx.trace_id)
    assert read_root.span_id == trace.format_span_id(ctx.span_id)
    assert read_root.parent_span_id == "" and read_child.parent_span_id == read_root.span_id
    assert read_root.kind == "SERVER" and read_child.kind == "INTERNAL"
    assert (read_root.start_ns, read_root.end_ns, read_root.duration_s) == (1_000, 4_000, 3e-6)
    assert read_root.attributes == {
        "moe.tier": "fast",
        "moe.escalated": True,
        "gen_ai.usage.output_tokens": 3,
    }
    assert read_child.attributes["moe.routing.layers"] == [1, 3]
    assert read_child.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert [tuple(e) for e in read_child.events] == [
        ("moe.token", 2_500, {"moe.token.index": 0, "moe.token.routing": [4, 5]}),
        ("moe.token", 2_750, {"moe.token.index": 1, "moe.token.itl_s": 0.25}),
    ]
    assert (read_child.status, read_child.status_message) == ("ERROR", "boom")
    assert read_root.status == "UNSET"
    assert read_root.resource["moe.role"] == "gateway" and read_root.resource["node"] == "n1"


def test_reader_skips_malformed_lines_and_reads_base64_ids(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(TelemetrySettings(), role="t", span_exporter=exporter)
    telemetry.tracer.start_span("plain", attributes={"k": 1.5}).end()
    finished = exporter.get_finished_spans()
    # Plain protobuf JSON (base64 ids, enum names) must read the same as the Collector's form.
    plain = MessageToJson(encode_spans(finished), indent=None)
    path = tmp_path / "t.jsonl"
    path.write_text(f'{plain}\nnot json\n{{"foo": 1}}\n\n{plain[:40]}\n')
    stats = TraceFileStats()
    spans = list(read_spans(path, stats=stats))
    assert [s.name for s in spans] == ["plain"]
    assert spans[0].span_id == trace.format_span_id(finished[0].context.span_id)
    assert spans[0].attributes == {"k": 1.5}
    assert (stats.num_lines, stats.num_malformed, stats.malformed_lines) == (4, 3, [2, 3, 5])
    with pytest.raises(FileNotFoundError):
        list(read_spans(tmp_path / "missing.jsonl"))


# --- metrics ------------------------------------------------------------------------------------


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, list[Any]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = list(metric.data.data_points)
    return out


def test_metrics_instruments_and_attributes() -> None:
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry(TelemetrySettings(), role="tier", metric_reader=reader)
    assert telemetry.metrics_enabled and not telemetry.tracing
    m = telemetry.metrics
    m.record_request("strong", "mixtral", 0.05, 0.01, 0.5, "stop")
    m.record_request("strong", "mixtral", 0.07, None, 0.6, "length")
    m.record_routing("strong", {(1, 3): 5, (1, 4): 0, (2, 0): 2})
    m.record_dispatch("strong", "shard-1", 0.003)
    m.record_prefix("strong", looked_up=100, hit=40)
    m.record_evictions("strong", 3)
    m.record_truncation("strong", 7)
    m.record_escalation("fast", "strong")
    m.record_shadow_divergence("strong", 0.2)
    m.add_kv_source("strong", lambda: (12, 64))

    def broken() -> tuple[int, int]:
        raise RuntimeError("pool gone")

    m.add_kv_source("fast", broken)  # logged and skipped, the other tier still reports
    points = _points(reader)

    ttft = points["gen_ai.server.time_to_first_token"]
    assert len(ttft) == 1 and ttft[0].count == 2
    assert dict(ttft[0].attributes) == {"gen_ai.request.model": "mixtral", "moe.tier": "strong"}
    assert tuple(ttft[0].explicit_bounds) == TTFT_BUCKETS
    assert points["gen_ai.server.time_per_output_token"][0].count == 1
    reasons = {p.attributes["moe.finish_reason"] for p in points["gen_ai.server.request.duration"]}
    assert reasons == {"stop", "length"}
    routed = {
        (p.attributes["moe.layer"], p.attributes["moe.expert"]): p.value
        for p in points["moe.routed_tokens"]
    }
    assert routed == {(1, 3): 5, (2, 0): 2}
    assert dict(points["moe.shard.dispatch.duration"][0].attributes) == {
        "moe.tier": "strong",
        "moe.shard": "shard-1",
    }
    assert points["moe.kv.prefix_lookup_tokens"][0].value == 100
    assert points["moe.kv.prefix_hit_tokens"][0].value == 40
    assert points["moe.kv.evicted_blocks"][0].value == 3
    assert points["moe.kv.truncated_tokens"][0].value == 7
    assert dict(points["moe.escalations"][0].attributes) == {
        "moe.from_tier": "fast",
        "moe.to_tier": "strong",
    }
    assert points["moe.shadow.divergence"][0].sum == pytest.approx(0.2)
    assert [(dict(p.attributes), p.value) for p in points["moe.kv.blocks_in_use"]] == [
        ({"moe.tier": "strong"}, 12)
    ]
    assert points["moe.kv.blocks_total"][0].value == 64


def test_prometheus_skips_a_taken_port() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        settings = TelemetrySettings(
            metrics_exporter="prometheus", prometheus_host="127.0.0.1", prometheus_port=taken
        )
        telemetry = setup_telemetry(settings, role="tier", attributes={"moe.tier": "fast"})
        port = telemetry.prometheus_port
        assert port is not None and taken < port <= taken + 32
        telemetry.metrics.record_escalation("fast", "strong")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
    assert 'moe_escalations_total{moe_from_tier="fast",moe_to_tier="strong"' in body


@pytest.mark.skipif(not listening_sockets.available(), reason="needs Linux /proc")
def test_prometheus_listens_on_loopback_unless_configured() -> None:
    assert TelemetrySettings().prometheus_host == "127.0.0.1"
    settings = TelemetrySettings(metrics_exporter="prometheus", prometheus_port=0)
    telemetry = setup_telemetry(settings, role="tier")
    port = telemetry.prometheus_port
    assert port is not None and telemetry.prometheus_address == ("127.0.0.1", port)
    assert {a for a, p in listening_sockets.listening() if p == port} == {"127.0.0.1"}


@pytest.mark.skipif(not listening_sockets.available(), reason="needs Linux /proc")
def test_prometheus_host_is_taken_from_the_settings_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = TelemetrySettings(
        metrics_exporter="prometheus", prometheus_host="127.0.0.2", prometheus_port=0
    )
    address = setup_telemetry(settings, role="tier").prometheus_address
    assert address is not None and address[0] == "127.0.0.2"
    assert ("127.0.0.2", address[1]) in listening_sockets.listening()
    reset_telemetry()
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.3")
    address = setup_telemetry(settings, role="tier").prometheus_address
    assert address is not None and address[0] == "127.0.0.3"


# --- propagation --------------------------------------------------------------------------------


def test_traceparent_round_trip() -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(TelemetrySettings(), role="gateway", span_exporter=exporter)
    parent = telemetry.tracer.start_span("gateway")
    header = traceparent_of(parent)
    ctx = parent.get_span_context()
    version, trace_id, span_id, flags = header.split("-")
    assert (version, trace_id, span_id) == ("00", f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert int(flags, 16) & 1  # sampled (the SDK may also set W3C's "random" bit)
    remote = context_from_traceparent(header)
    assert remote is not None
    telemetry.tracer.start_span("replica", context=remote).end()
    parent.end()
    child = exporter.get_finished_spans()[0]
    assert child.context.trace_id == ctx.trace_id
    assert child.parent is not None and child.parent.span_id == ctx.span_id
    for bad in ("", "garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"):
        assert context_from_traceparent(bad) is None
    assert traceparent_of(trace.INVALID_SPAN) == ""


# --- OTLP/gRPC ----------------------------------------------------------------------------------


class _Collector(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    def __init__(self) -> None:
        self.traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.traces.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()
            self.metrics.append(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()


def test_otlp_grpc_export_reaches_a_receiver() -> None:
    collector = _Collector()
    with loopback_grpc_server(
        lambda s: trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, s),
        lambda s: metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, s),
    ) as port:
        settings = TelemetrySettings(
            traces_exporter="otlp",
            metrics_exporter="otlp",
            otlp_endpoint=f"http://127.0.0.1:{port}",
        )
        telemetry = setup_telemetry(settings, role="gateway", attributes={"node": "n1"})
        telemetry.tracer.start_span("text_completion m", attributes={"moe.tier": "fast"}).end()
        telemetry.metrics.record_escalation("fast", "strong")
        assert telemetry.force_flush(10_000)
        reset_telemetry()
    spans = [
        (span, rs.resource)
        for request in collector.traces
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    assert len(spans) == 1
    span, resource = spans[0]
    assert span.name == "text_completion m"
    assert {a.key: a.value.string_value for a in span.attributes} == {"moe.tier": "fast"}
    assert {a.key: a.value.string_value for a in resource.attributes}["moe.role"] == "gateway"
    names = {
        metric.name
        for request in collector.metrics
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }
    assert "moe.escalations" in names
