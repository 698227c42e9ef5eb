"""Repair of a current layer under new load: fill gaps, spread nodes, fix counts, improve."""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence

from router.placement.bounds import lightest
from router.placement.improve import improve
from router.placement.layer import Layer

# ------------------------------------------------------------------------- repair


def repair(
    layer: Layer, wanted: Sequence[int], target: float, budget: int | None, match: bool = False
) -> int | None:
    """Fix this layer (built from the current plan) with few moves; slots moved.

    First what is mandatory (an expert with no slot; an expert on fewer nodes than it
    could be); with ``match``, replica counts moved to ``wanted`` (the from-scratch
    counts: one slot per replica handed from an expert over its count to one under);
    then replica counts where the largest load per replica alone would keep the
    maximum above ``target`` (``wanted``'s largest load per replica is the bar); then
    ``improve``. None when the mandatory fixes alone exceed ``budget``.
    """
    used = 0
    for e in range(len(layer.load)):
        if not layer.where[e]:
            if not add_replica(layer, e, force=True):
                raise AssertionError(f"expert {e} found no slot")
            used += 1
    used += spread_nodes(layer)
    if budget is not None and used > budget:
        return None
    if match:
        short = [e for e, c in enumerate(layer.counts) if c < wanted[e]]
        for e in sorted(short, key=layer.w.__getitem__, reverse=True):
            while layer.counts[e] < wanted[e] and (budget is None or used < budget):
                if not add_replica(layer, e, force=False, spare=wanted):
                    break
                used += 1
    bar = max(x / c for x, c in zip(layer.load, wanted, strict=True)) * (1 + 1e-9)
    # an expert's shard holds S - 1 other replicas, at least the lightest ones
    others = lightest(layer.w, layer.counts, layer.slots - 1)
    heap = [(-x, e) for e, x in enumerate(layer.w)]
    heapq.heapify(heap)
    while heap and (budget is None or used < budget):
        neg_w, e = heapq.heappop(heap)
        if -neg_w != layer.w[e]:
            continue  # stale
        if layer.w[e] <= bar or layer.w[e] + others <= target:
            break  # counts no longer keep the maximum above the target
        if not add_replica(layer, e, force=False):
            break
        used += 1
        heapq.heappush(heap, (-layer.w[e], e))
    used += improve(layer, target, None if budget is None else budget - used, repair=True)
    return used


def add_replica(layer: Layer, e: int, force: bool, spare: Sequence[int] | None = None) -> bool:
    """One more replica of ``e``, in a free slot or in place of a spare replica.

    The donor is the replicated expert (with more replicas than ``spare`` says, when
    given) whose per-replica load rises least; unless ``force``, only if that stays
    below ``e``'s load per replica now.
    """
    free = [
        g
        for g, h in enumerate(layer.shards)
        if len(h) < layer.slots and layer.can_host(e, g, grow=True)
    ]
    if free:
        g = min(free, key=layer.shard_load.__getitem__)
        layer.reweight(e, layer.counts[e] + 1)
        layer.add(e, g)
        return True
    donors = sorted(
        (layer.load[d] / (c - 1), d)
        for d, c in enumerate(layer.counts)
        if c >= 2 and d != e and (spare is None or c > spare[d])
    )
    current = layer.w[e] if layer.counts[e] else math.inf
    for after, d in donors:
        if not force and after >= current:
            return False
        spots = [
            g for g in layer.where[d] if layer.may_drop(d, g) and layer.can_host(e, g, grow=True)
        ]
        if spots:
            g = min(spots, key=layer.shard_load.__getitem__)
            layer.remove(d, g)
            layer.reweight(d, layer.counts[d] - 1)
            layer.reweight(e, layer.counts[e] + 1)
            layer.add(e, g)
            return True
    return False


def spread_nodes(layer: Layer) -> int:
    """Move replicas until each expert is on ``min(R, spread_floor)`` nodes; slots moved."""
    if not layer.on_node:
        return 0
    used = 0
    for e, where in enumerate(layer.where):
        while layer.spread[e] < min(len(where), layer.spread_floor):
            cost = relocate(layer, e)
            if not cost:
                break
            used += cost
    return used


def relocate(layer: Layer, e: int) -> int:
    """Move a replica of ``e`` off a node holding two to a node without one; slots moved.

    Takes the relocation or swap (with a replica of similar load) that keeps the two
    shards' maximum lowest; 0 when there is none.
    """
    base = e * layer.num_nodes
    shard_load, w = layer.shard_load, layer.w
    best: tuple[float, int, int, int, int] | None = None  # (max, cost, src, dst, f)
    for src in layer.where[e]:
        if layer.on_node[base + layer.node[src]] < 2:
            continue
        for dst, held in enumerate(layer.shards):
            if layer.on_node[base + layer.node[dst]]:
                continue
            if len(held) < layer.slots:
                val = max(shard_load[src] - w[e], shard_load[dst] + w[e])
                if best is None or (val, 1) < best[:2]:
                    best = (val, 1, src, dst, -1)
                continue
            for f in held:
                d = w[e] - w[f]
                val = max(shard_load[src] - d, shard_load[dst] + d)
                if best is not None and (val, 2) >= best[:2]:
                    continue
                if f not in layer.shards[src] and layer.can_host(f, src, dst):
                    best = (val, 2, src, dst, f)
    if best is None:
        return 0
    _, cost, src, dst, f = best
    layer.move(e, src, dst)
    if f >= 0:
        layer.move(f, dst, src)
    return cost


def fix_over(layer: Layer, target: float) -> int:
    """Bring every shard over ``target`` under it by one swap each where one exists.

    Unlike ``improve`` (the heaviest shard only), each shard over the target, heaviest
    first, takes the relocation or swap with any shard that leaves both under the target,
    the two loads closest to even (bisect over the other shard's sorted replicas). Runs
    again while a pass fixes something; slots moved.
    """
    shards, shard_load, w, slots = layer.shards, layer.shard_load, layer.w, layer.slots
    used, fixed = 0, True
    while fixed:
        fixed = False
        over = [g for g in range(len(shards)) if shard_load[g] > target]
        for a_shard in sorted(over, key=shard_load.__getitem__, reverse=True):
            top = shard_load[a_shard]
            best: tuple[float, int, int, int] | None = None  # (imbalance, a, B, b or -1)
            for b_shard, held_b in enumerate(shards):
                room = target - shard_load[b_shard]
                if b_shard == a_shard or room <= 0.0:
                    continue
                pairs = sorted((w[b], b) for b in held_b)
                if len(held_b) < slots:
                    pairs.insert(0, (0.0, -1))  # an empty slot: a relocation
                keys = [x for x, _ in pairs]
                even = 0.5 * (top - shard_load[b_shard])
                for a in shards[a_shard]:
                    if a in held_b:
                        continue
                    low, high = w[a] - room, w[a] - (top - target)  # w[b] window
                    for i in range(bisect.bisect_left(keys, low), len(keys)):
                        x, b = pairs[i]
                        if x > high:
                            break
                        score = abs(w[a] - x - even)
                        if best is not None and score >= best[0]:
                            continue
                        if (b < 0 or b not in shards[a_shard]) and _may_swap(
                            layer, a, a_shard, b, b_shard
                        ):
                            best = (score, a, b_shard, b)
            if best is not None:
                _, a, b_shard, b = best
                layer.move(a, a_shard, b_shard)
                if b >= 0:
                    layer.move(b, b_shard, a_shard)
                used += 1 if b < 0 else 2
                fixed = True
    return used


def _may_swap(layer: Layer, a: int, a_shard: int, b: int, b_shard: int) -> bool:
    if not layer.can_host(a, b_shard, a_shard):
        return False
    return b < 0 or layer.can_host(b, a_shard, b_shard)
