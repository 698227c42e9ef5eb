"""DeepSeek's EPLB, global policy, reimplemented from its published description (not copied).

As published (github.com/deepseek-ai/EPLB, ``rebalance_experts`` with one node group): per
layer, give each redundant slot in turn to the logical expert with the highest load per
replica (``argmax(weight / replica_count)``, first index on ties), then pack all physical
experts onto GPUs with balanced packing: sort by load per replica, heaviest first, and put
each on the GPU with the lowest load among those with a free slot (first index on ties),
every GPU taking exactly ``slots`` experts. The current placement plays no part, and two
replicas of one expert may share a GPU (its packing does not forbid it).

The published code keeps its tables in torch tensors, runs the replication as one argmax
over all layers per redundant slot and the packing as a Python loop over tensor elements.
This version replicates with a heap (the same choices, each in O(log E)) and packs with
the published linear scan over Python lists, faster than indexing tensors one element at
a time, so a time compared against it favours EPLB.
Used by ``bench/placement.py`` only.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

Shards = list[list[int]]  # [G] -> expert ids (an id may repeat)


def replicate(load: Sequence[float], num_slots: int) -> list[int]:
    """[E] replica counts: each redundant slot to the argmax of load / replicas.

    A heap makes the same choices as the published argmax loop (ties to the lowest
    index), in O(log E) per slot instead of O(E).
    """
    counts = [1] * len(load)
    heap = [(-x, e) for e, x in enumerate(load)]
    heapq.heapify(heap)
    for _ in range(num_slots - len(load)):
        _, best = heapq.heappop(heap)
        counts[best] += 1
        heapq.heappush(heap, (-load[best] / counts[best], best))
    return counts


def balanced_packing(weights: Sequence[float], num_packs: int) -> list[int]:
    """[items] pack per item: heaviest first onto the lightest pack that has room."""
    per_pack = len(weights) // num_packs
    assert per_pack * num_packs == len(weights), (len(weights), num_packs)
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    pack_weight = [0.0] * num_packs
    pack_items = [0] * num_packs
    assignment = [-1] * len(weights)
    for item in order:
        pack = min(
            (p for p in range(num_packs) if pack_items[p] < per_pack),
            key=pack_weight.__getitem__,
        )
        assignment[item] = pack
        pack_weight[pack] += weights[item]
        pack_items[pack] += 1
    return assignment


def rebalance_layer(load: Sequence[float], num_shards: int, slots_per_shard: int) -> Shards:
    """One layer's placement: [G] lists of expert ids, ``slots_per_shard`` each."""
    counts = replicate(load, num_shards * slots_per_shard)
    physical = [e for e, c in enumerate(counts) for _ in range(c)]
    weights = [load[e] / counts[e] for e in physical]
    shards: Shards = [[] for _ in range(num_shards)]
    for item, pack in enumerate(balanced_packing(weights, num_shards)):
        shards[pack].append(physical[item])
    return shards


def rebalance_experts(
    load: Sequence[Sequence[float]], num_shards: int, slots_per_shard: int
) -> list[Shards]:
    """[L][G] -> expert ids: every layer planned from scratch."""
    return [rebalance_layer(row, num_shards, slots_per_shard) for row in load]
