"""Spans on disk as OTLP/JSON lines, written by the ``file`` exporter and read back for reports.

Each ``export()`` call appends one line holding an OTLP ``ExportTraceServiceRequest`` in the
protobuf-JSON mapping the OpenTelemetry Collector's file exporter writes (and its
``otlpjsonfile`` receiver reads): camelCase fields, enums as integers, 64-bit integers as
strings, trace and span ids as lowercase hex. A trace file can therefore be replayed into a
Collector, and Collector output can be read by ``read_spans``.

One line is one ``write()`` on a file opened in append mode, so several processes on a node
(Ray actors) may share a file without interleaving lines on a local file system.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from cluster.telemetry.otlp_json import encode_line

logger = logging.getLogger(__name__)

_SPAN_KINDS = ("UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
_STATUS_CODES = ("UNSET", "OK", "ERROR")


class JsonLinesSpanExporter(SpanExporter):
    """Appends each batch of spans to ``path`` as one OTLP/JSON line (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._shut_down = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shut_down:
            return SpanExportResult.FAILURE
        if not spans:
            return SpanExportResult.SUCCESS
        line = encode_line(spans) + "\n"
        with self._lock:
            try:
                with self.path.open("a", encoding="utf-8") as out:
                    out.write(line)
                    out.flush()
            except OSError as err:
                # Losing a batch must not take the server down; the SDK counts the failure.
                logger.error("could not append %d span(s) to %s: %s", len(spans), self.path, err)
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._shut_down = True

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True  # every export() already flushed its line


class SpanEvent(NamedTuple):
    name: str
    time_ns: int
    attributes: dict[str, Any]


@dataclass(frozen=True)
class SpanRecord:
    """One finished span as read from a trace file; ids are lowercase hex, times Unix ns."""

    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: str  # SERVER, CLIENT, INTERNAL, ...
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[SpanEvent]
    resource: dict[str, Any]
    status: str  # UNSET, OK or ERROR
    status_message: str = ""

    @property
    def duration_s(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e9


@dataclass
class TraceFileStats:
    """What ``read_spans`` saw; malformed lines are skipped and counted, never fatal."""

    num_lines: int = 0
    num_spans: int = 0
    num_malformed: int = 0
    malformed_lines: list[int] = field(default_factory=list)  # 1-based, the first few only


def read_spans(path: str | Path, *, stats: TraceFileStats | None = None) -> Iterator[SpanRecord]:
    """Yield every span of an OTLP/JSON-lines trace file, in file order.

    A line that is not valid JSON or not an ``ExportTraceServiceRequest`` is skipped with a
    warning: a process killed mid-write leaves a truncated last line, and that must not hide
    the rest of the file. Raises ``FileNotFoundError`` if the file does not exist.
    """
    stats = stats if stats is not None else TraceFileStats()
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            stats.num_lines += 1
            try:
                spans = _decode_line(line)
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                stats.num_malformed += 1
                if len(stats.malformed_lines) < 10:
                    stats.malformed_lines.append(number)
                logger.warning("%s:%d: skipping malformed line (%s)", path, number, err)
                continue
            stats.num_spans += len(spans)
            yield from spans


def _decode_line(line: str) -> list[SpanRecord]:
    request = json.loads(line)
    if not isinstance(request, dict) or "resourceSpans" not in request:
        raise ValueError("not an ExportTraceServiceRequest (no resourceSpans)")
    records = []
    for resource_spans in request["resourceSpans"]:
        resource = _attributes(resource_spans.get("resource", {}).get("attributes", []))
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                records.append(_decode_span(span, resource))
    return records


def _decode_span(span: dict[str, Any], resource: dict[str, Any]) -> SpanRecord:
    status = span.get("status", {})
    events = [
        SpanEvent(
            name=event.get("name", ""),
            time_ns=int(event.get("timeUnixNano", 0)),
            attributes=_attributes(event.get("attributes", [])),
        )
        for event in span.get("events", [])
    ]
    return SpanRecord(
        trace_id=_decode_id(span["traceId"], 16),
        span_id=_decode_id(span["spanId"], 8),
        parent_span_id=_decode_id(span.get("parentSpanId", ""), 8),
        name=span.get("name", ""),
        kind=_enum_name(span.get("kind", 0), _SPAN_KINDS, "SPAN_KIND_"),
        start_ns=int(span.get("startTimeUnixNano", 0)),
        end_ns=int(span.get("endTimeUnixNano", 0)),
        attributes=_attributes(span.get("attributes", [])),
        events=events,
        resource=resource,
        status=_enum_name(status.get("code", 0), _STATUS_CODES, "STATUS_CODE_"),
        status_message=status.get("message", ""),
    )


def _decode_id(value: str, num_bytes: int) -> str:
    """Accept the spec's hex ids and plain protobuf-JSON base64 ids alike."""
    if not value:
        return ""
    if len(value) == 2 * num_bytes:
        int(value, 16)  # ValueError if not hex
        return value.lower()
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error as err:
        raise ValueError(f"bad id {value!r}") from err
    if len(raw) != num_bytes:
        raise ValueError(f"bad id {value!r}: {len(raw)} bytes, expected {num_bytes}")
    return raw.hex()


def _enum_name(value: int | str, names: tuple[str, ...], prefix: str) -> str:
    if isinstance(value, str):
        return value.removeprefix(prefix)
    return names[value] if 0 <= value < len(names) else str(value)


def _attributes(key_values: list[dict[str, Any]]) -> dict[str, Any]:
    return {kv["key"]: _any_value(kv.get("value", {})) for kv in key_values}


def _any_value(value: dict[str, Any]) -> Any:
    if "stringValue" in value:
        return value["stringValue"]
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])  # also "NaN" / "Infinity"
    if "arrayValue" in value:
        return [_any_value(v) for v in value["arrayValue"].get("values", [])]
    if "kvlistValue" in value:
        return _attributes(value["kvlistValue"].get("values", []))
    if "bytesValue" in value:
        return base64.b64decode(value["bytesValue"])
    return None
