"""Dispatch plans: which shard computes each (token, k) routing pair of one MoE layer.

A plan groups a step's pairs by shard so that every shard gets at most one call per
layer, carrying each of its tokens once with all the pairs it must compute for it.
Ids and ints only (built from ``expert_ids.tolist()``): no tensors, no Ray; the
tensors a shard receives are gathered by ``experts.dispatch_tensors``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from router.routing_table import RoutingTable, Slot


class ExpertUnavailableError(LookupError):
    """Some (layer, expert) the step routes to has no reachable replica: never guess one.

    ``missing`` lists those slots; the message names them (the tier maps it to UNAVAILABLE).
    ``token_rows`` (of the step's ``num_tokens``) are the tokens that routed to them, set by
    the layer that raised: the engine fails only their requests and runs the rest again.
    """

    def __init__(
        self,
        message: str,
        missing: Sequence[Slot],
        token_rows: Sequence[int] = (),
        num_tokens: int = 0,
    ) -> None:
        super().__init__(message)
        self.missing = tuple(missing)
        self.token_rows = tuple(token_rows)
        self.num_tokens = num_tokens

    def __reduce__(self) -> tuple[type[ExpertUnavailableError], tuple[object, ...]]:
        return (type(self), (str(self), self.missing, self.token_rows, self.num_tokens))


def missing_experts(
    layer: int, expert_ids: Sequence[Sequence[int]], table: RoutingTable
) -> list[Slot]:
    """The (layer, expert) slots the rows route to (negative ids are padding) that ``table``
    places nowhere, sorted."""
    wanted = {e for row in expert_ids for e in row if e >= 0}
    return sorted((layer, e) for e in wanted if not table.shards_for(layer, e))


def unreachable_only(
    table: RoutingTable,
    running: RoutingTable,
    reaches: Callable[[str], bool],
    dead: Collection[str] = (),
) -> list[Slot]:
    """The slots ``table`` places only on shards that ``reaches`` denies while ``running``
    has a replica of them on a shard it reaches (and not ``dead``), sorted: installing
    ``table`` now would take away a replica the backbone can use."""
    out = []
    for slot, shards in table.placement.items():
        if any(reaches(s) for s in shards):
            continue
        if any(reaches(s) and s not in dead for s in running.shards_for(*slot)):
            out.append(slot)
    return sorted(out)


@dataclass(frozen=True)
class ShardWork:
    """One shard's share of a layer: its rows and, per row, the (k slot, expert) pairs.

    ``token_index`` holds the step's token indices, unique and increasing; ``pairs[i]``
    lists the pairs of token ``token_index[i]`` this shard computes, in increasing k.
    """

    token_index: list[int] = field(default_factory=list)
    pairs: list[list[tuple[int, int]]] = field(default_factory=list)

    @property
    def num_pairs(self) -> int:
        return sum(len(row) for row in self.pairs)


@dataclass(frozen=True)
class DispatchPlan:
    """Every (token, k) pair of one layer's step, assigned to exactly one shard."""

    layer: int
    per_shard: dict[str, ShardWork]  # sorted by shard id; shards without work are absent
    num_tokens: int
    table_version: int

    @property
    def loads(self) -> dict[str, int]:
        """Pairs each shard computes in this step."""
        return {shard: work.num_pairs for shard, work in self.per_shard.items()}

    @property
    def fan_out(self) -> list[int]:
        """For each token of the step, how many shards it is sent to."""
        counts = [0] * self.num_tokens
        for work in self.per_shard.values():
            for t in work.token_index:
                counts[t] += 1
        return counts


def _choose_replicas(
    layer: int,
    expert_ids: Sequence[Sequence[int]],
    table: RoutingTable,
    near: Collection[str] = (),
) -> list[list[str]]:
    """The shard of every (token, k) pair: least-loaded replica, nearest first, deterministically.

    Unreplicated experts are placed first and their pairs counted as shard load. Then
    the pairs of replicated experts, in (token, k) order, each go to the replica with
    the fewest pairs so far in this step (the load split follows the replicas' current
    load, never the token's position); ties prefer a replica in ``near`` (on the
    caller's node: shared memory, no network), then a shard the token already visits
    (fewer shards per token), then the first replica in sorted shard-id order.
    """
    loads: Counter[str] = Counter()
    chosen: list[list[str | None]] = []  # None: a replicated pair not yet placed
    pending: list[tuple[int, int, tuple[str, ...]]] = []
    for t, row in enumerate(expert_ids):
        chosen.append([])
        for k, e in enumerate(row):
            assert e >= 0, f"token {t} slot {k}: expert id {e} is negative"
            replicas = table.shards_for(layer, e)
            if not replicas:
                raise ExpertUnavailableError(
                    f"expert (layer {layer}, expert {e}) has no shard in routing table "
                    f"v{table.version}; publish a table that places it",
                    [(layer, e)],
                )
            if len(replicas) == 1:
                chosen[t].append(replicas[0])
                loads[replicas[0]] += 1
            else:
                chosen[t].append(None)
                pending.append((t, k, replicas))
    for t, k, replicas in pending:
        visited = {s for s in chosen[t] if s is not None}
        best = min(
            range(len(replicas)),
            key=lambda i: (
                loads[replicas[i]],
                replicas[i] not in near,
                replicas[i] not in visited,
                i,
            ),
        )
        chosen[t][k] = replicas[best]
        loads[replicas[best]] += 1
    assert all(s is not None for row in chosen for s in row), "a pair was left unplaced"
    return [[s for s in row if s is not None] for row in chosen]


def plan_dispatch(
    layer: int,
    expert_ids: Sequence[Sequence[int]],
    table: RoutingTable,
    near: Collection[str] = (),
) -> DispatchPlan:
    """Group the step's (token, k) pairs (``expert_ids`` is T x K) by the shard that runs them.

    Replicas are chosen least-loaded first, nearest (``near``) on ties (see
    ``_choose_replicas``); each shard then gets its tokens once, in increasing order, with
    their pairs in increasing k.
    """
    chosen = _choose_replicas(layer, expert_ids, table, near)
    rows: dict[str, dict[int, list[tuple[int, int]]]] = {}
    for t, (row, shards) in enumerate(zip(expert_ids, chosen, strict=True)):
        for k, (e, shard) in enumerate(zip(row, shards, strict=True)):
            rows.setdefault(shard, {}).setdefault(t, []).append((k, e))
    per_shard = {
        shard: ShardWork(list(by_token), list(by_token.values()))  # tokens inserted in order
        for shard, by_token in sorted(rows.items())
    }
    return DispatchPlan(layer, per_shard, len(expert_ids), table.version)
