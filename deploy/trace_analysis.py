"""What a trace file says about latency, expert fan-out and expert load: pure functions over spans.

A request is its root span (``text_completion {model}``, attribute ``gen_ai.operation.name``);
its descendants in the same trace (tier request, queue, prefill, decode, expert shards) are
found by walking parent ids. Per-token ``moe.token`` events are counted for the tier of their
nearest ``moe.tier_request`` span; events under a ``moe.shadow`` span count for that shadow
tier's fan-out and expert load but never for the request's own numbers.

Latency prefers the attributes the gateway measured and falls back to what the spans show
(first token event for TTFT, event spacing for time per token, the ``moe.queue`` span), so a
trace with missing attributes still reports. Expert counts cover the recorded token events,
which are a spread sample of at most ``token_events`` per request.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cluster.telemetry.trace_file import SpanEvent, SpanRecord

OPERATION = "text_completion"
TOKEN_EVENT = "moe.token"
UNKNOWN_TIER = "unknown"


@dataclass(frozen=True)
class Percentiles:
    count: int
    p50: float | None
    p95: float | None
    p99: float | None


@dataclass(frozen=True)
class TierSummary:
    tier: str
    requests: int
    errors: int  # root span status ERROR
    escalated: int
    output_tokens: int
    ttft_s: Percentiles
    tpot_s: Percentiles
    e2e_s: Percentiles


@dataclass(frozen=True)
class Bucket:
    value: int
    count: int
    share: float


@dataclass(frozen=True)
class FanOut:
    """How many distinct experts and shards each recorded token of a tier touched."""

    tier: str
    tokens: int
    experts: list[Bucket]
    shards: list[Bucket]


@dataclass(frozen=True)
class RequestSummary:
    request_id: str
    trace_id: str
    tier: str
    e2e_s: float
    ttft_s: float | None
    tpot_s: float | None
    queue_s: float | None
    output_tokens: int | None
    mean_experts: float | None  # per recorded token
    mean_shards: float | None
    error: bool
    escalated: bool


@dataclass(frozen=True)
class HotExpert:
    tier: str
    layer: int
    expert: int
    tokens: int
    share: float  # of the layer's routed (token, expert) pairs


@dataclass(frozen=True)
class ExpertLoad:
    """Recorded tokens per (layer, expert) of one tier: ``tokens[i][e]`` is ``layers[i]``, e."""

    tier: str
    layers: list[int]
    num_experts: int
    tokens: list[list[int]]


@dataclass(frozen=True)
class TraceReport:
    num_spans: int
    num_traces: int
    num_requests: int
    num_token_events: int
    tiers: list[TierSummary]
    fan_out: list[FanOut]
    slowest: list[RequestSummary]
    hot_experts: list[HotExpert]
    loads: list[ExpertLoad]
    requests: list[RequestSummary] = field(repr=False)  # all of them, for plots
    notes: list[str]


def percentiles(values: Iterable[float]) -> Percentiles:
    data = sorted(values)
    return Percentiles(len(data), *(percentile(data, q) for q in (50.0, 95.0, 99.0)))


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), None when empty."""
    if not sorted_values:
        return None
    rank = (len(sorted_values) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def is_request_span(span: SpanRecord) -> bool:
    return span.attributes.get("gen_ai.operation.name") == OPERATION or (
        span.name == OPERATION or span.name.startswith(OPERATION + " ")
    )


def _tier_of_tier_request(span: SpanRecord) -> str:
    tier = span.attributes.get("moe.tier")
    return str(tier) if tier else span.name.partition(" ")[2] or UNKNOWN_TIER


@dataclass
class _Place:
    """Where a span sits: its request root, its tier-request span, and whether under a shadow."""

    root: SpanRecord | None = None
    tier_request: SpanRecord | None = None
    shadow: bool = False


@dataclass
class _RequestTokens:
    num_experts: list[int] = field(default_factory=list)
    num_shards: list[int] = field(default_factory=list)
    events: list[SpanEvent] = field(default_factory=list)
    queue_s: float | None = None
    tier: str | None = None


def _locate(spans: dict[str, SpanRecord]) -> dict[str, _Place]:
    """Walk each span's parents (within its trace) to its request root and tier-request span."""
    places: dict[str, _Place] = {}
    for span_id, span in spans.items():
        place = _Place()
        current: SpanRecord | None = span
        seen: set[str] = set()
        while current is not None and current.span_id not in seen:
            seen.add(current.span_id)
            if is_request_span(current):
                place.root = current
                break
            if place.tier_request is None and current.name.startswith("moe.tier_request"):
                place.tier_request = current
            place.shadow = place.shadow or current.name.startswith("moe.shadow")
            current = spans.get(current.parent_span_id)
        places[span_id] = place
    return places


def _routing_pairs(event: SpanEvent, carriers: list[SpanRecord]) -> list[tuple[int, int]]:
    """(layer, expert) pairs of a token event's flattened [layer slot][k] routing, or []."""
    flat = event.attributes.get("moe.token.routing")
    if not isinstance(flat, list) or not flat:
        return []
    layers: Any = None
    top_k: Any = None
    for span in carriers:  # the span holding the event first, then its tier-request span
        layers = layers if layers is not None else span.attributes.get("moe.routing.layers")
        top_k = top_k if top_k is not None else span.attributes.get("moe.routing.top_k")
    if isinstance(layers, list) and layers and len(flat) % len(layers) == 0:
        top_k = len(flat) // len(layers)
    elif isinstance(top_k, int) and top_k > 0 and len(flat) % top_k == 0:
        layers = list(range(len(flat) // top_k))  # layer slots stand in for layer indices
    else:
        return []
    return [
        (int(layers[i // top_k]), int(expert))
        for i, expert in enumerate(flat)
        if isinstance(expert, int) and expert >= 0
    ]


def analyze(spans: Iterable[SpanRecord], *, top: int = 10) -> TraceReport:
    """Summarise spans from one or more trace files; ``top`` bounds the slowest and hot lists."""
    traces: dict[str, dict[str, SpanRecord]] = defaultdict(dict)
    num_spans = 0
    for span in spans:
        traces[span.trace_id].setdefault(span.span_id, span)  # a re-read file adds nothing
        num_spans += 1
    notes: list[str] = []
    experts_by_tier: dict[str, Counter[int]] = defaultdict(Counter)
    shards_by_tier: dict[str, Counter[int]] = defaultdict(Counter)
    load: dict[str, Counter[tuple[int, int]]] = defaultdict(Counter)
    per_request: dict[tuple[str, str], _RequestTokens] = defaultdict(_RequestTokens)
    roots: list[SpanRecord] = []
    num_events = orphans = 0
    for trace_spans in traces.values():
        places = _locate(trace_spans)
        for span in trace_spans.values():
            place = places[span.span_id]
            if is_request_span(span):
                roots.append(span)
                continue
            own = None if place.shadow or place.root is None else place.root
            tokens = per_request[(own.trace_id, own.span_id)] if own is not None else None
            if tokens is not None and span.name == "moe.queue" and tokens.queue_s is None:
                tokens.queue_s = span.duration_s
            if tokens is not None and span is place.tier_request and tokens.tier is None:
                tokens.tier = _tier_of_tier_request(span)  # when the root does not say
            events = [e for e in span.events if e.name == TOKEN_EVENT]
            if not events:
                continue
            num_events += len(events)
            if tokens is None and not place.shadow:
                orphans += len(events)
            tier_span = place.tier_request
            if tier_span is not None:
                tier = _tier_of_tier_request(tier_span)
            elif own is not None and own.attributes.get("moe.tier"):
                tier = str(own.attributes["moe.tier"])
            else:
                tier = UNKNOWN_TIER
            carriers = [span] if tier_span is None else [span, tier_span]
            if tokens is not None:
                tokens.events.extend(events)
            for event in events:
                n_experts = event.attributes.get("moe.token.experts")
                n_shards = event.attributes.get("moe.token.shards")
                if isinstance(n_experts, int):
                    experts_by_tier[tier][n_experts] += 1
                    if tokens is not None:
                        tokens.num_experts.append(n_experts)
                if isinstance(n_shards, int):
                    shards_by_tier[tier][n_shards] += 1
                    if tokens is not None:
                        tokens.num_shards.append(n_shards)
                load[tier].update(_routing_pairs(event, carriers))
    if orphans:
        notes.append(f"{orphans} token event(s) outside any request span (gateway spans missing?)")
    if not roots:
        notes.append("no request spans (text_completion) found")
    requests = [
        _summarise(root, per_request.get((root.trace_id, root.span_id), _RequestTokens()))
        for root in roots
    ]
    slowest = sorted(requests, key=lambda r: (-r.e2e_s, r.request_id))[: max(top, 0)]
    tiers_seen = sorted({r.tier for r in requests} | set(experts_by_tier) | set(shards_by_tier))
    return TraceReport(
        num_spans=num_spans,
        num_traces=len(traces),
        num_requests=len(requests),
        num_token_events=num_events,
        tiers=[_tier_summary(t, [r for r in requests if r.tier == t]) for t in tiers_seen],
        fan_out=[
            _fan_out(t, experts_by_tier[t], shards_by_tier[t])
            for t in tiers_seen
            if experts_by_tier[t] or shards_by_tier[t]
        ],
        slowest=slowest,
        hot_experts=[h for t in sorted(load) for h in _hot_experts(t, load[t], top)],
        loads=[_expert_load(t, load[t]) for t in sorted(load) if load[t]],
        requests=requests,
        notes=notes,
    )


def _summarise(root: SpanRecord, tokens: _RequestTokens) -> RequestSummary:
    attrs = root.attributes
    events = sorted(tokens.events, key=lambda e: e.attributes.get("moe.token.index", 0))
    ttft = _number(attrs.get("moe.latency.ttft_s"))
    first = next((e for e in events if e.attributes.get("moe.token.index") == 0), None)
    if ttft is None and first is not None:
        ttft = max(0, first.time_ns - root.start_ns) / 1e9
    tpot = _number(attrs.get("moe.latency.tpot_s"))
    indexed = [e for e in events if isinstance(e.attributes.get("moe.token.index"), int)]
    if tpot is None and len(indexed) >= 2:
        a, b = indexed[0], indexed[-1]
        steps = b.attributes["moe.token.index"] - a.attributes["moe.token.index"]
        tpot = (b.time_ns - a.time_ns) / 1e9 / steps if steps > 0 else None
    queue = _number(attrs.get("moe.latency.queue_s"))
    output = attrs.get("gen_ai.usage.output_tokens")
    if not isinstance(output, int) and indexed:
        output = max(e.attributes["moe.token.index"] for e in indexed) + 1
    return RequestSummary(
        request_id=str(attrs.get("moe.request.id") or attrs.get("gen_ai.response.id") or "")
        or root.span_id,
        trace_id=root.trace_id,
        tier=str(attrs.get("moe.tier") or tokens.tier or UNKNOWN_TIER),
        e2e_s=root.duration_s,
        ttft_s=ttft,
        tpot_s=tpot,
        queue_s=queue if queue is not None else tokens.queue_s,
        output_tokens=output if isinstance(output, int) else None,
        mean_experts=_mean(tokens.num_experts),
        mean_shards=_mean(tokens.num_shards),
        error=root.status == "ERROR",
        escalated=attrs.get("moe.escalated") is True,
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _mean(values: list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def _tier_summary(tier: str, requests: list[RequestSummary]) -> TierSummary:
    return TierSummary(
        tier=tier,
        requests=len(requests),
        errors=sum(r.error for r in requests),
        escalated=sum(r.escalated for r in requests),
        output_tokens=sum(r.output_tokens or 0 for r in requests),
        ttft_s=percentiles(r.ttft_s for r in requests if r.ttft_s is not None),
        tpot_s=percentiles(r.tpot_s for r in requests if r.tpot_s is not None),
        e2e_s=percentiles(r.e2e_s for r in requests),
    )


def _buckets(counts: Counter[int]) -> list[Bucket]:
    total = sum(counts.values())
    return [Bucket(v, counts[v], counts[v] / total) for v in sorted(counts)]


def _fan_out(tier: str, experts: Counter[int], shards: Counter[int]) -> FanOut:
    tokens = max(sum(experts.values()), sum(shards.values()))
    return FanOut(tier, tokens, _buckets(experts), _buckets(shards))


def _hot_experts(tier: str, load: Counter[tuple[int, int]], top: int) -> list[HotExpert]:
    per_layer: Counter[int] = Counter()
    for (layer, _), n in load.items():
        per_layer[layer] += n
    ranked = sorted(load.items(), key=lambda item: (-item[1], item[0]))[: max(top, 0)]
    return [HotExpert(tier, layer, e, n, n / per_layer[layer]) for (layer, e), n in ranked]


def _expert_load(tier: str, load: Counter[tuple[int, int]]) -> ExpertLoad:
    layers = sorted({layer for layer, _ in load})
    num_experts = max(e for _, e in load) + 1
    rows = [[load[(layer, e)] for e in range(num_experts)] for layer in layers]
    return ExpertLoad(tier, layers, num_experts, rows)
