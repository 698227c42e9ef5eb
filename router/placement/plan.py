"""The planner's public entry points: ``plan_placement``, ``choose_redundancy``, the plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from router.placement.arrays import as_slots
from router.placement.bounds import shard_loads
from router.placement.geometry import DEFAULT_TOLERANCE, Geometry, ShardsIn
from router.placement.replan import replan
from router.placement.scratch import plan_from_scratch
from router.placement.validate import (
    MAX_SHARDS,
    MAX_SLOTS_PER_LAYER,
    MAX_SLOTS_PER_SHARD,
    MAX_TOTAL_SLOTS,
    check_int,
    load_array,
    validate_current,
    validate_load,
)


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
    # set by plan_placement: ``layers`` as a read-only [L, G, S] array, -1 for an empty slot
    _slots: np.ndarray | None = field(default=None, repr=False, compare=False)

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
    matrix = load_array(load)  # [L, E]
    num_layers, num_experts = matrix.shape
    check_int("num_shards", num_shards, 1, MAX_SHARDS)
    check_int("slots_per_shard", slots_per_shard, 1, MAX_SLOTS_PER_SHARD)
    check_int("num_nodes", num_nodes, 1, num_shards)
    if num_shards % num_nodes:
        raise ValueError(f"num_shards={num_shards} must split evenly over num_nodes={num_nodes}")
    capacity = num_shards * slots_per_shard
    if capacity > MAX_SLOTS_PER_LAYER or capacity * num_layers > MAX_TOTAL_SLOTS:
        raise ValueError(
            f"num_shards * slots_per_shard = {capacity} per layer x {num_layers} layers is over "
            f"the limit ({MAX_SLOTS_PER_LAYER} per layer, {MAX_TOTAL_SLOTS} in all)"
        )
    if capacity < num_experts:
        raise ValueError(
            f"num_shards * slots_per_shard = {num_shards} * {slots_per_shard} = {capacity} "
            f"slots per layer cannot hold the load's {num_experts} experts; raise "
            f"slots_per_shard to at least {-(-num_experts // num_shards)}"
        )
    if max_replicas is not None:
        check_int("max_replicas", max_replicas, 1, num_shards)
    if max_moved_slots is not None:
        check_int("max_moved_slots", max_moved_slots, 0, MAX_TOTAL_SLOTS)
    if bytes_per_slot is not None:
        check_int("bytes_per_slot", bytes_per_slot, 0, 1 << 50)
    if not (isinstance(tolerance, int | float) and 0.0 <= tolerance <= 1.0):
        raise ValueError(f"tolerance={tolerance!r} must be a number in [0, 1]")
    geometry = Geometry(num_shards, slots_per_shard, num_nodes, max_replicas or num_shards)
    if current is None:
        rows = matrix.tolist()
        scratch = [plan_from_scratch(row, geometry) for row in rows]
        maxima = [max(shard_loads(shards, row)) for shards, row in zip(scratch, rows, strict=True)]
        layers = tuple(tuple(tuple(held) for held in shards) for shards in scratch)
        slots, moved = as_slots(layers, slots_per_shard), 0
    else:
        cur: Sequence[ShardsIn]
        if (
            isinstance(current, PlacementPlan)
            and current._checked
            and (current.num_layers, current.num_experts) == (num_layers, num_experts)
            and (current.num_shards, current.slots_per_shard) == (num_shards, slots_per_shard)
        ):
            cur = current.layers  # built and checked by this function
            known = current._slots
        else:
            layers_in = current.layers if isinstance(current, PlacementPlan) else current
            cur = validate_current(layers_in, num_layers, num_experts, num_shards, slots_per_shard)
            known = None
        current_slots = as_slots(cur, slots_per_shard) if known is None else known
        result = replan(matrix, current_slots, cur, geometry, max_moved_slots, tolerance)
        layers, slots, moved = result.layers, result.slots, result.moved
        maxima = result.maxima.tolist()
    slots.flags.writeable = False
    totals = matrix.sum(axis=1).tolist()
    return PlacementPlan(
        layers=layers,
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
        _slots=slots,
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
    check_int("num_shards", num_shards, 1, MAX_SHARDS)
    if not (isinstance(target_balancedness, int | float) and 1.0 <= target_balancedness < 1e6):
        raise ValueError(f"target_balancedness={target_balancedness!r} must be in [1, 1e6)")
    least = -(-len(rows[0]) // num_shards)
    check_int("max_slots_per_shard", max_slots_per_shard, least, MAX_SLOTS_PER_SHARD)
    plan = plan_placement(rows, num_shards, least, num_nodes=num_nodes)
    for slots in range(least + 1, max_slots_per_shard + 1):
        if plan.balancedness <= target_balancedness:
            break
        plan = plan_placement(rows, num_shards, slots, num_nodes=num_nodes)
    return plan
