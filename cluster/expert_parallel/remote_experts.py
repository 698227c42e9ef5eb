"""The remote expert backend: each MoE layer's routed tokens go to the shards holding their experts.

Per layer: plan which shard computes each (token, expert) pair (one call per
shard, ``router.dispatch``), send every shard its tokens at once, wait for all,
and add the partial sums into the layer's output. When the engine step belongs
to a traced request, each layer's dispatch is a ``moe.expert_dispatch`` span
whose context travels with the shard calls, so the shards' own
``moe.expert_shard`` spans land under the request across processes. It implements the same
``ExpertBackend`` interface as the colocated one, so the model maths does not
know where its experts live. The routing table can be swapped between steps.

Legend: T tokens, K experts per token, H hidden, N tokens sent to one shard.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from cluster.expert_parallel.transports import ShardCall, ShardCaller
from cluster.telemetry.dispatch_spans import DispatchSpans
from cluster.telemetry.setup import get_telemetry
from experts.dispatch_tensors import combine, gather_shard_inputs, split_by_owner
from router.dispatch import plan_dispatch
from router.routing_table import RoutingTable

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden [N, H], ids [N, K'], w [N, K']


class RemoteExperts:
    """The ``ExpertBackend`` whose experts live in shards, reached through a ``ShardCaller``."""

    def __init__(self, pool: ShardCaller, table: RoutingTable, tier: str = "") -> None:
        self._pool = pool
        self._table = table
        self.tier = tier  # for metric attributes
        self._dispatch_spans = DispatchSpans()  # per traced request, recorded off this thread
        self._owners: dict[tuple[int, int], tuple[list[str], torch.Tensor] | None] = {}
        self._lock = threading.Lock()
        self.num_shard_calls = 0
        self.last_fan_out: list[int] = []  # shards each token touched, last layer computed

    @property
    def table(self) -> RoutingTable:
        return self._table

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
        with self._lock:
            table = self._table
        shards, rows, sends, fan_out = self.split(table, layer, hidden, expert_ids, weights)
        telemetry = get_telemetry()
        span = self._dispatch_spans.start(telemetry, layer, hidden.shape[0], len(shards))
        traceparent = span.traceparent if span is not None else ""
        pending = [
            self._pool.send(ShardCall(shard, layer, *sent, traceparent))
            for shard, sent in zip(shards, sends, strict=True)
        ]
        if telemetry.metrics_enabled:  # per-shard round trips, as each shard answers
            timed = self._pool.wait_timed(pending)
            outputs = [out for out, _ in timed]
            for shard, (_, seconds) in zip(shards, timed, strict=True):
                telemetry.metrics.record_dispatch(self.tier, shard, seconds)
        else:
            outputs = self._pool.wait(pending)
        if span is not None:
            self._dispatch_spans.end(telemetry, span)
        self.num_shard_calls += len(pending)
        self.last_fan_out = fan_out
        outputs = [out.to(hidden.device) for out in outputs]  # shards answer in host memory
        return combine(
            hidden.shape[0],
            hidden.shape[1],
            list(zip(rows, outputs, strict=True)),
            dtype=hidden.dtype,
            device=hidden.device,
        )

    def split(
        self,
        table: RoutingTable,
        layer: int,
        hidden: torch.Tensor,  # [T, H]
        expert_ids: torch.Tensor,  # [T, K]
        weights: torch.Tensor,  # [T, K]
    ) -> tuple[list[str], list[Sequence[int] | torch.Tensor], list[Inputs], list[int]]:
        """The shards called, their rows, their inputs, and the shards each token touches.

        Gathered on the step's device (the pool moves only these rows to the host). When
        every expert of the layer has one shard, whole-tensor ops do it; otherwise the
        plan (``router.dispatch``) chooses among replicas pair by pair.
        """
        owners = self._owner_map(table, layer)
        if owners is not None and expert_ids.numel() and int(expert_ids.max()) < len(owners[1]):
            shard_ids, owner = owners
            parts = split_by_owner(
                owner.to(expert_ids.device), len(shard_ids), hidden, expert_ids, weights
            )
            kept = [(sid, part) for sid, part in zip(shard_ids, parts, strict=True) if part]
            fan_out = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
            for _, (token_index, *_) in kept:
                fan_out[token_index] += 1
            return (
                [sid for sid, _ in kept],
                [token_index for _, (token_index, *_) in kept],
                [(h, ids, w) for _, (_, h, ids, w) in kept],
                fan_out.tolist(),
            )
        plan = plan_dispatch(layer, expert_ids.tolist(), table)
        sends = [
            gather_shard_inputs(work.token_index, work.pairs, hidden, weights)
            for work in plan.per_shard.values()
        ]
        rows = [work.token_index for work in plan.per_shard.values()]
        return list(plan.per_shard), list(rows), sends, plan.fan_out

    def _owner_map(self, table: RoutingTable, layer: int) -> tuple[list[str], torch.Tensor] | None:
        """(shard ids, [E] shard index per expert) when each expert of ``layer`` has one shard."""
        key = (table.version, layer)
        if key not in self._owners:
            placed = {e: shards for (lyr, e), shards in table.placement.items() if lyr == layer}
            owners = None
            if placed and all(len(s) == 1 for s in placed.values()):
                if sorted(placed) == list(range(len(placed))):  # every expert placed
                    shard_ids = sorted({s[0] for s in placed.values()})
                    index = {sid: i for i, sid in enumerate(shard_ids)}
                    owner = torch.tensor([index[placed[e][0]] for e in range(len(placed))])
                    owners = (shard_ids, owner)
            if len(self._owners) > 1024:
                self._owners.clear()
            self._owners[key] = owners
        return self._owners[key]
