"""Where one layer's tokens go under one routing table, as tensors: the layer's shards and,
for an unreplicated layer, an [E + 1] owner table that splits a step's (token, k) pairs by
shard in whole-tensor ops; a replicated layer (or an expert the table does not place) goes
through the per-pair ``plan_dispatch``, which picks among replicas and names what is missing.
Routes are cached per (table version, dead shards, layer, device)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from experts.dispatch_tensors import ShardSplit, split_by_shard
from router.dispatch import plan_dispatch
from router.routing_table import RoutingTable

MAX_ROUTES_CACHED = 1024  # (table version, dead shards, layer, device) routes kept


@dataclass(frozen=True)
class LayerRoute:
    """Where one layer's experts live under one routing table."""

    shard_ids: list[str]  # [S] every shard holding an expert of the layer, sorted
    # [E + 1] long: the shard index of each expert, then S for an id past the table's experts;
    # None when some expert has several shards (or an expert id below E is not placed)
    owner: torch.Tensor | None
    shard_index: torch.Tensor  # [S + 1, 1, 1] long: 0..S, for split_by_shard


class LayerRoutes:
    """The routes of the layers a backbone dispatched, cached (see the module doc)."""

    def __init__(self) -> None:
        self._routes: dict[tuple[int, frozenset[str], int, torch.device], LayerRoute] = {}

    def split(
        self,
        table: RoutingTable,
        layer: int,
        hidden: torch.Tensor,  # [T, H]
        expert_ids: torch.Tensor,  # [T, K]
        weights: torch.Tensor,  # [T, K]
        dead: frozenset[str] = frozenset(),  # shards ``table`` already excludes (cache key)
        near: Collection[str] = (),  # shards on this node: preferred among equal replicas
    ) -> tuple[list[str], ShardSplit]:
        """The layer's shard ids [S] and its tokens split among them (shard index s is
        ``shard_ids[s]``), gathered on the step's device (the transport moves them to the host).
        """
        route = self.route(table, layer, expert_ids.device, dead)
        num_tokens, num_k = expert_ids.shape
        num_shards = len(route.shard_ids)
        if route.owner is not None:
            placed = route.owner.shape[0] - 1
            flat_ids = expert_ids.reshape(-1).clamp(max=placed)  # [T * K] unplaced -> E
            shard_of_pair = route.owner.index_select(0, flat_ids).view(num_tokens, num_k)
            # shard index S: an expert the table does not place; the plan names it below
            split = split_by_shard(
                shard_of_pair, num_shards + 1, hidden, expert_ids, weights, route.shard_index
            )
            if not split.counts[num_shards]:
                return route.shard_ids, split
        # raises for an unplaced expert; replicas least loaded first, then on this node
        plan = plan_dispatch(layer, expert_ids.tolist(), table, near)
        index = {sid: i for i, sid in enumerate(route.shard_ids)}
        flat = [0] * (num_tokens * num_k)
        for sid, work in plan.per_shard.items():
            for t, row in zip(work.token_index, work.pairs, strict=True):
                for k, _ in row:
                    flat[t * num_k + k] = index[sid]
        shard_of_pair = torch.tensor(flat, dtype=torch.long, device=expert_ids.device)
        shard_of_pair = shard_of_pair.view(num_tokens, num_k)  # [T, K]
        shard_index = route.shard_index[:num_shards]  # [S, 1, 1]
        return route.shard_ids, split_by_shard(
            shard_of_pair, num_shards, hidden, expert_ids, weights, shard_index
        )

    def route(
        self, table: RoutingTable, layer: int, device: torch.device, dead: frozenset[str]
    ) -> LayerRoute:
        """The layer's shards, and its [E + 1] owner table on ``device`` when unreplicated."""
        key = (table.version, dead, layer, device)
        route = self._routes.get(key)
        if route is None:
            placed = {e: shards for (lyr, e), shards in table.placement.items() if lyr == layer}
            shard_ids = sorted({s for shards in placed.values() for s in shards})
            owner = None
            every = sorted(placed) == list(range(len(placed)))  # experts 0..E-1, none skipped
            if placed and every and all(len(s) == 1 for s in placed.values()):
                index = {sid: i for i, sid in enumerate(shard_ids)}
                owners = [index[placed[e][0]] for e in range(len(placed))] + [len(shard_ids)]
                owner = torch.tensor(owners, dtype=torch.long, device=device)  # [E + 1]
            if len(self._routes) >= MAX_ROUTES_CACHED:
                self._routes.clear()
            shard_index = torch.arange(len(shard_ids) + 1, device=device).view(-1, 1, 1)
            route = self._routes[key] = LayerRoute(shard_ids, owner, shard_index)
        return route
