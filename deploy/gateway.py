"""The gateway: authenticate, validate, ask the tier policy, stream tokens back.

Ray-free: it talks to tiers through a ``TierClient`` (opened and read by ``deploy.tier_stream``)
and yields protobuf chunks; ``deploy.gateway_host`` hosts it in the Serve ingress deployment.
Cascade: when the policy asks for a probe, the first K tokens of the fast tier are held back;
if their mean log-probability is too low the fast stream is cancelled and the strong tier serves
the request from scratch, otherwise the held tokens are released and the fast tier goes on.
Shadowed requests run on the candidate tier in a background task the caller never waits for.
A request whose replica is lost mid-stream is resubmitted to another replica of its tier with
the tokens already sent (``deploy.tier_stream.open_resumable``, ``grpc.max_resubmissions``):
every request has a seed (one is drawn here when the client sent none, and recorded), so the
resumed stream is the one the lost replica would have sent.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field, replace

import grpc
from opentelemetry import trace

from cluster.engine.requests import Routing
from cluster.serving.tier_client import TierClient
from cluster.serving.tier_messages import TierRequest, TierTokens
from cluster.telemetry.setup import get_telemetry, traceparent_of
from deploy.api import (
    ApiError,
    GenerateArgs,
    RequestLimits,
    invalid,
    parse_generate,
    usage_message,
)
from deploy.audit import (
    AuditLog,
    AuditRecord,
    kv_policy_record,
    routing_summary,
    sampling_record,
    utc_timestamp,
)
from deploy.config import ClusterConfig, largest_context
from deploy.edge_config import tenant_of
from deploy.gateway_trace import GatewayTrace
from deploy.proto import moecluster_v1_pb2 as pb
from deploy.tier_listing import health_of, list_tiers
from deploy.tier_stream import (
    ReplicaLostError,
    Resubmission,
    chain_held,
    open_resumable,
    open_tier_stream,
    routing_chunks,
)
from experts.stop_strings import StopStringMatcher
from router.tier_policy import TierDecision, TierPolicy

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


@dataclass
class _Served:
    """What the caller received, for usage, shadow comparison and the final chunk."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    routing: list[Routing] = field(default_factory=list)
    queue_s: float | None = None
    last: TierTokens | None = None


class Gateway:
    def __init__(
        self, config: ClusterConfig, tiers: TierClient, audit: AuditLog | None = None
    ) -> None:
        self.config = config
        self.tiers = tiers
        self.audit = audit
        self.policy = TierPolicy(config.policy_config())
        self.api_keys = config.auth.resolve_api_keys()  # here: in the gateway's own process
        self._background: set[asyncio.Task[None]] = set()
        self.limits = RequestLimits(
            max_tokens_limit=max(t.max_tokens_limit for t in config.tiers),
            max_prompt_tokens=largest_context(config) or RequestLimits.max_prompt_tokens,
        )

    def authenticate(self, metadata: Mapping[str, str]) -> str:
        """Check the API key; return the caller's tenant id ("" with authentication off)."""
        if not self.api_keys:
            return ""
        header = metadata.get("authorization", "")
        if not header:
            raise ApiError(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing API key: send metadata 'authorization: Bearer <key>'",
            )
        scheme, _, key = header.partition(" ")
        # every known key is compared (no early exit), so the time taken says nothing
        matches = [hmac.compare_digest(key.encode(), known.encode()) for known in self.api_keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
        return tenant_of(key)

    async def generate(
        self,
        request: pb.GenerateRequest,
        metadata: Mapping[str, str],
        request_id: str | None = None,
        budget_s: float | None = None,
    ) -> AsyncIterator[pb.GenerateChunk]:
        """Stream chunks for one request; problems raise ``ApiError``. The request id is the
        server's (``request_id``, or a new one): never a client-sent value. ``budget_s``: the
        seconds the call may run (the caller enforces it; no resubmission starts after it),
        at most ``grpc.request_timeout_s``."""
        traced = GatewayTrace(get_telemetry(), metadata)
        limit = self.config.grpc.request_timeout_s
        deadline = time.monotonic() + (limit if budget_s is None else min(budget_s, limit))
        chunks = self._generate(request, metadata, traced, request_id or uuid.uuid4().hex, deadline)
        error: BaseException | None = None
        try:
            async for chunk in chunks:
                yield chunk
        except BaseException as err:  # recorded on the span, then passed on unchanged
            error = err
            raise
        finally:
            # closing the inner generator now (not at garbage collection) is what cancels
            # the tier stream when the client goes away
            await chunks.aclose()
            traced.close(error)

    async def _generate(
        self,
        request: pb.GenerateRequest,
        metadata: Mapping[str, str],
        traced: GatewayTrace,
        request_id: str,
        deadline: float,
    ) -> AsyncGenerator[pb.GenerateChunk, None]:
        tenant = self.authenticate(metadata)
        args = parse_generate(request, self.limits)
        if args.params.seed is None:  # an explicit seed makes every request replayable
            args = replace(args, params=replace(args.params, seed=secrets.randbits(63)))
        trace_id = traced.trace_id or _trace_id(metadata.get("traceparent", ""))
        try:
            decision = self.policy.choose(args.tier, args.retrieval_confidence)
        except ValueError as err:
            raise invalid(str(err)) from None
        first_tier = decision.tier
        traced.request(
            request_id, args.params, args.prompt, self.config.tier(decision.tier).model_name
        )
        traced.deciding(decision)
        reachable = [decision.tier]
        if decision.probe_tokens:  # the cascade may hand the request to its target
            reachable.append(self.policy.config.cascade.to_tier)
        for tier in reachable:
            limit = self.config.tier(tier).max_tokens_limit
            if args.params.max_tokens > limit:
                raise invalid(
                    f"max_tokens={args.params.max_tokens} is out of range for tier "
                    f"{tier!r}: allowed [1, {limit}]"
                )
        tier_request = TierRequest(
            request_id=request_id,
            params=args.params,
            prompt=args.prompt,
            token_ids=args.token_ids,
            kv_policy=args.kv_policy,
            session_id=args.session_id,
            return_routing=args.return_routing,
            traceparent=traced.traceparent,
            attention_first_tokens=args.attention_first_tokens,
            cache_salt=tenant,  # tenants never share (or time) each other's cached blocks
            pin_tokens=args.pin_tokens,
            pin_ttl_s=args.pin_ttl_s,
        )
        resubmit = self._resubmission(traced, deadline)
        stream = await open_resumable(self.tiers, decision.tier, tier_request, resubmit)
        held: list[TierTokens] = []
        if decision.probe_tokens:
            stream, held, decision = await self._probe(decision, tier_request, stream, resubmit)
        traced.decided(decision, first_tier)
        served = _Served()
        matcher = StopStringMatcher(args.stop)
        try:
            async for batch in chain_held(held, stream):
                routing = routing_chunks(len(served.token_ids), batch)
                served.token_ids += batch.token_ids
                served.logprobs += batch.logprobs
                served.text.append(batch.text)
                served.last = batch
                if batch.queue_s is not None and served.queue_s is None:  # not a resumption's
                    served.queue_s = batch.queue_s
                if batch.routing is not None:
                    served.routing += batch.routing
                traced.token()
                text = matcher.push(batch.text)
                finish = "stop" if matcher.stopped else batch.finish_reason
                if finish is None:
                    yield pb.GenerateChunk(token_ids=batch.token_ids, text=text, routing=routing)
                    continue
                chunk = pb.GenerateChunk(
                    token_ids=batch.token_ids,
                    text=text + matcher.flush(),
                    finish_reason=finish,
                    routing=routing,
                )
                self._finish(chunk, decision, served, request_id, trace_id)
                self._record(traced, args, tier_request, decision, served, chunk)
                yield chunk
                break
        finally:
            await stream.aclose()
        shadow = self.policy.shadow_tier(decision, request_id)
        if shadow is not None:
            self._spawn(self._shadow(shadow, tier_request, served, traced.shadow_span(shadow)))

    def _record(
        self,
        traced: GatewayTrace,
        args: GenerateArgs,
        request: TierRequest,
        decision: TierDecision,
        served: _Served,
        chunk: pb.GenerateChunk,
    ) -> None:
        """The finished request's span attributes, latency metrics and audit record."""
        model = self.config.tier(decision.tier).model_name
        usage = {
            "prompt_tokens": chunk.usage.prompt_tokens,
            "cached_prompt_tokens": chunk.usage.cached_prompt_tokens,
            "completion_tokens": chunk.usage.completion_tokens,
            "truncated_tokens": chunk.usage.truncated_tokens,
        }
        text = "".join(served.text)
        traced.finished(decision, model, chunk.finish_reason, usage, served.queue_s, text)
        if self.audit is None:
            return
        record = AuditRecord(
            request_id=request.request_id,
            time=utc_timestamp(),
            trace_id=chunk.trace_id,
            tier=decision.tier,
            model=model,
            reason=decision.reason,
            escalated=decision.escalated,
            confidence=decision.confidence,
            sampling=sampling_record(args.params),
            stop=list(args.stop),
            kv_policy=kv_policy_record(args.kv_policy),
            prompt_tokens=usage["prompt_tokens"],
            cached_prompt_tokens=usage["cached_prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            truncated_tokens=usage["truncated_tokens"],
            finish_reason=chunk.finish_reason,
            routing=routing_summary(served.routing) if served.routing else None,
            prompt=args.prompt,
            prompt_token_ids=list(request.token_ids) if request.token_ids else None,
            output_text=text,
            output_token_ids=list(served.token_ids),
        )
        # a file write: off the event loop; append never raises (it counts its errors)
        self._spawn(asyncio.to_thread(self.audit.append, record))

    def _resubmission(self, traced: GatewayTrace, deadline: float) -> Resubmission:
        """The request's resubmission budget; each resubmission is traced and counted."""

        def resubmitted(lost: ReplicaLostError, attempt: int, num_sent: int) -> None:
            traced.resubmitted(lost.tier, attempt, num_sent, lost.detail)

        return Resubmission(self.config.grpc.max_resubmissions, deadline, resubmitted)

    async def _probe(
        self,
        decision: TierDecision,
        request: TierRequest,
        stream: AsyncGenerator[TierTokens, None],
        resubmit: Resubmission,
    ) -> tuple[AsyncGenerator[TierTokens, None], list[TierTokens], TierDecision]:
        """Hold back the fast tier's first K tokens and let the policy judge them."""
        held: list[TierTokens] = []
        logprobs: list[float] = []
        async for batch in stream:
            held.append(batch)
            logprobs += batch.logprobs
            if len(logprobs) >= decision.probe_tokens or batch.finish_reason is not None:
                break
        settled = self.policy.after_probe(decision, logprobs)  # [probe_tokens] logprobs
        if not settled.escalated:
            return stream, held, settled
        await stream.aclose()  # the fast tier stops; its tokens are never shown
        return await open_resumable(self.tiers, settled.tier, request, resubmit), [], settled

    def _finish(
        self,
        chunk: pb.GenerateChunk,
        decision: TierDecision,
        served: _Served,
        request_id: str,
        trace_id: str,
    ) -> None:
        last = served.last
        assert last is not None
        chunk.usage.CopyFrom(usage_message(last, len(served.token_ids), request_id))
        info = pb.TierInfo(
            name=decision.tier,
            model=self.config.tier(decision.tier).model_name,
            reason=decision.reason,
            escalated=decision.escalated,
        )
        if decision.confidence is not None:
            info.confidence = decision.confidence
        chunk.tier.CopyFrom(info)
        chunk.request_id = request_id
        chunk.trace_id = trace_id
        if last.attention is not None:
            chunk.attention.extend(
                pb.LayerAttention(layer=i, entropy=entropy, first_tokens_mass=mass)
                for i, (entropy, mass) in enumerate(last.attention)
            )

    async def _shadow(
        self, tier: str, request: TierRequest, primary: _Served, span: trace.Span | None
    ) -> None:
        """Run the request on the candidate tier and record how far it diverges."""
        tracker = self.policy.shadow
        k = tracker.config.probe_tokens
        params = replace(request.params, max_tokens=min(k, request.params.max_tokens))
        shadow_request = replace(
            request,
            request_id=f"{request.request_id}-shadow",
            params=params,
            return_routing=False,
            attention_first_tokens=0,
            traceparent=traceparent_of(span) if span is not None else "",
        )
        tokens: list[int] = []
        logprobs: list[float] = []
        try:
            async for batch in await open_tier_stream(self.tiers, tier, shadow_request):
                tokens += batch.token_ids
                logprobs += batch.logprobs
        except ApiError as err:
            if span is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, err.message))
                span.end()
            return  # the candidate could not take it: no sample, the caller is unaffected
        result = tracker.divergence(primary.token_ids, primary.logprobs, tokens, logprobs)
        tracker.record(result)
        get_telemetry().metrics.record_shadow_divergence(tier, result.divergence)
        if span is not None:
            span.set_attributes(
                {
                    "moe.shadow.divergence": result.divergence,
                    "moe.shadow.logprob_gap": result.logprob_gap,
                }
            )
            span.end()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def list_tiers(self) -> pb.ListTiersResponse:
        return await list_tiers(self.config, self.tiers, self.policy.promotion_state())

    async def health(self) -> pb.HealthResponse:
        return health_of(await self.list_tiers())


def _trace_id(traceparent: str) -> str:
    """The W3C trace id the client sent (``00-<trace>-<span>-<flags>``), or a new one."""
    if _TRACEPARENT.fullmatch(traceparent.strip().lower()):
        version, trace, parent, _ = traceparent.strip().lower().split("-")
        if version != "ff" and trace != "0" * 32 and parent != "0" * 16:
            return trace
    return secrets.token_hex(16)


__all__ = ["ApiError", "Gateway", "GenerateArgs"]
