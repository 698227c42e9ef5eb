"""Routing-aware expert placement: replicate hot experts, pack slots so no shard straggles.

Pure and torch-free: loads are floats, experts and shards are ints. Legend for the shape
comments: L MoE layers, E experts per layer, G expert shards, S weight slots per shard,
N nodes (shards ``g`` of one node are the contiguous run ``g // (G // N)``), R replicas
of one expert (1 <= R <= G).

Method, per layer (every layer has its own load, so its own placement):

1. **Replicate.** Every expert gets one slot; each of the ``G*S - E`` extra slots goes to
   the expert whose load per replica is highest now (a heap), which minimises the largest
   load per replica, the floor under the straggler shard.
2. **Pack.** Replicas, heaviest first, go to the lightest shard with a free slot that does
   not hold that expert (longest-processing-time), preferring a node without it on a tie.
3. **Improve.** While the heaviest shard is above a lower bound, move or swap one of its
   replicas with one on a lighter shard, or re-purpose a cold expert's spare replica as one
   more replica of a hot expert on it, when that leaves every shard touched below the old
   maximum. Then replicas move (by swaps with replicas of similar load) until each
   replicated expert spans ``NODE_SPREAD`` nodes, so a node loss never removes an expert,
   and the improvement runs again under that rule. A plan is never worse than the same
   steps without replication (both are built when a bound cannot rule it out).
4. **Re-plan from a current plan** (layers worst first, so a move budget goes where it
   helps). The target is ``tolerance`` (1%) above a lower bound on any plan's maximum, so
   a plan under it is within 1% of the best. Keep the layer if it is under the target;
   else give hot experts a replica in spare replicas' slots and swap replicas between the
   heaviest and lightest shards (bisect on sorted loads) until every shard is under it.
   Only when that fails (the bound is loose: few slots, heavy skew) is the best plan built
   from scratch, relabelled to overlap the current one; a repair then aims at 1% above
   it, and the plan moving fewest slots among those within 1% of the best wins.

Balancedness of a layer is max shard load / mean shard load (1.0 is perfect; an expert's
load splits evenly among its replicas); a plan's balancedness is the mean over layers.
A slot moved is a (shard, expert) the shard did not hold in the current plan.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from operator import truediv
from typing import Any

# Bounds on inputs, so one request cannot make the planner allocate without limit.
MAX_LAYERS = 1024
MAX_EXPERTS = 8192
MAX_SHARDS = 4096
MAX_SLOTS_PER_SHARD = 4096
MAX_SLOTS_PER_LAYER = 1 << 16  # G * S
MAX_TOTAL_SLOTS = 1 << 22  # L * G * S
MAX_LOAD = 1e18  # per (layer, expert): token counts, far above any real window
DEFAULT_TOLERANCE = 0.01  # a low-move plan within 1% of the best found wins
NODE_SPREAD = 2  # a replicated expert always spans this many nodes (when there are)
PACK_NODE_SLACK = 0.01  # packing prefers a new node for a replica within 1% of mean load

Shards = list[list[int]]  # [G] -> expert ids in slot order
ShardsIn = Sequence[Sequence[int]]  # the same, read only (lists or a plan's tuples)
_NUMBER_TYPES = frozenset({int, float})
# One improvement step: (new max load, slots moved, kind, expert a on the heaviest shard A,
# the other shard B, the other expert b or -1)
_Step = tuple[float, int, int, int, int, int]
_RELOCATE, _SWAP, _REPURPOSE = range(3)


@dataclass(frozen=True)
class PlacementPlan:
    """Which experts each shard holds, per MoE layer, and what the plan costs and buys.

    ``layers[l][g]`` lists the experts in shard ``g``'s slots for layer ``l``, in slot order
    (an expert kept from the current plan keeps its slot index). ``moved_slots`` counts the
    (layer, shard, expert) slots the shards must load that the current plan did not hold
    (0 without a current plan); ``moved_bytes`` is that times the bytes per slot, if given.
    """

    layers: tuple[tuple[tuple[int, ...], ...], ...]  # [L][G] -> expert ids
    num_experts: int
    slots_per_shard: int
    num_nodes: int
    balancedness_per_layer: tuple[float, ...]  # [L], max / mean shard load
    moved_slots: int = 0
    moved_bytes: int | None = None
    # set by plan_placement: its layers need no validation as a later plan's current one
    _checked: bool = field(default=False, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_shards(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    @property
    def balancedness(self) -> float:
        """Mean over layers of max shard load / mean shard load (1.0 = perfectly even)."""
        per_layer = self.balancedness_per_layer
        return sum(per_layer) / len(per_layer) if per_layer else 1.0

    @property
    def extra_slots(self) -> int:
        """Slots per layer beyond one per expert: what replication can use."""
        return self.num_shards * self.slots_per_shard - self.num_experts

    def replicas(self, layer: int, expert: int) -> tuple[int, ...]:
        """The shards holding ``expert`` in ``layer``, ascending."""
        return tuple(g for g, held in enumerate(self.layers[layer]) if expert in held)

    def to_json(self) -> dict[str, Any]:
        """The CLI's JSON shape: ``{"layers": [{"shards": ...}], "balancedness", "moved"}``."""
        out: dict[str, Any] = {
            "layers": [
                {"shards": [list(s) for s in shards], "balancedness": round(b, 6)}
                for shards, b in zip(self.layers, self.balancedness_per_layer, strict=True)
            ],
            "balancedness": round(self.balancedness, 6),
            "moved": self.moved_slots,
        }
        if self.moved_bytes is not None:
            out["moved_bytes"] = self.moved_bytes
        return out


# ----------------------------------------------------------------------------- public API


def plan_placement(
    load: Sequence[Sequence[float]],
    num_shards: int,
    slots_per_shard: int,
    *,
    num_nodes: int = 1,
    current: PlacementPlan | Sequence[Sequence[Sequence[int]]] | None = None,
    max_moved_slots: int | None = None,
    bytes_per_slot: int | None = None,
    max_replicas: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> PlacementPlan:
    """Place ``load`` ([L][E] token counts) on ``num_shards`` x ``slots_per_shard`` slots.

    With ``current`` ([L][G] -> expert ids, e.g. a previous plan's ``layers``) the plan
    keeps as many current slots as it can (see the module docstring) and moves at most
    ``max_moved_slots`` slots in all. ``max_replicas`` caps replicas per expert (1: no
    replication, extra slots stay empty). Raises ``ValueError`` naming the bad field.
    """
    rows = validate_load(load)
    num_experts = len(rows[0])
    _check_int("num_shards", num_shards, 1, MAX_SHARDS)
    _check_int("slots_per_shard", slots_per_shard, 1, MAX_SLOTS_PER_SHARD)
    _check_int("num_nodes", num_nodes, 1, num_shards)
    if num_shards % num_nodes:
        raise ValueError(f"num_shards={num_shards} must split evenly over num_nodes={num_nodes}")
    capacity = num_shards * slots_per_shard
    if capacity > MAX_SLOTS_PER_LAYER or capacity * len(rows) > MAX_TOTAL_SLOTS:
        raise ValueError(
            f"num_shards * slots_per_shard = {capacity} per layer x {len(rows)} layers is over "
            f"the limit ({MAX_SLOTS_PER_LAYER} per layer, {MAX_TOTAL_SLOTS} in all)"
        )
    if capacity < num_experts:
        raise ValueError(
            f"num_shards * slots_per_shard = {num_shards} * {slots_per_shard} = {capacity} "
            f"slots per layer cannot hold the load's {num_experts} experts; raise "
            f"slots_per_shard to at least {-(-num_experts // num_shards)}"
        )
    if max_replicas is not None:
        _check_int("max_replicas", max_replicas, 1, num_shards)
    if max_moved_slots is not None:
        _check_int("max_moved_slots", max_moved_slots, 0, MAX_TOTAL_SLOTS)
    if bytes_per_slot is not None:
        _check_int("bytes_per_slot", bytes_per_slot, 0, 1 << 50)
    if not (isinstance(tolerance, int | float) and 0.0 <= tolerance <= 1.0):
        raise ValueError(f"tolerance={tolerance!r} must be a number in [0, 1]")
    geometry = _Geometry(num_shards, slots_per_shard, num_nodes, max_replicas or num_shards)
    if current is None:
        layers = [_plan_from_scratch(row, geometry) for row in rows]
        maxima = [max(shard_loads(shards, row)) for shards, row in zip(layers, rows, strict=True)]
        moved = 0
    else:
        cur: Sequence[ShardsIn]
        if (
            isinstance(current, PlacementPlan)
            and current._checked
            and (current.num_layers, current.num_experts) == (len(rows), num_experts)
            and (current.num_shards, current.slots_per_shard) == (num_shards, slots_per_shard)
        ):
            cur = current.layers  # built and checked by this function
        else:
            layers_in = current.layers if isinstance(current, PlacementPlan) else current
            cur = validate_current(layers_in, len(rows), num_experts, num_shards, slots_per_shard)
        layers, maxima, moved = _replan(rows, cur, geometry, max_moved_slots, tolerance)
    totals = [sum(row) for row in rows]
    return PlacementPlan(
        layers=tuple(tuple(tuple(s) for s in shards) for shards in layers),
        num_experts=num_experts,
        slots_per_shard=slots_per_shard,
        num_nodes=num_nodes,
        balancedness_per_layer=tuple(
            max(1.0, top * num_shards / total) if total > 0 else 1.0  # >= 1 but for underflow
            for top, total in zip(maxima, totals, strict=True)
        ),
        moved_slots=moved,
        moved_bytes=None if bytes_per_slot is None else moved * bytes_per_slot,
        _checked=True,
    )


def choose_redundancy(
    load: Sequence[Sequence[float]],
    num_shards: int,
    *,
    target_balancedness: float,
    max_slots_per_shard: int,
    num_nodes: int = 1,
) -> PlacementPlan:
    """The plan with the fewest slots per shard whose balancedness is <= the target.

    Slots grow one per shard at a time (``G`` slots per layer: shards hold stacked weight
    slots of one size), from ``ceil(E / G)`` up to the memory budget ``max_slots_per_shard``;
    when none reaches the target, the plan at the budget is returned (check its
    ``balancedness``).
    """
    rows = validate_load(load)
    _check_int("num_shards", num_shards, 1, MAX_SHARDS)
    if not (isinstance(target_balancedness, int | float) and 1.0 <= target_balancedness < 1e6):
        raise ValueError(f"target_balancedness={target_balancedness!r} must be in [1, 1e6)")
    least = -(-len(rows[0]) // num_shards)
    _check_int("max_slots_per_shard", max_slots_per_shard, least, MAX_SLOTS_PER_SHARD)
    plan = plan_placement(rows, num_shards, least, num_nodes=num_nodes)
    for slots in range(least + 1, max_slots_per_shard + 1):
        if plan.balancedness <= target_balancedness:
            break
        plan = plan_placement(rows, num_shards, slots, num_nodes=num_nodes)
    return plan


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


# ----------------------------------------------------------------------------- validation


def validate_load(load: Any) -> list[list[float]]:
    """The load matrix as [L][E] floats, or ``ValueError`` naming the bad field and limit.

    A fast path checks a row with C-level calls (types, min, max, sum); only a row that
    fails it is walked value by value, to name the first bad one.
    """
    layers = _sequence(load, "load", "a list of layers")
    if not 1 <= len(layers) <= MAX_LAYERS:
        raise ValueError(f"load has {len(layers)} layers; allowed 1..{MAX_LAYERS}")
    rows: list[list[float]] = []
    width = -1
    for i, raw in enumerate(layers):
        row = _sequence(raw, f"load[{i}]", "a list of per-expert loads")
        if width < 0:
            width = len(row)
            if not 1 <= width <= MAX_EXPERTS:
                raise ValueError(f"load[0] has {width} experts; allowed 1..{MAX_EXPERTS}")
        elif len(row) != width:
            raise ValueError(
                f"load is ragged: load[{i}] has {len(row)} experts, load[0] has {width}"
            )
        if set(map(type, row)) <= _NUMBER_TYPES:  # bool is its own type: refused below
            try:
                out = list(map(float, row))
            except OverflowError:
                out = []
            if out and min(out) >= 0.0 and max(out) <= MAX_LOAD and math.isfinite(sum(out)):
                rows.append(out)
                continue
        rows.append(_bad_row(i, row))
    return rows


def _bad_row(i: int, row: Sequence[Any]) -> list[float]:
    """Walk a row that failed the fast check; raise naming its first bad value."""
    out = []
    for j, x in enumerate(row):
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise ValueError(f"load[{i}][{j}] must be a number, got {type(x).__name__}")
        try:
            v = float(x)
        except OverflowError:
            v = math.inf
        if not 0.0 <= v <= MAX_LOAD:  # NaN fails too
            raise ValueError(f"load[{i}][{j}]={v!r} must be finite and in [0, {MAX_LOAD:g}]")
        out.append(v)
    return out


def validate_current(
    current: Any, num_layers: int, num_experts: int, num_shards: int, slots_per_shard: int
) -> list[Shards]:
    """A current plan as [L][G] lists of expert ids, checked against the load's shape."""
    layers_in = _sequence(current, "current", "a list of layers")
    if len(layers_in) != num_layers:
        raise ValueError(f"current has {len(layers_in)} layers; the load has {num_layers}")
    layers: list[Shards] = []
    for i, raw in enumerate(layers_in):
        shards = _sequence(raw, f"current[{i}]", "a list of shards")
        if len(shards) != num_shards:
            raise ValueError(f"current[{i}] has {len(shards)} shards; num_shards={num_shards}")
        layer: Shards = [
            list(_sequence(held, f"current[{i}][{g}]", "a list of expert ids"))
            for g, held in enumerate(shards)
        ]
        flat = [e for held in layer for e in held]
        if flat and not (
            set(map(type, flat)) == {int} and min(flat) >= 0 and max(flat) < num_experts
        ):
            for g, held in enumerate(layer):
                for e in held:
                    if type(e) is not int or not 0 <= e < num_experts:
                        shown = e if type(e) is int else type(e).__name__
                        raise ValueError(
                            f"current[{i}][{g}] has expert id {shown}; allowed 0..{num_experts - 1}"
                        )
        for g, held in enumerate(layer):
            if len(held) > slots_per_shard:
                raise ValueError(
                    f"current[{i}][{g}] holds {len(held)} experts; "
                    f"slots_per_shard={slots_per_shard}"
                )
            if len(set(held)) != len(held):
                raise ValueError(f"current[{i}][{g}] lists an expert twice")
        layers.append(layer)
    return layers


def _sequence(value: Any, field: str, what: str) -> Sequence[Any]:
    """``value`` if it is a list or tuple (or another non-string sequence), else an error."""
    if type(value) in (list, tuple):
        return value
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{field} must be {what}, got {type(value).__name__}")
    return value


def _check_int(field: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = value if isinstance(value, int) else type(value).__name__
        raise ValueError(f"{field}={shown} must be an integer in [{low}, {high}]")


# ----------------------------------------------------------------------------- one layer


@dataclass(frozen=True)
class _Geometry:
    num_shards: int  # G
    slots: int  # S per shard
    num_nodes: int  # N
    max_replicas: int  # R cap, <= G

    @cached_property
    def node(self) -> list[int]:
        """[G] -> node of each shard (shards of a node are contiguous)."""
        per_node = self.num_shards // self.num_nodes
        return [g // per_node for g in range(self.num_shards)]


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


def lower_bound(per_replica: Sequence[float], counts: Sequence[int], geometry: _Geometry) -> float:
    """A floor under the max shard load for these replica counts, whatever the packing.

    The mean; and, when every slot is used, the heaviest replica plus the ``S - 1``
    lightest other replicas, since its shard holds exactly ``S`` replicas.
    """
    total = sum([w * c for w, c in zip(per_replica, counts, strict=True)])
    heaviest = max(per_replica)
    floor = max(total / geometry.num_shards, heaviest)
    if geometry.slots > 1 and sum(counts) == geometry.num_shards * geometry.slots:
        floor = max(floor, heaviest + _lightest(per_replica, counts, geometry.slots - 1))
    return floor


def greedy_bound(load: Sequence[float], geometry: _Geometry) -> tuple[float, float]:
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


def _lightest(per_replica: Sequence[float], counts: Sequence[int], k: int) -> float:
    """Sum of the ``k`` lightest replicas (an expert's replicas all weigh the same)."""
    total, left = 0.0, k
    for e in heapq.nsmallest(k, range(len(per_replica)), key=per_replica.__getitem__):
        take = min(counts[e], left)
        total += take * per_replica[e]
        left -= take
        if not left:
            break
    return total


class _Choice:
    """The best improvement step offered so far in one round of ``_Layer.improve``.

    ``best`` has the lowest new maximum (fewer slots moved on a tie); ``win`` is the
    cheapest that reaches the target. Steps moving more than ``room`` slots are refused.
    """

    def __init__(self, top: float, target: float, room: int, cheapest: bool) -> None:
        self.bar = top * (1.0 - 1e-12)  # a step must end below the heaviest shard's load
        self.target = target
        self.room = room
        self.cheapest = cheapest
        self.best: _Step | None = None
        self.win: _Step | None = None

    def offer(self, step: _Step) -> None:
        val, cost = step[0], step[1]
        if cost > self.room:
            return
        if val <= self.target and (self.win is None or (cost, val) < (self.win[1], self.win[0])):
            self.win = step
        if self.best is None or (val, cost) < self.best[:2]:
            self.best = step

    def limit(self) -> float:
        """A new maximum below this may still be chosen."""
        low = self.bar if self.best is None else self.best[0]
        if self.cheapest:  # a cheaper step that still reaches the target counts too
            low = max(low, min(self.bar, math.nextafter(self.target, math.inf)))
        return low

    def chosen(self) -> _Step | None:
        return self.win if self.cheapest and self.win is not None else self.best


class _Layer:
    """Mutable placement of one layer: slots, replica counts, shard loads (ints and floats).

    ``can_host`` holds the two rules every step keeps: no expert twice on a shard, and a
    replica goes to a node without one unless the expert is on every node already (or the
    move leaves the number of its nodes unchanged). Node bookkeeping makes that O(1).
    """

    def __init__(self, load: Sequence[float], counts: list[int], geometry: _Geometry) -> None:
        g = geometry
        self.load = load
        self.counts = counts  # [E] replicas
        self.w = [x / c if c else 0.0 for x, c in zip(load, counts, strict=True)]  # [E]
        self.slots = g.slots
        self.max_replicas = g.max_replicas
        self.num_nodes = g.num_nodes
        self.node = g.node  # [G] -> node
        self.shards: Shards = [[] for _ in range(g.num_shards)]
        self.shard_load = [0.0] * g.num_shards  # [G]
        self.where: list[list[int]] = [[] for _ in load]  # [E] -> shards holding it
        # [E * N] replicas of expert e on node n, [E] nodes holding e; only when N > 1
        self.on_node = [0] * (len(load) * g.num_nodes) if g.num_nodes > 1 else []
        self.spread = [0] * len(load)
        self.spread_floor = min(NODE_SPREAD, g.num_nodes)  # nodes a replicated expert spans

    @classmethod
    def from_shards(cls, load: Sequence[float], shards: ShardsIn, geometry: _Geometry) -> _Layer:
        counts = [0] * len(load)
        for held in shards:
            for e in held:
                counts[e] += 1
        layer = cls(load, counts, geometry)
        w, where = layer.w, layer.where
        layer.shards = [list(held) for held in shards]
        layer.shard_load = [sum([w[e] for e in held]) for held in shards]
        for g, held in enumerate(shards):
            for e in held:
                where[e].append(g)
                if layer.on_node:
                    layer._count_node(e, g, 1)
        return layer

    @property
    def max_load(self) -> float:
        return max(self.shard_load)

    def _count_node(self, e: int, g: int, step: int) -> None:
        i = e * self.num_nodes + self.node[g]
        before = self.on_node[i]
        self.on_node[i] = before + step
        if before == 0 or before + step == 0:
            self.spread[e] += step

    def add(self, e: int, g: int) -> None:
        self.shards[g].append(e)
        self.shard_load[g] += self.w[e]
        self.where[e].append(g)
        if self.on_node:
            self._count_node(e, g, 1)

    def remove(self, e: int, g: int) -> None:
        self.shards[g].remove(e)
        self.shard_load[g] -= self.w[e]
        self.where[e].remove(g)
        if self.on_node:
            self._count_node(e, g, -1)

    def move(self, e: int, src: int, dst: int) -> None:
        self.remove(e, src)
        self.add(e, dst)

    def reweight(self, e: int, count: int) -> None:
        """Set ``e``'s replica count, updating the load of every shard holding it."""
        new_w = self.load[e] / count if count else 0.0
        delta = new_w - self.w[e]
        for g in self.where[e]:
            self.shard_load[g] += delta
        self.w[e] = new_w
        self.counts[e] = count

    def can_host(self, e: int, dst: int, src: int = -1, grow: bool = False) -> bool:
        """May a replica of ``e`` go to ``dst`` (moving from ``src``, or new when -1)?

        Never twice on a shard; onto a node that holds ``e`` already only if ``e`` keeps
        ``min(replicas, spread_floor)`` nodes (a move may also keep its node count).
        ``grow``: the replica is one more than ``counts`` says (the count rises after).
        """
        if e in self.shards[dst]:
            return False
        if not self.on_node:
            return True
        nd = self.node[dst]
        if src >= 0 and self.node[src] == nd:
            return True
        base = e * self.num_nodes
        if self.on_node[base + nd] == 0:
            return True
        spread = self.spread[e]
        if src >= 0:
            if self.on_node[base + self.node[src]] > 1:
                return True  # the move keeps every node it had
            spread -= 1  # the move loses src's node
        return spread >= min(self.counts[e] + grow, self.spread_floor)

    def may_drop(self, e: int, g: int) -> bool:
        """May ``e``'s replica on ``g`` go, keeping ``min(replicas, spread_floor)`` nodes?"""
        if self.counts[e] < 2:
            return False
        if not self.on_node or self.on_node[e * self.num_nodes + self.node[g]] > 1:
            return True
        return self.spread[e] - 1 >= min(self.counts[e] - 1, self.spread_floor)

    # ------------------------------------------------------------------------- packing

    def pack(self) -> None:
        """Longest-processing-time packing of every replica, heaviest first (ties by id)."""
        w, counts = self.w, self.counts
        items = sorted(((w[e], e) for e, c in enumerate(counts) for _ in range(c)), reverse=True)
        heap = [(0.0, g) for g in range(len(self.shards))]
        slots, shards, shard_load = self.slots, self.shards, self.shard_load
        nodes = self.num_nodes
        slack = PACK_NODE_SLACK * sum(self.load) / len(shards)
        for _, e in items:
            if counts[e] == 1:
                _, g = heapq.heappop(heap)
            else:
                stash = []
                g = -1
                while heap:
                    entry = heapq.heappop(heap)
                    stash.append(entry)
                    if g >= 0 and entry[0] > shard_load[g] + slack:
                        break
                    if self.can_host(e, entry[1]):
                        if g < 0:
                            g = entry[1]
                        if not self.on_node or not self.on_node[e * nodes + self.node[entry[1]]]:
                            g = entry[1]  # a new node for e, at (nearly) the same load
                            break
                if g >= 0:
                    stash.remove((shard_load[g], g))
                for entry in stash:
                    heapq.heappush(heap, entry)
                if g < 0:
                    self._place_by_swap(e)
                    heap = [
                        (shard_load[s], s) for s in range(len(shards)) if len(shards[s]) < slots
                    ]
                    heapq.heapify(heap)
                    continue
            self.add(e, g)
            if len(shards[g]) < slots:
                heapq.heappush(heap, (shard_load[g], g))

    def _place_by_swap(self, e: int) -> None:
        """Place ``e`` when no open shard may take it: move some ``f`` to an open shard.

        Rare (replicas of one expert left for last); a linear search for the move that
        keeps the two shards' maximum lowest.
        """
        open_shards = [g for g, held in enumerate(self.shards) if len(held) < self.slots]
        best: tuple[float, int, int, int] | None = None
        for y, held in enumerate(self.shards):
            if not self.can_host(e, y):
                continue
            for f in held:
                for x in open_shards:
                    if x != y and self.can_host(f, x, src=y):
                        worst = max(
                            self.shard_load[x] + self.w[f],
                            self.shard_load[y] - self.w[f] + self.w[e],
                        )
                        if best is None or worst < best[0]:
                            best = (worst, f, y, x)
        if best is not None:
            _, f, y, x = best
            self.move(f, y, x)
            self.add(e, y)
            return
        # Only reachable when node spread is impossible; keep shards distinct at least.
        for x in sorted(open_shards, key=self.shard_load.__getitem__):
            if e not in self.shards[x]:
                self.add(e, x)
                return
        raise AssertionError(f"no shard can take a replica of expert {e}")

    # ------------------------------------------------------------------------- improvement

    def improve(
        self, target: float, budget: int | None, repair: bool = False, candidates: int = 4
    ) -> int:
        """Move replicas off the heaviest shard until it is <= ``target``; slots moved.

        Each step takes the heaviest shard ``A`` and the best of: relocating one of its
        replicas to a free slot (1 slot moved) or swapping it with one on another shard
        (2), looking at the ``candidates`` lightest shards, all shards if those offer
        nothing; re-purposing a spare replica of a cold expert elsewhere as a new replica
        of one on ``A`` (1) when swaps offer nothing or when repairing. A step must leave
        every shard it touches below ``A``'s load, which shrinks the sorted load vector,
        so the loop ends. It takes the lowest new maximum; when repairing, the cheapest
        step that reaches ``target``. At most ``budget`` slots move.
        """
        shards, shard_load, w, slots = self.shards, self.shard_load, self.w, self.slots
        num_shards = len(shards)
        used = 0
        for _ in range(4 * num_shards * slots):
            a_shard = max(range(num_shards), key=shard_load.__getitem__)
            top = shard_load[a_shard]
            if top <= target or num_shards == 1:
                break
            room = 3 if budget is None else budget - used
            choice = _Choice(top, target, room, cheapest=repair)
            held_a = shards[a_shard]
            pool = heapq.nsmallest(candidates + 1, range(num_shards), key=shard_load.__getitem__)
            if repair:
                pool += [g for g in range(num_shards) if len(shards[g]) < slots and g not in pool]
            for wide in (False, True):  # all shards only when the lightest offer nothing
                if wide:
                    if choice.best is not None or len(pool) >= num_shards:
                        break
                    pool = [g for g in range(num_shards) if g not in pool]
                for b_shard in pool:
                    low = shard_load[b_shard]
                    gap = top - low
                    if b_shard == a_shard or gap <= 0.0:
                        continue
                    held_b = shards[b_shard]
                    has_free = len(held_b) < slots
                    cap = choice.limit()
                    for a in held_a:
                        wa = w[a]
                        if wa <= 0.0 or top - wa >= cap:
                            continue  # no step with a can beat what is found
                        a_ok = -1  # lazily: may a go to B?
                        if has_free and wa < gap:
                            a_ok = int(self.can_host(a, b_shard, a_shard))
                            if a_ok:
                                choice.offer(
                                    (max(top - wa, low + wa), 1, _RELOCATE, a, b_shard, -1)
                                )
                        for b in held_b:
                            d = wa - w[b]
                            if d <= 0.0 or d >= gap:
                                continue
                            val = top - d if top - d > low + d else low + d
                            if val >= cap:
                                continue
                            if a_ok < 0:
                                a_ok = int(self.can_host(a, b_shard, a_shard))
                            if a_ok and self.can_host(b, a_shard, b_shard):
                                choice.offer((val, 2, _SWAP, a, b_shard, b))
            if choice.best is None or (repair and choice.win is None):
                for step in self._repurpose_steps(a_shard, choice.limit()):
                    choice.offer(step)
            chosen = choice.chosen()
            if chosen is None:
                break
            _, cost, kind, a, b_shard, b = chosen
            if kind == _REPURPOSE:
                self.remove(b, b_shard)
                self.reweight(b, self.counts[b] - 1)
                self.reweight(a, self.counts[a] + 1)
                self.add(a, b_shard)
            else:
                self.move(a, a_shard, b_shard)
                if kind == _SWAP:
                    self.move(b, b_shard, a_shard)
            used += cost
        return used

    def _repurpose_steps(self, a_shard: int, cap: float, donors: int = 3) -> list[_Step]:
        """Steps giving an expert on ``a_shard`` one more replica in a spare replica's slot.

        Donors are the replicated experts whose load per replica rises least when they
        lose one; every shard holding either expert changes, so all of them are checked.
        """
        load, counts, w, shard_load = self.load, self.counts, self.w, self.shard_load
        spare = heapq.nsmallest(
            donors,
            ((load[y] / (c - 1) - w[y], y) for y, c in enumerate(counts) if c >= 2),
        )
        steps: list[_Step] = []
        for x in self.shards[a_shard]:
            if counts[x] >= self.max_replicas or w[x] <= 0.0:
                continue
            after_x = load[x] / (counts[x] + 1)
            fall = w[x] - after_x
            holds_x = self.where[x]
            for rise, y in spare:
                if y == x or rise >= fall:
                    continue  # y's replicas would gain more than x's lose
                holds_y = self.where[y]
                changed = {g: shard_load[g] - fall for g in holds_x}
                for g in holds_y:
                    changed[g] = changed.get(g, shard_load[g]) + rise
                for b_shard in holds_y:
                    if b_shard in changed and x in self.shards[b_shard]:
                        continue
                    if not (self.may_drop(y, b_shard) and self.can_host(x, b_shard, grow=True)):
                        continue
                    new_b = shard_load[b_shard] - w[y] + after_x
                    val = max(new_b, *(v for g, v in changed.items() if g != b_shard))
                    if val < cap:
                        steps.append((val, 1, _REPURPOSE, x, b_shard, y))
        return steps

    # ------------------------------------------------------------------------- repair

    def repair(
        self, wanted: Sequence[int], target: float, budget: int | None, match: bool = False
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
        for e in range(len(self.load)):
            if not self.where[e]:
                if not self._add_replica(e, force=True):
                    raise AssertionError(f"expert {e} found no slot")
                used += 1
        used += self.spread_nodes()
        if budget is not None and used > budget:
            return None
        if match:
            short = [e for e, c in enumerate(self.counts) if c < wanted[e]]
            for e in sorted(short, key=self.w.__getitem__, reverse=True):
                while self.counts[e] < wanted[e] and (budget is None or used < budget):
                    if not self._add_replica(e, force=False, spare=wanted):
                        break
                    used += 1
        bar = max(x / c for x, c in zip(self.load, wanted, strict=True)) * (1 + 1e-9)
        # an expert's shard holds S - 1 other replicas, at least the lightest ones
        others = _lightest(self.w, self.counts, self.slots - 1)
        heap = [(-x, e) for e, x in enumerate(self.w)]
        heapq.heapify(heap)
        while heap and (budget is None or used < budget):
            neg_w, e = heapq.heappop(heap)
            if -neg_w != self.w[e]:
                continue  # stale
            if self.w[e] <= bar or self.w[e] + others <= target:
                break  # counts no longer keep the maximum above the target
            if not self._add_replica(e, force=False):
                break
            used += 1
            heapq.heappush(heap, (-self.w[e], e))
        used += self.improve(target, None if budget is None else budget - used, repair=True)
        return used

    def _add_replica(self, e: int, force: bool, spare: Sequence[int] | None = None) -> bool:
        """One more replica of ``e``, in a free slot or in place of a spare replica.

        The donor is the replicated expert (with more replicas than ``spare`` says, when
        given) whose per-replica load rises least; unless ``force``, only if that stays
        below ``e``'s load per replica now.
        """
        free = [
            g
            for g, h in enumerate(self.shards)
            if len(h) < self.slots and self.can_host(e, g, grow=True)
        ]
        if free:
            g = min(free, key=self.shard_load.__getitem__)
            self.reweight(e, self.counts[e] + 1)
            self.add(e, g)
            return True
        donors = sorted(
            (self.load[d] / (c - 1), d)
            for d, c in enumerate(self.counts)
            if c >= 2 and d != e and (spare is None or c > spare[d])
        )
        current = self.w[e] if self.counts[e] else math.inf
        for after, d in donors:
            if not force and after >= current:
                return False
            spots = [
                g for g in self.where[d] if self.may_drop(d, g) and self.can_host(e, g, grow=True)
            ]
            if spots:
                g = min(spots, key=self.shard_load.__getitem__)
                self.remove(d, g)
                self.reweight(d, self.counts[d] - 1)
                self.reweight(e, self.counts[e] + 1)
                self.add(e, g)
                return True
        return False

    def spread_nodes(self) -> int:
        """Move replicas until each expert is on ``min(R, spread_floor)`` nodes; slots moved."""
        if not self.on_node:
            return 0
        used = 0
        for e, where in enumerate(self.where):
            while self.spread[e] < min(len(where), self.spread_floor):
                cost = self._relocate(e)
                if not cost:
                    break
                used += cost
        return used

    def _relocate(self, e: int) -> int:
        """Move a replica of ``e`` off a node holding two to a node without one; slots moved.

        Takes the relocation or swap (with a replica of similar load) that keeps the two
        shards' maximum lowest; 0 when there is none.
        """
        base = e * self.num_nodes
        shard_load, w = self.shard_load, self.w
        best: tuple[float, int, int, int, int] | None = None  # (max, cost, src, dst, f)
        for src in self.where[e]:
            if self.on_node[base + self.node[src]] < 2:
                continue
            for dst, held in enumerate(self.shards):
                if self.on_node[base + self.node[dst]]:
                    continue
                if len(held) < self.slots:
                    val = max(shard_load[src] - w[e], shard_load[dst] + w[e])
                    if best is None or (val, 1) < best[:2]:
                        best = (val, 1, src, dst, -1)
                    continue
                for f in held:
                    d = w[e] - w[f]
                    val = max(shard_load[src] - d, shard_load[dst] + d)
                    if best is not None and (val, 2) >= best[:2]:
                        continue
                    if f not in self.shards[src] and self.can_host(f, src, dst):
                        best = (val, 2, src, dst, f)
        if best is None:
            return 0
        _, cost, src, dst, f = best
        self.move(e, src, dst)
        if f >= 0:
            self.move(f, dst, src)
        return cost


def _plan_from_scratch(load: list[float], geometry: _Geometry) -> Shards:
    """Replicate, pack, improve; never worse than the same steps without replication."""
    layer = _pack_and_improve(load, geometry, geometry.max_replicas)
    if geometry.max_replicas > 1 and layer.max_load > max(load) * (1 + 1e-12):
        # Replication could have cost a better packing (a bound says when it cannot).
        single = _pack_and_improve(load, geometry, 1)
        if single.max_load < layer.max_load:
            layer = single
    return [sorted(held) for held in layer.shards]


def _pack_and_improve(load: list[float], geometry: _Geometry, max_replicas: int) -> _Layer:
    total_slots = geometry.num_shards * geometry.slots
    counts = greedy_counts(load, total_slots, max_replicas)
    layer = _Layer(load, counts, geometry)
    # Balance first with shards distinct only, then spread replicas over nodes by swaps
    # with replicas of similar load, then balance again under the node rule.
    layer.spread_floor = 1
    layer.pack()
    bound = lower_bound(layer.w, counts, geometry) * (1 + 1e-9)
    if layer.max_load > bound:
        layer.improve(bound, None)
    if geometry.num_nodes > 1:
        layer.spread_floor = min(NODE_SPREAD, geometry.num_nodes)
        layer.spread_nodes()
        if layer.max_load > bound:
            layer.improve(bound, None)
    return layer


def _replan(
    rows: list[list[float]],
    current: Sequence[ShardsIn],
    geometry: _Geometry,
    budget: int | None,
    tolerance: float,
) -> tuple[list[Shards], list[float], int]:
    """Per layer, worst first: keep, fix by a few swaps, or repair against the best plan.

    The target is ``tolerance`` above a lower bound on the best plan, so a plan under it
    is within ``tolerance`` of any plan found from scratch; only a layer that swaps
    cannot bring under it pays for a from-scratch plan (then the target is that plan's
    maximum plus ``tolerance``). Returns the layers, their max shard loads, slots moved.
    """
    views = [_View(load, shards, geometry) for load, shards in zip(rows, current, strict=True)]
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
            shards = _repair_layer(rows[i], current[i], geometry, left, tolerance, i, budget)
            maxima[i] = max(shard_loads(shards, rows[i]))
        result[i] = shards
        moved += moved_slots(current[i], shards)
    assert budget is None or moved <= budget, (moved, budget)
    return result, maxima, moved


def _repair_layer(
    load: list[float],
    current: ShardsIn,
    geometry: _Geometry,
    left: int | None,
    tolerance: float,
    index: int,
    budget: int | None,
) -> Shards:
    """The slow path: the best plan from scratch, and a repair that stays near it."""
    best = _relabel(_plan_from_scratch(load, geometry), current, geometry)
    best_max = max(shard_loads(best, load))
    layer = _Layer.from_shards(load, current, geometry)
    wanted = greedy_counts(load, geometry.num_shards * geometry.slots, geometry.max_replicas)
    target = best_max * (1 + tolerance)
    if layer.repair(wanted, target, left, match=True) is None:
        raise ValueError(
            f"max_moved_slots={budget} is too small: layer {index} of the current plan needs "
            "moves for experts without a slot or replicas on one node"
        )
    repaired = _keep_slot_order(current, layer.shards)
    options = [(moved_slots(current, best), 1, best)]  # the best plan qualifies by definition
    if layer.max_load <= target:
        options.append((moved_slots(current, repaired), 0, repaired))
    fits = [o for o in options if left is None or o[0] <= left]
    return _keep_slot_order(current, min(fits)[2]) if fits else repaired


class _View:
    """A current plan's layer under new load, for the fast path: lists and floats only.

    ``swap_until`` brings every shard under a target by swapping replicas between the
    heaviest shards and the lightest ones (2 slots moved each), the usual repair after
    a small drift; ``None`` when a shard finds no single swap that does it.
    """

    def __init__(self, load: list[float], shards: ShardsIn, geometry: _Geometry) -> None:
        tally = Counter(list(chain.from_iterable(shards)))  # a list: Counter's fast path
        counts = list(map(tally.__getitem__, range(len(load))))  # [E], C-level loops
        self.load = load
        self.counts = counts
        if all(counts):
            self.w = w = list(map(truediv, load, counts))  # [E] load per replica
        else:
            self.w = w = [x / c if c else 0.0 for x, c in zip(load, counts, strict=True)]
        self.shards = shards
        self.shard_load = [sum(map(w.__getitem__, held)) for held in shards]  # [G]
        self.geometry = geometry
        self.max_load = max(self.shard_load)
        self.new_max = self.max_load  # after swap_until

    def sound(self) -> bool:
        """Every expert placed, and every replicated one on enough nodes."""
        if not all(self.counts):
            return False
        g = self.geometry
        floor = min(NODE_SPREAD, g.num_nodes)
        if floor < 2:
            return True
        node = g.node
        nodes: dict[int, set[int]] = {}
        counts = self.counts
        for s, held in enumerate(self.shards):
            for e in held:
                if counts[e] > 1:
                    nodes.setdefault(e, set()).add(node[s])
        return all(len(n) >= floor for n in nodes.values())

    def swap_until(
        self, target: float, bar: float, budget: int | None, tries: int = 4
    ) -> Shards | None:
        """Swap replicas from shards over ``target`` to shards under it until none is over.

        First, while an expert's load per replica is above ``bar`` (the largest under the
        from-scratch replica counts) and keeps its shards over the target, it gets one
        more replica in the slot of a spare replica of another expert (1 slot moved): a
        hot expert whose load rose lifts every shard holding it, and one slot fixes
        them all. Then, for the heaviest shard ``A`` and each of the ``tries`` lightest
        shards ``B``, every replica ``a`` on ``A`` looks up (bisect over ``B``'s sorted
        loads) the replica ``b`` that moves the most load without putting ``B`` over; the
        first swap (or move to a free slot) that brings ``A`` under the target is taken,
        else the one moving most, and ``A`` goes on. None when no step helps or ``budget``
        runs out: the caller takes the slow path.
        """
        shard_load, w, counts = list(self.shard_load), list(self.w), list(self.counts)
        shards = [list(h) for h in self.shards]
        slots = self.geometry.slots
        node = self.geometry.node
        spread = min(NODE_SPREAD, self.geometry.num_nodes)
        used = 0
        if max(w) > bar * (1 + 1e-9):
            grown = self._grow_hot(shards, shard_load, w, counts, target, bar, budget)
            if grown is None:
                return None
            used = grown
        under = sorted((x, g) for g, x in enumerate(shard_load) if x < target)
        by_weight: dict[int, tuple[list[float], list[int]]] = {}  # shard -> sorted (w, e)
        on_node: dict[int, list[int]] = {}  # replicated expert -> [N] replicas per node

        def node_ok(e: int, src: int, dst: int) -> bool:
            """Does moving ``e`` from ``src`` to ``dst`` keep it on ``spread`` nodes?"""
            if spread < 2 or counts[e] < 2 or node[src] == node[dst]:
                return True
            per_node = on_node.get(e)
            if per_node is None:
                per_node = on_node[e] = [0] * self.geometry.num_nodes
                for g, h in enumerate(shards):
                    if e in h:
                        per_node[node[g]] += 1
            after = len(per_node) - per_node.count(0)
            after -= per_node[node[src]] == 1
            after += per_node[node[dst]] == 0
            return after >= spread

        def moved_node(e: int, src: int, dst: int) -> None:
            per_node = on_node.get(e)
            if per_node is not None:
                per_node[node[src]] -= 1
                per_node[node[dst]] += 1

        def best_step(a_shard: int, excess: float) -> tuple[float, int, int, int] | None:
            """(load moved, a, B, b or -1 for a free slot), or None."""
            part: tuple[float, int, int, int] | None = None  # the one moving most
            held_a = shards[a_shard]
            for _, b_shard in under[:tries]:
                room = target - shard_load[b_shard]
                held_b = shards[b_shard]
                cached = by_weight.get(b_shard)
                if cached is None:
                    pairs = sorted(zip(map(w.__getitem__, held_b), held_b, strict=True))
                    cached = by_weight[b_shard] = ([x for x, _ in pairs], [b for _, b in pairs])
                keys, experts = cached
                free = len(held_b) < slots
                for a in held_a:
                    wa = w[a]
                    if wa <= 0.0 or a in held_b:
                        continue
                    moved, b = -1.0, -1
                    if free and wa <= room:
                        moved = wa
                    else:
                        i = bisect.bisect_left(keys, wa - room)
                        while i < len(keys) and keys[i] < wa:
                            if experts[i] not in held_a and node_ok(experts[i], b_shard, a_shard):
                                moved, b = wa - keys[i], experts[i]
                                break
                            i += 1
                    if moved <= 0.0 or not node_ok(a, a_shard, b_shard):
                        continue
                    if moved >= excess:
                        return (moved, a, b_shard, b)  # the first that brings A under
                    if part is None or moved > part[0]:
                        part = (moved, a, b_shard, b)
            return part

        for a_shard in sorted(range(len(shards)), key=shard_load.__getitem__, reverse=True):
            if shard_load[a_shard] <= target:
                break
            while shard_load[a_shard] > target:
                step = best_step(a_shard, shard_load[a_shard] - target)
                cost = 2 if step is not None and step[3] >= 0 else 1
                if step is None or (budget is not None and used + cost > budget):
                    return None
                moved, a, b_shard, b = step
                held_a, held_b = shards[a_shard], shards[b_shard]
                if b < 0:
                    held_a.remove(a)
                    held_b.append(a)
                else:
                    held_a[held_a.index(a)] = b
                    held_b[held_b.index(b)] = a
                    moved_node(b, b_shard, a_shard)
                moved_node(a, a_shard, b_shard)
                used += cost
                shard_load[a_shard] -= moved
                old = shard_load[b_shard]
                shard_load[b_shard] = old + moved
                under.remove((old, b_shard))
                if old + moved < target:
                    bisect.insort(under, (old + moved, b_shard))
                by_weight.pop(b_shard, None)
        self.new_max = max(shard_load)
        return shards

    def _grow_hot(
        self,
        shards: Shards,
        shard_load: list[float],
        w: list[float],
        counts: list[int],
        target: float,
        bar: float,
        budget: int | None,
    ) -> int | None:
        """Give hot experts a replica in a spare replica's slot (see ``swap_until``).

        Updates the lists in place; slots moved, or None when ``budget`` runs out.
        """
        load, node, geometry = self.load, self.geometry.node, self.geometry
        spread = min(NODE_SPREAD, geometry.num_nodes)
        others = _lightest(w, counts, geometry.slots - 1)
        used = 0
        while True:
            x = max(range(len(w)), key=w.__getitem__)
            if w[x] <= bar * (1 + 1e-9) or w[x] + others <= target:
                return used
            if counts[x] >= geometry.max_replicas:
                return used
            if budget is not None and used + 1 > budget:
                return None
            holds_x = [g for g, h in enumerate(shards) if x in h]
            nodes_x = {node[g] for g in holds_x}
            donors = sorted(
                (load[y] / (c - 1) - w[y], y) for y, c in enumerate(counts) if c >= 2 and y != x
            )
            step: tuple[int, int] | None = None  # (donor, shard)
            for _, y in donors:
                if load[y] / (counts[y] - 1) >= w[x]:
                    break  # its replicas would outweigh x's: no gain
                holds_y = [g for g, h in enumerate(shards) if y in h]
                for b in sorted(holds_y, key=shard_load.__getitem__):
                    if x in shards[b]:
                        continue
                    if spread >= 2:
                        rest_y = {node[g] for g in holds_y if g != b}
                        if len(rest_y) < min(counts[y] - 1, spread):
                            continue
                        if len(nodes_x | {node[b]}) < min(counts[x] + 1, spread):
                            continue
                    step = (y, b)
                    break
                if step is not None:
                    break
            if step is None:
                return used
            y, b = step
            new_x, new_y = load[x] / (counts[x] + 1), load[y] / (counts[y] - 1)
            for g in holds_x:
                shard_load[g] += new_x - w[x]
            for g, h in enumerate(shards):
                if y in h and g != b:
                    shard_load[g] += new_y - w[y]
            shard_load[b] += new_x - w[y]
            shards[b][shards[b].index(y)] = x
            counts[x] += 1
            counts[y] -= 1
            w[x], w[y] = new_x, new_y
            used += 1


def _keep_slot_order(current: ShardsIn, new: ShardsIn) -> Shards:
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


def _relabel(best: Shards, current: ShardsIn, geometry: _Geometry) -> Shards:
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
