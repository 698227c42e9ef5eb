"""When a tier re-plans: imbalance with gain over move cost, drift, and hysteresis (a load
hovering at the threshold re-plans once, not on every crossing). Also the step-time
balancedness of a placement, and the ``experts.replan`` config section's checks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from router.replan_policy import ReplanConfig, ReplanPolicy, balancedness
from router.routing_table import RoutingTable, round_robin
from tests.unit.test_config import problems, with_tier, write

CFG = ReplanConfig(
    enabled=True,
    min_tokens=100,
    imbalance_threshold=1.2,
    margin=0.05,
    drift_threshold=0.3,
    min_interval_s=10.0,
    copy_bandwidth_bytes_per_s=1e6,
    amortize_horizon_s=100.0,
)


def test_balancedness_is_step_time_faithful() -> None:
    table = round_robin([0, 1], 4, ["a", "b"])  # a: experts 0, 2; b: 1, 3
    assert balancedness([[1, 1, 1, 1], [1, 1, 1, 1]], [0, 1], table) == pytest.approx(1.0)
    # layer 0 all on a (max 4, mean 2), layer 1 even (max 2, mean 2): (4 + 2) / (2 + 2)
    assert balancedness([[2, 0, 2, 0], [1, 1, 1, 1]], [0, 1], table) == pytest.approx(1.5)


def test_a_replicated_expert_splits_its_load() -> None:
    table = RoutingTable(0, {(0, 0): ("a", "b"), (0, 1): ("b",)})
    assert balancedness([[4, 0]], [0], table) == pytest.approx(1.0)  # 2 and 2
    assert balancedness([[0, 0]], [0], table) == 1.0  # no load: nothing to balance


def test_an_empty_shard_counts_in_the_mean() -> None:
    table = RoutingTable(0, {(0, 0): ("a",), (0, 1): ("a",)})
    assert balancedness([[1, 1]], [0], table, ["a", "b"]) == pytest.approx(2.0)


def test_nothing_before_enough_tokens() -> None:
    policy = ReplanPolicy(CFG)
    assert policy.consider(0.0, imbalance=3.0, drift=0.9, num_tokens=99) is None
    trigger = policy.consider(0.0, imbalance=3.0, drift=0.0, num_tokens=100)
    assert trigger is not None and trigger.reason == "imbalance"


def test_drift_triggers_even_when_balanced() -> None:
    policy = ReplanPolicy(CFG)
    assert policy.consider(0.0, imbalance=1.0, drift=0.29, num_tokens=1000) is None
    trigger = policy.consider(1.0, imbalance=1.0, drift=0.3, num_tokens=1000)
    assert trigger is not None and trigger.reason == "drift"


def test_gain_must_beat_the_amortised_move_cost_by_the_margin() -> None:
    policy = ReplanPolicy(CFG)
    # 5 MB at 1 MB/s = 5 s over a 100 s horizon: cost 0.05; gain 0.3 - 0.05 > 0.05
    verdict = policy.accept(current=1.5, planned=1.2, moved_bytes=5_000_000)
    assert verdict.apply and verdict.cost == pytest.approx(0.05)
    # the same gain moving 26 MB: cost 0.26, 0.3 - 0.26 < margin
    assert not ReplanPolicy(CFG).accept(current=1.5, planned=1.2, moved_bytes=26_000_000).apply
    # free moves still need a gain over the margin
    assert not ReplanPolicy(CFG).accept(current=1.22, planned=1.18, moved_bytes=0).apply


def test_attempts_are_rate_limited() -> None:
    policy = ReplanPolicy(CFG)
    assert policy.consider(0.0, 2.0, 0.0, 1000) is not None
    policy.accept(2.0, 1.99, 0)  # rejected: no gain
    assert policy.consider(9.9, 2.0, 0.0, 1000) is None  # within min_interval_s
    assert policy.consider(10.0, 2.0, 0.0, 1000) is not None


def test_a_load_oscillating_around_the_threshold_replans_once() -> None:
    """Balancedness alternating 1.19 / 1.22 over an hour: a naive threshold would re-plan on
    every crossing (every min_interval_s); the Schmitt trigger re-plans once, and again only
    after the placement fit the load (below threshold - margin) and the load left it."""
    policy = ReplanPolicy(CFG)
    applied = 0
    for tick in range(360):  # every 10 s
        imbalance = 1.22 if tick % 2 else 1.19
        trigger = policy.consider(tick * 10.0, imbalance, drift=0.0, num_tokens=10_000)
        if trigger is not None and policy.accept(imbalance, 1.0, 0).apply:
            applied += 1
    assert applied == 1
    assert policy.consider(4000.0, 1.1, 0.0, 10_000) is None  # below 1.15: re-armed
    assert policy.consider(4010.0, 1.3, 0.0, 10_000) is not None


def test_default_config_is_valid_and_off() -> None:
    assert not ReplanConfig().enabled


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"imbalance_threshold": 0.9}, "imbalance_threshold=0.9 must be >= 1"),
        ({"margin": 1.5}, "margin=1.5 must be in [0, 1)"),
        ({"drift_threshold": 0.0}, "drift_threshold=0.0 must be in (0, 1]"),
        ({"copy_bandwidth_bytes_per_s": 0.0}, "copy_bandwidth_bytes_per_s=0.0 must be > 0"),
        ({"num_windows": 0}, "num_windows=0 must be in 1..1000"),
        ({"ack_timeout_s": 1.0}, "ack_timeout_s=1.0 must be >= report_interval_s"),
    ],
)
def test_bad_settings_name_the_field_and_limit(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ReplanConfig(**fields)


SHARDED = {"placement": "sharded", "num_shards": 2}


def test_the_yaml_section_is_the_runtime_config(tmp_path: Path) -> None:
    from deploy.config import load_config

    replan = {"enabled": True, "imbalance_threshold": 1.4, "max_moved_slots": 8}
    tier = load_config(write(tmp_path, with_tier(experts={**SHARDED, "replan": replan}))).tiers[1]
    assert tier.experts.replan == ReplanConfig(
        enabled=True, imbalance_threshold=1.4, max_moved_slots=8
    )


def test_the_yaml_section_errors_name_the_field_path(tmp_path: Path) -> None:
    found = problems(tmp_path, with_tier(experts={**SHARDED, "replan": {"margin": 2}}))
    assert any("tiers.1.experts.replan.margin: margin=2" in line for line in found), found
    found = problems(tmp_path, with_tier(experts={**SHARDED, "replan": {"bogus": 1}}))
    assert any("replan.bogus" in line for line in found), found


def test_replan_needs_sharded_experts(tmp_path: Path) -> None:
    found = problems(tmp_path, with_tier(experts={"replan": {"enabled": True}}))
    assert any("replan.enabled needs placement: sharded" in line for line in found), found
