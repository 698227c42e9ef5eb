"""Re-placing the slots of lost shards: every expert gets its replica count back.

When a shard dies (its process crashed, its node went away) every replica it held is gone.
``replace_lost`` removes those replicas from the table and adds, for each one, a replica of the
same (layer, expert) on a surviving shard: a shard that does not hold that slot yet, preferring
one on a node without a replica of it (a second node loss should not take both), then the
shard holding the fewest slots of that layer (even memory and load), then the fewest slots in
all, then the smaller id (deterministic). Ids and ints only: no tensors, no Ray.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence

from router.routing_table import Replica, RoutingTable, Slot


def replace_lost(
    table: RoutingTable,
    lost: Collection[str],
    survivors: Sequence[str],
    node_of: Mapping[str, str] | None = None,
    required: Collection[Slot] = (),
) -> tuple[list[Replica], list[Replica]]:
    """(add, remove) for ``table.with_changes``: the lost shards' replicas out, as many in on
    ``survivors``. A slot every survivor already holds keeps fewer replicas (nowhere to add).
    A slot of ``required`` that the table places nowhere (its shards were lost before the
    table was read) gets one replica too.
    """
    gone = set(lost)
    alive = [s for s in survivors if s not in gone]
    nodes = dict(node_of or {})
    remove: list[Replica] = []
    holds: dict[Slot, set[str]] = {}
    per_layer: Counter[tuple[int, str]] = Counter()
    total: Counter[str] = Counter({s: 0 for s in alive})
    for (layer, expert), shards in table.placement.items():
        for sid in shards:
            if sid in gone:
                remove.append((layer, expert, sid))
            else:
                holds.setdefault((layer, expert), set()).add(sid)
                per_layer[(layer, sid)] += 1
                total[sid] += 1
    add: list[Replica] = []
    unplaced = [(lyr, e, "") for lyr, e in required if not table.shards_for(lyr, e)]
    for layer, expert, _ in sorted(remove) + sorted(unplaced):
        held = holds.setdefault((layer, expert), set())
        candidates = [s for s in alive if s not in held]
        if not candidates:
            continue
        used_nodes = {nodes.get(s, s) for s in held}
        best = min(
            candidates,
            key=lambda s: (nodes.get(s, s) in used_nodes, per_layer[(layer, s)], total[s], s),
        )
        add.append((layer, expert, best))
        held.add(best)
        per_layer[(layer, best)] += 1
        total[best] += 1
    return add, remove


def lost_slots(table: RoutingTable, lost: Collection[str]) -> list[Slot]:
    """The slots whose every replica is on a lost shard, sorted (what ``replace_lost`` must
    load from the checkpoint rather than find elsewhere)."""
    gone = set(lost)
    return sorted(slot for slot, shards in table.placement.items() if set(shards) <= gone)


def restore_replication(
    table: RoutingTable,
    shard_id: str,
    floor: int,
    capacity: int,
    held: Collection[Slot] = (),
) -> list[Replica]:
    """Replicas to add on ``shard_id`` (a shard back from a restart) so that the slots with
    fewer than ``floor`` replicas (the configured replication, lost with the shard) get one
    more: only slots it does not hold in ``table``; those it still ``held`` (no load needed)
    first, then the most lacking, then (layer, expert); at most ``capacity`` slots per layer
    on the shard in all. Sorted by (layer, expert).
    """
    per_layer: Counter[int] = Counter(
        lyr for (lyr, _), shards in table.placement.items() if shard_id in shards
    )
    have = set(held)
    short = sorted(
        ((lyr, e) not in have, len(shards) - floor, lyr, e)
        for (lyr, e), shards in table.placement.items()
        if len(shards) < floor and shard_id not in shards
    )
    add: list[Replica] = []
    for _, _, layer, expert in short:
        if per_layer[layer] >= capacity:
            continue
        add.append((layer, expert, shard_id))
        per_layer[layer] += 1
    return sorted(add)
