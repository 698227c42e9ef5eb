"""Spans recorded as plain data on a hot thread, built and handed to the exporters on another.

The engine's thread knows everything a span of its work needs (ids, a layer, token counts,
two clocks), but making it an SDK span there costs the step: the sampler, a lock and bounded
collections per span, attribute checks per value. A ``SpanBatcher`` takes a builder and its
plain arguments instead (one tuple appended to a deque), and its own thread turns each batch
into ``ReadableSpan``s (``SpanFactory.finished``) and hands them to the span processors, whose
exporters run on their own threads as before. A builder may also return no span: the
per-layer dispatch metrics (``Metrics.record_dispatch_layer``) use a batcher of their own to
record measurements off the hot thread the same way.

Order is kept (one FIFO, drained by one thread at a time), nothing recorded is lost on flush or
shutdown (``Telemetry.force_flush`` drains the batcher before the processors), and memory is
bounded: past ``capacity`` waiting records, new ones are counted in ``num_dropped`` and dropped.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, Status, StatusCode

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 65_536  # records waiting at most; ~100 bytes each
DEFAULT_INTERVAL_S = 0.5  # how often the thread drains when nothing asks sooner
BATCH_SIZE = 512  # a drain is due once this many wait

Builder = Callable[..., Sequence[ReadableSpan]]
_UNSET = Status(StatusCode.UNSET)


class SpanFactory:
    """Finished ``ReadableSpan``s from plain data, as the process's tracer would record them:
    its resource, scope, id generator, sampler and span limits."""

    def __init__(
        self,
        resource: Resource,
        scope: InstrumentationScope,
        sampler: Sampler,
        ids: IdGenerator,
        limits: SpanLimits | None = None,
    ) -> None:
        self.resource = resource
        self.scope = scope
        self.sampler = sampler
        self.ids = ids
        self.limits = limits or SpanLimits()

    def new_span_id(self) -> int:
        return self.ids.generate_span_id()

    def finished(
        self,
        name: str,
        parent: SpanContext,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any] | None = None,
        events: Sequence[Event] = (),
        *,
        span_id: int | None = None,
        num_events_skipped: int = 0,
        status: Status = _UNSET,
    ) -> ReadableSpan | None:
        """A span under ``parent``, or None when the sampler drops it.

        ``events`` past the span limit keep the last ones, as an SDK span does; events the
        caller left out (``num_events_skipped``) count as dropped too.
        """
        context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        decision = self.sampler.should_sample(context, parent.trace_id, name, attributes=attributes)
        if not decision.decision.is_sampled():
            return None
        own = SpanContext(
            parent.trace_id,
            span_id if span_id is not None else self.ids.generate_span_id(),
            is_remote=False,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
            trace_state=decision.trace_state,
        )
        kept: Sequence[Event] = events
        if events or num_events_skipped:
            bounded = BoundedList.from_seq(self.limits.max_events, events)
            bounded.dropped += num_events_skipped
            kept = bounded
        return ReadableSpan(
            name,
            context=own,
            parent=parent,
            resource=self.resource,
            attributes=dict(attributes or {}),
            events=kept,
            status=status,
            start_time=start_ns,
            end_time=end_ns,
            instrumentation_scope=self.scope,
        )


class SpanBatcher:
    """A bounded FIFO of (builder, arguments); a thread of its own builds and delivers them."""

    def __init__(
        self,
        processors: Sequence[SpanProcessor],
        *,
        capacity: int = DEFAULT_CAPACITY,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        self._processors = list(processors)
        self.capacity = capacity
        self.interval_s = interval_s
        self.num_dropped = 0
        self.num_failed = 0
        self._items: deque[tuple[Builder, tuple[Any, ...]]] = deque()
        self._drain_lock = threading.Lock()  # one drain at a time keeps the order
        self._wake = threading.Event()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def record(self, build: Builder, *args: Any) -> bool:
        """Queue ``build(*args)`` for the batcher's thread; False when full (dropped) or closed.

        Costs the caller one tuple and a deque append: no span is built here.
        """
        if self._closed or len(self._items) >= self.capacity:
            self.num_dropped += 1
            return False
        self._items.append((build, args))
        if self._thread is None:
            self._start()
        elif len(self._items) == BATCH_SIZE:
            self._wake.set()
        return True

    def flush(self) -> int:
        """Build and deliver everything recorded so far, on the calling thread; how many spans."""
        delivered = 0
        with self._drain_lock:
            while self._items:
                build, args = self._items.popleft()
                try:
                    spans = build(*args)
                except Exception:  # a bad record costs its spans, never the others
                    self.num_failed += 1
                    logger.exception("could not build span(s) with %r", build)
                    continue
                for span in spans:
                    for processor in self._processors:
                        processor.on_end(span)
                delivered += len(spans)
        return delivered

    def shutdown(self) -> None:
        """Deliver what is left and stop the thread; later records are dropped."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self.flush()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="span-batcher", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self.flush()
