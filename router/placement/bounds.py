"""Replica counts, lower bounds on a layer's max shard load, and scores of any placement."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from router.placement.geometry import Geometry


def greedy_counts(load: Sequence[float], total_slots: int, max_replicas: int) -> list[int]:
    """[E] replicas per expert: one each, then each extra slot to the highest load/replica.

    Giving the next replica to the current maximum is optimal for the largest load per
    replica (any other choice leaves that maximum in place). O(extra * log E).
    """
    counts = [1] * len(load)
    extra = min(total_slots, len(load) * max_replicas) - len(load)
    heap = [(-x, e) for e, x in enumerate(load)]
    heapq.heapify(heap)
    for _ in range(extra):
        _, e = heapq.heappop(heap)
        c = counts[e] + 1
        counts[e] = c
        if c < max_replicas:
            heapq.heappush(heap, (-load[e] / c, e))
    return counts


def lower_bound(per_replica: Sequence[float], counts: Sequence[int], geometry: Geometry) -> float:
    """A floor under the max shard load for these replica counts, whatever the packing.

    The mean; and, when every slot is used, the heaviest replica plus the ``S - 1``
    lightest other replicas, since its shard holds exactly ``S`` replicas.
    """
    total = sum([w * c for w, c in zip(per_replica, counts, strict=True)])
    heaviest = max(per_replica)
    floor = max(total / geometry.num_shards, heaviest)
    if geometry.slots > 1 and sum(counts) == geometry.num_shards * geometry.slots:
        floor = max(floor, heaviest + lightest(per_replica, counts, geometry.slots - 1))
    return floor


def greedy_bound(load: Sequence[float], geometry: Geometry) -> tuple[float, float]:
    """``lower_bound`` for the greedy replica counts, and their largest load per replica.

    The same value as ``greedy_counts`` then ``lower_bound``, without building the [E]
    counts: only the ``extra + 1`` heaviest experts can get a replica (any other would
    need all of them replicated first), so the heap holds those alone.
    """
    num_experts, slots, num_shards = len(load), geometry.slots, geometry.num_shards
    extra = min(num_shards * slots, num_experts * geometry.max_replicas) - num_experts
    order = sorted(load)  # ascending
    total = sum(order)
    k = min(num_experts, extra + 1)
    singles = order[: num_experts - k]  # never replicated, lightest first
    heap = [(-x, x, 1) for x in order[num_experts - k :]]  # (-load per replica, load, count)
    heapq.heapify(heap)
    done: list[tuple[float, float, int]] = []  # at max_replicas
    for _ in range(extra):
        _, x, c = heap[0]
        if c + 1 >= geometry.max_replicas:
            done.append((-x / (c + 1), x, c + 1))
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (-x / (c + 1), x, c + 1))
    groups = heap + done
    heaviest = max([-g[0] for g in groups] + singles[-1:])
    floor = max(total / num_shards, heaviest)
    if slots > 1 and extra == num_shards * slots - num_experts:  # every slot used
        light = singles[: slots - 1]
        for neg_w, _, c in sorted(groups, reverse=True):  # lightest replicas first
            if len(light) >= slots - 1 and -neg_w >= light[-1]:
                break
            light += [-neg_w] * min(c, slots - 1)
            light.sort()
            del light[slots - 1 :]
        floor = max(floor, heaviest + sum(light[: slots - 1]))
    return floor, heaviest


def lightest(per_replica: Sequence[float], counts: Sequence[int], k: int) -> float:
    """Sum of the ``k`` lightest replicas (an expert's replicas all weigh the same)."""
    total, left = 0.0, k
    for e in heapq.nsmallest(k, range(len(per_replica)), key=per_replica.__getitem__):
        take = min(counts[e], left)
        total += take * per_replica[e]
        left -= take
        if not left:
            break
    return total


def layer_balancedness(shards: Sequence[Sequence[int]], load: Sequence[float]) -> float:
    """Max shard load / mean shard load of one layer; 1.0 for a layer with no load.

    Scores any placement (a shard may even list an expert twice, as EPLB's packing can):
    each expert's load splits evenly over the slots holding it. Every expert with load
    must have a slot.
    """
    loads = shard_loads(shards, load)
    total = sum(load)
    return max(1.0, max(loads) * len(shards) / total) if total > 0 else 1.0  # underflow only


def shard_loads(shards: Sequence[Sequence[int]], load: Sequence[float]) -> list[float]:
    """[G] load per shard, each expert's load split evenly over its slots."""
    counts = [0] * len(load)
    for held in shards:
        for e in held:
            counts[e] += 1
    missing = [e for e, c in enumerate(counts) if c == 0 and load[e] > 0]
    if missing:
        raise ValueError(f"{len(missing)} expert(s) with load have no slot, e.g. {missing[:5]}")
    per_replica = [x / c if c else 0.0 for x, c in zip(load, counts, strict=True)]
    return [sum(per_replica[e] for e in held) for held in shards]


def moved_slots(current: Sequence[Sequence[int]], new: Sequence[Sequence[int]]) -> int:
    """Slots of one layer that ``new`` holds and ``current`` did not, shard by shard."""
    return sum(len(set(n).difference(c)) for c, n in zip(current, new, strict=True))
