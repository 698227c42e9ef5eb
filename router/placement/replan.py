"""Re-planning from a current plan: keep, fix by a few swaps, or repair against the best."""

from __future__ import annotations

from collections.abc import Sequence

from router.placement.bounds import greedy_bound, greedy_counts, moved_slots, shard_loads
from router.placement.geometry import Geometry, Shards, ShardsIn
from router.placement.layer import Layer
from router.placement.repair import repair
from router.placement.scratch import keep_slot_order, plan_from_scratch, relabel
from router.placement.view import View


def replan(
    rows: list[list[float]],
    current: Sequence[ShardsIn],
    geometry: Geometry,
    budget: int | None,
    tolerance: float,
) -> tuple[list[Shards], list[float], int]:
    """Per layer, worst first: keep, fix by a few swaps, or repair against the best plan.

    The target is ``tolerance`` above a lower bound on the best plan, so a plan under it
    is within ``tolerance`` of any plan found from scratch; only a layer that swaps
    cannot bring under it pays for a from-scratch plan (then the target is that plan's
    maximum plus ``tolerance``). Returns the layers, their max shard loads, slots moved.
    """
    views = [View(load, shards, geometry) for load, shards in zip(rows, current, strict=True)]
    bounds = [greedy_bound(view.load, geometry) for view in views]
    targets = [floor * (1 + tolerance) for floor, _ in bounds]
    order = sorted(range(len(rows)), key=lambda i: -views[i].max_load / max(targets[i], 1e-300))
    result: list[Shards] = [[] for _ in rows]
    maxima = [0.0] * len(rows)
    moved = 0
    for i in order:
        view, target = views[i], targets[i]
        left = None if budget is None else budget - moved
        sound = view.sound()
        if sound and view.max_load <= target:
            result[i], maxima[i] = [list(h) for h in current[i]], view.max_load
            continue
        shards = view.swap_until(target, bounds[i][1], left) if sound else None
        if shards is not None:
            maxima[i] = view.new_max
        else:
            shards = repair_layer(rows[i], current[i], geometry, left, tolerance, i, budget)
            maxima[i] = max(shard_loads(shards, rows[i]))
        result[i] = shards
        moved += moved_slots(current[i], shards)
    assert budget is None or moved <= budget, (moved, budget)
    return result, maxima, moved


def repair_layer(
    load: list[float],
    current: ShardsIn,
    geometry: Geometry,
    left: int | None,
    tolerance: float,
    index: int,
    budget: int | None,
) -> Shards:
    """The slow path: the best plan from scratch, and a repair that stays near it."""
    best = relabel(plan_from_scratch(load, geometry), current, geometry)
    best_max = max(shard_loads(best, load))
    layer = Layer.from_shards(load, current, geometry)
    wanted = greedy_counts(load, geometry.num_shards * geometry.slots, geometry.max_replicas)
    target = best_max * (1 + tolerance)
    if repair(layer, wanted, target, left, match=True) is None:
        raise ValueError(
            f"max_moved_slots={budget} is too small: layer {index} of the current plan needs "
            "moves for experts without a slot or replicas on one node"
        )
    repaired = keep_slot_order(current, layer.shards)
    options = [(moved_slots(current, best), 1, best)]  # the best plan qualifies by definition
    if layer.max_load <= target:
        options.append((moved_slots(current, repaired), 0, repaired))
    fits = [o for o in options if left is None or o[0] <= left]
    return keep_slot_order(current, min(fits)[2]) if fits else repaired
