"""Telemetry of remote dispatch off the engine's thread: per-shard round-trip metrics and the
shards' ``moe.expert_shard`` spans are recorded as plain data, and built on a batcher's thread
(or at the next collection / flush, which sees everything recorded before it). No Ray."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from cluster.expert_parallel.remote_experts import RemoteExperts
from cluster.expert_parallel.shard_actor import ShardActorImpl
from cluster.expert_parallel.transports import ShardCall
from cluster.telemetry import metrics as metrics_module
from cluster.telemetry.settings import TelemetrySettings
from cluster.telemetry.setup import (
    get_telemetry,
    reset_telemetry,
    setup_telemetry,
    traceparent_for,
)
from cluster.telemetry.span_batch import SpanFactory
from router.routing_table import round_robin

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    reset_telemetry()
    yield
    reset_telemetry()


def _dispatch_points(reader: InMemoryMetricReader) -> dict[str, int]:
    """Data points of ``moe.shard.dispatch.duration``: count per shard."""
    data = reader.get_metrics_data()
    counts: dict[str, int] = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == "moe.shard.dispatch.duration":
                    for point in metric.data.data_points:
                        assert isinstance(point, HistogramDataPoint) and point.attributes
                        counts[str(point.attributes["moe.shard"])] = point.count
    return counts


class _Recorded:
    """Which threads recorded dispatch measurements."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, metrics: metrics_module.Metrics) -> None:
        self.threads: list[str] = []
        real = metrics._record_dispatches

        def spy(*args: Any) -> Sequence[Any]:
            self.threads.append(threading.current_thread().name)
            return real(*args)

        monkeypatch.setattr(metrics, "_record_dispatches", spy)


def test_layer_timings_are_recorded_off_the_calling_thread_and_seen_by_a_collection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reader = InMemoryMetricReader()
    metrics = setup_telemetry(TelemetrySettings(), role="tier", metric_reader=reader).metrics
    recorded = _Recorded(monkeypatch, metrics)
    for _ in range(3):
        metrics.record_dispatch_layer("strong", ["s0", "s1"], [0.001, 0.002])
    assert threading.current_thread().name not in recorded.threads  # queued, not recorded here
    assert _dispatch_points(reader) == {"s0": 3, "s1": 3}  # a collection drains the queue first
    metrics.record_dispatch_layer("strong", ["s1"], [0.003])
    deadline = threading.Event()
    for _ in range(100):  # the batcher's own thread, within its interval (0.5 s)
        if len(recorded.threads) == 4:
            break
        deadline.wait(0.05)
    assert recorded.threads[-1] == "span-batcher"
    assert _dispatch_points(reader) == {"s0": 3, "s1": 4}


class _Echo:
    """A ``ShardCaller`` whose shards answer their hidden rows at once."""

    def send(self, call: ShardCall) -> Any:
        return call.hidden.clone()

    def wait(self, pending: Sequence[Any]) -> list[torch.Tensor]:
        return list(pending)

    def wait_timed(self, pending: Sequence[Any]) -> list[tuple[torch.Tensor, float]]:
        return [(out, 0.001) for out in pending]


def test_remote_experts_queue_one_record_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    reader = InMemoryMetricReader()
    metrics = setup_telemetry(TelemetrySettings(), role="tier", metric_reader=reader).metrics
    queued: list[tuple[Any, ...]] = []
    monkeypatch.setattr(metrics, "record_dispatch", lambda *a: pytest.fail("recorded inline"))
    real = metrics.record_dispatch_layer

    def spy(*args: Any) -> None:
        queued.append(args)
        real(*args)

    monkeypatch.setattr(metrics, "record_dispatch_layer", spy)
    backend = RemoteExperts(_Echo(), round_robin((0,), 4, ["s0", "s1"]), tier="strong")
    hidden = torch.randn(3, 8)
    ids = torch.tensor([[0, 2], [1, 3], [0, 1]])  # even experts on s0, odd on s1
    out = backend.forward(0, hidden, ids, torch.ones(3, 2))
    assert torch.equal(out, hidden * torch.tensor([[1.0], [1.0], [2.0]]))  # token 2 on both
    assert queued == [("strong", ["s0", "s1"], [0.001, 0.001])]
    assert _dispatch_points(reader) == {"s0": 1, "s1": 1}


class _Shard:
    def compute(self, layer: int, hidden: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if layer == 99:
            raise KeyError("no expert for layer 99")
        return hidden * 2


def _shard_actor() -> ShardActorImpl:
    """The actor body around a fake shard (no checkpoint)."""
    actor = ShardActorImpl.__new__(ShardActorImpl)
    actor.shard, actor.device, actor.shard_id = _Shard(), "cpu", "s1"  # type: ignore[assignment]
    return actor


def test_shard_spans_are_built_off_the_channel_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = InMemorySpanExporter()
    setup_telemetry(TelemetrySettings(), role="expert_shard", span_exporter=exporter)
    built_on: list[str] = []
    real = SpanFactory.finished

    def spy(self: SpanFactory, *args: Any, **kwargs: Any) -> Any:
        built_on.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SpanFactory, "finished", spy)
    actor = _shard_actor()
    hidden, ids, weights = torch.ones(4, 8), torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2)
    assert torch.equal(actor.compute_tensors(3, hidden, ids, weights, TRACEPARENT), hidden * 2)
    assert torch.equal(actor.compute_tensors(3, hidden, ids, weights, ""), hidden * 2)  # untraced
    with pytest.raises(KeyError):
        actor.compute_tensors(99, hidden, ids, weights, TRACEPARENT)
    assert threading.current_thread().name not in built_on
    get_telemetry().force_flush()
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["moe.expert_shard s1"] * 2
    ok, failed = spans
    assert ok.parent is not None and traceparent_for(ok.parent) == TRACEPARENT
    assert dict(ok.attributes or {}) == {"moe.shard": "s1", "moe.layer": 3, "moe.shard.tokens": 4}
    assert ok.status.status_code is StatusCode.UNSET and ok.end_time >= ok.start_time  # type: ignore[operator]
    assert failed.status.status_code is StatusCode.ERROR
    assert "KeyError" in (failed.status.description or "")
