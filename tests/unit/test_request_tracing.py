"""A real request's telemetry end to end, in one process: gateway, tier replica, expert shards.

The gateway and a real ``TierReplica`` (tiny Mixtral checkpoint) run in-process; the
strong tier's experts are remote in the sense that matters here: a ``RemoteExperts``
backend dispatches every MoE layer to two shards through ``InProcessPool`` (the shard
actor body, called in-process, no Ray), carrying the trace context as the real pool
does. An in-memory span exporter and metric reader collect what a collector would receive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cluster.engine.config import EngineConfig
from cluster.expert_parallel.expert_pool import InProcessPool
from cluster.expert_parallel.remote_experts import RemoteExperts
from cluster.serving.tier_client import InProcessTierClient
from cluster.serving.tier_replica import TierReplica
from cluster.telemetry.settings import TelemetrySettings
from cluster.telemetry.setup import get_telemetry, reset_telemetry, setup_telemetry
from deploy.api import ApiError
from deploy.config import ClusterConfig, parse_config
from deploy.gateway import Gateway
from deploy.proto import moecluster_v1_pb2 as pb
from experts.checkpoint import CheckpointReader
from router.routing_table import round_robin
from tests.checkpoints import BuildCheckpoint

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(shared_checkpoint: BuildCheckpoint) -> Path:
    return shared_checkpoint("mixtral", seed=3)


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture(scope="module")
def gateway(
    model_dir: Path, exporter: InMemorySpanExporter, reader: InMemoryMetricReader
) -> Iterator[Gateway]:
    settings = TelemetrySettings(token_events=4)
    setup_telemetry(
        settings, role="test", span_exporter=exporter, metric_reader=reader
    )  # before the replicas: they read it at construction
    spec = CheckpointReader(model_dir).spec
    shard_ids = ["s0", "s1"]
    table = round_robin(spec.moe_layers, spec.num_experts, shard_ids)
    pool = InProcessPool.start(str(model_dir), {sid: table.experts_on(sid) for sid in shard_ids})
    engine = EngineConfig(num_blocks=64, max_num_seqs=4)
    replicas = {
        # colocated experts, the engine in a child process (as a deployed replica runs it)
        "fast": TierReplica("fast", model_dir, engine, engine_process=True),
        "strong": TierReplica(
            "strong", model_dir, engine, experts=RemoteExperts(pool, table, "strong")
        ),
    }
    config = _config(model_dir)
    yield Gateway(config, InProcessTierClient(replicas))
    for replica in replicas.values():
        replica.shutdown()
    reset_telemetry()


def _config(model_dir: Path) -> ClusterConfig:
    tiers = [{"name": "fast", "model": str(model_dir)}, {"name": "strong", "model": str(model_dir)}]
    return parse_config({"tiers": tiers}, base_dir=model_dir.parent)


def _run(gateway: Gateway, request: pb.GenerateRequest, metadata: dict[str, str]) -> list[Any]:
    async def collect() -> list[Any]:
        return [chunk async for chunk in gateway.generate(request, metadata)]

    return asyncio.run(collect())


def _request(**fields: Any) -> pb.GenerateRequest:
    base: dict[str, Any] = {
        "token_ids": [5, 6, 7, 8, 9, 10, 11],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "tier": "strong",
    }
    return pb.GenerateRequest(**(base | fields))


def _finished(exporter: InMemorySpanExporter) -> Sequence[ReadableSpan]:
    """Every span so far: the replica's children and dispatch spans are built in batches."""
    get_telemetry().force_flush()
    return exporter.get_finished_spans()


def _by_name(spans: Sequence[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


def _one(spans: Sequence[ReadableSpan], prefix: str) -> ReadableSpan:
    found = _by_name(spans, prefix)
    assert len(found) == 1, f"{prefix}: {[s.name for s in spans]}"
    return found[0]


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_span_tree_continues_the_client_trace(
    gateway: Gateway, exporter: InMemorySpanExporter
) -> None:
    exporter.clear()
    chunks = _run(gateway, _request(), {"traceparent": TRACEPARENT, "request_id": "req-1"})
    spans = _finished(exporter)
    assert {format(s.context.trace_id, "032x") for s in spans} == {CLIENT_TRACE}
    assert chunks[-1].trace_id == CLIENT_TRACE

    root = _one(spans, "text_completion ")
    assert root.kind is SpanKind.SERVER
    assert _parent(root) == int(CLIENT_SPAN, 16)
    root_id = root.context.span_id
    decision = _one(spans, "moe.tier_decision")
    tier = _one(spans, "moe.tier_request strong")
    assert _parent(decision) == root_id and _parent(tier) == root_id
    for name in ("moe.queue", "moe.prefill", "moe.decode"):
        assert _parent(_one(spans, name)) == tier.context.span_id, name

    # shard work: each traced step's layer dispatch, and each shard's compute under it
    dispatch = _by_name(spans, "moe.expert_dispatch")
    shard_work = _by_name(spans, "moe.expert_shard ")
    assert dispatch and shard_work
    assert {_parent(s) for s in dispatch} == {tier.context.span_id}
    assert {_parent(s) for s in shard_work} <= {s.context.span_id for s in dispatch}
    assert {s.attributes["moe.shard"] for s in shard_work} == {"s0", "s1"}


def test_root_attributes_follow_genai_conventions(
    gateway: Gateway, exporter: InMemorySpanExporter
) -> None:
    exporter.clear()
    chunks = _run(gateway, _request(), {"traceparent": TRACEPARENT})
    root = _one(_finished(exporter), "text_completion ")
    attrs = dict(root.attributes or {})
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.provider.name"] == "moe-cluster"
    assert attrs["gen_ai.request.max_tokens"] == MAX_TOKENS
    assert attrs["gen_ai.usage.input_tokens"] == 7
    assert attrs["gen_ai.usage.output_tokens"] == MAX_TOKENS
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("length",)
    assert attrs["gen_ai.response.id"] == chunks[-1].request_id
    assert attrs["moe.tier"] == "strong" and attrs["moe.tier.reason"] == "explicit"
    assert attrs["moe.latency.ttft_s"] > 0 and attrs["moe.latency.tpot_s"] > 0
    assert attrs["moe.latency.queue_s"] >= 0
    assert "moe.prompt.text" not in attrs and "moe.completion.text" not in attrs


def test_per_token_events_carry_routing_fan_out(
    gateway: Gateway, exporter: InMemorySpanExporter
) -> None:
    exporter.clear()
    _run(gateway, _request(), {"traceparent": TRACEPARENT})
    decode = _one(_finished(exporter), "moe.decode")
    events = [e for e in decode.events if e.name == "moe.token"]
    assert len(events) == 3  # 6 tokens, at most token_events=4: every second one
    attrs = decode.attributes or {}
    layers, top_k = list(attrs["moe.routing.layers"]), attrs["moe.routing.top_k"]
    for event in events:
        e = event.attributes or {}
        assert 1 <= e["moe.token.experts"] <= len(layers) * top_k
        assert 1 <= e["moe.token.shards"] <= 2
        assert len(e["moe.token.routing"]) == len(layers) * top_k
    assert "moe.token.itl_s" not in (events[0].attributes or {})
    assert all((e.attributes or {})["moe.token.itl_s"] > 0 for e in events[1:])


def test_metrics_record_latency_routing_dispatch_and_kv(
    gateway: Gateway, reader: InMemoryMetricReader
) -> None:
    _run(gateway, _request(), {})
    points = _points(reader)
    assert ("gen_ai.server.time_to_first_token", "strong") in points
    assert ("gen_ai.server.request.duration", "strong") in points
    assert ("gen_ai.server.time_per_output_token", "strong") in points
    routed = [a for name, a in _raw_points(reader) if name == "moe.routed_tokens"]
    assert {a["moe.tier"] for a in routed} == {"strong"}
    assert {"moe.layer", "moe.expert"} <= set(routed[0])
    assert ("moe.shard.dispatch.duration", "strong") in points
    assert ("moe.kv.blocks_in_use", "strong") in points


def test_errors_mark_the_root_span(gateway: Gateway, exporter: InMemorySpanExporter) -> None:
    exporter.clear()
    with pytest.raises(ApiError):
        _run(gateway, _request(tier="nope"), {"traceparent": TRACEPARENT})
    root = _one(_finished(exporter), "text_completion")
    assert root.status.status_code is StatusCode.ERROR
    assert (root.attributes or {})["rpc.grpc.status_code"] == 3  # INVALID_ARGUMENT


def test_attention_diagnostics_reach_the_response_and_the_trace(
    gateway: Gateway, exporter: InMemorySpanExporter
) -> None:
    exporter.clear()
    chunks = _run(gateway, _request(attention_first_tokens=2), {"traceparent": TRACEPARENT})
    attention = list(chunks[-1].attention)
    assert [a.layer for a in attention] == [0, 1, 2]
    assert all(a.entropy >= 0 and 0 <= a.first_tokens_mass <= 1 for a in attention)
    tier = _one(_finished(exporter), "moe.tier_request strong")
    masses = list((tier.attributes or {})["moe.attention.first_tokens_mass"])
    assert masses == pytest.approx([a.first_tokens_mass for a in attention], rel=1e-5)


def _raw_points(reader: InMemoryMetricReader) -> list[tuple[str, dict[str, Any]]]:
    data = reader.get_metrics_data()
    found = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    found.append((metric.name, dict(point.attributes or {})))
    return found


def _points(reader: InMemoryMetricReader) -> set[tuple[str, str]]:
    return {(name, str(a.get("moe.tier"))) for name, a in _raw_points(reader)}


def test_dispatch_spans_are_bounded_per_request(
    gateway: Gateway, exporter: InMemorySpanExporter
) -> None:
    exporter.clear()
    _run(gateway, _request(max_tokens=40), {"traceparent": TRACEPARENT})
    spans = _finished(exporter)
    # 40 steps x 3 MoE layers = 120 dispatches; only the first dispatch_spans are recorded
    assert len(_by_name(spans, "moe.expert_dispatch")) == TelemetrySettings().dispatch_spans
    assert len(_one(spans, "moe.decode").events) == 4  # token_events=4


def test_an_engine_process_replica_traces_and_counts_the_same(
    gateway: Gateway, exporter: InMemorySpanExporter, reader: InMemoryMetricReader
) -> None:
    """Runs last (the metrics are cumulative): the ``fast`` replica's engine is a child
    process; its token events' times and routing cross over, so the spans and metrics match."""
    exporter.clear()
    _run(gateway, _request(tier="fast"), {"traceparent": TRACEPARENT})
    spans = _finished(exporter)
    tier = _one(spans, "moe.tier_request fast")
    queue, prefill, decode = (_one(spans, n) for n in ("moe.queue", "moe.prefill", "moe.decode"))
    for span in (queue, prefill, decode):
        assert _parent(span) == tier.context.span_id
    assert tier.start_time <= queue.start_time <= queue.end_time <= prefill.end_time
    assert prefill.end_time <= decode.end_time <= tier.end_time
    events = [e for e in decode.events if e.name == "moe.token"]
    assert len(events) == 3
    for event in events:
        e = event.attributes or {}
        assert e["moe.token.experts"] >= 1 and e["moe.token.shards"] == 0  # colocated
    routed = [a for name, a in _raw_points(reader) if name == "moe.routed_tokens"]
    assert "fast" in {a["moe.tier"] for a in routed}
    assert ("moe.kv.blocks_in_use", "fast") in _points(reader)
