"""The gateway resubmits a request whose replica was lost (actor died, engine stopped) with the
tokens already sent, within ``grpc.max_resubmissions`` and the deadline; never after a
refusal, a request's own failure or a client cancel. Scripted tiers, no Ray, no model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cluster.serving.tier_client import TierReplicaLostError
from cluster.serving.tier_messages import TierItem, TierRejected, TierRequest
from cluster.telemetry.settings import TelemetrySettings
from cluster.telemetry.setup import reset_telemetry, setup_telemetry
from deploy.config import ClusterConfig, ConfigError, parse_config
from deploy.gateway import Gateway
from deploy.proto import moecluster_v1_pb2 as pb
from tests.unit.gateway_fakes import (
    PROMPT_TOKENS,
    Call,
    FakeTierClient,
    Script,
    api_error,
    assert_all_closed,
    assert_only_last_is_final,
    batch,
    make_config,
    rejected,
    run_generate,
    stream,
    take_then_leave,
    text_of,
    tokens_of,
)


class SequencedTierClient(FakeTierClient):
    """Each call to a tier follows the next of its scripts (the last one repeats)."""

    def __init__(self, scripts: dict[str, list[Script]]) -> None:
        super().__init__()
        self.sequences = scripts

    async def generate(self, tier: str, request: TierRequest) -> AsyncGenerator[TierItem, None]:
        done = len(self.calls_to(tier))
        scripts = self.sequences[tier]
        self.scripts[tier] = scripts[min(done, len(scripts) - 1)]
        async with aclosing(super().generate(tier, request)) as items:  # a cancel reaches it
            async for item in items:
                yield item


def lost_after(*batches: TierItem) -> Script:
    """A replica that streams ``batches`` then dies (Ray's actor error, as the client maps it)."""
    return Script(list(batches), error_after=TierReplicaLostError)


def engine_stopped_after(*batches: TierItem) -> Script:
    return Script([*batches, TierRejected("unavailable", "engine stopped", engine_stopped=True)])


def config(max_resubmissions: int | None = None) -> ClusterConfig:
    base = make_config(cascade={"enabled": False})
    if max_resubmissions is None:
        return base
    grpc_section = base.grpc.model_copy(update={"max_resubmissions": max_resubmissions})
    return base.model_copy(update={"grpc": grpc_section})


def request(**fields: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="hi", tier="strong", max_tokens=6, **fields)  # type: ignore[arg-type]


def resumed_with(call: Call) -> tuple[int, ...]:
    return call.request.resume_token_ids


def test_a_replica_lost_mid_stream_is_resubmitted_with_the_tokens_sent() -> None:
    fake = SequencedTierClient(
        {
            "strong": [
                lost_after(batch([1, 2], text="Hé"), batch([3], text="l")),
                stream(batch([4, 5], text="lo"), batch([6], text="!", finish="length")),
            ]
        }
    )
    chunks = run_generate(Gateway(config(), fake), request(seed=5))
    assert tokens_of(chunks) == [1, 2, 3, 4, 5, 6]  # nothing repeated, nothing missing
    assert text_of(chunks) == "Héllo!"
    last = assert_only_last_is_final(chunks)
    assert last.usage.prompt_tokens == PROMPT_TOKENS and last.usage.completion_tokens == 6
    first, second = fake.calls_to("strong")
    assert resumed_with(first) == () and resumed_with(second) == (1, 2, 3)
    assert second.request.params == first.request.params  # same seed, same max_tokens
    assert second.request.request_id == first.request.request_id
    assert_all_closed(fake)


def test_an_unseeded_request_resumes_with_the_seed_the_gateway_drew() -> None:
    fake = SequencedTierClient(
        {"strong": [lost_after(batch([1])), stream(batch([2], finish="length"))]}
    )
    run_generate(Gateway(config(), fake), request(temperature=0.8))
    first, second = fake.calls_to("strong")
    assert first.request.params.seed is not None
    assert second.request.params.seed == first.request.params.seed


def test_an_engine_that_stopped_mid_stream_is_a_lost_replica() -> None:
    fake = SequencedTierClient(
        {
            "strong": [
                engine_stopped_after(batch([1, 2])),
                stream(batch([3], finish="length")),
            ]
        }
    )
    chunks = run_generate(Gateway(config(), fake), request())
    assert tokens_of(chunks) == [1, 2, 3]
    assert resumed_with(fake.calls_to("strong")[1]) == (1, 2)


def test_a_replica_lost_before_its_first_token_is_resubmitted_from_scratch() -> None:
    fake = SequencedTierClient(
        {
            "strong": [
                Script(error=TierReplicaLostError),
                rejected("unavailable", "tier 'strong' stopped generating"),
                stream(batch([1, 2], finish="length")),
            ]
        }
    )
    fake.sequences["strong"][1] = engine_stopped_after()  # a dead engine refusing at once
    chunks = run_generate(Gateway(config(), fake), request())
    assert tokens_of(chunks) == [1, 2]
    assert [resumed_with(c) for c in fake.calls_to("strong")] == [(), (), ()]


def test_resubmissions_are_bounded() -> None:
    fake = SequencedTierClient({"strong": [lost_after(batch([1])), lost_after(batch([2]))]})
    err = api_error(Gateway(config(max_resubmissions=2), fake), request())
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert "lost the replica serving this request" in err.message
    calls = fake.calls_to("strong")
    assert [resumed_with(c) for c in calls] == [(), (1,), (1, 2)]
    none = SequencedTierClient({"strong": [lost_after(batch([1])), stream(batch([2]))]})
    assert api_error(Gateway(config(max_resubmissions=0), none), request()).code == (
        grpc.StatusCode.UNAVAILABLE
    )
    assert len(none.calls_to("strong")) == 1


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("invalid_argument", grpc.StatusCode.INVALID_ARGUMENT),
        ("resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_a_refused_resubmission_ends_the_stream_with_the_refusal(
    code: str, status: grpc.StatusCode
) -> None:
    fake = SequencedTierClient(
        {"strong": [lost_after(batch([1])), rejected(code, f"refused: {code}")]}
    )
    err = api_error(Gateway(config(), fake), request())
    assert err.code == status and err.message == f"refused: {code}"
    assert len(fake.calls_to("strong")) == 2


def test_a_request_that_failed_alone_is_not_resubmitted() -> None:
    failed: list[TierItem] = [
        batch([1]),
        TierRejected("unavailable", "tier 'strong' failed this request"),
    ]
    fake = SequencedTierClient({"strong": [Script(failed), stream(batch([2]))]})
    err = api_error(Gateway(config(), fake), request())
    assert err.code == grpc.StatusCode.UNAVAILABLE and "failed this request" in err.message
    assert len(fake.calls_to("strong")) == 1


def test_no_resubmission_after_the_deadline() -> None:
    fake = SequencedTierClient({"strong": [lost_after(batch([1])), stream(batch([2]))]})
    gateway = Gateway(config(), fake)

    async def collect() -> list[pb.GenerateChunk]:
        return [c async for c in gateway.generate(request(), {}, budget_s=0.0)]

    with pytest.raises(Exception, match="lost the replica"):
        asyncio.run(collect())
    assert len(fake.calls_to("strong")) == 1


def test_a_client_cancel_is_never_resubmitted() -> None:
    fake = SequencedTierClient(
        {"strong": [stream(batch([1]), batch([2]), batch([3], finish="length"))]}
    )
    got = asyncio.run(take_then_leave(Gateway(config(), fake), request(), 1))
    assert got == [1]
    (call,) = fake.calls_to("strong")
    assert call.cancelled


def test_each_resubmission_is_a_span_event_and_counted() -> None:
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    setup_telemetry(TelemetrySettings(), role="test", span_exporter=exporter, metric_reader=reader)
    try:
        fake = SequencedTierClient(
            {
                "strong": [
                    lost_after(batch([1, 2])),
                    lost_after(batch([3])),
                    stream(batch([4], finish="length")),
                ]
            }
        )
        run_generate(Gateway(config(), fake), request())
        (root,) = [s for s in exporter.get_finished_spans() if s.name.startswith("text_")]
        events = [e for e in root.events if e.name == "moe.resubmission"]
        attributes = [dict(e.attributes or {}) for e in events]
        assert [a["moe.resubmission.tokens_sent"] for a in attributes] == [2, 3]
        assert [a["moe.resubmission.attempt"] for a in attributes] == [1, 2]
        assert all(a["moe.tier"] == "strong" for a in attributes)
        data = reader.get_metrics_data()
        assert data is not None
        points = [
            getattr(p, "value", None)
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == "moe.resubmissions"
            for p in m.data.data_points
        ]
        assert points == [2]
    finally:
        reset_telemetry()


def test_max_resubmissions_is_bounded_at_load() -> None:
    data: dict[str, object] = {
        "tiers": [{"name": "fast", "model": "models/fast"}],
        "policy": {"cascade": {"enabled": False}},
        "grpc": {},
    }
    assert parse_config(data, base_dir=Path("/srv")).grpc.max_resubmissions == 2
    data["grpc"] = {"max_resubmissions": 11}
    with pytest.raises(ConfigError, match="max_resubmissions"):
        parse_config(data, base_dir=Path("/srv"))
