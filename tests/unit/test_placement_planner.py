"""The placement planner (router/placement/) and ``moe-cluster plan``: properties, examples."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.cli import main
from router.placement import (
    DEFAULT_TOLERANCE,
    NODE_SPREAD,
    Geometry,
    PlacementPlan,
    ShardsIn,
    choose_redundancy,
    greedy_bound,
    greedy_counts,
    layer_balancedness,
    lower_bound,
    moved_slots,
    plan_placement,
    shard_loads,
)
from router.placement.arrays import greedy_bounds
from router.placement.layer import Layer
from router.placement.reassign import PENALTY, min_cost_assignment, pull_back, rebalance
from router.placement.repair import fix_over

PROPERTY = settings(max_examples=60, deadline=None)


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[list[float]], int, int, int]:
    """(load [L][E], shards G, slots per shard S, nodes N): skewed, flat, zero loads."""
    num_experts = draw(st.integers(1, 24))
    num_nodes = draw(st.sampled_from([1, 2, 3]))
    num_shards = num_nodes * draw(st.integers(1, 4))
    least = -(-num_experts // num_shards)
    slots = draw(st.integers(least, least + 3))
    layers = draw(st.integers(1, 3))
    value = st.one_of(
        st.just(0.0),
        st.floats(0.0, 1000.0, allow_nan=False),
        st.sampled_from([1.0, 7.0, 5000.0]),
    )
    load = draw(
        st.lists(
            st.lists(value, min_size=num_experts, max_size=num_experts), min_size=layers
        ).filter(lambda rows: len(rows) <= 3)
    )
    return load, num_shards, slots, num_nodes


def check_plan(plan: PlacementPlan, load: list[list[float]], slots: int, nodes: int) -> None:
    """The invariants every plan keeps, whatever the load."""
    per_node = plan.num_shards // nodes
    for index, shards in enumerate(plan.layers):
        counts: dict[int, list[int]] = {}
        for g, held in enumerate(shards):
            assert len(held) <= slots, (index, g, held)
            assert len(set(held)) == len(held), f"an expert twice on shard {g}: {held}"
            for e in held:
                counts.setdefault(e, []).append(g)
        assert sorted(counts) == list(range(len(load[index]))), "every expert placed"
        for e, where in counts.items():
            spread = len({g // per_node for g in where})
            assert spread >= min(len(where), nodes, NODE_SPREAD), (e, where)
        expected = layer_balancedness(shards, load[index])
        assert math.isclose(plan.balancedness_per_layer[index], expected, rel_tol=1e-9)


# ----------------------------------------------------------------------------- properties


@PROPERTY
@given(problems())
def test_every_plan_keeps_the_invariants(problem: tuple[list[list[float]], int, int, int]) -> None:
    load, shards, slots, nodes = problem
    plan = plan_placement(load, shards, slots, num_nodes=nodes)
    check_plan(plan, load, slots, nodes)
    assert plan.moved_slots == 0 and plan.balancedness >= 1.0 - 1e-9


@PROPERTY
@given(problems())
def test_replication_is_never_worse_than_none(
    problem: tuple[list[list[float]], int, int, int],
) -> None:
    load, shards, slots, nodes = problem
    plan = plan_placement(load, shards, slots, num_nodes=nodes)
    single = plan_placement(load, shards, slots, num_nodes=nodes, max_replicas=1)
    check_plan(single, load, slots, nodes)
    assert all(len(single.replicas(0, e)) == 1 for e in range(len(load[0])))
    for ours, alone in zip(plan.balancedness_per_layer, single.balancedness_per_layer, strict=True):
        assert ours <= alone * (1 + 1e-9)


@PROPERTY
@given(problems(), st.integers(0, 2**32 - 1), st.integers(0, 12))
def test_replan_moves_within_the_budget(
    problem: tuple[list[list[float]], int, int, int], seed: int, budget: int
) -> None:
    load, shards, slots, nodes = problem
    rng = random.Random(seed)
    before = plan_placement(load, shards, slots, num_nodes=nodes)
    drifted = [[x * rng.uniform(0.5, 1.5) for x in row] for row in load]
    free = plan_placement(drifted, shards, slots, num_nodes=nodes, current=before)
    check_plan(free, drifted, slots, nodes)
    bound = plan_placement(
        drifted, shards, slots, num_nodes=nodes, current=before, max_moved_slots=budget
    )
    check_plan(bound, drifted, slots, nodes)
    for plan in (free, bound):
        actual = sum(moved_slots(c, n) for c, n in zip(before.layers, plan.layers, strict=True))
        assert plan.moved_slots == actual
    assert bound.moved_slots <= budget


@PROPERTY
@given(problems(), st.integers(0, 2**32 - 1), st.sampled_from([0.05, 0.3]))
def test_replan_stays_within_tolerance_of_the_best(
    problem: tuple[list[list[float]], int, int, int], seed: int, sigma: float
) -> None:
    """Without a budget every re-planned layer is within 1% of the plan from scratch (or
    of the lower bound, which no plan beats with those replica counts)."""
    load, shards, slots, nodes = problem
    rng = random.Random(seed)
    before = plan_placement(load, shards, slots, num_nodes=nodes)
    drifted = [[x * math.exp(sigma * rng.gauss(0.0, 1.0)) for x in row] for row in load]
    again = plan_placement(drifted, shards, slots, num_nodes=nodes, current=before)
    best = plan_placement(drifted, shards, slots, num_nodes=nodes)
    geometry = Geometry(shards, slots, nodes, shards)
    for i, row in enumerate(drifted):
        total = sum(row)
        floor = greedy_bound(row, geometry)[0] * shards / total if total > 0 else 1.0
        bar = max(best.balancedness_per_layer[i], floor) * (1 + DEFAULT_TOLERANCE)
        assert again.balancedness_per_layer[i] <= bar * (1 + 1e-9), (i, bar)


@PROPERTY
@given(problems())
def test_the_same_load_moves_nothing(problem: tuple[list[list[float]], int, int, int]) -> None:
    load, shards, slots, nodes = problem
    plan = plan_placement(load, shards, slots, num_nodes=nodes)
    again = plan_placement(load, shards, slots, num_nodes=nodes, current=plan)
    assert again.moved_slots == 0 and again.layers == plan.layers


@PROPERTY
@given(st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=40), st.data())
def test_greedy_bound_matches_counts_then_bound(load: list[float], data: st.DataObject) -> None:
    shards = data.draw(st.integers(1, 8))
    least = -(-len(load) // shards)
    geometry = Geometry(
        shards, data.draw(st.integers(least, least + 4)), 1, data.draw(st.integers(1, shards))
    )
    counts = greedy_counts(load, shards * geometry.slots, geometry.max_replicas)
    per_replica = [x / c for x, c in zip(load, counts, strict=True)]
    floor, heaviest = greedy_bound(load, geometry)
    assert math.isclose(floor, lower_bound(per_replica, counts, geometry), abs_tol=1e-9)
    assert math.isclose(heaviest, max(per_replica), abs_tol=1e-9)


@PROPERTY
@given(
    st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=40),
    st.integers(1, 4),
    st.data(),
)
def test_greedy_bounds_of_all_layers_match_one_at_a_time(
    row: list[float], num_layers: int, data: st.DataObject
) -> None:
    """The vectorised bound of the re-plan equals ``greedy_bound`` on every layer."""
    load = [row] + [data.draw(st.permutations(row)) for _ in range(num_layers - 1)]
    shards = data.draw(st.integers(1, 8))
    least = -(-len(row) // shards)
    geometry = Geometry(
        shards, data.draw(st.integers(least, least + 4)), 1, data.draw(st.integers(1, shards))
    )
    bounds = greedy_bounds(np.array(load), geometry)
    assert bounds is not None
    for i, layer in enumerate(load):
        floor, heaviest = greedy_bound(layer, geometry)
        assert math.isclose(floor, bounds[0][i], rel_tol=1e-12, abs_tol=1e-9)
        assert math.isclose(heaviest, bounds[1][i], rel_tol=1e-12, abs_tol=1e-9)


@PROPERTY
@given(st.integers(1, 6).flatmap(lambda n: st.lists(
    st.lists(st.sampled_from([0.0, 1.0, 2.5, 1e12]), min_size=n, max_size=n),
    min_size=n, max_size=n,
)))  # fmt: skip
def test_min_cost_assignment_is_optimal(cost: list[list[float]]) -> None:
    pick = min_cost_assignment(cost)
    assert sorted(pick) == list(range(len(cost)))
    best = min(
        sum(cost[i][j] for i, j in enumerate(perm))
        for perm in itertools.permutations(range(len(cost)))
    )
    assert math.isclose(sum(cost[i][j] for i, j in enumerate(pick)), best)


def _overload_cost(layer: Layer, current: ShardsIn, target: float) -> float:
    over = sum(max(0.0, x - target) for x in layer.shard_load) / target
    return PENALTY * over + moved_slots(current, layer.shards)


@PROPERTY
@given(problems(), st.integers(0, 2**32 - 1))
def test_reassignment_rounds_never_lose_ground(
    problem: tuple[list[list[float]], int, int, int], seed: int
) -> None:
    """``pull_back`` keeps every shard under the target and never adds a move;
    ``rebalance`` never raises overload x ``PENALTY`` + moves; ``fix_over`` never
    raises the overload."""
    load, shards, slots, nodes = problem
    rng = random.Random(seed)
    before = plan_placement(load, shards, slots, num_nodes=nodes)
    drifted = [[x * math.exp(0.5 * rng.gauss(0.0, 1.0)) for x in row] for row in load]
    best = plan_placement(drifted, shards, slots, num_nodes=nodes)
    geometry = Geometry(shards, slots, nodes, shards)
    for i, row in enumerate(drifted):
        target = max(max(shard_loads(best.layers[i], row)), 1e-9) * 1.01
        current = before.layers[i]
        layer = Layer.from_shards(row, best.layers[i], geometry)
        moved = moved_slots(current, best.layers[i])
        pull_back(layer, current, target)
        assert layer.max_load <= target * (1 + 1e-9)
        assert moved_slots(current, layer.shards) <= moved
        assert layer.sound()
        layer = Layer.from_shards(row, current, geometry)
        start = _overload_cost(layer, current, target)
        rebalance(layer, current, target)
        assert _overload_cost(layer, current, target) <= start + 1e-6
        assert layer.sound()
        layer = Layer.from_shards(row, current, geometry)
        over = sum(max(0.0, x - target) for x in layer.shard_load)
        fix_over(layer, target)
        assert sum(max(0.0, x - target) for x in layer.shard_load) <= over * (1 + 1e-9) + 1e-9
        assert layer.sound()


# ----------------------------------------------------------------------------- examples


def zipf(num_experts: int, exponent: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    weights = [1000.0 / (rank + 1) ** exponent for rank in range(num_experts)]
    rng.shuffle(weights)
    return weights


def test_hot_expert_gets_replicas_on_distinct_nodes() -> None:
    load = [[100.0] + [1.0] * 15]
    plan = plan_placement(load, 4, 5, num_nodes=2)
    hot = plan.replicas(0, 0)
    assert len(hot) == 4 and {g // 2 for g in hot} == {0, 1}
    assert plan.balancedness < 1.05


def test_zipf_with_a_quarter_extra_slots_is_nearly_even() -> None:
    load = [zipf(64, 1.0, seed) for seed in range(4)]
    plan = plan_placement(load, 8, 10)
    assert plan.balancedness <= 1.05
    assert plan.extra_slots == 16


def test_replan_keeps_slot_indices_of_kept_experts() -> None:
    load = [zipf(32, 1.2, 1)]
    plan = plan_placement(load, 4, 10)
    shifted = [[x * (3.0 if e == 5 else 1.0) for e, x in enumerate(load[0])]]
    again = plan_placement(shifted, 4, 10, current=plan, bytes_per_slot=1000)
    assert again.moved_bytes == again.moved_slots * 1000
    for before, after in zip(plan.layers[0], again.layers[0], strict=True):
        for slot, e in enumerate(before):
            if e in after:
                assert after[slot] == e  # a kept expert keeps its weight slot


def test_replan_takes_few_moves_and_stays_near_the_best() -> None:
    rng = random.Random(7)
    load = [zipf(64, 1.0, seed) for seed in range(6)]
    plan = plan_placement(load, 8, 10, num_nodes=2)
    drifted = [[x * math.exp(rng.gauss(0, 0.05)) for x in row] for row in load]
    again = plan_placement(drifted, 8, 10, num_nodes=2, current=plan)
    best = plan_placement(drifted, 8, 10, num_nodes=2)
    assert again.moved_slots <= 0.15 * 6 * 80
    for ours, theirs in zip(again.balancedness_per_layer, best.balancedness_per_layer, strict=True):
        assert ours <= theirs * 1.01 + 1e-9


def test_zero_budget_keeps_the_current_plan() -> None:
    load = [zipf(16, 1.0, 3)]
    plan = plan_placement(load, 4, 5)
    flipped = [list(reversed(load[0]))]
    kept = plan_placement(flipped, 4, 5, current=plan.layers, max_moved_slots=0)
    assert kept.moved_slots == 0 and kept.layers == plan.layers


def test_a_current_plan_missing_an_expert_is_completed() -> None:
    current = [[[0, 1], [2]]]  # expert 3 has no slot
    plan = plan_placement([[1.0, 1.0, 1.0, 1.0]], 2, 2, current=current)
    assert plan.moved_slots == 1 and sorted(e for s in plan.layers[0] for e in s) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="max_moved_slots=0 is too small"):
        plan_placement([[1.0, 1.0, 1.0, 1.0]], 2, 2, current=current, max_moved_slots=0)


def test_choose_redundancy_takes_the_fewest_slots() -> None:
    load = [zipf(16, 1.2, 5)]
    plan = choose_redundancy(load, 4, target_balancedness=1.1, max_slots_per_shard=8)
    assert plan.balancedness <= 1.1
    if plan.slots_per_shard > 4:
        fewer = plan_placement(load, 4, plan.slots_per_shard - 1)
        assert fewer.balancedness > 1.1
    capped = choose_redundancy(load, 4, target_balancedness=1.0, max_slots_per_shard=4)
    assert capped.slots_per_shard == 4  # the budget, even though the target is not reached


def test_all_zero_load_is_balanced() -> None:
    plan = plan_placement([[0.0] * 6], 3, 3)
    assert plan.balancedness == 1.0
    check_plan(plan, [[0.0] * 6], 3, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"load": [[1.0, 2.0, 3.0]], "num_shards": 1, "slots_per_shard": 2}, "cannot hold"),
        ({"load": [[1.0, -2.0]]}, r"load\[0\]\[1\]=-2.0 must be finite"),
        ({"load": [[1.0, float("nan")]]}, r"load\[0\]\[1\]=nan"),
        ({"load": [[1.0, float("inf")]]}, r"load\[0\]\[1\]=inf"),
        ({"load": [[1.0, 2.0], [1.0]]}, "ragged: load.1. has 1 experts"),
        ({"load": [[1.0, True]]}, r"load\[0\]\[1\] must be a number, got bool"),
        ({"load": [[1.0, "x" * 10_000]]}, "got str$"),
        ({"load": "x" * 10_000}, "got str$"),
        ({"load": []}, "0 layers; allowed 1..1024"),
        ({"load": [[1.0]] * 2000}, "2000 layers; allowed 1..1024"),
        ({"load": [[1.0] * 9000]}, "9000 experts; allowed 1..8192"),
        ({"num_shards": 0}, r"num_shards=0 must be an integer in \[1, 4096\]"),
        ({"num_shards": 4, "num_nodes": 3}, "split evenly"),
        ({"max_moved_slots": -1}, "max_moved_slots=-1"),
        ({"num_shards": 4096, "slots_per_shard": 4096}, "over the limit"),
    ],
)
def test_bad_inputs_name_the_field(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"load": [[1.0, 2.0]], "num_shards": 2, "slots_per_shard": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message) as info:
        plan_placement(**args)  # type: ignore[arg-type]
    assert len(str(info.value)) < 300  # never echoes the input


@pytest.mark.parametrize(
    ("current", "message"),
    [
        ([[[0], [1]]] * 2, "current has 2 layers"),
        ([[[0], [1], [0]]], "current.0. has 3 shards"),
        ([[[0, 1, 0], [1]]], r"holds 3 experts; slots_per_shard=2"),
        ([[[0, 0], [1]]], "lists an expert twice"),
        ([[[0, 7], [1]]], "expert id 7; allowed 0..1"),
        ([[[0, "a" * 5000], [1]]], "expert id str"),
    ],
)
def test_bad_current_plans_are_refused(current: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        plan_placement([[1.0, 2.0]], 2, 2, current=current)  # type: ignore[arg-type]
    assert len(str(info.value)) < 300


# ----------------------------------------------------------------------------- CLI


def test_cli_plan_json_and_replan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_file = tmp_path / "load.json"
    load_file.write_text(json.dumps({"load": [zipf(16, 1.0, s) for s in range(2)]}))
    base = ["plan", "--load", str(load_file), "--shards", "4", "--slots-per-shard", "5"]
    assert main([*base, "--nodes", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"layers", "balancedness", "moved"} and out["moved"] == 0
    assert len(out["layers"]) == 2 and all(len(layer["shards"]) == 4 for layer in out["layers"])
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(out))
    assert main([*base, "--nodes", "2", "--current", str(plan_file), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["moved"] == 0 and again["layers"] == out["layers"]
    assert main([*base, "--target-balancedness", "1.5"]) == 0
    table = capsys.readouterr().out
    assert "balancedness" in table and "shard" in table


def test_cli_plan_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"load": [[1.0, -1.0]]}))
    assert main(["plan", "--load", str(bad), "--shards", "2", "--slots-per-shard", "1"]) == 2
    assert "load[0][1]=-1.0" in capsys.readouterr().err
    bad.write_text("{not json")
    assert main(["plan", "--load", str(bad), "--shards", "2", "--slots-per-shard", "1"]) == 2
    assert "not JSON" in capsys.readouterr().err
