"""The report of ``bench/multiturn.py``: its table and its targets (issue 17's goals), from
the rounds' per-configuration summaries and the routing simulation."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from bench.harness import median, target


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = f"{'configuration':30} {'computed':>9} {'x none':>7} {'hit':>6} {'store':>7}"
    head += "  TTFT p50 per turn (ms)"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        ttft = " ".join(f"{x:6.0f}" for x in r["ttft_p50_ms_per_turn"])
        lines.append(
            f"{name:30} {r['prompt_tokens_computed']:9d} {r['computed_vs_no_cache']:7.3f} "
            f"{r['hit_rate']:6.3f} {r['store_tokens']:7d}  {ttft}"
        )
    return "\n".join(lines)


def compute_targets(
    rounds: list[dict[str, dict[str, Any]]], sim: dict[str, Any], restart_turn: int
) -> dict[str, dict[str, Any]]:
    def med(fn: Callable[[dict[str, dict[str, Any]]], float]) -> float:
        return median([fn(rd) for rd in rounds])

    prefill = med(lambda rd: rd["store_events"]["computed_vs_no_cache"])
    ttft = med(
        lambda rd: (
            rd["store_events"]["ttft_p50_ms_turn4_on"] / rd["no_cache"]["ttft_p50_ms_turn4_on"]
        )
    )
    above = med(lambda rd: rd["store_events"]["hit_rate"] - rd["local_text_affinity"]["hit_rate"])

    def recovery(rd: dict[str, dict[str, Any]]) -> float:
        per_turn = rd["store_events_restart"]["hit_rate_per_turn"]
        steady = statistics.mean(per_turn[1:restart_turn])
        return per_turn[restart_turn] / steady if steady else 0.0

    return {
        "prefill_computed_vs_no_cache": target(prefill, 0.15, at_least=False),
        "ttft_p50_turn4_on_vs_no_cache": target(ttft, 0.3, at_least=False),
        "hit_rate_above_text_affinity": target(above, 0.001, at_least=True),
        "hit_rate_after_restart_vs_steady": target(med(recovery), 0.9, at_least=True),
        "sim_hit_rate_vs_oracle": target(sim["hit_vs_oracle_min"], 0.95, at_least=True),
        "sim_busiest_queue_vs_mean": target(sim["busiest_vs_mean_queue_max"], 1.5, at_least=False),
        "sim_decision_us_p50": target(sim["decision_us_p50_max"], 100.0, at_least=False),
    }
