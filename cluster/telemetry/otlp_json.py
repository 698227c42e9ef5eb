"""Finished spans as an OTLP/JSON ``ExportTraceServiceRequest`` line, written straight from the
SDK spans.

The file exporter once went SDK span -> protobuf message (``encode_spans``) -> dict
(``MessageToDict``) -> ids rewritten to hex -> ``json.dumps``: a pure-Python walk over every
field of every message, about 1 ms per span carrying a request's token events, on the exporting
thread, holding the GIL the engine thread needs. Here each span's JSON is put together from
strings in one pass (no dict per value; the encodings of small ints and attribute keys are made
once), with the same bytes: the protobuf-JSON mapping the OpenTelemetry Collector's file
exporter writes (camelCase fields in field-number order, enums as integers, 64-bit integers as
strings, ids as lowercase hex, default values left out). ``tests/unit/test_otlp_json.py`` holds
it to the protobuf path, byte for byte.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext

logger = logging.getLogger(__name__)

_FLAGS_HAS_IS_REMOTE = 0x100  # SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_FLAGS_IS_REMOTE = 0x200  # SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_NUM_SMALL_INTS = 4096  # expert ids, layers, token indices, counts
_INT_TEXT = tuple(f'{{"intValue":"{i}"}}' for i in range(_NUM_SMALL_INTS))
_KEY_TEXT: dict[str, str] = {}  # attribute key -> its '{"key":...,"value":' prefix
_MAX_KEYS = 4096  # attribute keys are a small fixed set; the cache never grows past this
_DOUBLE_WORDS = {math.inf: "Infinity", -math.inf: "-Infinity"}
_MARKER = "\x00spans\x00"  # stands for a scope's spans in a resource's skeleton

Json = dict[str, Any]
ScopeGroup = tuple[InstrumentationScope | None, list[ReadableSpan]]


def encode_line(spans: Sequence[ReadableSpan]) -> str:
    """The request as compact JSON text: ``spans`` grouped by resource, then instrumentation
    scope, in first-seen order."""
    resources = []
    for resource, scopes in _grouped(spans):
        skeleton: Json = {"resource": _resource(resource), "scopeSpans": []}
        texts = []
        for scope, members in scopes:
            scope_spans = {"scope": _scope(scope), "spans": [_MARKER]}
            skeleton["scopeSpans"].append(_with_schema(scope_spans, scope))
            texts.append(",".join([span_text(span) for span in members]))
        frame = _dumps(_with_schema(skeleton, resource)).split(_dumps(_MARKER))
        assert len(frame) == len(texts) + 1, "a resource or scope attribute holds the marker"
        resources.append(
            "".join(part for pair in zip(frame, [*texts, ""], strict=True) for part in pair)
        )
    return '{"resourceSpans":[' + ",".join(resources) + "]}"


def encode_request(spans: Sequence[ReadableSpan]) -> Json:
    """The request as a dict (the parsed ``encode_line``), for readers and tests."""
    request: Json = json.loads(encode_line(spans))
    return request


def _grouped(spans: Sequence[ReadableSpan]) -> list[tuple[Resource, list[ScopeGroup]]]:
    groups: dict[int, tuple[Resource, dict[int, ScopeGroup]]] = {}
    for span in spans:  # by identity: every span of a provider shares its resource and scope
        resource, scope = span.resource, span.instrumentation_scope or None
        by_scope = groups.setdefault(id(resource), (resource, {}))[1]
        by_scope.setdefault(id(scope), (scope, []))[1].append(span)
    merged: list[tuple[Resource, list[ScopeGroup]]] = []
    for resource, by_scope in groups.values():  # distinct but equal objects share a group
        found = next((g for r, g in merged if r is resource or r == resource), None)
        if found is None:
            found = []
            merged.append((resource, found))
        for scope, members in by_scope.values():
            same = next((m for s, m in found if s is scope or s == scope), None)
            if same is None:
                found.append((scope, members))
            else:
                same.extend(members)
    return merged


def _with_schema(entry: Json, owner: Resource | InstrumentationScope | None) -> Json:
    if owner is not None and owner.schema_url:
        entry["schemaUrl"] = owner.schema_url
    return entry


def _resource(resource: Resource) -> Json:
    return {"attributes": _attributes(resource.attributes)} if resource.attributes else {}


def _scope(scope: InstrumentationScope | None) -> Json:
    out: Json = {}
    if scope is None:
        return out
    if scope.name:
        out["name"] = scope.name
    if scope.version:
        out["version"] = scope.version
    if scope.attributes:
        out["attributes"] = _attributes(scope.attributes)
    return out


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def span_text(span: ReadableSpan) -> str:
    """One span as compact JSON text (an OTLP ``Span``)."""
    context = span.get_span_context()
    assert context is not None, f"span {span.name!r} has no context"
    parent = span.parent
    out = [f'{{"traceId":"{context.trace_id:032x}","spanId":"{context.span_id:016x}"']
    if context.trace_state:
        state = ",".join(f"{k}={v}" for k, v in context.trace_state.items())
        out.append(',"traceState":' + _dumps(state))
    if parent is not None:
        out.append(f',"parentSpanId":"{parent.span_id:016x}"')
    if span.name:
        out.append(',"name":' + _dumps(span.name))
    out.append(f',"kind":{span.kind.value + 1}')  # the SDK's INTERNAL is 0, OTLP's is 1
    if span.start_time:
        out.append(f',"startTimeUnixNano":"{span.start_time}"')
    if span.end_time:
        out.append(f',"endTimeUnixNano":"{span.end_time}"')
    if span.attributes:
        out.append(',"attributes":' + attributes_text(span.attributes))
    if span.dropped_attributes:
        out.append(f',"droppedAttributesCount":{span.dropped_attributes}')
    if span.events:
        out.append(',"events":[' + ",".join([_event_text(e) for e in span.events]) + "]")
    if span.dropped_events:
        out.append(f',"droppedEventsCount":{span.dropped_events}')
    if span.links:
        out.append(',"links":[' + ",".join([_link_text(link) for link in span.links]) + "]")
    if span.dropped_links:
        out.append(f',"droppedLinksCount":{span.dropped_links}')
    if span.status is not None:
        status: Json = {}  # field 2 (message) before field 3 (code)
        if span.status.description:
            status["message"] = span.status.description
        if span.status.status_code.value:
            status["code"] = span.status.status_code.value
        out.append(',"status":' + _dumps(status))
    out.append(f',"flags":{_flags(parent)}}}')
    return "".join(out)


def _event_text(event: Event) -> str:
    fields = []
    if event.timestamp:
        fields.append(f'"timeUnixNano":"{event.timestamp}"')
    if event.name:
        fields.append('"name":' + _dumps(event.name))
    if event.attributes:
        fields.append('"attributes":' + attributes_text(event.attributes))
    if event.dropped_attributes:
        fields.append(f'"droppedAttributesCount":{event.dropped_attributes}')
    return "{" + ",".join(fields) + "}"


def _link_text(link: Link) -> str:
    context = link.context
    out = f'{{"traceId":"{context.trace_id:032x}","spanId":"{context.span_id:016x}"'
    if link.attributes:
        out += ',"attributes":' + attributes_text(link.attributes)
    if link.dropped_attributes:
        out += f',"droppedAttributesCount":{link.dropped_attributes}'
    return out + f',"flags":{_flags(context)}}}'


def _flags(context: SpanContext | None) -> int:
    if context is not None and context.is_remote:
        return _FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE
    return _FLAGS_HAS_IS_REMOTE


def attributes_text(attrs: Mapping[str, Any]) -> str:
    """OTLP ``KeyValue``s as JSON text; a value with no OTLP form is left out (and logged)."""
    keys = _KEY_TEXT
    parts = []
    for key, value in attrs.items():
        prefix = keys.get(key)
        if prefix is None:
            if len(keys) >= _MAX_KEYS:
                keys.clear()
            prefix = keys[key] = '{"key":' + _dumps(key) + ',"value":'
        try:
            parts.append(prefix + value_text(value) + "}")
        except TypeError as err:  # the SDK checks attribute types; a foreign span may not have
            logger.error("attribute %r left out of the export: %s", key, err)
    return "[" + ",".join(parts) + "]"


def value_text(value: Any) -> str:
    """An OTLP ``AnyValue`` as JSON text; the exact-type checks cover nearly every value."""
    kind = type(value)
    if kind is int:
        return _INT_TEXT[value] if 0 <= value < _NUM_SMALL_INTS else f'{{"intValue":"{value}"}}'
    if kind is str:
        return '{"stringValue":' + _dumps(value) + "}"
    if kind is float and math.isfinite(value):
        return '{"doubleValue":' + float.__repr__(value) + "}"  # as json.dumps writes it
    if kind is bool:
        return '{"boolValue":true}' if value else '{"boolValue":false}'
    if (kind is list or kind is tuple) and value:  # homogeneous, as the SDK requires
        texts = [value_text(v) for v in value]
        return '{"arrayValue":{"values":[' + ",".join(texts) + "]}}"
    return _dumps(any_value(value))


def _attributes(attrs: Mapping[str, Any]) -> list[Json]:
    pairs: list[Json] = json.loads(attributes_text(attrs))
    return pairs


def any_value(value: Any) -> Json:
    """An OTLP ``AnyValue`` as a dict, for the values ``value_text`` does not write itself."""
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"boolValue": bool(value)}
    if isinstance(value, str):
        return {"stringValue": str(value)}
    if isinstance(value, int):
        return {"intValue": str(int(value))}
    if isinstance(value, float):
        value = float(value)
        return {"doubleValue": value if math.isfinite(value) else _double_word(value)}
    if isinstance(value, bytes):
        return {"bytesValue": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Sequence):
        values = [any_value(v) for v in value]
        return {"arrayValue": {"values": values} if values else {}}
    if isinstance(value, Mapping):
        pairs = [{"key": str(k), "value": any_value(v)} for k, v in value.items()]
        return {"kvlistValue": {"values": pairs} if pairs else {}}
    raise TypeError(f"attribute value {value!r} of type {type(value).__name__} has no OTLP form")


def _double_word(value: float) -> str:
    return "NaN" if math.isnan(value) else _DOUBLE_WORDS[value]
