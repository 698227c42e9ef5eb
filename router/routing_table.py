"""The routing table: which expert-shard replicas hold each (layer, expert), versioned.

The placement controller publishes a new table after shards have loaded (and before
they drop) the slots it moves; engines swap tables between steps. Ids and ints only:
no tensors, no Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

Slot = tuple[int, int]  # (layer, expert)
Replica = tuple[int, int, str]  # (layer, expert, shard id)


def _format_slots(slots: Iterable[Slot]) -> str:
    by_layer: dict[int, list[int]] = {}
    for layer, expert in sorted(slots):
        by_layer.setdefault(layer, []).append(expert)
    return "; ".join(f"layer {layer}: experts {experts}" for layer, experts in by_layer.items())


@dataclass(frozen=True)
class RoutingTable:
    """A frozen map (layer, expert) -> shard ids holding a replica of it.

    Replica tuples are stored sorted and slots without a replica are left out, so
    equal placements give equal tables (and, through ``plan_dispatch``, equal plans).
    Which replica serves a given token is the dispatcher's choice, made per step.
    """

    version: int
    placement: Mapping[Slot, tuple[str, ...]]

    def __post_init__(self) -> None:
        if self.version < 0:
            raise ValueError(f"version={self.version!r} must be >= 0")
        canonical: dict[Slot, tuple[str, ...]] = {}
        for (layer, expert), shards in sorted(self.placement.items()):
            if len(set(shards)) != len(shards):
                raise ValueError(
                    f"expert (layer {layer}, expert {expert}) lists a shard twice: {shards}"
                )
            if shards:
                canonical[(layer, expert)] = tuple(sorted(shards))
        # a private copy: later edits to the caller's dict must not reach a published table
        object.__setattr__(self, "placement", MappingProxyType(canonical))

    def shards_for(self, layer: int, expert: int) -> tuple[str, ...]:
        """The shards holding (layer, expert), sorted; empty when it has none."""
        return self.placement.get((layer, expert), ())

    @property
    def shards(self) -> tuple[str, ...]:
        """Every shard id that holds at least one slot, sorted."""
        return tuple(sorted({s for shards in self.placement.values() for s in shards}))

    def experts_on(self, shard: str) -> list[Slot]:
        """The (layer, expert) slots ``shard`` holds, sorted."""
        return [slot for slot, shards in self.placement.items() if shard in shards]

    def excluding(self, shards: Iterable[str]) -> RoutingTable:
        """The same version without any replica on ``shards`` (a dispatcher's view while they
        are down); a slot whose every replica is excluded drops out."""
        gone = set(shards)
        if not gone:
            return self
        placement = {
            slot: tuple(s for s in held if s not in gone) for slot, held in self.placement.items()
        }
        return RoutingTable(self.version, placement)

    def with_changes(
        self, add: Iterable[Replica] = (), remove: Iterable[Replica] = ()
    ) -> RoutingTable:
        """A new table, version + 1, with ``remove`` then ``add`` applied.

        Adding a replica that exists or removing one that does not is an error, since
        either means the caller's view of placement is out of date.
        """
        placement = {slot: list(shards) for slot, shards in self.placement.items()}
        for layer, expert, shard in remove:
            held = placement.get((layer, expert), [])
            if shard not in held:
                raise ValueError(
                    f"cannot remove shard {shard!r} from (layer {layer}, expert {expert}): "
                    f"its replicas in table v{self.version} are {tuple(held)}"
                )
            held.remove(shard)
        for layer, expert, shard in add:
            held = placement.setdefault((layer, expert), [])
            if shard in held:
                raise ValueError(
                    f"shard {shard!r} already holds (layer {layer}, expert {expert}) "
                    f"in table v{self.version}"
                )
            held.append(shard)
        return RoutingTable(self.version + 1, {k: tuple(v) for k, v in placement.items()})

    def validate(self, moe_layers: Sequence[int], num_experts: int) -> None:
        """Raise ``ValueError`` unless every expert of every MoE layer has a shard.

        Slots outside the model (a dense layer, an expert id out of range) are errors too.
        """
        wanted = {(layer, e) for layer in moe_layers for e in range(num_experts)}
        missing = wanted - self.placement.keys()
        extra = self.placement.keys() - wanted
        problems = []
        if missing:
            problems.append(f"no shard holds {_format_slots(missing)}")
        if extra:
            problems.append(
                f"slots outside the model (MoE layers {tuple(moe_layers)}, "
                f"{num_experts} experts): {_format_slots(extra)}"
            )
        if problems:
            raise ValueError(
                f"routing table v{self.version} is invalid: " + "; and ".join(problems)
            )


def replicated(
    moe_layers: Sequence[int],
    num_experts: int,
    shard_ids: Sequence[str],
    replicas: int = 1,
    version: int = 0,
) -> RoutingTable:
    """``replicas`` copies of every expert: expert e on ``shard_ids[(e + j) % S]`` for j < r.

    ``replicas=1`` is ``round_robin``; with more, losing any ``replicas - 1`` shards still
    leaves every expert a copy (each shard holds about ``r * E / S`` experts per layer).
    """
    if not 1 <= replicas <= len(shard_ids):
        raise ValueError(
            f"replicas={replicas} must be between 1 and the number of shards ({len(shard_ids)})"
        )
    table = round_robin(moe_layers, num_experts, shard_ids, version)
    count = len(shard_ids)
    placement = {
        (layer, e): tuple(shard_ids[(e + j) % count] for j in range(replicas))
        for (layer, e) in table.placement
    }
    return RoutingTable(version, placement)


def round_robin(
    moe_layers: Sequence[int], num_experts: int, shard_ids: Sequence[str], version: int = 0
) -> RoutingTable:
    """One replica per expert: expert e of every layer goes to ``shard_ids[e % S]``.

    Each shard gets ``ceil(E / S)`` or ``floor(E / S)`` experts of each layer, so both
    memory and (under uniform routing) load are even to within one expert per layer.
    """
    if not shard_ids:
        raise ValueError("round_robin needs at least one shard id")
    if len(set(shard_ids)) != len(shard_ids):
        raise ValueError(f"shard ids must be unique, got {list(shard_ids)}")
    placement = {
        (layer, e): (shard_ids[e % len(shard_ids)],)
        for layer in moe_layers
        for e in range(num_experts)
    }
    return RoutingTable(version, placement)
