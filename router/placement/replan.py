"""Re-planning from a current plan: keep, fix by a few swaps, or repair against the best.

Every layer's state and lower bound is computed at once (``arrays``). A layer is kept
when each expert has a slot, replicas span their nodes and its max shard load is within
``tolerance`` of the bound: no plan is better by more than that. Layers that only need
swaps (no expert's load per replica alone keeps a shard over the target) are fixed all
together (``batch``). The rest, and layers the swaps cannot fix, go one at a time, worst
first: swaps after giving hot experts replicas (``view``), else the slow path
(``repair_layer``): candidates within ``tolerance`` of the best found, each pulled back
towards the current plan, fewest moves winning. With a move budget the batched result is
used when it fits the budget; otherwise every layer not kept goes the per-layer way,
worst first, so the budget goes where it helps most.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from router.placement.arrays import (
    as_shards,
    layer_arrays,
    layer_bounds,
    left_pack,
    lightest_replicas,
    moved_slots_total,
)
from router.placement.batch import swap_rounds
from router.placement.bounds import greedy_counts, moved_slots, shard_loads
from router.placement.geometry import Geometry, Shards, ShardsIn
from router.placement.improve import improve
from router.placement.layer import Layer
from router.placement.reassign import pull_back, rebalance
from router.placement.repair import fix_over, repair
from router.placement.scratch import keep_slot_order, plan_from_scratch, relabel
from router.placement.view import View

Layers = tuple[tuple[tuple[int, ...], ...], ...]  # [L][G] -> expert ids, a plan's layers


@dataclass(frozen=True)
class Replanned:
    """A re-plan's result: layers as the plan stores them, [L, G, S] slots, costs."""

    layers: Layers
    slots: np.ndarray  # [L, G, S], -1 for an empty slot
    maxima: np.ndarray  # [L] max shard load
    moved: int


def replan(
    load: np.ndarray,
    slots: np.ndarray,
    current: Sequence[ShardsIn],
    geometry: Geometry,
    budget: int | None,
    tolerance: float,
) -> Replanned:
    """Re-plan ``load`` ([L, E]) from ``current`` ([L][G] ids; ``slots`` the same, [L, G, S]).

    The target of a layer is ``tolerance`` above a lower bound on the best plan, so a
    plan under it is within ``tolerance`` of any plan found from scratch; only a layer
    swaps cannot bring under it pays for a from-scratch plan (then the target is that
    plan's maximum plus ``tolerance``). At most ``budget`` slots move in all.
    """
    state = layer_arrays(load, slots, geometry)
    floor, heaviest = layer_bounds(load, state, geometry)
    target = floor * (1 + tolerance)
    top = state.shard_load.max(axis=1)
    keep = state.sound & (top <= target)
    if keep.all():
        return Replanned(_as_layers(current), slots, top, 0)
    width = load.shape[1]
    w_max = state.wp[:, :width].max(axis=1)
    hot = w_max > heaviest * (1 + 1e-9)  # a replica heavier than the counts from scratch allow
    if hot.any():  # ... that keeps its shard over the target with the lightest others
        rows = np.flatnonzero(hot)
        others = lightest_replicas(state.wp[rows], slots[rows], geometry.slots - 1)
        hot[rows] = w_max[rows] + others > target[rows]
    new = slots.copy()
    batched = state.sound & ~keep & ~hot
    failed = swap_rounds(new, state, target, np.flatnonzero(batched), geometry)
    new[failed] = slots[failed]
    batched[failed] = False
    moved = moved_slots_total(slots[batched], new[batched])
    rest = ~keep & ~batched
    if budget is not None and moved > budget:
        new[batched], moved, rest, batched[:] = slots[batched], 0, ~keep, False
    todo = np.flatnonzero(rest)
    worst_first = todo[np.argsort(-top[todo] / np.maximum(target[todo], 1e-300), kind="stable")]
    rows = load.tolist() if len(todo) else []
    fixed: dict[int, tuple[Shards, float]] = {}  # layer -> shards, max shard load
    for i in worst_first.tolist():
        left = None if budget is None else budget - moved
        shards = None
        if state.sound[i]:
            view = View(rows[i], current[i], geometry)
            shards = view.swap_until(float(target[i]), float(heaviest[i]), left)
        if shards is None:
            shards = repair_layer(rows[i], current[i], geometry, left, tolerance, i, budget)
        fixed[i] = shards, max(shard_loads(shards, rows[i]))
        moved += moved_slots(current[i], shards)
        new[i] = -1
        for g, held in enumerate(shards):
            new[i, g, : len(held)] = held
    assert budget is None or moved <= budget, (moved, budget)
    changed = np.flatnonzero(~keep)
    new[changed] = left_pack(new[changed])
    maxima = top.copy()
    maxima[batched] = state.shard_load[batched].max(axis=1)  # kept up to date by the swaps
    layers = list(_as_layers(current))
    swapped = np.flatnonzero(batched)
    for i, layer_shards in zip(swapped.tolist(), as_shards(new[swapped]), strict=True):
        layers[i] = layer_shards
    for i, (fixed_shards, top_i) in fixed.items():
        layers[i], maxima[i] = tuple(map(tuple, fixed_shards)), top_i
    return Replanned(tuple(layers), new, maxima, moved)


def _as_layers(current: Sequence[ShardsIn]) -> Layers:
    """The current plan's layers as tuples (a plan's own layers are already)."""
    if type(current) is tuple:
        return current
    return tuple(tuple(tuple(held) for held in shards) for shards in current)


def repair_layer(
    load: list[float],
    current: ShardsIn,
    geometry: Geometry,
    left: int | None,
    tolerance: float,
    index: int,
    budget: int | None,
) -> Shards:
    """The slow path: the best plan from scratch, a repair of the current plan, and both
    pulled back towards the current plan; the fewest moves within ``tolerance`` wins.

    The best found is the lower of the plan from scratch and the repair (built without
    regard to ``left``); a plan within ``tolerance`` of it and within ``left`` moves is
    chosen, fewest moves first; when none fits ``left``, the repair (which kept to it).
    """
    best = relabel(plan_from_scratch(load, geometry), current, geometry)
    best_max = max(shard_loads(best, load))
    layer = Layer.from_shards(load, current, geometry)
    if layer.sound() and layer.max_load <= best_max * (1 + tolerance):
        return [list(held) for held in current]
    wanted = greedy_counts(load, geometry.num_shards * geometry.slots, geometry.max_replicas)
    if repair(layer, wanted, best_max * (1 + tolerance), left, match=True) is None:
        raise ValueError(
            f"max_moved_slots={budget} is too small: layer {index} of the current plan needs "
            "moves for experts without a slot or replicas on one node"
        )
    repaired = keep_slot_order(current, layer.shards)
    # the same counts, re-paired by reassignment rounds (no budget: a candidate only)
    paired = Layer.from_shards(load, current, geometry)
    repair(paired, wanted, math.inf, None, match=True)  # the counts alone
    aim = best_max * (1 + tolerance)
    rebalance(paired, current, aim)
    for _ in range(2):  # improve frees room that fix_over uses, and the other way round
        improve(paired, aim, None, repair=True)
        if not fix_over(paired, aim):
            break
    starts = [
        (repaired, layer.max_load),
        (keep_slot_order(current, paired.shards), paired.max_load),
        (best, best_max),
    ]
    target = min(top for _, top in starts) * (1 + tolerance)
    options: list[tuple[int, float, Shards]] = []  # (slots moved, max load, shards)
    for start, top in starts:
        if top > target:
            continue
        options.append((moved_slots(current, start), top, start))
        pulled = Layer.from_shards(load, start, geometry)
        pull_back(pulled, current, target)
        shards = keep_slot_order(current, pulled.shards)
        options.append((moved_slots(current, shards), pulled.max_load, shards))
    fits = [o for o in options if left is None or o[0] <= left]
    return min(fits, key=lambda o: o[:2])[2] if fits else repaired
