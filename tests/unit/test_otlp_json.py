"""cluster.telemetry.otlp_json: the direct OTLP/JSON encoder writes what the protobuf path
(``encode_spans`` + ``MessageToDict`` + hex ids) writes, for every kind of field and value."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, TraceFlags, TraceState

from cluster.telemetry.otlp_json import any_value, encode_line, encode_request, value_text

_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _oracle(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """The protobuf path the file exporter used before, ids rewritten to hex."""
    request = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    for resource_spans in request.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for holder in (span, *span.get("links", [])):
                    for key in _ID_FIELDS:
                        if key in holder:
                            holder[key] = base64.b64decode(holder[key]).hex()
    return request


def _finished(
    build: Any, resource: Resource | None = None, scope: str = "moe-cluster"
) -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource or Resource.create({"moe.role": "t"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    build(provider.get_tracer(scope, "1.2", schema_url="https://example/s"))
    provider.shutdown()
    return list(exporter.get_finished_spans())


def _same_as_oracle(spans: Sequence[ReadableSpan]) -> None:
    oracle = _oracle(spans)
    assert encode_request(spans) == oracle
    # field order and number formats too: the very line the protobuf path wrote
    assert encode_line(spans) == json.dumps(oracle, separators=(",", ":"))


def test_every_field_matches_the_protobuf_path() -> None:
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1))
    linked = SpanContext(0x123, 0x456, is_remote=False, trace_state=TraceState([("k", "v")]))

    def build(tracer: trace.Tracer) -> None:
        root = tracer.start_span(
            "root",
            context=trace.set_span_in_context(trace.NonRecordingSpan(remote)),
            kind=trace.SpanKind.SERVER,
            start_time=10,
            attributes={"s": "x", "i": 7, "zero": 0, "f": 0.5, "b": True, "neg": -3},
            links=[Link(linked, {"why": "shadow"}), Link(remote)],
        )
        child = tracer.start_span("child", context=trace.set_span_in_context(root), start_time=11)
        child.set_attribute("ints", [1, 2, 3])
        child.set_attribute("strs", ("a", ""))
        child.set_attribute("floats", [1.0, 2.5])
        child.set_attribute("bools", [True, False])
        child.set_attribute("empty_str", "")
        child.set_attribute("big", 2**62)
        child.add_event("moe.token", {"moe.token.index": 0, "moe.token.routing": [4, 5]}, 12)
        child.add_event("moe.token", {"moe.token.itl_s": 0.25}, 13)
        child.add_event("bare", timestamp=14)
        child.set_status(trace.Status(trace.StatusCode.ERROR, "boom"))
        child.end(end_time=20)
        ok = tracer.start_span("ok", kind=trace.SpanKind.CLIENT)
        ok.set_status(trace.Status(trace.StatusCode.OK))
        ok.end()
        for kind in (trace.SpanKind.PRODUCER, trace.SpanKind.CONSUMER):
            tracer.start_span(kind.name, kind=kind).end()
        root.end(end_time=30)

    _same_as_oracle(_finished(build))


def test_events_and_attributes_over_the_limits_count_what_was_dropped() -> None:
    def build(tracer: trace.Tracer) -> None:
        span = tracer.start_span("many")
        for i in range(200):  # the SDK keeps 128 of each by default
            span.set_attribute(f"a{i}", i)
            span.add_event("e", {f"k{j}": j for j in range(i % 3)}, timestamp=i + 1)
        span.end()

    spans = _finished(build)
    assert spans[0].dropped_events and spans[0].dropped_attributes
    _same_as_oracle(spans)


def test_spans_of_several_resources_and_scopes_group_in_first_seen_order() -> None:
    first = _finished(lambda t: t.start_span("a").end(), Resource.create({"n": "1"}))
    second = _finished(lambda t: t.start_span("b").end(), Resource.create({"n": "2"}), "other")
    third = _finished(lambda t: t.start_span("c").end(), Resource.create({"n": "1"}))
    spans = [*first, *second, *third]
    _same_as_oracle(spans)
    assert [len(r["scopeSpans"]) for r in encode_request(spans)["resourceSpans"]] == [1, 1]


def test_values_outside_the_sdk_types() -> None:
    assert any_value(None) == {}
    assert any_value(b"\x01\x02") == {"bytesValue": "AQI="}
    assert any_value(math.nan) == {"doubleValue": "NaN"}
    assert any_value(-math.inf) == {"doubleValue": "-Infinity"}
    assert any_value({"k": [1]}) == {
        "kvlistValue": {
            "values": [{"key": "k", "value": {"arrayValue": {"values": [{"intValue": "1"}]}}}]
        }
    }
    assert any_value([]) == {"arrayValue": {}}
    assert any_value(b"") == {"bytesValue": ""}
    assert any_value(range(2)) == {"arrayValue": {"values": [{"intValue": "0"}, {"intValue": "1"}]}}


@pytest.mark.parametrize(
    "value",
    [0, 4095, 4096, -1, 2**63 - 1, "", "é\n\"", 0.1, 1e300, -0.0, 3.0, math.nan, math.inf, True,
     False, [1, 2], (5000, -2), ["a"], [0.5, 2.0], [True], [], (), None, b"\x00", range(2),
     {"k": 1}],
)  # fmt: skip
def test_text_values_are_the_dicts_json(value: Any) -> None:
    assert value_text(value) == json.dumps(any_value(value), separators=(",", ":"))


def test_no_spans_is_an_empty_request() -> None:
    assert encode_request([]) == {"resourceSpans": []}
