"""``moe-cluster traces report``: latency, fan-out and expert load from JSON-lines trace files.

For an SRE at a terminal: it reads the files the ``file`` traces exporter writes (one per
process or node; pass them all), prints plain-text tables or one JSON object, and can draw a
latency histogram and a layer x expert load heatmap. The numbers come from
``deploy.trace_analysis``; this module only parses flags, renders and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.telemetry.trace_file import SpanRecord, TraceFileStats, read_spans
from deploy.trace_analysis import (
    FanOut,
    Percentiles,
    RequestSummary,
    TraceReport,
    analyze,
)


def add_traces_parser(sub: Any) -> None:
    """Register ``traces report`` on the CLI's subparsers (``sub`` is argparse's action)."""
    traces = sub.add_parser(
        "traces",
        help="read OpenTelemetry trace files",
        description="Tools over the JSON-lines (OTLP/JSON) trace files that the 'file' traces "
        "exporter writes (telemetry.traces_exporter: file).",
    )
    actions = traces.add_subparsers(dest="traces_command", required=True, metavar="SUBCOMMAND")
    report = actions.add_parser(
        "report",
        help="latency per tier, expert fan-out, slowest requests, hot experts",
        description="Summarise trace files: per tier the request count, errors and p50/p95/p99 "
        "of time to first token, time per output token and end-to-end latency; how many "
        "experts and expert shards each generated token touched; the slowest requests; and "
        "the most loaded (layer, expert) pairs. Expert figures cover the recorded token "
        "events (at most telemetry.token_events per request).",
    )
    report.add_argument(
        "files", nargs="+", type=Path, metavar="FILE", help="trace file(s), JSON lines"
    )
    report.add_argument(
        "--top", type=int, default=10, help="slowest requests and hot experts to list (10)"
    )
    report.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="OUT.png",
        help="also draw latency histograms and expert-load heatmaps (needs matplotlib)",
    )
    report.add_argument("--json", action="store_true", help="print one JSON object instead")


def cmd_traces(args: argparse.Namespace) -> int:
    assert args.traces_command == "report", args.traces_command
    return _cmd_report(args)


def _cmd_report(args: argparse.Namespace) -> int:
    if args.top < 0:
        raise ValueError(f"--top {args.top} must be >= 0")
    for path in args.files:
        if not path.is_file():
            raise FileNotFoundError(f"trace file not found: {path}")
    if args.plot is not None and not _have_matplotlib():
        print(
            "moe-cluster traces: error: --plot needs matplotlib "
            "(pip install 'moe-cluster[report]' or pip install matplotlib)",
            file=sys.stderr,
        )
        return 2
    spans: list[SpanRecord] = []
    notes: list[str] = []
    for path in args.files:
        stats = TraceFileStats()
        spans.extend(read_spans(path, stats=stats))
        if stats.num_malformed:
            lines = ", ".join(map(str, stats.malformed_lines))
            notes.append(f"{path}: skipped {stats.num_malformed} malformed line(s) ({lines}...)")
    report = analyze(spans, top=args.top)
    report.notes[:0] = notes
    if not spans:
        names = " ".join(str(p) for p in args.files)
        print(
            f"no spans in {names}: is telemetry.traces_exporter 'file' and are requests sampled?",
            file=sys.stderr,
        )
    print(json.dumps(report_dict(report), indent=2) if args.json else format_report(report))
    if args.plot is not None:
        plot_report(report, args.plot)
        print(f"[traces] plot written to {args.plot}", file=sys.stderr)
    return 0


def report_dict(report: TraceReport) -> dict[str, Any]:
    """The report as JSON-ready data: everything printed, not the full request list."""
    data = dataclasses.asdict(report)
    del data["requests"]
    return data


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-align the first column, right-align the rest (numbers)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = (str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _latency_row(tier: str, metric: str, p: Percentiles) -> list[str]:
    return [tier, metric, str(p.count), _ms(p.p50), _ms(p.p95), _ms(p.p99)]


def _fan_out_lines(fan: FanOut) -> list[str]:
    experts = {b.value: b for b in fan.experts}
    shards = {b.value: b for b in fan.shards}
    rows = []
    for value in sorted(experts.keys() | shards.keys()):
        e, s = experts.get(value), shards.get(value)
        rows.append(
            [
                str(value),
                str(e.count) if e else "-",
                f"{e.share:.1%}" if e else "-",
                str(s.count) if s else "-",
                f"{s.share:.1%}" if s else "-",
            ]
        )
    head = ["touched", "tokens (experts)", "share", "tokens (shards)", "share"]
    return [f"Fan-out per token, tier {fan.tier} ({fan.tokens} tokens)", *_table(head, rows)]


def _request_row(r: RequestSummary) -> list[str]:
    flags = ",".join(f for f, on in (("error", r.error), ("escalated", r.escalated)) if on)
    return [
        r.request_id,
        r.tier,
        _ms(r.e2e_s),
        _ms(r.ttft_s),
        _ms(r.queue_s),
        "-" if r.output_tokens is None else str(r.output_tokens),
        _num(r.mean_experts),
        _num(r.mean_shards),
        flags,
    ]


def format_report(report: TraceReport) -> str:
    out = [
        f"{report.num_spans} spans, {report.num_traces} traces, {report.num_requests} requests, "
        f"{report.num_token_events} token events",
        "",
        "Requests per tier",
        *_table(
            ["tier", "requests", "errors", "escalated", "output tokens"],
            [
                [t.tier, str(t.requests), str(t.errors), str(t.escalated), str(t.output_tokens)]
                for t in report.tiers
            ],
        ),
        "",
        "Latency per tier (ms; tpot = time per output token after the first)",
        *_table(
            ["tier", "metric", "count", "p50", "p95", "p99"],
            [
                row
                for t in report.tiers
                if t.requests
                for row in (
                    _latency_row(t.tier, "ttft", t.ttft_s),
                    _latency_row(t.tier, "tpot", t.tpot_s),
                    _latency_row(t.tier, "e2e", t.e2e_s),
                )
            ],
        ),
    ]
    for fan in report.fan_out:
        out += ["", *_fan_out_lines(fan)]
    out += [
        "",
        f"Slowest {len(report.slowest)} requests (ms; experts and shards: mean per token)",
        *_table(
            ["request", "tier", "e2e", "ttft", "queue", "out tokens", "experts", "shards", "flags"],
            [_request_row(r) for r in report.slowest],
        ),
    ]
    for tier in sorted({h.tier for h in report.hot_experts}):
        out += [
            "",
            f"Hot experts, tier {tier} (share of the layer's routed token-expert pairs)",
            *_table(
                ["layer", "expert", "tokens", "share"],
                [
                    [str(h.layer), str(h.expert), str(h.tokens), f"{h.share:.1%}"]
                    for h in report.hot_experts
                    if h.tier == tier
                ],
            ),
        ]
    if report.notes:
        out += ["", "Notes", *(f"- {note}" for note in report.notes)]
    return "\n".join(out)


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_report(report: TraceReport, out: Path) -> None:
    """Latency histograms (e2e and TTFT per tier) over one heatmap of expert load per tier."""
    # A bare Figure (no pyplot) renders PNG through Agg without touching the process's
    # backend or needing a display.
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = max(1, len(report.loads))
    fig = Figure(figsize=(10, 3.5 + 3.0 * panels), layout="constrained")
    axes = fig.subplots(1 + panels, 1, squeeze=False)[:, 0]
    ax = axes[0]
    series = [
        (f"{tier} {label}", values)
        for tier in sorted({r.tier for r in report.requests})
        for label, values in (
            ("e2e", [r.e2e_s * 1e3 for r in report.requests if r.tier == tier]),
            ("ttft", [r.ttft_s * 1e3 for r in report.requests if r.tier == tier and r.ttft_s]),
        )
        if values
    ]
    if series:
        every = [v for _, values in series for v in values]
        low, high = max(min(every), 1e-3), max(max(every), 1e-3)
        log = high / low > 50
        bins = np.geomspace(low, high * 1.001, 40) if log else np.linspace(0, high * 1.001, 40)
        for name, values in series:
            style = "-" if name.endswith("e2e") else "--"
            ax.hist(values, bins=bins, histtype="step", linestyle=style, linewidth=1.5, label=name)
        if log:
            ax.set_xscale("log")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no request spans", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Request latency per tier")
    ax.set_xlabel("ms")
    ax.set_ylabel("requests")
    for ax, load in zip(axes[1:], report.loads, strict=False):
        image = ax.imshow(np.array(load.tokens), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(load.layers)), [str(layer) for layer in load.layers])
        ax.set_title(f"Expert load, tier {load.tier} (recorded tokens)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        fig.colorbar(image, ax=ax, label="tokens")
    if not report.loads:
        axes[1].text(0.5, 0.5, "no expert routing in token events", ha="center", va="center")
        axes[1].set_axis_off()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
