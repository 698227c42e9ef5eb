"""A replica's placement reporter: counts gathered and sent with the engine's table version,
a newer table handed to the engine, and a dead controller never stopping serving."""

from __future__ import annotations

import asyncio
from typing import Any

from cluster.expert_parallel.placement_controller import ReportReply
from cluster.serving.placement_reporter import PlacementReporter

Slot = tuple[int, int]
PLACEMENT = (((0, 0), ("s0", "s1")),)


class FakeEngine:
    def __init__(self) -> None:
        self.table_version = 0
        self.tables: list[tuple[int, Any]] = []

    def set_routing_table(self, version: int, placement: Any) -> None:
        self.tables.append((version, placement))

    def is_alive(self) -> bool:
        return True


def test_counts_and_version_are_sent_and_a_newer_table_reaches_the_engine() -> None:
    engine = FakeEngine()
    sent: list[tuple[str, str, dict[Slot, int], int]] = []

    async def send(tier: str, rid: str, counts: dict[Slot, int], v: int) -> ReportReply:
        sent.append((tier, rid, counts, v))
        return ReportReply(2, PLACEMENT, 0.05)

    reporter = PlacementReporter("strong", "r1", engine, send, 5.0)  # type: ignore[arg-type]
    reporter.add({(0, 0): 3})
    reporter.add({(0, 0): 2, (0, 1): 1})
    assert asyncio.run(reporter.report_once()) == 0.05
    assert sent == [("strong", "r1", {(0, 0): 5, (0, 1): 1}, 0)]
    assert engine.tables == [(2, PLACEMENT)]


def test_a_failed_report_is_dropped_and_retried_later() -> None:
    engine = FakeEngine()

    async def send(tier: str, rid: str, counts: dict[Slot, int], v: int) -> ReportReply:
        raise ConnectionError("controller gone")

    reporter = PlacementReporter("strong", "r1", engine, send, 5.0)  # type: ignore[arg-type]
    reporter.add({(0, 0): 3})
    assert asyncio.run(reporter.report_once()) == 5.0
    assert reporter.num_failed == 1 and engine.tables == []
