"""The pure parts of ``bench.reliability``: workload, arrivals, classification of outcomes,
recovery times, rows, targets and the table (no Ray, no gRPC)."""

from __future__ import annotations

import pytest

from bench.reliability_outcomes import (
    CLIENT_DEADLINE_DETAILS,
    Outcome,
    classify,
    format_table,
    poisson_arrivals,
    recovery_after,
    replicated_share,
    scenario_row,
    targets,
    workload,
)

REF = [7, 8, 9, 10]


@pytest.mark.parametrize(
    ("tokens", "code", "details", "expected"),
    [
        (REF, "OK", "", "completed"),
        (REF[:2], "OK", "", "wrong"),  # ended OK, tokens missing
        ([*REF, 11], "OK", "", "wrong"),  # a token too many
        ([7, 9], "UNAVAILABLE", "replica died", "wrong"),  # a wrong token before the failure
        ([7, 8], "UNAVAILABLE", "replica died", "failed"),  # right so far, then a clear status
        ([], "UNAVAILABLE", "connection refused", "failed"),
        ([], "DEADLINE_EXCEEDED", "the request ran past its deadline (20 s)", "failed"),
        ([7], "DEADLINE_EXCEEDED", CLIENT_DEADLINE_DETAILS, "lost"),  # the client's own timer
        ([], None, "", "lost"),  # the hard stop after the client's deadline
    ],
)
def test_each_outcome_lands_in_one_class(
    tokens: list[int], code: str | None, details: str, expected: str
) -> None:
    outcome = Outcome(0, 1.0, list(tokens), code, details, 2.0)
    assert classify(outcome, REF) == expected


def test_workload_mixes_greedy_and_seeded_requests_on_shared_prefixes() -> None:
    specs = workload(8, max_tokens=16, seed=1, num_prefixes=4, prefix_len=32)
    assert [s.temperature > 0 for s in specs] == [False, True] * 4
    assert all((s.seed is not None) == (s.temperature > 0) for s in specs)
    assert specs[0].token_ids[:32] == specs[4].token_ids[:32] != specs[1].token_ids[:32]
    assert all(36 <= len(s.token_ids) <= 48 for s in specs)
    assert workload(8, 16, seed=1) == specs  # fixed seed, same workload


def test_poisson_arrivals_are_sorted_in_range_and_about_the_rate() -> None:
    times = poisson_arrivals(2.0, 500.0, seed=3)
    assert times == sorted(times) and 0 < times[0] and times[-1] < 500.0
    assert 900 < len(times) < 1100
    assert poisson_arrivals(2.0, 500.0, seed=3) == times


def _outcome(sent: float, ok: bool, spec: int = 0) -> Outcome:
    if ok:
        return Outcome(spec, sent, list(REF), "OK", "", sent + 0.5)
    return Outcome(spec, sent, [], "UNAVAILABLE", "shard died", sent + 0.1)


def test_recovery_is_the_start_of_the_last_run_of_completions() -> None:
    sends = [(1, True), (5, False), (6, True), (7, False), (8, True), (9, True)]
    outcomes = [_outcome(t, ok) for t, ok in sends]
    classes = [classify(o, REF) for o in outcomes]
    assert recovery_after(outcomes, classes, fault_at=4.0) == 4.0  # from 8 on, all completed
    assert recovery_after(outcomes[:1] + outcomes[2:3], classes[:1] + classes[2:3], 4.0) == 2.0
    assert recovery_after(outcomes[:4], classes[:4], 4.0) is None  # the last one failed
    assert recovery_after(outcomes[:1], classes[:1], 4.0) is None  # nothing sent after it
    assert recovery_after([_outcome(5, True)], ["completed"], 4.0) == 1.0


def test_a_row_counts_classes_and_splits_latency_at_the_fault() -> None:
    outcomes = [
        Outcome(0, 1.0, list(REF), "OK", "", 1.5),  # before: 0.5 s
        Outcome(0, 3.0, list(REF), "OK", "", 7.0),  # open at the fault: during, 4.0 s
        Outcome(0, 4.5, list(REF), "OK", "", 7.5),  # during: 3.0 s
        Outcome(1, 5.0, [1], "OK", "", 5.2),  # wrong
        Outcome(0, 5.5, [], "UNAVAILABLE", "the \x1b[36mreplica\x1b[39m holding it died", 5.6),
        Outcome(0, 6.0, [], None, "", None),  # lost
        Outcome(0, 20.0, list(REF), "OK", "", 20.4),  # after the window: in no p99
    ]
    row = scenario_row("backbone_killed", outcomes, {0: REF, 1: [1, 2]}, 4.0, 10.0)
    assert (row["sent"], row["completed"], row["failed"], row["wrong"], row["lost"]) == (
        7,
        4,
        1,
        1,
        1,
    )
    assert row["p99_before_s"] == 0.5 and 3.9 < row["p99_during_s"] < 4.0
    assert row["sent_after_fault"] == 5 and row["requests_ok_again_s"] == 16.0
    assert row["statuses"]["UNAVAILABLE"]["count"] == 1
    assert row["statuses"]["UNAVAILABLE"]["example"] == "the replica holding it died"


def test_targets_want_no_wrong_no_lost_and_every_request_where_replicated() -> None:
    good = {"scenario": "backbone_killed", "sent": 10, "completed": 10, "wrong": 0, "lost": 0}
    bad = {"scenario": "shard_killed_replicated", "sent": 10, "completed": 7, "wrong": 1}
    bad["lost"] = 2
    unreplicated = {"scenario": "shard_killed_no_replica", "sent": 4, "completed": 1}
    unreplicated.update(wrong=0, lost=0)
    skipped = {"scenario": "gateway_killed", "not_run": "the run's time budget"}
    found = targets([good, bad, unreplicated, skipped])
    assert found["backbone_killed.completed_share"]["met"] is True
    assert found["backbone_killed.wrong"]["met"] and found["backbone_killed.lost"]["met"]
    assert found["shard_killed_replicated.completed_share"]["value"] == 0.7
    assert not found["shard_killed_replicated.completed_share"]["met"]
    assert not found["shard_killed_replicated.wrong"]["met"]
    assert not found["shard_killed_replicated.lost"]["met"]
    assert "shard_killed_no_replica.completed_share" not in found  # failing clearly is allowed
    assert found["shard_killed_no_replica.lost"]["met"]
    assert not any(name.startswith("gateway_killed") for name in found)
    assert all({"value", "goal", "met"} <= set(t) for t in found.values())


def test_the_table_has_a_line_per_scenario_and_says_what_did_not_run() -> None:
    outcomes = [_outcome(1, True), _outcome(5, False)]
    row = scenario_row("kv_store_shard_killed", outcomes, {0: REF}, 4.0, 9.0)
    row.update(replacement_s=1.25, recovered_s=None, note="not serving right 45 s after")
    skipped = {"scenario": "gateway_killed", "not_run": "no live gateway replica found"}
    lines = format_table([row, skipped]).splitlines()
    assert len(lines) == 3 and lines[0].split()[:2] == ["scenario", "sent"]
    assert lines[1].split()[:6] == ["kv_store_shard_killed", "2", "1", "1", "0", "0"]
    assert "1.25" in lines[1] and "not serving right" in lines[1]
    assert "not run: no live gateway replica found" in lines[2]


def test_replicated_share_counts_each_shards_slots_held_elsewhere() -> None:
    placement = [
        ((0, 0), ("s0", "s1")),
        ((0, 1), ("s0",)),
        ((1, 0), ("s1",)),
        ((1, 1), ("s1", "s0")),
    ]
    assert replicated_share(placement) == {"s0": (2, 3), "s1": (2, 3)}
    assert replicated_share([((0, 0), ("s0", "s0"))]) == {"s0": (0, 2)}  # not another shard
