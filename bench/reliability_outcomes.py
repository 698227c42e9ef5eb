"""The pure half of ``bench.reliability``: the workload, Poisson arrivals, what became of each
request, the per-scenario row, recovery times, targets and the table. No Ray, no gRPC.

A request ends in exactly one class:

- ``completed``: the stream ended OK and its tokens equal the unfaulted reference;
- ``wrong``: some token the client received differs from the reference (at its position, or
  the stream ended OK with too few or too many): a wrong token is wrong whatever the final
  status, since the client already acted on it;
- ``failed``: the server ended the call with a status other than OK and a message, before the
  client's own deadline (deadline + margin), and every token received so far was right;
- ``lost``: neither answered nor refused by the client's deadline (the server's own limit is
  the deadline, the client waits a margin longer): the client's timer ended it (a hang).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.harness import FIRST_ORDINARY_ID, percentile, target

CLASSES = ("completed", "failed", "wrong", "lost")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the errors it forwards
# what grpc's client library says when its own deadline timer ends a call (the server said nothing)
CLIENT_DEADLINE_DETAILS = "Deadline Exceeded"


@dataclass(frozen=True)
class Spec:
    """One request of the workload: its prompt and sampling (greedy when ``temperature`` is 0)."""

    index: int
    token_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None


def workload(
    count: int, max_tokens: int, seed: int, num_prefixes: int = 4, prefix_len: int = 32
) -> list[Spec]:
    """``count`` requests: one of ``num_prefixes`` shared prefixes (full KV blocks, so the
    store holds them) and 4..16 ids of their own; even indices greedy, odd seeded sampling."""
    rng = random.Random(seed)
    prefixes = [
        tuple(rng.randrange(FIRST_ORDINARY_ID, 2048) for _ in range(prefix_len))
        for _ in range(num_prefixes)
    ]
    specs = []
    for i in range(count):
        own = tuple(rng.randrange(FIRST_ORDINARY_ID, 2048) for _ in range(rng.randint(4, 16)))
        sampled = i % 2 == 1
        specs.append(
            Spec(
                i,
                prefixes[i % num_prefixes] + own,
                max_tokens,
                temperature=0.8 if sampled else 0.0,
                seed=1000 + i if sampled else None,
            )
        )
    return specs


def poisson_arrivals(rate_per_s: float, duration_s: float, seed: int) -> list[float]:
    """Send times in ``[0, duration_s)`` of a Poisson process of ``rate_per_s`` (open loop:
    a request goes out at its time whatever the others are doing)."""
    assert rate_per_s > 0, f"rate_per_s={rate_per_s} must be > 0"
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate_per_s)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate_per_s)
    return times


@dataclass
class Outcome:
    """What the client saw of one request; times in seconds on the traffic's clock."""

    spec: int
    sent_at: float
    tokens: list[int] = field(default_factory=list)
    code: str | None = None  # gRPC status name at the end; None: no status by the margin
    details: str = ""
    ended_at: float | None = None

    @property
    def latency(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.sent_at


def classify(outcome: Outcome, reference: Sequence[int]) -> str:
    """One of :data:`CLASSES` (see the module docstring)."""
    tokens, ref = outcome.tokens, list(reference)
    if tokens != ref[: len(tokens)]:
        return "wrong"
    if outcome.code == "OK":
        return "completed" if len(tokens) == len(ref) else "wrong"
    if outcome.code is None or (
        outcome.code == "DEADLINE_EXCEEDED" and outcome.details == CLIENT_DEADLINE_DETAILS
    ):
        return "lost"
    return "failed"


def recovery_after(
    outcomes: Sequence[Outcome], classes: Sequence[str], fault_at: float
) -> float | None:
    """Seconds from the fault to the send time of the first request after which every request
    sent completed (0.0 when none failed after it); None when the last one sent did not."""
    after = sorted(
        ((o.sent_at, c) for o, c in zip(outcomes, classes, strict=True) if o.sent_at >= fault_at)
    )
    if not after:
        return None
    if after[-1][1] != "completed":
        return None
    start = after[-1][0]
    for sent_at, cls in reversed(after):
        if cls != "completed":
            break
        start = sent_at
    return round(start - fault_at, 3)


def _p99(values: Sequence[float]) -> float | None:
    return round(percentile(values, 99), 3) if values else None


def scenario_row(
    name: str,
    outcomes: Sequence[Outcome],
    references: Mapping[int, Sequence[int]],
    fault_at: float,
    fault_end: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A scenario's row: counts by class, p99 latency of the completed requests that ended
    before the fault and of those that ran into it (open at the fault, or sent in the window
    ``[fault_at, fault_end)``), recovery, and the statuses other than OK (count, a message)."""
    classes = [classify(o, references[o.spec]) for o in outcomes]
    counts = {c: classes.count(c) for c in CLASSES}
    ended = [
        (o.sent_at, o.ended_at)
        for o, c in zip(outcomes, classes, strict=True)
        if c == "completed" and o.ended_at is not None
    ]
    lat_before = [end - sent for sent, end in ended if end < fault_at]
    lat_during = [end - sent for sent, end in ended if end >= fault_at and sent < fault_end]
    statuses: dict[str, dict[str, Any]] = {}
    for o, c in zip(outcomes, classes, strict=True):
        if c in ("failed", "lost", "wrong") and o.code not in (None, "OK"):
            example = _ANSI.sub("", o.details)[:200]
            entry = statuses.setdefault(o.code or "", {"count": 0, "example": example})
            entry["count"] += 1
    return {
        "scenario": name,
        "sent": len(outcomes),
        **counts,
        "sent_after_fault": sum(o.sent_at >= fault_at for o in outcomes),
        "p99_before_s": _p99(lat_before),
        "p99_during_s": _p99(lat_during),
        "requests_ok_again_s": recovery_after(outcomes, classes, fault_at),
        "statuses": statuses,
        **(extra or {}),
    }


# scenarios where, with replication, every request must complete (issue 18's report)
MUST_COMPLETE = ("shard_killed_replicated", "kv_store_shard_killed", "backbone_killed")


def targets(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """wrong = 0 and lost = 0 per scenario; completed = sent for :data:`MUST_COMPLETE`. A
    scenario that did not run has no row and no target here (the report says why)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("not_run"):
            continue
        name = row["scenario"]
        out[f"{name}.wrong"] = target(row["wrong"], 0, at_least=False)
        out[f"{name}.lost"] = target(row["lost"], 0, at_least=False)
        if name in MUST_COMPLETE:
            share = row["completed"] / row["sent"] if row["sent"] else None
            out[f"{name}.completed_share"] = target(share, 1.0, at_least=True)
    return out


def replicated_share(placement: Sequence[tuple[Any, Sequence[str]]]) -> dict[str, tuple[int, int]]:
    """Per shard: (its slots held by another shard too, its slots), from a controller table's
    placement (``[((layer, expert), shard ids), ...]``)."""
    held: dict[str, list[int]] = {}
    for _slot, shards in placement:
        for sid in shards:
            counts = held.setdefault(sid, [0, 0])
            counts[0] += len(set(shards)) > 1
            counts[1] += 1
    return {sid: (c[0], c[1]) for sid, c in held.items()}


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per scenario: counts, p99 before/during, recovery times, notes."""
    header = (
        f"{'scenario':<28}{'sent':>5}{'done':>6}{'fail':>6}{'wrong':>6}{'lost':>6}"
        f"{'p99 before':>11}{'p99 fault':>10}{'replaced':>9}{'ok again':>9}  notes"
    )
    lines = [header]
    for row in rows:
        if row.get("not_run"):
            lines.append(f"{row['scenario']:<28}  not run: {row['not_run']}")
            continue
        lines.append(
            f"{row['scenario']:<28}{row['sent']:>5}{row['completed']:>6}{row['failed']:>6}"
            f"{row['wrong']:>6}{row['lost']:>6}{_seconds(row['p99_before_s']):>11}"
            f"{_seconds(row['p99_during_s']):>10}{_seconds(row.get('replacement_s')):>9}"
            f"{_seconds(row.get('recovered_s')):>9}  {row.get('note', '')}"
        )
    return "\n".join(lines)
