"""The planner's vocabulary: shard geometry, shapes of a layer's placement, the node rule.

Legend for shape comments in this package: L MoE layers, E experts per layer, G expert
shards, S weight slots per shard, N nodes (shards ``g`` of one node are the contiguous run
``g // (G // N)``), R replicas of one expert (1 <= R <= G).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

DEFAULT_TOLERANCE = 0.01  # a low-move plan within 1% of the best found wins
NODE_SPREAD = 2  # a replicated expert always spans this many nodes (when there are)
PACK_NODE_SLACK = 0.01  # packing prefers a new node for a replica within 1% of mean load

Shards = list[list[int]]  # [G] -> expert ids in slot order
ShardsIn = Sequence[Sequence[int]]  # the same, read only (lists or a plan's tuples)


@dataclass(frozen=True)
class Geometry:
    """How one layer's slots are laid out: shards, slots per shard, nodes, replica cap."""

    num_shards: int  # G
    slots: int  # S per shard
    num_nodes: int  # N
    max_replicas: int  # R cap, <= G

    @cached_property
    def node(self) -> list[int]:
        """[G] -> node of each shard (shards of a node are contiguous)."""
        per_node = self.num_shards // self.num_nodes
        return [g // per_node for g in range(self.num_shards)]
