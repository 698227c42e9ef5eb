"""Reassignment rounds on one layer: a minimum-cost assignment of one replica per shard.

Each round frees one replica per shard (the k-th heaviest of those the shard did not hold
in the current plan, or the k-th heaviest of all) and gives the freed replicas back to
the shards, one each, by a minimum-cost assignment. An edge costs 1 when the shard did not
hold that expert in the current plan (a moved slot), 0 when it did; it is forbidden when
it would put an expert twice on a shard, and a round is undone when it leaves a
replicated expert on too few nodes. Keeping every replica where it is is always allowed,
so no round makes the objective worse. Two uses:

* ``rebalance``: shards over the target cost ``PENALTY`` per unit of target they are over,
  so a round first cuts the total overload, then moves (a re-pairing of hot replicas
  that single swaps cannot reach: every shard changes one replica at once);
* ``pull_back``: from a plan under the target, edges that would put a shard over it are
  forbidden, so only moves are saved: replicas go back to where the current plan had
  them while the balance stays within the target.

Only shards that can gain take part in a round: those whose freed replica is away from
its home in the current plan, and those homes (every shard, when rebalancing a layer
over the target). Rounds run over every k, again, until a pass gains nothing or the work
bound is spent: the assignment is O(G^3) in Python, so a call costs at most about half a
second; layers of more than ``MAX_SHARDS`` shards skip it (their slow path is the repair
and the plan from scratch alone).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from router.placement.geometry import ShardsIn
from router.placement.layer import Layer

MAX_SHARDS = 32  # larger layers skip it: at 64 shards a round costs ~10 ms in Python
MAX_PASSES = 8
MAX_WORK = 4_000_000  # rounds x G^3 per call
PENALTY = 1e4  # moved slots worth one unit of overload (relative to the target)
_FORBIDDEN = 1e12


def rebalance(layer: Layer, current: ShardsIn, target: float) -> None:
    """Cut the load over ``target``, then moves from ``current``; in place."""
    _passes(layer, [set(h) for h in current], target, PENALTY)


def pull_back(layer: Layer, current: ShardsIn, target: float) -> None:
    """Pull ``layer`` (every shard <= ``target``) towards ``current``; in place."""
    _passes(layer, [set(h) for h in current], target, None)


def _passes(layer: Layer, held: list[set[int]], target: float, penalty: float | None) -> None:
    num_shards = len(layer.shards)
    if not 2 <= num_shards <= MAX_SHARDS:
        return
    rounds = max(1, MAX_WORK // num_shards**3)
    for _ in range(MAX_PASSES):
        gained = False
        for only_moved in (True, False):
            for k in range(layer.slots):
                if rounds <= 0:
                    return
                rounds -= 1
                gained |= _round(layer, held, target, k, only_moved, penalty)
        if not gained:
            return


def _round(
    layer: Layer,
    held: list[set[int]],
    target: float,
    k: int,
    only_moved: bool,
    penalty: float | None,
) -> bool:
    """One reassignment of a freed replica per shard; whether it gained."""
    w, shards = layer.w, layer.shards
    freed: list[int] = []  # [G] expert freed on each shard, -1 for an empty slot
    for g, items in enumerate(shards):
        by_weight = sorted(items, key=w.__getitem__, reverse=True)
        moved = [e for e in by_weight if e not in held[g]]
        if only_moved and moved:
            freed.append(moved[k % len(moved)])
        else:
            freed.append(by_weight[k] if k < len(by_weight) else -1)
    weight = [w[e] if e >= 0 else 0.0 for e in freed]
    # who takes part: shards whose freed replica is away from home, those homes, and
    # (rebalancing) every shard once one is over the target; the rest keep theirs
    away = [g for g, e in enumerate(freed) if e >= 0 and e not in held[g]]
    if penalty is not None and max(layer.shard_load) > target:
        part = list(range(len(shards)))
    elif away:
        wanted = {freed[g] for g in away}
        part = sorted(set(away) | {h for h, home in enumerate(held) if wanted & home})
    else:
        return False  # every freed replica is home and nothing is over: nothing to gain
    cost: list[list[float]] = []
    for g in part:
        items, rest = shards[g], layer.shard_load[g] - weight[g]
        limit = max(target, layer.shard_load[g]) * (1 + 1e-12)
        mine, home = freed[g], held[g]
        row = []
        for j in part:
            e, x = freed[j], weight[j]
            if e >= 0 and e != mine and e in items:
                row.append(_FORBIDDEN)
                continue
            edge = 0.0 if e < 0 or e in home else 1.0
            if penalty is not None:
                edge += penalty * max(0.0, rest + x - target) / target
            elif rest + x > limit:
                edge = _FORBIDDEN
            row.append(edge)
        cost.append(row)
    pick = min_cost_assignment(cost)
    before = sum(row[i] for i, row in enumerate(cost))
    after = sum(cost[i][j] for i, j in enumerate(pick))
    if after >= before - 1e-9:
        return False
    new = list(freed)
    for i, j in enumerate(pick):
        new[part[i]] = freed[part[j]]
    _apply(layer, freed, new)
    if layer.on_node and not _spread_kept(layer, freed):
        _apply(layer, new, freed)
        return False
    return True


def _apply(layer: Layer, old: Sequence[int], new: Sequence[int]) -> None:
    changed = [g for g, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
    for g in changed:
        if old[g] >= 0:
            layer.remove(old[g], g)
    for g in changed:
        if new[g] >= 0:
            layer.add(new[g], g)


def _spread_kept(layer: Layer, experts: Sequence[int]) -> bool:
    """Every replicated expert among ``experts`` still spans ``min(R, spread_floor)`` nodes."""
    floor = layer.spread_floor
    return all(layer.spread[e] >= min(layer.counts[e], floor) for e in experts if e >= 0)


def min_cost_assignment(cost: Sequence[Sequence[float]]) -> list[int]:
    """[n] column of each row in a minimum-cost perfect matching of a square cost matrix.

    The Hungarian method with potentials (shortest augmenting paths), O(n^3).
    """
    n = len(cost)
    u = [0.0] * (n + 1)  # row potentials (1-based; 0 is the virtual start)
    v = [0.0] * (n + 1)  # column potentials
    match = [0] * (n + 1)  # column -> row
    way = [0] * (n + 1)
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        dist = [math.inf] * (n + 1)
        used = [False] * (n + 1)
        while True:
            used[j0] = True
            i0 = match[j0]
            row, ui = cost[i0 - 1], u[i0]
            delta, j1 = math.inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    reduced = row[j - 1] - ui - v[j]
                    if reduced < dist[j]:
                        dist[j], way[j] = reduced, j0
                    if dist[j] < delta:
                        delta, j1 = dist[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    dist[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    out = [0] * n
    for j in range(1, n + 1):
        out[match[j] - 1] = j - 1
    return out
