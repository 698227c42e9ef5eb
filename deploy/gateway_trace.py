"""The gateway's part of a request's telemetry: the root span, the tier decision, latency metrics.

One SERVER span per Generate call, named ``text_completion {model}`` as the
OpenTelemetry GenAI conventions ask, continuing the W3C ``traceparent`` the
client sent (so the request joins the caller's trace). Its context is handed
to the tier replica, whose spans (queue, prefill, decode, expert shards) land
under it. Attributes: the GenAI ones where they exist, the project's own under
``moe.``. Text goes on the span only when ``telemetry.record_text`` is on.

The async generator serving the call never makes the span "current" (context
variables do not survive across the yields of a streamed response); children
get their parent explicitly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import grpc
from opentelemetry import trace

from cluster.telemetry.setup import Telemetry, context_from_traceparent, traceparent_of
from experts.sampling_params import SamplingParams
from router.tier_policy import TierDecision

PROVIDER = "moe-cluster"
OPERATION = "text_completion"


class GatewayTrace:
    def __init__(self, telemetry: Telemetry, metadata: Mapping[str, str]) -> None:
        self.telemetry = telemetry
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.span: trace.Span | None = None
        self._decision_span: trace.Span | None = None
        if telemetry.tracing:
            parent = context_from_traceparent(metadata.get("traceparent", ""))
            self.span = telemetry.tracer.start_span(
                OPERATION,
                context=parent,
                kind=trace.SpanKind.SERVER,
                attributes={"gen_ai.operation.name": OPERATION, "gen_ai.provider.name": PROVIDER},
            )
        # children (and a shadow run that outlives the request) are parented explicitly
        self._root_context = trace.set_span_in_context(self.span) if self.span else None

    @property
    def trace_id(self) -> str | None:
        """The trace this request is recorded in (the client's when it sent one)."""
        if self.span is None or not self.span.get_span_context().is_valid:
            return None
        return trace.format_trace_id(self.span.get_span_context().trace_id)

    @property
    def traceparent(self) -> str:
        """Context for the tier replica; "" when the request is not sampled."""
        if self.span is None or not self.span.get_span_context().trace_flags.sampled:
            return ""
        return traceparent_of(self.span)

    def request(
        self, request_id: str, params: SamplingParams, prompt: str | None, model: str
    ) -> None:
        if self.span is None:
            return
        self.span.update_name(f"{OPERATION} {model}")
        attributes: dict[str, Any] = {
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": params.max_tokens,
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
            "gen_ai.response.id": request_id,
            "moe.request.id": request_id,
        }
        if params.top_k:
            attributes["gen_ai.request.top_k"] = params.top_k
        if params.seed is not None:
            attributes["gen_ai.request.seed"] = params.seed
        if prompt is not None and self.telemetry.settings.record_text:
            attributes["moe.prompt.text"] = prompt
        self.span.set_attributes(attributes)

    def deciding(self, decision: TierDecision) -> None:
        """The tier decision span opens; it closes when the decision is settled (after a probe)."""
        if self.span is None:
            return
        self._decision_span = self.telemetry.tracer.start_span(
            "moe.tier_decision",
            context=self._root_context,
            attributes={"moe.tier": decision.tier, "moe.tier.reason": decision.reason},
        )

    def decided(self, decision: TierDecision, first_tier: str) -> None:
        if decision.escalated:
            self.telemetry.metrics.record_escalation(first_tier, decision.tier)
        span = self._decision_span
        if span is None:
            return
        span.set_attributes(
            {
                "moe.tier": decision.tier,
                "moe.tier.reason": decision.reason,
                "moe.escalated": decision.escalated,
            }
        )
        if decision.confidence is not None:
            span.set_attribute("moe.tier.confidence", decision.confidence)
        span.end()
        self._decision_span = None

    def resubmitted(self, tier: str, attempt: int, num_sent: int, reason: str) -> None:
        """A replica serving the request was lost; it goes on on another, from token
        ``num_sent`` (an event on the request span, and the resubmission counter)."""
        self.telemetry.metrics.record_resubmission(tier)
        if self.span is None:
            return
        self.span.add_event(
            "moe.resubmission",
            {
                "moe.tier": tier,
                "moe.resubmission.attempt": attempt,
                "moe.resubmission.tokens_sent": num_sent,
                "moe.resubmission.reason": reason[:300],
            },
        )

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()

    def finished(
        self,
        decision: TierDecision,
        model: str,
        finish_reason: str,
        usage: Mapping[str, int],
        queue_s: float | None,
        output_text: str,
    ) -> None:
        """Latency metrics and the response attributes; the span ends in ``close``."""
        end = time.monotonic()
        output_tokens = usage["completion_tokens"]
        ttft = (self.first_token or end) - self.start
        tpot = (end - ttft - self.start) / (output_tokens - 1) if output_tokens > 1 else None
        self.telemetry.metrics.record_request(
            decision.tier, model, ttft, tpot, end - self.start, finish_reason
        )
        if self.span is None:
            return
        attributes: dict[str, Any] = {
            "gen_ai.response.finish_reasons": [finish_reason],
            "gen_ai.usage.input_tokens": usage["prompt_tokens"],
            "gen_ai.usage.output_tokens": output_tokens,
            "moe.tier": decision.tier,
            "moe.tier.reason": decision.reason,
            "moe.escalated": decision.escalated,
            "moe.usage.cached_prompt_tokens": usage["cached_prompt_tokens"],
            "moe.usage.truncated_tokens": usage["truncated_tokens"],
            "moe.latency.ttft_s": ttft,
        }
        if tpot is not None:
            attributes["moe.latency.tpot_s"] = tpot
        if queue_s is not None:
            attributes["moe.latency.queue_s"] = queue_s
        if self.telemetry.settings.record_text:
            attributes["moe.completion.text"] = output_text
        self.span.set_attributes(attributes)

    def close(self, error: BaseException | None = None) -> None:
        """End the span; an error (or the client going away) marks it."""
        if self._decision_span is not None:
            self._decision_span.end()
            self._decision_span = None
        if self.span is None:
            return
        if error is not None:
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, str(error) or "error"))
            self.span.set_attribute("error.type", type(error).__name__)
            code = getattr(error, "code", None)
            if isinstance(code, grpc.StatusCode):
                self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        self.span.end()
        self.span = None

    def shadow_span(self, tier: str) -> trace.Span | None:
        """A span for the background shadow run, under the request (it may outlive it)."""
        if self._root_context is None:
            return None
        return self.telemetry.tracer.start_span(
            f"moe.shadow {tier}", context=self._root_context, attributes={"moe.tier": tier}
        )
