"""deploy.trace_analysis and ``moe-cluster traces report`` over a trace file written by the
JSON-lines exporter, following the span contract of the gateway and tier replicas."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from cluster.telemetry.setup import JsonLinesSpanExporter, read_spans
from deploy.cli import main
from deploy.trace_analysis import Bucket, analyze, percentile

MS = 1_000_000  # ns
LAYERS = [1, 3]  # MoE layer index of each routing slot; top_k = 2
# Flattened [layer slot][k] expert ids, with the fan-out the replica would compute.
A = ([0, 1, 2, 3], 4, 2)  # (routing, distinct experts, distinct shards)
B = ([0, 2, 0, 1], 3, 1)
C = ([0, 1, 0, 1], 2, 1)


class _Writer:
    """Writes request traces the way gateway and replicas do, with explicit timestamps."""

    def __init__(self, path: Path) -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": "test"}))
        self.provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
        self.tracer = self.provider.get_tracer("test")
        self.clock = 1_700_000_000_000 * MS

    def request(
        self,
        rid: str,
        tier: str,
        e2e_ms: int,
        tokens: list[tuple[list[int], int, int]] | None = None,
        *,
        root_attrs: dict[str, Any] | None = None,
        events_on: str = "decode",
        error: bool = False,
        shadow: tuple[str, list[tuple[list[int], int, int]]] | None = None,
        token_times_ms: list[tuple[int, int]] | None = None,  # (index, ms) without routing
        queue_ms: int = 1,
    ) -> None:
        start = self.clock
        self.clock += 10_000 * MS
        attrs = {
            "gen_ai.operation.name": "text_completion",
            "gen_ai.provider.name": "moe-cluster",
            "gen_ai.request.model": "m",
            "gen_ai.response.id": rid,
            "moe.request.id": rid,
            "moe.tier": tier,
        }
        attrs.update(root_attrs or {})
        root = self.tracer.start_span(
            f"text_completion {tier}-model",
            kind=trace.SpanKind.SERVER,
            start_time=start,
            attributes={k: v for k, v in attrs.items() if v is not None},
        )
        under_root = trace.set_span_in_context(root)
        self._tier_request(
            under_root, tier, start, tokens or [], events_on, token_times_ms, queue_ms
        )
        if shadow is not None:
            shadow_span = self.tracer.start_span(
                f"moe.shadow {shadow[0]}", context=under_root, start_time=start
            )
            shadow_span.set_attribute("moe.shadow.divergence", 0.5)
            ctx = trace.set_span_in_context(shadow_span)
            self._tier_request(ctx, shadow[0], start, shadow[1], "decode", None, 1)
            shadow_span.end(end_time=start + 5 * MS)
        if error:
            root.set_status(trace.Status(trace.StatusCode.ERROR, "boom"))
        root.end(end_time=start + e2e_ms * MS)

    def _tier_request(
        self,
        parent: Any,
        tier: str,
        start: int,
        tokens: list[tuple[list[int], int, int]],
        events_on: str,
        token_times_ms: list[tuple[int, int]] | None,
        queue_ms: int,
    ) -> None:
        span = self.tracer.start_span(f"moe.tier_request {tier}", context=parent, start_time=start)
        ctx = trace.set_span_in_context(span)
        self.tracer.start_span("moe.queue", context=ctx, start_time=start).end(
            end_time=start + queue_ms * MS
        )
        self.tracer.start_span("moe.prefill", context=ctx, start_time=start + queue_ms * MS).end(
            end_time=start + 2 * MS
        )
        decode = self.tracer.start_span("moe.decode", context=ctx, start_time=start + 2 * MS)
        carrier = decode if events_on == "decode" else span
        if tokens:
            carrier.set_attribute("moe.routing.layers", LAYERS)
            carrier.set_attribute("moe.routing.top_k", 2)
        for i, (routing, experts, shards) in enumerate(tokens):
            event = {
                "moe.token.index": i,
                "moe.token.experts": experts,
                "moe.token.shards": shards,
                "moe.token.routing": routing,
            }
            if i:
                event["moe.token.itl_s"] = 0.001
            carrier.add_event("moe.token", event, timestamp=start + (3 + i) * MS)
        for index, ms in token_times_ms or []:
            carrier.add_event("moe.token", {"moe.token.index": index}, timestamp=start + ms * MS)
        decode.end(end_time=start + 9 * MS)
        span.end(end_time=start + 9 * MS)


def _latency(ttft_ms: float, tpot_ms: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"moe.latency.ttft_s": ttft_ms / 1e3, "moe.latency.queue_s": 0.001}
    if tpot_ms is not None:
        out["moe.latency.tpot_s"] = tpot_ms / 1e3
    return out


@pytest.fixture
def trace_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "traces.jsonl"
    w = _Writer(path)
    for n, (rid, e2e) in enumerate([("r1", 100), ("r2", 200), ("r3", 300), ("r4", 400)], 1):
        tokens = [A, B, C, A] if rid == "r4" else [A, B, C]
        attrs = {**_latency(10 * n, 4 + n), "gen_ai.usage.output_tokens": len(tokens)}
        w.request(
            rid,
            "strong",
            e2e,
            tokens,
            root_attrs=attrs,
            events_on=("tier_request" if rid == "r2" else "decode"),
        )
    w.request(
        "r5", "fast", 50, root_attrs={**_latency(5), "gen_ai.usage.output_tokens": 1},
        shadow=("strong", [C, C]),
    )  # fmt: skip
    # Missing attributes: tier from the tier-request span, latency from events and spans.
    w.request(
        "r6", "fast", 1000, root_attrs={"moe.tier": None, "moe.escalated": True}, error=True,
        token_times_ms=[(0, 100), (1, 150), (3, 250)], queue_ms=20,
    )  # fmt: skip
    w.provider.shutdown()
    yield path


def test_percentile_interpolates_like_numpy() -> None:
    data = [100.0, 200.0, 300.0, 400.0]
    assert [percentile(data, q) for q in (0, 50, 95, 99, 100)] == pytest.approx(
        [100, 250, 385, 397, 400]
    )
    assert percentile([], 50) is None and percentile([7.0], 99) == 7.0


def test_analysis_numbers(trace_file: Path) -> None:
    report = analyze(read_spans(trace_file), top=3)
    assert (report.num_requests, report.num_traces) == (6, 6)
    assert report.num_token_events == 13 + 2 + 3
    tiers = {t.tier: t for t in report.tiers}
    assert sorted(tiers) == ["fast", "strong"]
    strong, fast = tiers["strong"], tiers["fast"]
    assert (strong.requests, strong.errors, strong.output_tokens) == (4, 0, 13)
    assert (strong.e2e_s.p50, strong.e2e_s.p95, strong.e2e_s.p99) == pytest.approx(
        (0.25, 0.385, 0.397)
    )
    assert (strong.ttft_s.p50, strong.ttft_s.p95) == pytest.approx((0.025, 0.0385))
    assert strong.tpot_s.p50 == pytest.approx(0.0065)
    assert (fast.requests, fast.errors, fast.escalated) == (2, 1, 1)
    assert fast.e2e_s.p50 == pytest.approx(0.525)
    assert fast.tpot_s.count == 1  # r5 made one token: no time per token

    # Fan-out counts every recorded token of the tier, the shadow run's included.
    (fan,) = report.fan_out
    assert (fan.tier, fan.tokens) == ("strong", 15)
    assert fan.experts == [Bucket(2, 6, 6 / 15), Bucket(3, 4, 4 / 15), Bucket(4, 5, 5 / 15)]
    assert fan.shards == [Bucket(1, 10, 10 / 15), Bucket(2, 5, 5 / 15)]

    assert [r.request_id for r in report.slowest] == ["r6", "r4", "r3"]
    r6, r4 = report.slowest[0], report.slowest[1]
    assert (r6.tier, r6.error, r6.escalated) == ("fast", True, True)
    assert r6.ttft_s == pytest.approx(0.1)  # first token event - request start
    assert r6.tpot_s == pytest.approx(0.05)  # (250 - 100) ms over 3 tokens
    assert r6.queue_s == pytest.approx(0.02)  # the moe.queue span
    assert r6.output_tokens == 4 and r6.mean_experts is None
    assert (r4.mean_experts, r4.mean_shards, r4.output_tokens) == (3.25, 1.5, 4)
    r5 = next(r for r in report.requests if r.request_id == "r5")
    assert r5.mean_experts is None  # the shadow's tokens are not the request's
    r2 = next(r for r in report.requests if r.request_id == "r2")
    assert r2.mean_experts == 3.0  # events on the tier-request span count too

    hot = [(h.tier, h.layer, h.expert, h.tokens) for h in report.hot_experts]
    assert hot == [("strong", 1, 0, 15), ("strong", 1, 1, 11), ("strong", 3, 0, 10)]
    assert [h.share for h in report.hot_experts] == pytest.approx([0.5, 11 / 30, 1 / 3])
    (load,) = report.loads
    assert (load.tier, load.layers, load.num_experts) == ("strong", [1, 3], 4)
    assert load.tokens == [[15, 11, 4, 0], [10, 10, 5, 5]]
    assert report.notes == []


def test_analysis_of_bare_spans(tmp_path: Path) -> None:
    """Token events without routing or a request root, a root without attributes."""
    path = tmp_path / "bare.jsonl"
    w = _Writer(path)
    root = w.tracer.start_span("text_completion", start_time=0)
    root.end(end_time=2 * MS)
    orphan = w.tracer.start_span("moe.decode", start_time=0)
    orphan.add_event("moe.token", {"moe.token.experts": 2, "moe.token.routing": [1, 2, 3]}, 1)
    orphan.end(end_time=1)
    w.provider.shutdown()
    report = analyze(read_spans(path))
    (request,) = report.requests
    assert (request.tier, request.ttft_s, request.output_tokens) == ("unknown", None, None)
    assert request.request_id == trace.format_span_id(root.get_span_context().span_id)
    assert report.fan_out[0].experts == [Bucket(2, 1, 1.0)]
    assert report.hot_experts == [] and report.loads == []  # routing without layers: skipped
    assert "1 token event(s) outside any request span" in report.notes[0]


def test_cli_report_text_json_and_plot(
    trace_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "plots" / "report.png"
    assert main(["traces", "report", str(trace_file), "--top", "3", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "18 token events" in out
    assert "Latency per tier" in out and "Slowest 3 requests" in out
    assert "Fan-out per token, tier strong (15 tokens)" in out
    assert "Hot experts, tier strong" in out
    lines = out.splitlines()
    slow = lines[lines.index(next(x for x in lines if x.startswith("Slowest"))) + 3]
    assert slow.split()[:4] == ["r6", "fast", "1000.0", "100.0"] and "error,escalated" in slow
    assert any(x.split() == ["strong", "e2e", "4", "250.0", "385.0", "397.0"] for x in lines)
    assert png.is_file() and png.stat().st_size > 1000

    assert main(["traces", "report", str(trace_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["request_id"] for r in data["slowest"]] == ["r6", "r4", "r3", "r2", "r1", "r5"]
    assert data["hot_experts"][0] == {
        "tier": "strong",
        "layer": 1,
        "expert": 0,
        "tokens": 15,
        "share": 0.5,
    }
    assert "requests" not in data


def test_cli_errors_and_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["traces", "report", str(tmp_path / "nope.jsonl")]) == 2
    assert "trace file not found" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["traces", "report", str(empty)]) == 0
    captured = capsys.readouterr()
    assert "no spans in" in captured.err
    assert "no request spans (text_completion) found" in captured.out
    empty.write_text("garbage\n")
    assert main(["traces", "report", str(empty), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_spans"] == 0 and "skipped 1 malformed line(s)" in data["notes"][0]
    with pytest.raises(SystemExit):
        main(["traces", "report", "--help"])
    assert "--plot OUT.png" in capsys.readouterr().out
