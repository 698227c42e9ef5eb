"""The remote expert backend: each MoE layer's routed tokens go to the shards holding their experts.

Per layer: choose the shard of every (token, k) pair, gather each shard's tokens with
whole-tensor ops (``experts.dispatch_tensors.split_by_shard``), send every shard its tokens
at once, wait for all, and add the partial sums into the layer's output. When every expert
of the layer has one shard, the pairs' shards are one lookup in an [E] table; with replicas,
the plan (``router.dispatch``) chooses among them pair by pair. When the engine step belongs
to a traced request, each layer's dispatch is a ``moe.expert_dispatch`` span whose context
travels with the shard calls, so the shards' own ``moe.expert_shard`` spans land under the
request across processes; spans and the per-shard round-trip metrics are handed over as
plain data and built on a batcher's thread, not this one. It implements the same
``ExpertBackend`` interface as the colocated one, so the model maths does not know where its
experts live. The routing table can be swapped between steps.

Legend: T tokens, K experts per token, H hidden, E experts placed in the layer, S shards of
the layer, N tokens sent to one shard.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass

import torch

from cluster.expert_parallel.transports import ShardCall, ShardCaller
from cluster.telemetry.dispatch_spans import DispatchSpans
from cluster.telemetry.setup import get_telemetry
from experts.dispatch_tensors import ShardSplit, combine, split_by_shard
from router.dispatch import plan_dispatch
from router.routing_table import RoutingTable

MAX_ROUTES_CACHED = 1024  # (table version, layer, device) routes kept


@dataclass(frozen=True)
class LayerRoute:
    """Where one layer's experts live under one routing table."""

    shard_ids: list[str]  # [S] every shard holding an expert of the layer, sorted
    # [E + 1] long: the shard index of each expert, then S for an id past the table's experts;
    # None when some expert has several shards (or an expert id below E is not placed)
    owner: torch.Tensor | None
    shard_index: torch.Tensor  # [S + 1, 1, 1] long: 0..S, for split_by_shard


class RemoteExperts:
    """The ``ExpertBackend`` whose experts live in shards, reached through a ``ShardCaller``."""

    def __init__(
        self,
        pool: ShardCaller,
        table: RoutingTable,
        tier: str = "",
        near: Collection[str] = (),
    ) -> None:
        self._pool = pool
        self.near = frozenset(near)  # shards on this node: preferred among equal replicas
        self._table = table
        self.tier = tier  # for metric attributes
        self._dispatch_spans = DispatchSpans()  # per traced request, recorded off this thread
        self._routes: dict[tuple[int, int, torch.device], LayerRoute] = {}
        self._lock = threading.Lock()
        self.num_shard_calls = 0
        self._last_touched: torch.Tensor | None = None  # [S, T] of the last layer computed

    @property
    def table(self) -> RoutingTable:
        return self._table

    @property
    def last_fan_out(self) -> list[int]:
        """Shards each token touched in the last layer computed (read on demand: a host copy)."""
        touched = self._last_touched
        return [] if touched is None else touched.sum(dim=0).tolist()

    def set_table(self, table: RoutingTable) -> None:
        """Install a newer routing table; the next layer computed uses it."""
        with self._lock:
            if table.version <= self._table.version:
                raise ValueError(
                    f"routing table version {table.version} is not newer than {self._table.version}"
                )
            self._table = table

    def forward(
        self,
        layer: int,
        hidden: torch.Tensor,  # [T, H]
        expert_ids: torch.Tensor,  # [T, K]
        weights: torch.Tensor,  # [T, K]
    ) -> torch.Tensor:  # [T, H]
        # Dispatch's tensor work is small gathers and copies. On CPU, torch would fork its
        # OpenMP team for those past 32K elements (a 32-token layer at hidden 1024), and on a
        # node whose cores the shards share, the forked thread waits for a core: measured
        # 0.5 ms vs 8 ms per layer medians, run to run, with two threads. So this thread
        # runs the layer's dispatch on one (the setting is per OS thread; restored after).
        # An in-process pool's shards compute within send, so on one thread too, as a shard
        # actor does.
        threads = torch.get_num_threads() if hidden.device.type == "cpu" else 1
        if threads == 1:
            return self._forward(layer, hidden, expert_ids, weights)
        torch.set_num_threads(1)
        try:
            return self._forward(layer, hidden, expert_ids, weights)
        finally:
            torch.set_num_threads(threads)

    def _forward(
        self,
        layer: int,
        hidden: torch.Tensor,  # [T, H]
        expert_ids: torch.Tensor,  # [T, K]
        weights: torch.Tensor,  # [T, K]
    ) -> torch.Tensor:  # [T, H]
        with self._lock:
            table = self._table
        shard_ids, split = self.split(table, layer, hidden, expert_ids, weights)
        parts = split.parts()
        telemetry = get_telemetry()
        span = self._dispatch_spans.start(telemetry, layer, hidden.shape[0], len(parts))
        traceparent = span.traceparent if span is not None else ""
        called = [shard_ids[s] for s, *_ in parts]
        pending = [
            self._pool.send(ShardCall(shard, layer, h, ids, w, traceparent))
            for shard, (_, _, h, ids, w) in zip(called, parts, strict=True)
        ]
        if telemetry.metrics_enabled:  # per-shard round trips, recorded off this thread
            timed = self._pool.wait_timed(pending)
            outputs = [out for out, _ in timed]
            telemetry.metrics.record_dispatch_layer(self.tier, called, [s for _, s in timed])
        else:
            outputs = self._pool.wait(pending)
        if span is not None:
            self._dispatch_spans.end(telemetry, span)
        self.num_shard_calls += len(pending)
        self._last_touched = split.touched
        partials = [(rows, out) for (_, rows, *_), out in zip(parts, outputs, strict=True)]
        return combine(hidden.shape[0], hidden.shape[1], partials, hidden.dtype, hidden.device)

    def split(
        self,
        table: RoutingTable,
        layer: int,
        hidden: torch.Tensor,  # [T, H]
        expert_ids: torch.Tensor,  # [T, K]
        weights: torch.Tensor,  # [T, K]
    ) -> tuple[list[str], ShardSplit]:
        """The layer's shard ids [S] and its tokens split among them (shard index s is
        ``shard_ids[s]``), gathered on the step's device (the transport moves them to the host).
        """
        route = self._route(table, layer, expert_ids.device)
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
        plan = plan_dispatch(layer, expert_ids.tolist(), table, self.near)
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

    def _route(self, table: RoutingTable, layer: int, device: torch.device) -> LayerRoute:
        """The layer's shards, and its [E + 1] owner table on ``device`` when unreplicated."""
        key = (table.version, layer, device)
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
