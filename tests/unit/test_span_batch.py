"""cluster.telemetry.span_batch and its users: spans recorded as plain data on a hot thread,
built and delivered later, in order, nothing lost at a flush, memory bounded. No Ray, no torch."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, DEFAULT_ON
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, TraceFlags

from cluster.engine.requests import TokenEvent
from cluster.serving.request_trace import RequestTrace
from cluster.telemetry.dispatch_spans import DispatchSpans
from cluster.telemetry.settings import TelemetrySettings
from cluster.telemetry.setup import (
    Telemetry,
    reset_telemetry,
    setup_telemetry,
    span_context_of,
    traceparent_for,
)
from cluster.telemetry.span_batch import SpanBatcher, SpanFactory
from cluster.telemetry.step_trace import step_trace

PARENT = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True, TraceFlags(1))
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    reset_telemetry()
    yield
    reset_telemetry()


def _factory(sampler: object = DEFAULT_ON, max_events: int | None = None) -> SpanFactory:
    return SpanFactory(
        Resource.create({"moe.role": "t"}),
        InstrumentationScope("moe-cluster"),
        sampler,  # type: ignore[arg-type]
        RandomIdGenerator(),
        SpanLimits(max_events=max_events),
    )


def _named(factory: SpanFactory, name: str) -> Sequence[ReadableSpan]:
    span = factory.finished(name, PARENT, 1, 2)
    return [span] if span is not None else []


def _batcher(**kwargs: float) -> tuple[SpanBatcher, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return SpanBatcher([SimpleSpanProcessor(exporter)], **kwargs), exporter  # type: ignore[arg-type]


def test_records_are_built_in_order_and_flush_delivers_them_all() -> None:
    batcher, exporter = _batcher(interval_s=60.0)  # the thread never wakes on its own here
    factory = _factory()
    for i in range(1000):
        assert batcher.record(_named, factory, f"s{i}")
    batcher.flush()
    assert [s.name for s in exporter.get_finished_spans()] == [f"s{i}" for i in range(1000)]
    assert len(batcher) == 0


def test_the_thread_delivers_without_being_asked() -> None:
    batcher, exporter = _batcher(interval_s=0.05)
    batcher.record(_named, _factory(), "later")
    deadline = time.monotonic() + 10
    while not exporter.get_finished_spans():
        assert time.monotonic() < deadline, "the batcher's thread delivered nothing"
        time.sleep(0.01)
    batcher.shutdown()


def test_memory_is_bounded_and_shutdown_keeps_what_was_recorded() -> None:
    batcher, exporter = _batcher(capacity=3, interval_s=60.0)
    factory = _factory()
    accepted = [batcher.record(_named, factory, f"s{i}") for i in range(5)]
    assert accepted == [True, True, True, False, False]
    assert (len(batcher), batcher.num_dropped) == (3, 2)
    batcher.shutdown()
    assert [s.name for s in exporter.get_finished_spans()] == ["s0", "s1", "s2"]
    assert not batcher.record(_named, factory, "after")  # closed


def test_a_failing_builder_costs_only_its_own_spans() -> None:
    batcher, exporter = _batcher(interval_s=60.0)

    def broken() -> Sequence[ReadableSpan]:
        raise RuntimeError("bad record")

    batcher.record(broken)
    batcher.record(_named, _factory(), "fine")
    batcher.flush()
    assert [s.name for s in exporter.get_finished_spans()] == ["fine"]
    assert batcher.num_failed == 1


def test_concurrent_recorders_lose_nothing() -> None:
    batcher, exporter = _batcher(interval_s=0.001)
    factory = _factory()

    def record(prefix: str) -> None:
        for i in range(500):
            batcher.record(_named, factory, f"{prefix}{i}")

    threads = [threading.Thread(target=record, args=(p,)) for p in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.shutdown()
    names = [s.name for s in exporter.get_finished_spans()]
    for prefix in "ab":  # each thread's spans in its own order
        assert [n for n in names if n[0] == prefix] == [f"{prefix}{i}" for i in range(500)]


def test_factory_spans_are_children_as_the_sdk_records_them() -> None:
    factory = _factory(max_events=2)
    events = [Event("e", {"i": i}, 10 + i) for i in range(3)]
    span = factory.finished("x", PARENT, 5, 9, {"k": 1}, events, span_id=7, num_events_skipped=4)
    assert span is not None
    assert span.context is not None and span.parent == PARENT
    assert (span.context.trace_id, span.context.span_id) == (PARENT.trace_id, 7)
    assert span.context.trace_flags.sampled and not span.context.is_remote
    assert (span.start_time, span.end_time, dict(span.attributes or {})) == (5, 9, {"k": 1})
    # past the limit the last events stay, as on an SDK span; skipped ones count as dropped
    assert [(e.attributes or {})["i"] for e in span.events] == [1, 2]
    assert span.dropped_events == 1 + 4
    assert _factory(ALWAYS_OFF).finished("x", PARENT, 5, 9) is None


def test_traceparent_helpers_round_trip() -> None:
    assert span_context_of(TRACEPARENT) == PARENT
    assert traceparent_for(PARENT) == TRACEPARENT
    assert span_context_of("") is None and span_context_of("00-bad") is None


def _telemetry(
    exporter: InMemorySpanExporter, token_events: int = 256, dispatch_spans: int = 8
) -> Telemetry:
    settings = TelemetrySettings(token_events=token_events, dispatch_spans=dispatch_spans)
    return setup_telemetry(settings, role="t", span_exporter=exporter)


def test_dispatch_spans_are_bounded_per_request_and_parent_the_shard_calls() -> None:
    exporter = InMemorySpanExporter()
    telemetry = _telemetry(exporter, dispatch_spans=3)
    spans = DispatchSpans()
    assert spans.start(telemetry, 0, 4, 2) is None  # the step is not traced
    handed_on = []
    with step_trace(TRACEPARENT):
        for layer in range(5):
            pending = spans.start(telemetry, layer, 4, 2)
            if pending is not None:
                handed_on.append(pending.traceparent)
                spans.end(telemetry, pending)
    assert len(handed_on) == 3
    assert exporter.get_finished_spans() == ()  # nothing built on the recording thread
    telemetry.force_flush()
    made = exporter.get_finished_spans()
    assert [(s.name, (s.attributes or {})["moe.layer"]) for s in made] == [
        ("moe.expert_dispatch", 0),
        ("moe.expert_dispatch", 1),
        ("moe.expert_dispatch", 2),
    ]
    assert all(s.parent == PARENT for s in made)
    assert [traceparent_for(s.context) for s in made if s.context] == handed_on


def _token(index: int, last: bool = False) -> TokenEvent:
    return TokenEvent(
        request_id="r",
        token_id=5,
        index=index,
        logprob=0.0,
        text="",
        finish_reason="length" if last else None,
        num_prompt_tokens=3,
        num_cached_prompt_tokens=0,
        num_truncated_tokens=0,
        arrival_time=100.0,
        time=101.0 + index / 100,
        routing=((0, (1, 2)), (1, (2, 3))),
        scheduled_time=100.5,
    )


def test_request_end_keeps_every_token_event_in_order_after_a_flush() -> None:
    exporter = InMemorySpanExporter()
    telemetry = _telemetry(exporter, token_events=256)
    traced = RequestTrace(telemetry, "t", "r", TRACEPARENT, lambda layer, e: f"s{e % 2}")
    traced.add([_token(i, last=i == 99) for i in range(100)])
    traced.finish()
    telemetry.force_flush()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"moe.tier_request t", "moe.queue", "moe.prefill", "moe.decode"}
    tier, decode = spans["moe.tier_request t"], spans["moe.decode"]
    assert all(spans[n].parent == tier.context for n in ("moe.queue", "moe.prefill", "moe.decode"))
    events = [dict(e.attributes or {}) for e in decode.events]
    assert [e["moe.token.index"] for e in events] == list(range(100))
    assert events[0] == {
        "moe.token.index": 0,
        "moe.token.experts": 3,
        "moe.token.shards": 2,
        "moe.token.routing": [1, 2, 2, 3],
    }
    assert events[1]["moe.token.itl_s"] == pytest.approx(0.01)
    times = [e.timestamp for e in decode.events]
    assert times == sorted(times) and decode.start_time == times[0] == decode.events[0].timestamp
    assert decode.end_time is not None and tier.end_time is not None
    assert decode.end_time <= tier.end_time
    assert dict(decode.attributes or {}) == {"moe.routing.layers": [0, 1], "moe.routing.top_k": 2}


def test_token_events_past_the_span_limit_keep_the_last_as_an_sdk_span_does() -> None:
    exporter = InMemorySpanExporter()
    telemetry = _telemetry(exporter, token_events=256)
    traced = RequestTrace(telemetry, "t", "r", TRACEPARENT, None)
    traced.add([_token(i, last=i == 199) for i in range(200)])
    traced.finish()
    telemetry.force_flush()
    decode = next(s for s in exporter.get_finished_spans() if s.name == "moe.decode")
    room = SpanLimits().max_events
    assert room is not None and room < 200
    assert [(e.attributes or {})["moe.token.index"] for e in decode.events] == list(
        range(200 - room, 200)
    )
    assert decode.dropped_events == 200 - room
    assert {(e.attributes or {})["moe.token.shards"] for e in decode.events} == {0}


def test_an_untraced_request_records_nothing() -> None:
    exporter = InMemorySpanExporter()
    telemetry = _telemetry(exporter)
    traced = RequestTrace(telemetry, "t", "r", "", None)
    traced.add([_token(0, last=True)])
    traced.finish()
    assert telemetry.span_batcher is not None and len(telemetry.span_batcher) == 0
    telemetry.force_flush()
    assert exporter.get_finished_spans() == ()
    assert trace.INVALID_SPAN_CONTEXT != PARENT  # the fixture's parent is a valid one
