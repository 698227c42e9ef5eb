"""Every layer of a plan at once, as numpy arrays: slots, replica counts, loads, bounds.

Shapes (legend in ``geometry``): ``X`` [L, E] loads; ``P`` [L, G, S] expert id per weight
slot, ``-1`` for an empty slot (so ``wp[l, P]`` reads the zero in ``wp``'s last column);
``wp`` [L, E + 1] load per replica; ``node_count`` [L, E, N] replicas per node. Integers
and floats only: no tensors, no per-slot Python objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from router.placement.bounds import greedy_bound
from router.placement.geometry import NODE_SPREAD, Geometry, ShardsIn

# Sizes past which the vectorised bound is not worth it (the per-layer Python one runs).
MAX_BATCH_EXTRA = 1024  # extra slots per layer: one argmax per extra slot
MAX_BATCH_LIGHT = 1 << 16  # (extra + 1) * (S - 1) candidate light replicas per layer


def as_slots(layers: Sequence[ShardsIn], slots: int) -> np.ndarray:
    """[L, G, S] int32 from [L][G] lists of expert ids (checked already), -1 padding.

    int32 (ids < ``MAX_EXPERTS``) keeps a 58 x 288-slot plan's temporaries under 128 KiB.
    """
    try:
        out = np.array(layers, dtype=np.int32)
    except ValueError:  # ragged: some shard has an empty slot
        out = np.empty(0, dtype=np.int32)
    if out.ndim == 3 and out.shape[2] == slots:
        return out
    num_shards = len(layers[0]) if layers else 0
    out = np.full((len(layers), num_shards, slots), -1, dtype=np.int32)
    for i, shards in enumerate(layers):
        for g, held in enumerate(shards):
            out[i, g, : len(held)] = held
    return out


def as_shards(slots: np.ndarray) -> list[tuple[tuple[int, ...], ...]]:
    """Layers' [n, G, S] slots as the plan's tuples: empty slots dropped, order kept."""
    full: list[bool] = np.all(slots >= 0, axis=(1, 2)).tolist()
    return [
        tuple(map(tuple, layer)) if whole else tuple(tuple(e for e in r if e >= 0) for r in layer)
        for layer, whole in zip(slots.tolist(), full, strict=True)
    ]


def left_pack(slots: np.ndarray) -> np.ndarray:
    """``slots`` with each shard's empty slots moved to its end, the others' order kept."""
    if (slots >= 0).all():
        return slots
    order = np.argsort(slots < 0, axis=-1, kind="stable")
    return np.take_along_axis(slots, order, axis=-1)


@dataclass
class LayerArrays:
    """Replica counts and loads of a plan's layers under a load matrix (see the module doc).

    Node counts are kept for replicated experts only, the ones the node rule binds: row
    ``shared[l, e]`` of ``node_count`` (row 0, all zeros, stands for every other expert).
    ``sound`` [L]: every expert has a slot and every replicated one spans
    ``min(NODE_SPREAD, N)`` nodes, the state the fast path starts from.
    """

    counts: np.ndarray  # [L, E] replicas
    wp: np.ndarray  # [L, E + 1] load per replica, 0 for an empty slot
    wp32: np.ndarray  # the same in float32, to score swaps (moves apply wp's exact values)
    shard_load: np.ndarray  # [L, G]
    shared: np.ndarray  # [L, E + 1] row of node_count, 0 for an unreplicated expert
    node_count: np.ndarray  # [1 + replicated experts, N] replicas per node
    spread: np.ndarray  # [1 + replicated experts] nodes holding the expert
    sound: np.ndarray  # [L] bool


def layer_arrays(load: np.ndarray, slots: np.ndarray, geometry: Geometry) -> LayerArrays:
    """Counts, loads per replica and per shard, node counts of ``slots`` ([L, G, S])."""
    num_layers, num_experts = load.shape
    num_nodes, width = geometry.num_nodes, num_experts + 1
    flat = slots.reshape(num_layers, -1)  # [L, G * S]
    # flat index into an [L, E + 1] table; an empty slot (-1) reads column E
    index = flat % np.int32(width)
    index += (np.arange(num_layers, dtype=np.int32) * np.int32(width))[:, None]
    counts = np.bincount(index.ravel(), minlength=num_layers * width)
    counts = counts.reshape(num_layers, width)[:, :num_experts]
    wp = np.zeros((num_layers, width))
    np.divide(load, counts, out=wp[:, :num_experts], where=counts > 0)
    shard_load = np.add.reduceat(wp.take(index), np.arange(0, flat.shape[1], geometry.slots), 1)
    replicated = counts > 1
    shared = np.zeros((num_layers, width), dtype=np.int32)
    shared[:, :num_experts][replicated] = np.arange(1, int(replicated.sum()) + 1)
    row = shared.take(index)  # [L, G * S]
    on = row > 0
    node = np.repeat(np.asarray(geometry.node, dtype=np.int32), geometry.slots)  # [G * S]
    node = np.broadcast_to(node, row.shape)
    keys = row[on] * np.int32(num_nodes) + node[on]
    node_count = np.bincount(keys, minlength=(int(replicated.sum()) + 1) * num_nodes)
    node_count = node_count.reshape(-1, num_nodes)
    spread = (node_count > 0).sum(axis=1)
    sound = np.asarray((counts > 0).all(axis=1))
    floor = min(NODE_SPREAD, num_nodes)
    if floor > 1:
        layer_of_row = np.nonzero(replicated)[0]  # rows were numbered in this order
        sound[layer_of_row[spread[1:] < floor]] = False
    node_count = node_count.astype(np.int32)
    wp32 = wp.astype(np.float32)
    return LayerArrays(counts, wp, wp32, shard_load, shared, node_count, spread, sound)


def greedy_bounds(load: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray] | None:
    """``bounds.greedy_bound`` for every layer at once: ([L] floor, [L] heaviest replica).

    The same greedy: only the ``extra + 1`` heaviest experts can get a replica; each extra
    slot goes to the largest load per replica (an argmax per slot over all layers, ties to
    the lighter expert as the heap's order does). None when the sizes make that slow.
    """
    num_layers, num_experts = load.shape
    num_shards, slots, cap = geometry.num_shards, geometry.slots, geometry.max_replicas
    extra = min(num_shards * slots, num_experts * cap) - num_experts
    k = min(num_experts, extra + 1)
    if extra > MAX_BATCH_EXTRA or k * max(slots - 1, 1) > MAX_BATCH_LIGHT:
        return None
    part = np.partition(load, num_experts - k, axis=1) if k < num_experts else load.copy()
    top = np.sort(part[:, num_experts - k :], axis=1)  # [L, k] ascending
    count = np.ones(top.shape)
    per = top.copy()  # load per replica now, -inf once at the cap
    flat_top, flat_count, flat_per = top.ravel(), count.ravel(), per.ravel()
    base = np.arange(num_layers) * k
    for _ in range(extra):
        j = per.argmax(axis=1)
        j += base
        c = flat_count[j] + 1.0
        flat_count[j] = c
        flat_per[j] = flat_top[j] / c
        if c.max() >= cap:  # at the cap: no more replicas
            flat_per[j[c >= cap]] = -np.inf
    weight = top / count  # [L, k]
    heaviest = weight.max(axis=1)
    floor = np.maximum(load.sum(axis=1) / num_shards, heaviest)
    if slots > 1 and extra == num_shards * slots - num_experts:  # every slot used
        # the heaviest replica's shard holds S - 1 others, at least the lightest ones
        singles = part[:, : num_experts - k]
        if singles.shape[1] > slots - 1:
            singles = np.partition(singles, slots - 2, axis=1)[:, : slots - 1]
        copies = np.broadcast_to(weight[:, :, None], (*weight.shape, slots - 1))
        copies = np.where(np.arange(slots - 1) < count[:, :, None], copies, np.inf)
        pool = np.concatenate([singles, copies.reshape(num_layers, -1)], axis=1)
        light = np.partition(pool, slots - 2, axis=1)[:, : slots - 1].sum(axis=1)
        floor = np.maximum(floor, heaviest + light)
    return floor, heaviest


def layer_bounds(
    load: np.ndarray, state: LayerArrays, geometry: Geometry
) -> tuple[np.ndarray, np.ndarray]:
    """[L] ``greedy_bound`` floor of every layer, and an upper bound on its heaviest replica.

    Cheap check first: the current counts are one way to place the extra slots, so the
    greedy's heaviest replica is at most the current one (``w_max``), and the S - 1
    lightest greedy replicas weigh at most the S - 1 smallest loads; when those two add
    up to at most the mean shard load, the floor is the mean. Only the other layers pay
    for ``greedy_bounds`` (their heaviest is then exact).
    """
    num_layers, num_experts = load.shape
    mean = load.sum(axis=1) / geometry.num_shards
    heaviest = state.wp[:, :num_experts].max(axis=1)
    light = np.zeros(num_layers)
    if 1 < geometry.slots <= num_experts:
        k = geometry.slots - 1
        light = np.partition(load, k - 1, axis=1)[:, :k].sum(axis=1)
    easy = state.sound & (state.counts.max(axis=1) <= geometry.max_replicas)
    easy &= heaviest + light <= mean
    floor = mean
    rows = np.flatnonzero(~easy)
    if len(rows):
        exact = greedy_bounds(load[rows], geometry)
        if exact is None:
            pairs = [greedy_bound(row, geometry) for row in load[rows].tolist()]
            exact = (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
        floor[rows], heaviest[rows] = exact
    return floor, heaviest


def lightest_replicas(wp: np.ndarray, slots: np.ndarray, k: int) -> np.ndarray:
    """[L] sum of the ``k`` lightest filled slots' loads per replica."""
    if k <= 0:
        return np.zeros(len(wp))
    flat = slots.reshape(len(wp), -1)
    weight = np.where(flat >= 0, np.take_along_axis(wp, flat, axis=1), np.inf)
    k = min(k, weight.shape[1])
    return np.partition(weight, k - 1, axis=1)[:, :k].sum(axis=1)


def moved_slots_total(before: np.ndarray, after: np.ndarray) -> int:
    """Slots ``after`` holds that ``before`` did not, shard by shard ([L, G, S] each)."""
    layer, shard, slot = np.nonzero(after != before)  # only written slots can be new
    new = after[layer, shard, slot]
    held = (before[layer, shard] == new[:, None]).any(axis=1)
    return int(((new >= 0) & ~held).sum())
