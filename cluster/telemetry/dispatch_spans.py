"""The spans of expert dispatch, recorded without stopping the layer, on either side of the wire.

Backbone side (``DispatchSpans``): when the engine step belongs to a traced request
(``step_trace``), each MoE layer's dispatch is a span under that request, and its context
travels with the shard calls so the shards' ``moe.expert_shard`` spans land under it. The
layer runs on the engine's thread, so here it only draws a span id, formats the
``traceparent`` and, when the layer is done, hands two clocks and three counts to the
process's ``SpanBatcher``; the span itself is built and exported on the batcher's thread.
At most ``dispatch_spans`` per request (its first steps' layers): a long generation would
otherwise make layers x steps x shards spans.

Shard side (``ShardSpan``): a shard's ``moe.expert_shard`` span under the dispatch span whose
``traceparent`` came with the tokens. The channel thread that computes the layer only reads
two clocks and queues them with the shard, layer and token count; the span (ended with an
error status when the compute raised) is built on the batcher's thread as well.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, Status, StatusCode

from cluster.telemetry.setup import Telemetry, span_context_of
from cluster.telemetry.span_batch import SpanFactory
from cluster.telemetry.step_trace import current_step_trace

MAX_REQUESTS_COUNTED = 4096  # traced requests whose span counts are remembered (the latest)


class PendingDispatch(NamedTuple):
    """A layer's dispatch span while the layer runs: what the span will say, and its id."""

    parent: SpanContext
    span_id: int
    layer: int
    num_tokens: int
    num_shards: int
    start_ns: int

    @property
    def traceparent(self) -> str:
        """For the shard calls: their spans become this span's children."""
        flags = int(self.parent.trace_flags)
        return f"00-{self.parent.trace_id:032x}-{self.span_id:016x}-{flags:02x}"


class DispatchSpans:
    """Counts each traced request's dispatch spans and records them; one per expert backend,
    used from the engine's thread."""

    def __init__(self) -> None:
        self._made: dict[str, int] = {}  # traceparent -> spans so far; most recent last

    def start(
        self, telemetry: Telemetry, layer: int, num_tokens: int, num_shards: int
    ) -> PendingDispatch | None:
        """The span of this layer's dispatch, when the step is traced and under the limit."""
        step = current_step_trace()
        factory = telemetry.span_factory
        if not step or factory is None:
            return None
        made = self._made.pop(step, 0)
        self._made[step] = made + 1  # re-inserted last: the oldest requests are forgotten first
        if len(self._made) > MAX_REQUESTS_COUNTED:
            del self._made[next(iter(self._made))]
        if made >= telemetry.settings.dispatch_spans:
            return None
        parent = span_context_of(step)
        if parent is None:
            return None
        return PendingDispatch(
            parent, factory.new_span_id(), layer, num_tokens, num_shards, time.time_ns()
        )

    def end(self, telemetry: Telemetry, pending: PendingDispatch) -> None:
        batcher, factory = telemetry.span_batcher, telemetry.span_factory
        if batcher is not None and factory is not None:
            batcher.record(_build, factory, pending, time.time_ns())


def _build(factory: SpanFactory, pending: PendingDispatch, end_ns: int) -> Sequence[ReadableSpan]:
    span = factory.finished(
        "moe.expert_dispatch",
        pending.parent,
        pending.start_ns,
        end_ns,
        {
            "moe.layer": pending.layer,
            "moe.dispatch.tokens": pending.num_tokens,
            "moe.dispatch.shards": pending.num_shards,
        },
        span_id=pending.span_id,
    )
    return [span] if span is not None else []


class ShardSpan(NamedTuple):
    """A shard's span of one layer while it computes: its parent and start."""

    parent: SpanContext
    shard_id: str
    layer: int
    num_tokens: int
    start_ns: int

    @classmethod
    def start(
        cls, telemetry: Telemetry, traceparent: str, shard_id: str, layer: int, num_tokens: int
    ) -> ShardSpan | None:
        """The span of this compute, when the call came traced and this process traces."""
        if not traceparent or telemetry.span_batcher is None:
            return None
        parent = span_context_of(traceparent)  # parsed once per layer (cached)
        if parent is None:
            return None
        return cls(parent, shard_id, layer, num_tokens, time.time_ns())

    def end(self, telemetry: Telemetry, error: str = "") -> None:
        """Queue the span for the batcher; ``error`` (the exception's text) marks it failed."""
        batcher, factory = telemetry.span_batcher, telemetry.span_factory
        if batcher is not None and factory is not None:
            batcher.record(_build_shard, factory, self, time.time_ns(), error)


def _build_shard(
    factory: SpanFactory, pending: ShardSpan, end_ns: int, error: str
) -> Sequence[ReadableSpan]:
    span = factory.finished(
        f"moe.expert_shard {pending.shard_id}",
        pending.parent,
        pending.start_ns,
        end_ns,
        {
            "moe.shard": pending.shard_id,
            "moe.layer": pending.layer,
            "moe.shard.tokens": pending.num_tokens,
        },
        status=Status(StatusCode.ERROR, error) if error else Status(StatusCode.UNSET),
    )
    return [span] if span is not None else []
