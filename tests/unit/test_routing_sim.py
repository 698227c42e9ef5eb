"""The routing simulation behind bench/multiturn.py, small: event-fed routing finds about the
oracle's hits despite event lag and loss, and far more than power-of-two choices."""

from __future__ import annotations

from bench.routing_sim import SimConfig, simulate


def test_event_routing_tracks_the_oracle_in_a_small_simulation() -> None:
    cfg = SimConfig(replicas=8, requests=800, cache_blocks=1024, event_loss=0.05)
    for workload in ("business", "chat"):
        oracle = simulate(cfg, workload, "oracle")
        events = simulate(cfg, workload, "events")
        pow2 = simulate(cfg, workload, "power_of_two")
        assert events["requests"] == oracle["requests"] == 800 - 800 % 8
        assert events["hit_rate"] >= 0.85 * oracle["hit_rate"], (workload, events, oracle)
        assert events["hit_rate"] > pow2["hit_rate"], (workload, events, pow2)
