"""Finished spans as an OTLP/JSON ``ExportTraceServiceRequest``, built straight from the SDK spans.

The file exporter once went SDK span -> protobuf message (``encode_spans``) -> dict
(``MessageToDict``) -> ids rewritten to hex: a pure-Python walk over every field of every
message, about 1 ms per span carrying a request's token events, on the exporting thread, holding
the GIL the engine thread needs. Here the dict is built in one pass, with the same output: the
protobuf-JSON mapping the OpenTelemetry Collector's file exporter writes (camelCase fields in
field-number order, enums as integers, 64-bit integers as strings, ids as lowercase hex, default
values left out). ``tests/unit/test_otlp_json.py`` holds it to the protobuf path, field for field.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

logger = logging.getLogger(__name__)

_FLAGS_HAS_IS_REMOTE = 0x100  # SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_FLAGS_IS_REMOTE = 0x200  # SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_NUM_SMALL_INTS = 4096
_SMALL_INTS = tuple({"intValue": str(i)} for i in range(_NUM_SMALL_INTS))
_DOUBLE_WORDS = {math.inf: "Infinity", -math.inf: "-Infinity"}

Json = dict[str, Any]


def encode_request(spans: Sequence[ReadableSpan]) -> Json:
    """``spans`` grouped by resource, then instrumentation scope, in first-seen order."""
    groups: dict[int, tuple[Resource, dict[int, tuple[InstrumentationScope | None, list[Json]]]]]
    groups = {}
    for span in spans:
        resource = span.resource
        scope = span.instrumentation_scope or None
        _, scopes = groups.setdefault(id(resource), (resource, {}))
        scopes.setdefault(id(scope), (scope, []))[1].append(encode_span(span))
    resource_spans = []
    for resource, scopes in _merge_equal(groups):
        entry: Json = {"resource": _resource(resource), "scopeSpans": []}
        for scope, encoded in _merge_equal(scopes):
            scope_spans: Json = {"scope": _scope(scope), "spans": encoded}
            if scope is not None and scope.schema_url:
                scope_spans["schemaUrl"] = scope.schema_url
            entry["scopeSpans"].append(scope_spans)
        if resource.schema_url:
            entry["schemaUrl"] = resource.schema_url
        resource_spans.append(entry)
    return {"resourceSpans": resource_spans}


def _merge_equal(groups: Mapping[int, tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Groups keyed by object identity, merged where distinct objects are equal (rare)."""
    out: list[tuple[Any, Any]] = []
    for key, items in groups.values():
        for i, (seen, seen_items) in enumerate(out):
            if seen is key or seen == key:
                merged = _merged(seen_items, items)
                out[i] = (seen, merged)
                break
        else:
            out.append((key, items))
    return out


def _merged(a: Any, b: Any) -> Any:
    if isinstance(a, list):
        return a + b
    merged = dict(a)
    for key, (scope, spans) in b.items():
        merged[key] = (scope, merged[key][1] + spans) if key in merged else (scope, spans)
    return merged


def encode_span(span: ReadableSpan) -> Json:
    context = span.get_span_context()
    assert context is not None, f"span {span.name!r} has no context"
    out: Json = {"traceId": f"{context.trace_id:032x}", "spanId": f"{context.span_id:016x}"}
    if context.trace_state:
        out["traceState"] = ",".join(f"{k}={v}" for k, v in context.trace_state.items())
    parent = span.parent
    if parent is not None:
        out["parentSpanId"] = f"{parent.span_id:016x}"
    if span.name:
        out["name"] = span.name
    out["kind"] = span.kind.value + 1  # the SDK's INTERNAL is 0, OTLP's SPAN_KIND_INTERNAL is 1
    if span.start_time:
        out["startTimeUnixNano"] = str(span.start_time)
    if span.end_time:
        out["endTimeUnixNano"] = str(span.end_time)
    if span.attributes:
        out["attributes"] = attributes(span.attributes)
    if span.dropped_attributes:
        out["droppedAttributesCount"] = span.dropped_attributes
    if span.events:
        out["events"] = [
            _event(e.name, e.timestamp, e.attributes, e.dropped_attributes) for e in span.events
        ]
    if span.dropped_events:
        out["droppedEventsCount"] = span.dropped_events
    if span.links:
        out["links"] = [
            _link(link.context, link.attributes, link.dropped_attributes) for link in span.links
        ]
    if span.dropped_links:
        out["droppedLinksCount"] = span.dropped_links
    if span.status is not None:
        status: Json = {}  # field 2 (message) before field 3 (code)
        if span.status.description:
            status["message"] = span.status.description
        if span.status.status_code.value:
            status["code"] = span.status.status_code.value
        out["status"] = status
    out["flags"] = _flags(parent)
    return out


def _flags(context: SpanContext | None) -> int:
    if context is not None and context.is_remote:
        return _FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE
    return _FLAGS_HAS_IS_REMOTE


def _event(name: str, timestamp: int, attrs: Mapping[str, Any] | None, dropped: int) -> Json:
    out: Json = {}
    if timestamp:
        out["timeUnixNano"] = str(timestamp)
    if name:
        out["name"] = name
    if attrs:
        out["attributes"] = attributes(attrs)
    if dropped:
        out["droppedAttributesCount"] = dropped
    return out


def _link(context: SpanContext, attrs: Mapping[str, Any] | None, dropped: int) -> Json:
    out: Json = {"traceId": f"{context.trace_id:032x}", "spanId": f"{context.span_id:016x}"}
    if attrs:
        out["attributes"] = attributes(attrs)
    if dropped:
        out["droppedAttributesCount"] = dropped
    out["flags"] = _flags(context)
    return out


def _resource(resource: Resource) -> Json:
    return {"attributes": attributes(resource.attributes)} if resource.attributes else {}


def _scope(scope: InstrumentationScope | None) -> Json:
    out: Json = {}
    if scope is None:
        return out
    if scope.name:
        out["name"] = scope.name
    if scope.version:
        out["version"] = scope.version
    if scope.attributes:
        out["attributes"] = attributes(scope.attributes)
    return out


def attributes(attrs: Mapping[str, Any]) -> list[Json]:
    try:
        return [{"key": key, "value": any_value(value)} for key, value in attrs.items()]
    except TypeError:  # the SDK checks attribute types; a foreign span may not have: skip those
        return [pair for key, value in attrs.items() if (pair := _checked(key, value))]


def _checked(key: str, value: Any) -> Json | None:
    try:
        return {"key": key, "value": any_value(value)}
    except TypeError as err:
        logger.error("attribute %r left out of the export: %s", key, err)
        return None


def any_value(value: Any) -> Json:
    """An OTLP ``AnyValue``; the exact-type checks come first, as they cover nearly every value."""
    kind = type(value)
    if kind is str:
        return {"stringValue": value}
    if kind is int:
        return _int_value(value)
    if kind is float:
        return {"doubleValue": _double(value)}
    if kind is bool:
        return {"boolValue": value}
    if kind is tuple or kind is list:
        if not value:
            return {"arrayValue": {}}
        if all(type(v) is int for v in value):  # routing ids and layer lists: the common array
            return {"arrayValue": {"values": [_int_value(v) for v in value]}}
        return {"arrayValue": {"values": [any_value(v) for v in value]}}
    return _other_value(value)


def _int_value(value: int) -> Json:
    # expert ids, layers, indices: small ints, whose encodings are shared (never mutated)
    return _SMALL_INTS[value] if 0 <= value < _NUM_SMALL_INTS else {"intValue": str(value)}


def _other_value(value: Any) -> Json:
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"boolValue": bool(value)}
    if isinstance(value, str):
        return {"stringValue": str(value)}
    if isinstance(value, int):
        return {"intValue": str(int(value))}
    if isinstance(value, float):
        return {"doubleValue": _double(float(value))}
    if isinstance(value, bytes):
        return {"bytesValue": base64.b64encode(value).decode("ascii")} if value else {}
    if isinstance(value, Sequence):
        return any_value(list(value))
    if isinstance(value, Mapping):
        pairs = [{"key": str(k), "value": any_value(v)} for k, v in value.items()]
        return {"kvlistValue": {"values": pairs} if pairs else {}}
    raise TypeError(f"attribute value {value!r} of type {type(value).__name__} has no OTLP form")


def _double(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else _DOUBLE_WORDS[value]
