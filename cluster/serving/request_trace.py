"""A tier replica's part of a request's trace: queue, prefill, decode, and per-token fan-out.

The gateway sends its span's W3C ``traceparent`` with the request. Here one
``moe.tier_request {tier}`` span is opened under it when the engine accepts
the request (its context goes into the engine, so expert-shard work in the
request's steps joins the trace). The queue / prefill / decode children and
the per-token events are written when the request ends, from the engine's own
timestamps: nothing is added to the decode loop but a list append per token.

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

from cluster.engine.requests import Routing, TokenEvent
from cluster.telemetry.setup import Telemetry, context_from_traceparent, traceparent_of

ShardOf = Callable[[int, int], str]  # (layer, expert) -> shard holding it


def _epoch_ns(monotonic_s: float) -> int:
    """Engine times are ``time.monotonic``; spans want wall-clock nanoseconds."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


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
        """Record spans (when traced) and per-request metrics; call once, at the end."""
        last = self.events[-1] if self.events else None
        if last is not None:
            metrics = self.telemetry.metrics
            if last.finish_reason is not None:  # finished, not aborted mid-way
                metrics.record_prefix(
                    self.tier, last.num_prompt_tokens, last.num_cached_prompt_tokens
                )
                metrics.record_truncation(self.tier, last.num_truncated_tokens)
        if self.span is None:
            return
        span = self.span
        if last is not None:
            self._children(span, last)
            span.set_attribute("moe.usage.cached_prompt_tokens", last.num_cached_prompt_tokens)
            span.set_attribute("moe.usage.truncated_tokens", last.num_truncated_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", len(self.events))
            attention = self.attention()
            if attention is not None:  # per layer, index = layer
                span.set_attribute("moe.attention.entropy", [a[0] for a in attention])
                span.set_attribute("moe.attention.first_tokens_mass", [a[1] for a in attention])
        if error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end()

    def _children(self, span: trace.Span, last: TokenEvent) -> None:
        tracer = self.telemetry.tracer
        parent = trace.set_span_in_context(span)
        first = self.events[0]
        arrival = _epoch_ns(first.arrival_time)
        scheduled = _epoch_ns(first.scheduled_time or first.arrival_time)
        first_token = _epoch_ns(first.time)
        end = _epoch_ns(last.time)
        queue = tracer.start_span("moe.queue", context=parent, start_time=arrival)
        queue.end(end_time=scheduled)
        prefill = tracer.start_span(
            "moe.prefill",
            context=parent,
            start_time=scheduled,
            attributes={
                "gen_ai.usage.input_tokens": last.num_prompt_tokens,
                "moe.usage.cached_prompt_tokens": last.num_cached_prompt_tokens,
            },
        )
        prefill.end(end_time=first_token)
        decode = tracer.start_span("moe.decode", context=parent, start_time=first_token)
        self._token_events(decode)
        decode.end(end_time=end)
        span.set_attribute("moe.latency.queue_s", (scheduled - arrival) / 1e9)

    def _token_events(self, span: trace.Span) -> None:
        limit = self.telemetry.settings.token_events
        events = self.events
        if limit <= 0 or not events:
            return
        routing = events[-1].routing
        if routing is not None:
            span.set_attribute("moe.routing.layers", [layer for layer, _ in routing])
            span.set_attribute("moe.routing.top_k", len(routing[0][1]) if routing else 0)
        stride = -(-len(events) // limit)  # ceil: spread the kept events over the output
        for i in range(0, len(events), stride):
            event = events[i]
            attributes: dict[str, Any] = {"moe.token.index": event.index}
            if i > 0:
                attributes["moe.token.itl_s"] = event.time - events[i - 1].time
            if event.routing is not None:
                attributes.update(self._fan_out(event.routing))
            span.add_event("moe.token", attributes, timestamp=_epoch_ns(event.time))

    def _fan_out(self, routing: Routing) -> dict[str, Any]:
        pairs = [(layer, e) for layer, chosen in routing for e in chosen]
        shards = {self.shard_of(layer, e) for layer, e in pairs} if self.shard_of else set()
        return {
            "moe.token.experts": len({e for _, e in pairs}),
            "moe.token.shards": len(shards),
            "moe.token.routing": [e for _, chosen in routing for e in chosen],
        }
