"""Plans built from scratch, and mapping them onto a current plan's shards and slots."""

from __future__ import annotations

from typing import Any

from router.placement.bounds import greedy_counts, lower_bound
from router.placement.geometry import NODE_SPREAD, Geometry, Shards, ShardsIn
from router.placement.improve import improve
from router.placement.layer import Layer
from router.placement.repair import spread_nodes


def plan_from_scratch(load: list[float], geometry: Geometry) -> Shards:
    """Replicate, pack, improve; never worse than the same steps without replication."""
    layer = pack_and_improve(load, geometry, geometry.max_replicas)
    if geometry.max_replicas > 1 and layer.max_load > max(load) * (1 + 1e-12):
        # Replication could have cost a better packing (a bound says when it cannot).
        single = pack_and_improve(load, geometry, 1)
        if single.max_load < layer.max_load:
            layer = single
    return [sorted(held) for held in layer.shards]


def pack_and_improve(load: list[float], geometry: Geometry, max_replicas: int) -> Layer:
    total_slots = geometry.num_shards * geometry.slots
    counts = greedy_counts(load, total_slots, max_replicas)
    layer = Layer(load, counts, geometry)
    # Balance first with shards distinct only, then spread replicas over nodes by swaps
    # with replicas of similar load, then balance again under the node rule.
    layer.spread_floor = 1
    layer.pack()
    bound = lower_bound(layer.w, counts, geometry) * (1 + 1e-9)
    if layer.max_load > bound:
        improve(layer, bound, None)
    if geometry.num_nodes > 1:
        layer.spread_floor = min(NODE_SPREAD, geometry.num_nodes)
        spread_nodes(layer)
        if layer.max_load > bound:
            improve(layer, bound, None)
    return layer


def keep_slot_order(current: ShardsIn, new: ShardsIn) -> Shards:
    """``new`` with each kept expert at its current slot index; arrivals fill the gaps."""
    out: Shards = []
    for cur, held in zip(current, new, strict=True):
        keep = set(held)
        arrivals = sorted(keep.difference(cur))
        slots: list[int] = []
        for e in cur:
            if e in keep:
                slots.append(e)
            elif arrivals:
                slots.append(arrivals.pop(0))
        out.append(slots + arrivals)
    return out


def relabel(best: Shards, current: ShardsIn, geometry: Geometry) -> Shards:
    """Permute ``best``'s nodes, then its shards within a node, to overlap ``current`` most.

    Greedy matching on overlap counts; permuting whole nodes keeps every node rule.
    """
    num_shards, per_node = geometry.num_shards, geometry.num_shards // geometry.num_nodes
    holders: dict[int, list[int]] = {}
    for g, held in enumerate(current):
        for e in held:
            holders.setdefault(e, []).append(g)
    overlap = [[0] * num_shards for _ in range(num_shards)]  # [new shard][current shard]
    for g, held in enumerate(best):
        row = overlap[g]
        for e in held:
            for c in holders.get(e, ()):
                row[c] += 1

    def match(new: list[int], cur: list[int], score: Any) -> dict[int, int]:
        pairs = sorted((-score(a, b), a, b) for a in new for b in cur)
        taken_a: dict[int, int] = {}
        taken_b: set[int] = set()
        for _, a, b in pairs:
            if a not in taken_a and b not in taken_b:
                taken_a[a] = b
                taken_b.add(b)
        return taken_a

    def node_score(a: int, b: int) -> int:
        return sum(
            overlap[x][y]
            for x in range(a * per_node, (a + 1) * per_node)
            for y in range(b * per_node, (b + 1) * per_node)
        )

    nodes = list(range(geometry.num_nodes))
    out: Shards = [[] for _ in range(num_shards)]
    for a, b in match(nodes, nodes, node_score).items():
        new_shards = list(range(a * per_node, (a + 1) * per_node))
        cur_shards = list(range(b * per_node, (b + 1) * per_node))
        for x, y in match(new_shards, cur_shards, lambda x, y: overlap[x][y]).items():
            out[y] = best[x]
    return out
