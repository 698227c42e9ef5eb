"""The re-plan's fast path: paired swaps on every layer at once, in numpy.

After a small drift most layers need a few swaps: a shard over the target gives a replica
to a shard under it and takes back a lighter one (2 slots moved), or moves one into an
empty slot (1). Each round pairs, in every layer, the ``k``-th heaviest shard over the
target with a different shard under it (the ``k``-th lightest, rotated each round), and
takes for each pair the swap that brings the heavy shard under the target while keeping
the light one under it, fewest slots first, then the lowest of the two loads; when there
is none, the swap moving the most load that keeps the light shard under. All pairs of all
layers are scored as one [L, K, S, S] array. Swaps keep the planner's rules (no expert
twice on a shard; a replicated expert keeps ``min(NODE_SPREAD, N)`` nodes); two swaps of
one round moving the same expert are not both taken. Every step lowers the total load
over the target, so the rounds end; layers still over it go to the per-layer path.
Shapes as in ``arrays``; K pairs per layer.
"""

from __future__ import annotations

import numpy as np

from router.placement.arrays import LayerArrays
from router.placement.geometry import NODE_SPREAD, Geometry

MAX_ROUNDS = 16
PATIENCE = 2  # rounds without a step (each with other partners) before a layer is left
CHUNK_ELEMENTS = 16384  # [S, S, P] elements scored at once: temporaries under 128 KiB


def swap_rounds(
    slots: np.ndarray,
    state: LayerArrays,
    target: np.ndarray,
    layers: np.ndarray,
    geometry: Geometry,
    rounds: int = MAX_ROUNDS,
) -> np.ndarray:
    """Swap in ``layers`` (indices) until no shard is over ``target`` ([L]); in place.

    Updates ``slots`` [L, G, S] and ``state``'s shard loads and node counts. Returns the
    layers (of ``layers``) that still have a shard over the target.
    """
    active = np.asarray(layers, dtype=np.int64)
    stalled = np.zeros(len(target), dtype=np.int64)  # rounds in a row without a step
    for r in range(rounds):
        over = state.shard_load[active] > target[active, None]  # [A, G]
        active = active[over.any(axis=1) & (stalled[active] < PATIENCE)]
        if not len(active):
            break
        stepped = _round(slots, state, target, active, geometry, r)  # [A] bool
        stalled[active] = np.where(stepped, 0, stalled[active] + 1)
    over = state.shard_load[layers] > target[layers, None]
    return np.asarray(layers)[over.any(axis=1)]


def _round(
    slots: np.ndarray,
    state: LayerArrays,
    target: np.ndarray,
    active: np.ndarray,
    geometry: Geometry,
    rotation: int,
) -> np.ndarray:
    """One swap per (heavy, light) shard pair of each active layer; P pairs in all.

    Returns [A] whether each active layer took a step.
    """
    load = state.shard_load[active]  # [A, G]
    tgt = target[active][:, None]  # [A, 1]
    num_over = (load > tgt).sum(axis=1)
    num_under = (load < tgt).sum(axis=1)
    order = np.argsort(-load, axis=1, kind="stable")  # heaviest first
    width = int(min(num_over.max(), max(num_under.max(), 1)))
    k = np.arange(width)
    pick = (k[None, :] + rotation) % np.maximum(num_under, 1)[:, None]
    light_all = np.take_along_axis(order[:, ::-1], pick, axis=1)  # [A, K]
    row, col = np.nonzero((k[None, :] < num_over[:, None]) & (k[None, :] < num_under[:, None]))
    layer = active[row]  # [P]
    heavy, light = order[row, col], light_all[row, col]  # [P]
    load_a, load_b, tgt_p = load[row, heavy], load[row, light], tgt[row, 0]
    ids_a, ids_b = slots[layer, heavy], slots[layer, light]  # [P, S]
    wp32 = state.wp32
    w_a_t = wp32[layer[None, :], ids_a.T]  # [S, P] float32, for scoring only
    w_b_t = wp32[layer[None, :], ids_b.T]
    ok_a = ids_a >= 0
    ok_a &= _keeps_nodes(state, layer, ids_a, heavy, light, geometry)
    ok_b = _keeps_nodes(state, layer, ids_b, light, heavy, geometry)
    scale = 4.0 * float(load.max()) + 1.0
    # [S, P] layouts (pairs innermost), float32 weights; chunks keep temporaries small
    a_t, b_t, ok_a_t, ok_b_t = ids_a.T.copy(), ids_b.T.copy(), ok_a.T.copy(), ok_b.T.copy()
    step = max(1, CHUNK_ELEMENTS // geometry.slots**2)
    best = np.concatenate(
        [
            _best_steps(
                a_t[:, i : i + step], b_t[:, i : i + step], w_a_t[:, i : i + step],
                w_b_t[:, i : i + step], ok_a_t[:, i : i + step], ok_b_t[:, i : i + step],
                load_a[i : i + step], load_b[i : i + step], tgt_p[i : i + step], scale,
            )
            for i in range(0, len(layer), step)
        ]
    )  # fmt: skip
    chosen = best >= 0
    if not chosen.any():
        return np.zeros(len(active), dtype=bool)
    layer, heavy, light, best = layer[chosen], heavy[chosen], light[chosen], best[chosen]
    pos_a, pos_b = best // geometry.slots, best % geometry.slots
    pick_rows = np.flatnonzero(chosen)
    e_a, e_b = ids_a[pick_rows, pos_a], ids_b[pick_rows, pos_b]
    delta = state.wp[layer, e_a] - state.wp[layer, e_b]  # exact, float64; wp[l, -1] is 0
    keep = _unique_experts(layer, e_a, e_b, state.wp.shape[1])
    layer, heavy, light, pos_a, pos_b, e_a, e_b, delta = (
        x[keep] for x in (layer, heavy, light, pos_a, pos_b, e_a, e_b, delta)
    )
    slots[layer, heavy, pos_a] = e_b
    slots[layer, light, pos_b] = e_a
    state.shard_load[layer, heavy] -= delta
    state.shard_load[layer, light] += delta
    node = np.asarray(geometry.node)
    _move_nodes(state, layer, e_a, node[heavy], node[light])
    filled = e_b >= 0
    _move_nodes(state, layer[filled], e_b[filled], node[light[filled]], node[heavy[filled]])
    stepped = np.zeros(len(target), dtype=bool)
    stepped[layer] = True
    return stepped[active]


def _best_steps(
    ids_a: np.ndarray,
    ids_b: np.ndarray,
    w_a: np.ndarray,
    w_b: np.ndarray,
    ok_a: np.ndarray,
    ok_b: np.ndarray,
    load_a: np.ndarray,
    load_b: np.ndarray,
    target: np.ndarray,
    scale: float,
) -> np.ndarray:
    """[P] the chosen step of each pair as ``a_slot * S + b_slot``, -1 for none.

    Inputs are [S, P] (slot, pair) and [P]. A full step (the heavy shard ends under the
    target, the light one stays under it) wins: fewest slots (an empty slot first), then
    the two loads closest to even; a pair without one takes the step moving the most load
    that keeps the light shard under. Scores are [S, S, P] float32, pairs innermost for
    numpy's inner loops, with a margin far above float32's error on the bounds; callers
    keep P small: a temporary over 128 KiB is a fresh mapping, and its page faults cost
    more than the arithmetic.
    """
    num_slots, pairs = ids_a.shape
    same = ids_a[:, None, :] == ids_b[None, :, :]  # [S, S, P]
    bad_a = ~ok_a | same.any(axis=1)  # [S, P]: a may not go, or is on B already
    bad_b = ~ok_b | (same.any(axis=0) & (ids_b >= 0))  # b may not go, or is on A already
    margin = 1e-6 * target
    room = (target - load_b - margin).astype(np.float32)  # [P] most load B may take
    excess = (load_a - target + margin).astype(np.float32)  # [P] least load A must give
    moved = w_a[:, None, :] - w_b[None, :, :]  # [S, S, P]: load leaving the heavy shard
    bad = bad_a[:, None, :] | bad_b[None, :, :]
    # a full step moves load within [excess, room]: |moved - centre| <= half width
    window = moved - 0.5 * (room + excess)
    np.abs(window, out=window)
    short = bad | (window > 0.5 * (room - excess))
    key = moved - (0.5 * (load_a - load_b)).astype(np.float32)
    np.abs(key, out=key)
    if (ids_b < 0).any():  # an empty slot: a relocation (1 slot) before any swap (2)
        key += np.where(ids_b >= 0, np.float32(scale), np.float32(0.0))[None, :, :]
    np.copyto(key, np.float32(np.inf), where=short)
    flat = key.reshape(num_slots * num_slots, pairs)
    best = flat.argmin(axis=0)
    found = np.isfinite(flat[best, np.arange(pairs)])
    if found.all():
        return best
    rest = np.flatnonzero(~found)  # no full step: the most load moved, if any
    part = moved[:, :, rest]
    part = np.where(bad[:, :, rest] | (part <= 0.0) | (part > room[rest]), -np.inf, part)
    part = part.reshape(num_slots * num_slots, len(rest))
    most = part.argmax(axis=0)
    best[rest] = np.where(np.isfinite(part[most, np.arange(len(rest))]), most, -1)
    return best


def _keeps_nodes(
    state: LayerArrays,
    layer: np.ndarray,
    ids: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    geometry: Geometry,
) -> np.ndarray:
    """[P, S]: may each replica ``ids`` on shard ``src`` move to ``dst`` (node rule)?"""
    floor = min(NODE_SPREAD, geometry.num_nodes)
    if floor < 2:
        return np.ones(ids.shape, dtype=bool)
    node = np.asarray(geometry.node)
    n_src, n_dst = node[src][:, None], node[dst][:, None]  # [P, 1]
    row = state.shared[layer[:, None], ids]  # [P, S]; 0 (passes) for unreplicated or empty
    at_src = state.node_count[row, n_src]
    at_dst = state.node_count[row, n_dst]
    after = state.spread[row] - (at_src == 1) + (at_dst == 0)
    return (row == 0) | (n_src == n_dst) | (after >= floor)


def _unique_experts(layer: np.ndarray, e_a: np.ndarray, e_b: np.ndarray, width: int) -> np.ndarray:
    """[steps] bool: keep a step unless another step of the round moves one of its experts.

    Each step was checked alone; two moving one expert could break its node rule together.
    """
    key_a = layer * width + e_a
    key_b = np.where(e_b >= 0, layer * width + e_b, -1 - np.arange(len(e_b)))
    keys = np.sort(np.concatenate([key_a, key_b]))
    twice = keys[1:][keys[1:] == keys[:-1]]
    if not len(twice):
        return np.ones(len(layer), dtype=bool)
    return ~(np.isin(key_a, twice) | np.isin(key_b, twice))


def _move_nodes(
    state: LayerArrays, layer: np.ndarray, expert: np.ndarray, src: np.ndarray, dst: np.ndarray
) -> None:
    """Node bookkeeping for replicas moved node ``src`` -> ``dst`` (distinct experts)."""
    row = state.shared[layer, expert]
    shared = row > 0  # the only ones with node counts
    row, src, dst = row[shared], src[shared], dst[shared]
    if not len(row):
        return
    state.node_count[row, src] -= 1
    state.node_count[row, dst] += 1
    state.spread[row] = (state.node_count[row] > 0).sum(axis=1)
