"""Between routing tables (shard ids) and the planner's plans (shard indices), both ways.

The planner (``router.placement``) sees shards as ints ``0..G-1`` whose nodes are contiguous
runs; a ``RoutingTable`` names shards by id. ``ShardLayout`` orders a tier's shard ids by
node so the two agree, and ``plan_table`` plans a new table from a load and the current
table. Pure: ids and ints, no tensors, no Ray.

Legend: L MoE layers (in ``moe_layers`` order), E experts, G shards, S slots per shard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.placement import PlacementPlan, plan_placement
from router.routing_table import Replica, RoutingTable


@dataclass(frozen=True)
class ShardLayout:
    """A tier's shards in planner order: grouped by node, then by id."""

    shard_ids: tuple[str, ...]  # [G]
    num_nodes: int  # 1 when shards are not spread evenly over nodes (the planner needs that)

    @classmethod
    def of(cls, node_of: Mapping[str, str]) -> ShardLayout:
        ordered = tuple(sorted(node_of, key=lambda sid: (node_of[sid], sid)))
        per_node: dict[str, int] = {}
        for sid in ordered:
            per_node[node_of[sid]] = per_node.get(node_of[sid], 0) + 1
        even = len(set(per_node.values())) == 1
        return cls(ordered, len(per_node) if even else 1)


def slots_per_shard(table: RoutingTable, moe_layers: Sequence[int], extra: float) -> int:
    """Slots per shard and layer: the most any shard holds now, grown by ``extra`` (0.25:
    a quarter more) so that hot experts can get replicas."""
    most = 1
    for layer in moe_layers:
        held: dict[str, int] = {}
        for (lyr, _), shards in table.placement.items():
            if lyr == layer:
                for sid in shards:
                    held[sid] = held.get(sid, 0) + 1
        most = max(most, *held.values()) if held else most
    return max(most, math.ceil(most * (1 + extra)))


def table_layers(
    table: RoutingTable, moe_layers: Sequence[int], layout: ShardLayout
) -> list[list[list[int]]]:
    """[L][G] -> expert ids each shard holds under ``table`` (the planner's ``current``)."""
    index = {sid: g for g, sid in enumerate(layout.shard_ids)}
    row_of = {layer: i for i, layer in enumerate(moe_layers)}
    layers: list[list[list[int]]] = [[[] for _ in layout.shard_ids] for _ in moe_layers]
    for (layer, expert), shards in sorted(table.placement.items()):
        for sid in shards:
            layers[row_of[layer]][index[sid]].append(expert)
    return layers


def plan_changes(
    plan: PlacementPlan, table: RoutingTable, moe_layers: Sequence[int], layout: ShardLayout
) -> dict[int, tuple[list[Replica], list[Replica]]]:
    """Per model layer that changes: the replicas to add and to remove to go from ``table``
    to ``plan``."""
    changes: dict[int, tuple[list[Replica], list[Replica]]] = {}
    for layer, shards in zip(moe_layers, plan.layers, strict=True):
        add: list[Replica] = []
        remove: list[Replica] = []
        wanted = {(e, layout.shard_ids[g]) for g, held in enumerate(shards) for e in held}
        now = {
            (e, sid) for (lyr, e), sids in table.placement.items() if lyr == layer for sid in sids
        }
        add = [(layer, e, sid) for e, sid in sorted(wanted - now)]
        remove = [(layer, e, sid) for e, sid in sorted(now - wanted)]
        if add or remove:
            changes[layer] = (add, remove)
    return changes


def plan_table(
    load: Sequence[Sequence[float]],
    moe_layers: Sequence[int],
    table: RoutingTable,
    layout: ShardLayout,
    slots: int,
    max_moved_slots: int | None = None,
    bytes_per_slot: int | None = None,
) -> PlacementPlan:
    """Plan ``load`` ([L][E]) on the layout's shards, starting from ``table``'s placement."""
    return plan_placement(
        load,
        len(layout.shard_ids),
        slots,
        num_nodes=layout.num_nodes,
        current=table_layers(table, moe_layers, layout),
        max_moved_slots=max_moved_slots,
        bytes_per_slot=bytes_per_slot,
    )
