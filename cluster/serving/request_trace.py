"""A tier replica's part of a request's trace: queue, prefill, decode, and per-token fan-out.

The gateway sends its span's W3C ``traceparent`` with the request. Here one
``moe.tier_request {tier}`` span is opened under it when the engine accepts
the request (its context goes into the engine, so expert-shard work in the
request's steps joins the trace). The queue / prefill / decode children and
the per-token events are written when the request ends, from the engine's own
timestamps: nothing is added to the decode loop but a list append per token.
``finish`` only ends the tier span and records the request's events with the
process's span batcher, whose thread builds the children (plain ``Event``s, each
(layer, expert)'s shard looked up once) and hands them to the exporters.

Per-token event (``moe.token``, at most ``token_events`` per request, spread
evenly over the output): index, inter-token latency, and the routing fan-out:
how many distinct expert indices (``moe.token.experts``; a layer's expert 3 and
the next layer's expert 3 count once) and distinct expert shards
(``moe.token.shards``, 0 when experts are colocated) the token's position
touched across all MoE layers, plus the flattened expert ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import SpanContext

from cluster.engine.requests import Routing, TokenEvent
from cluster.telemetry.setup import Telemetry, context_from_traceparent, traceparent_of
from cluster.telemetry.span_batch import SpanFactory

ShardOf = Callable[[int, int], str]  # (layer, expert) -> shard holding it


def _epoch_offset_ns() -> int:
    """Wall-clock minus monotonic time, in nanoseconds, now."""
    return time.time_ns() - int(time.monotonic() * 1e9)


def _epoch_ns(monotonic_s: float, offset_ns: int) -> int:
    """Engine times are ``time.monotonic``; spans want wall-clock nanoseconds."""
    return offset_ns + int(monotonic_s * 1e9)


class RequestTrace:
    """Collects one request's tokens on a replica and writes its spans and metrics at the end."""

    def __init__(
        self,
        telemetry: Telemetry,
        tier: str,
        request_id: str,
        traceparent: str,
        shard_of: ShardOf | None,
    ) -> None:
        self.telemetry = telemetry
        self.tier = tier
        self.shard_of = shard_of
        self.events: list[TokenEvent] = []
        self.span: trace.Span | None = None
        parent = context_from_traceparent(traceparent) if traceparent else None
        if telemetry.tracing and parent is not None:
            self.span = telemetry.tracer.start_span(
                f"moe.tier_request {tier}",
                context=parent,
                attributes={"moe.tier": tier, "moe.request.id": request_id},
            )

    @property
    def traceparent(self) -> str:
        """Context for the engine (shard work joins it); "" when the request is not traced."""
        if self.span is None or not self.span.get_span_context().trace_flags.sampled:
            return ""
        return traceparent_of(self.span)

    @property
    def wants_routing(self) -> bool:
        return self.traceparent != "" and self.telemetry.settings.token_events > 0

    def add(self, events: Sequence[TokenEvent]) -> None:
        self.events.extend(events)

    def attention(self) -> tuple[tuple[float, float], ...] | None:
        """Per layer (entropy, first-N mass), averaged over the tokens that carry them."""
        rows = [e.attention for e in self.events if e.attention]
        if not rows:
            return None
        n = len(rows)
        return tuple(
            (sum(r[i][0] for r in rows) / n, sum(r[i][1] for r in rows) / n)
            for i in range(len(rows[0]))
        )

    def finish(self, error: str | None = None) -> None:
        """Record per-request metrics and end the span (when traced); call once, at the end.

        The queue / prefill / decode children and their token events are built later, on the
        span batcher's thread, from the events kept here (see ``_children``).
        """
        last = self.events[-1] if self.events else None
        if last is not None:
            metrics = self.telemetry.metrics
            if last.finish_reason is not None:  # finished, not aborted mid-way
                metrics.record_prefix(
                    self.tier, last.num_prompt_tokens, last.num_cached_prompt_tokens
                )
                metrics.record_truncation(self.tier, last.num_truncated_tokens)
                metrics.record_kv_request(self.tier, last.num_store_cached_tokens, last.kv_miss)
        if self.span is None:
            return
        span = self.span
        if last is not None:
            first = self.events[0]
            queue_s = (first.scheduled_time or first.arrival_time) - first.arrival_time
            span.set_attribute("moe.latency.queue_s", queue_s)
            span.set_attribute("moe.usage.cached_prompt_tokens", last.num_cached_prompt_tokens)
            span.set_attribute("moe.usage.store_cached_prompt_tokens", last.num_store_cached_tokens)
            if last.kv_miss:
                span.set_attribute("moe.kv.miss_reason", last.kv_miss)
            span.set_attribute("moe.usage.truncated_tokens", last.num_truncated_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", len(self.events))
            attention = self.attention()
            if attention is not None:  # per layer, index = layer
                span.set_attribute("moe.attention.entropy", [a[0] for a in attention])
                span.set_attribute("moe.attention.first_tokens_mass", [a[1] for a in attention])
            factory, batcher = self.telemetry.span_factory, self.telemetry.span_batcher
            assert factory is not None and batcher is not None, "a traced request without a batcher"
            batcher.record(self._children, factory, span.get_span_context(), _epoch_offset_ns())
        if error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end()

    def _children(
        self, factory: SpanFactory, parent: SpanContext, offset_ns: int
    ) -> list[ReadableSpan]:
        """The queue, prefill and decode spans, from the engine's timestamps (``offset_ns``
        turns them into wall-clock nanoseconds, as of ``finish``)."""
        first, last = self.events[0], self.events[-1]
        arrival = _epoch_ns(first.arrival_time, offset_ns)
        scheduled = _epoch_ns(first.scheduled_time or first.arrival_time, offset_ns)
        first_token = _epoch_ns(first.time, offset_ns)
        prefill = {
            "gen_ai.usage.input_tokens": last.num_prompt_tokens,
            "moe.usage.cached_prompt_tokens": last.num_cached_prompt_tokens,
        }
        events, skipped = self._token_events(factory.limits.max_events, offset_ns)
        spans = (
            factory.finished("moe.queue", parent, arrival, scheduled),
            factory.finished("moe.prefill", parent, scheduled, first_token, prefill),
            factory.finished(
                "moe.decode",
                parent,
                first_token,
                _epoch_ns(last.time, offset_ns),
                self._routing_attributes(),
                events,
                num_events_skipped=skipped,
            ),
        )
        return [s for s in spans if s is not None]

    def _routing_attributes(self) -> dict[str, Any]:
        routing = self.events[-1].routing
        if self.telemetry.settings.token_events <= 0 or routing is None:
            return {}
        return {
            "moe.routing.layers": [layer for layer, _ in routing],
            "moe.routing.top_k": len(routing[0][1]) if routing else 0,
        }

    def _token_events(self, room: int | None, offset_ns: int) -> tuple[list[Event], int]:
        """Up to ``token_events`` ``moe.token`` events spread evenly over the output; past the
        span's event limit only the last are built (an SDK span keeps the last), and the
        others are counted as dropped."""
        limit = self.telemetry.settings.token_events
        events = self.events
        if limit <= 0 or not events:
            return [], 0
        stride = -(-len(events) // limit)  # ceil: spread the kept events over the output
        kept = range(0, len(events), stride)
        skipped = max(0, len(kept) - room) if room is not None else 0
        fan_out = _FanOut(self.shard_of)
        out = []
        for i in kept[skipped:]:
            event = events[i]
            attributes: dict[str, Any] = {"moe.token.index": event.index}
            if i > 0:
                attributes["moe.token.itl_s"] = event.time - events[i - 1].time
            if event.routing is not None:
                attributes.update(fan_out(event.routing))
            out.append(Event("moe.token", attributes, _epoch_ns(event.time, offset_ns)))
        return out, skipped


class _FanOut:
    """A token's routing fan-out attributes; remembers the shard of each (layer, expert)."""

    def __init__(self, shard_of: ShardOf | None) -> None:
        self.shard_of = shard_of
        self.shards: dict[tuple[int, int], str] = {}

    def __call__(self, routing: Routing) -> dict[str, Any]:
        flat = [e for _, chosen in routing for e in chosen]
        shards: set[str] = set()
        if self.shard_of is not None:
            known = self.shards
            for layer, chosen in routing:
                for e in chosen:
                    shard = known.get((layer, e))
                    if shard is None:
                        shard = known[(layer, e)] = self.shard_of(layer, e)
                    shards.add(shard)
        return {
            "moe.token.experts": len(set(flat)),
            "moe.token.shards": len(shards),
            "moe.token.routing": flat,
        }
