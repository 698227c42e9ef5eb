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

Faults. A shard whose call fails (its process died: a closed pair or a dead actor, known at
once; or its compute failed) is marked dead in this backend's view, and its share of the SAME
layer is recomputed on surviving replicas of its (layer, expert) slots, added in its place in
the combine order; the other shards' answers are kept. A dead shard stays out until a newer
routing table is installed or ``reconnect`` reaches it again (a send to a shard whose pair
is gone tries once per table to join a fresh one, so a restarted shard is used again); an
engine process is handed fresh pairs by its replica instead (``join_shards``), and defers a
table naming only shards it cannot reach while the running one has a reachable replica. When
some expert a token needs has no live replica, the layer waits up to ``unavailable_wait_s``
for its shard to come back (a restart; not where the pool says ``can_reconnect = False``),
then raises ``ExpertUnavailableError`` naming the missing (layer, expert) slots and the
step's tokens that chose them (the engine ends only their requests,
``cluster.engine.missing_experts``): never a wrong token. Where a token's shard is found:
``layer_routes``.

Legend: T tokens, K experts per token, H hidden, E experts placed in the layer, S shards of
the layer, N tokens sent to one shard.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from cluster.expert_parallel.data_plane import DataPlaneError
from cluster.expert_parallel.layer_routes import LayerRoutes
from cluster.expert_parallel.transports import ShardCall, ShardCaller, ShardsFailed
from cluster.telemetry.dispatch_spans import DispatchSpans
from cluster.telemetry.setup import get_telemetry
from experts.dispatch_tensors import ShardSplit, combine, gather_shard_inputs, rows_choosing
from experts.shard import PAD_EXPERT
from router.dispatch import (
    ExpertUnavailableError,
    missing_experts,
    plan_dispatch,
    unreachable_only,
)
from router.routing_table import RoutingTable, Slot

log = logging.getLogger(__name__)

UNAVAILABLE_WAIT_S = 30.0  # the config's experts.unavailable_wait_s default
RETRY_S = 0.25  # between tries to reach a dead shard while an expert has no replica
REJOIN_S = 1.0  # how long a send may try to rejoin a shard that a new table lists again

# (shard id, rows [N] of the step, hidden [N, H], ids [N, K'], weights [N, K']): one call
Call = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class RemoteExperts:
    """The ``ExpertBackend`` whose experts live in shards, reached through a ``ShardCaller``."""

    def __init__(
        self,
        pool: ShardCaller,
        table: RoutingTable,
        tier: str = "",
        near: Collection[str] = (),
        unavailable_wait_s: float = UNAVAILABLE_WAIT_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._pool = pool
        self.unavailable_wait_s = unavailable_wait_s
        self._clock, self._sleep = clock, sleep
        self._dead: dict[str, str] = {}  # shards this backend routes around: why
        self._excluded: tuple[tuple[int, frozenset[str]], RoutingTable] | None = None
        self._deferred: RoutingTable | None = None  # newer, but needs pairs not joined yet
        self._rejoined: set[tuple[int, str]] = set()  # (table version, shard) tried
        self.num_shard_failures = 0  # calls that failed and were recomputed elsewhere
        self.near = frozenset(near)  # shards on this node: preferred among equal replicas
        self._table = table
        self.tier = tier  # for metric attributes
        self._dispatch_spans = DispatchSpans()  # per traced request, recorded off this thread
        self._routes = LayerRoutes()  # per (table version, dead shards, layer, device)
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

    @property
    def dead(self) -> dict[str, str]:
        """The shards routed around now, and why (a copy)."""
        with self._lock:
            return dict(self._dead)

    def set_table(self, table: RoutingTable) -> None:
        """Install a newer routing table; the next layer computed uses it. Shards marked dead
        are tried again (a table that still lists a dead one costs one failed, rerouted call).

        Where the pool tells which shards it reaches (an engine process, which cannot join a
        pair by itself), a table placing some (layer, expert) only on shards it cannot reach
        while the running table has a reachable replica is deferred: the running table stays
        (its version is what the replica acknowledges, so the controller keeps the old
        slots) until ``join_shards`` brings the pairs or a later table needs none."""
        with self._lock:
            if table.version <= self._table.version:
                raise ValueError(
                    f"routing table version {table.version} is not newer than {self._table.version}"
                )
            reaches = getattr(self._pool, "reaches", None)  # an engine process's channel
            if reaches is not None and (
                blocked := unreachable_only(table, self._table, reaches, self._dead)
            ):
                if self._deferred is None or self._deferred.version < table.version:
                    log.warning(
                        "table v%d deferred: %s held only by unreached shards",
                        table.version,
                        blocked[:8],
                    )
                self._deferred = table
                return
            self._deferred = None
            self._table = table
            self._dead.clear()
            self._rejoined.clear()

    @property
    def deferred_version(self) -> int:
        """The version of a table waiting for pairs to be joined (-1: none)."""
        with self._lock:
            return -1 if self._deferred is None else self._deferred.version

    def join_shards(self, host: str, tickets: dict[str, Any]) -> list[str]:
        """Adopt fresh pairs to shards (restarted ones) whose sides the replica started
        (``JoinShards``); those joined are live again, and a deferred table that now has a
        reachable replica of every slot is installed. Returns the shards joined."""
        adopt = getattr(self._pool, "adopt", None)
        if adopt is None:
            return []
        joined: list[str] = adopt(host, tickets)
        with self._lock:
            for sid in joined:
                self._dead.pop(sid, None)
            deferred, self._deferred = self._deferred, None
        if deferred is not None and deferred.version > self._table.version:
            self.set_table(deferred)
        return joined

    def _view(self) -> tuple[RoutingTable, frozenset[str]]:
        """The table without the dead shards (kept while neither changes)."""
        with self._lock:
            dead, table = frozenset(self._dead), self._table
            if not dead:
                return table, dead
            key = (table.version, dead)
            if self._excluded is None or self._excluded[0] != key:
                self._excluded = (key, table.excluding(dead))
            return self._excluded[1], dead

    def _mark_dead(self, shard_id: str, err: BaseException) -> None:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        with self._lock:
            first = shard_id not in self._dead
            self._dead[shard_id] = reason
        self.num_shard_failures += 1
        if first:
            log.warning("expert shard %s failed, routing around it: %s", shard_id, reason)

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
        if threads != 1:
            torch.set_num_threads(1)
        try:
            return self._forward(layer, hidden, expert_ids, weights)
        except ExpertUnavailableError as err:
            # name the tokens that chose the missing experts: the engine ends only their
            # requests. Not where this backbone can never reach the shard again (an engine
            # process): its engine stops, and the replica that replaces it connects afresh.
            if not err.token_rows and getattr(self._pool, "can_reconnect", True):
                experts = [e for lyr, e in err.missing if lyr == layer]
                err.token_rows, err.num_tokens = rows_choosing(expert_ids, experts)
            raise
        finally:
            if threads != 1:
                torch.set_num_threads(threads)

    def _forward(
        self,
        layer: int,
        hidden: torch.Tensor,  # [T, H]
        expert_ids: torch.Tensor,  # [T, K]
        weights: torch.Tensor,  # [T, K]
    ) -> torch.Tensor:  # [T, H]
        table, dead = self._view()
        deadline: list[float] = []  # set when some expert first has no live replica
        if dead:  # some shard is down: wait (bounded) if an expert it held has no replica now
            needed = missing_experts(layer, [expert_ids.unique().tolist()], table)
            if needed:
                table, dead = self._await_replicas(layer, needed, deadline)
        shard_ids, split = self.split(table, layer, hidden, expert_ids, weights, dead)
        parts = split.parts()
        telemetry = get_telemetry()
        span = self._dispatch_spans.start(telemetry, layer, hidden.shape[0], len(parts))
        traceparent = span.traceparent if span is not None else ""
        calls = [(shard_ids[s], rows, h, ids, w) for s, rows, h, ids, w in parts]
        partials = self._run(layer, calls, traceparent, telemetry.metrics_enabled, deadline)
        if span is not None:
            self._dispatch_spans.end(telemetry, span)
        self._last_touched = split.touched
        return combine(hidden.shape[0], hidden.shape[1], partials, hidden.dtype, hidden.device)

    def _run(
        self,
        layer: int,
        calls: Sequence[Call],
        traceparent: str,
        timed: bool,
        deadline: list[float],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:  # (rows [N], out [N, H]) in call order
        """Send every call, wait for all; a failed call's share is recomputed on surviving
        replicas and takes its place in the order (so the combine order stays the same)."""
        pending, sent = [], []
        failed: dict[int, Exception] = {}
        for i, (sid, _, h, ids, w) in enumerate(calls):
            call = ShardCall(sid, layer, h, ids, w, traceparent)
            try:
                pending.append(self._send(call))
                sent.append(i)
            except DataPlaneError as err:  # its pair is known to be gone: fails at once
                failed[i] = err
        answers: list[tuple[torch.Tensor, float] | None]
        try:
            if timed:
                answers = list(self._pool.wait_timed(pending))
            else:
                answers = [(out, 0.0) for out in self._pool.wait(pending)]
        except ShardsFailed as err:
            answers = err.answers
            failed.update({sent[j]: e for j, e in err.failed.items()})
        self.num_shard_calls += len(pending)
        got = {i: a for i, a in zip(sent, answers, strict=True) if a is not None}
        if timed and got:  # per-shard round trips, recorded off this thread
            metrics = get_telemetry().metrics
            metrics.record_dispatch_layer(
                self.tier, [calls[i][0] for i in got], [a[1] for a in got.values()]
            )
        partials: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, (sid, rows, h, ids, w) in enumerate(calls):
            if i in got:
                partials.append((rows, got[i][0]))
                continue
            self._mark_dead(sid, failed[i])
            partials.extend(self._reroute(layer, rows, h, ids, w, traceparent, timed, deadline))
        return partials

    def _send(self, call: ShardCall) -> Any:
        """Send; a shard whose pair is gone but that a new table lists again (it may have
        restarted) is tried once more after joining a fresh pair."""
        try:
            return self._pool.send(call)
        except DataPlaneError:
            if not self._rejoin(call.shard_id):
                raise
        return self._pool.send(call)

    def _rejoin(self, shard_id: str) -> bool:
        """Once per table, try to reach a shard whose pair was lost before (briefly)."""
        reconnect = getattr(self._pool, "reconnect", None)
        with self._lock:
            key = (self._table.version, shard_id)
            if reconnect is None or shard_id in self._dead or key in self._rejoined:
                return False
            self._rejoined.add(key)
        return bool(reconnect(shard_id, REJOIN_S))

    def _reroute(
        self,
        layer: int,
        rows: torch.Tensor,  # [N] the step's token of each row
        hidden: torch.Tensor,  # [N, H]
        expert_ids: torch.Tensor,  # [N, K'] PAD_EXPERT where padded
        weights: torch.Tensor,  # [N, K']
        traceparent: str,
        timed: bool,
        deadline: list[float],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A failed call's pairs, planned again over the live replicas and sent (fault path:
        per-pair Python work is fine here)."""
        pairs = [
            [(k, e) for k, e in enumerate(row) if e != PAD_EXPERT] for row in expert_ids.tolist()
        ]
        wanted = [[e for _, e in row] for row in pairs]
        table, _ = self._view()
        needed = missing_experts(layer, wanted, table)
        if needed:
            table, _ = self._await_replicas(layer, needed, deadline)
        plan = plan_dispatch(layer, wanted, table, self.near)
        calls: list[Call] = []
        for sid, work in plan.per_shard.items():
            shard_pairs = [
                [(pairs[t][j][0], e) for j, e in row]
                for t, row in zip(work.token_index, work.pairs, strict=True)
            ]
            h, ids, w = gather_shard_inputs(work.token_index, shard_pairs, hidden, weights)
            index = torch.tensor(work.token_index, dtype=torch.long, device=rows.device)
            calls.append((sid, rows.index_select(0, index), h, ids, w))
        return self._run(layer, calls, traceparent, timed, deadline)

    def _await_replicas(
        self, layer: int, needed: Sequence[Slot], deadline: list[float]
    ) -> tuple[RoutingTable, frozenset[str]]:
        """Until every slot in ``needed`` has a live replica: a dead shard that holds one
        answers again (``reconnect``), or a newer table places it. Bounded by
        ``unavailable_wait_s`` from the layer's first wait; then ExpertUnavailableError."""
        if not deadline:  # a pool that can never reach a dead shard again does not wait
            wait_s = self.unavailable_wait_s if getattr(self._pool, "can_reconnect", True) else 0
            deadline.append(self._clock() + wait_s)
        reconnect = getattr(self._pool, "reconnect", None)
        while True:
            with self._lock:
                table, dead = self._table, dict(self._dead)
            for sid in dead:
                holds = any(sid in table.shards_for(lyr, e) for lyr, e in needed)
                left = max(deadline[0] - self._clock(), RETRY_S)
                if holds and reconnect is not None and reconnect(sid, left):
                    with self._lock:
                        self._dead.pop(sid, None)
            view, gone = self._view()
            still = [(lyr, e) for lyr, e in needed if not view.shards_for(lyr, e)]
            if not still:
                return view, gone
            left = deadline[0] - self._clock()
            if left <= 0:
                waited = (
                    f"none came back within experts.unavailable_wait_s="
                    f"{self.unavailable_wait_s:g}s; raise it to wait longer for a restart"
                    if getattr(self._pool, "can_reconnect", True)
                    else "this backbone (an engine process) cannot rejoin a restarted shard"
                )
                raise ExpertUnavailableError(
                    f"experts {still} (layer, expert) have no live replica: shards "
                    f"{sorted(gone)} are down ({'; '.join(dead.values())}) and {waited}, "
                    "or replicate experts (experts.replication)",
                    still,
                )
            self._sleep(min(RETRY_S, left))

    def split(
        self,
        table: RoutingTable,
        layer: int,
        hidden: torch.Tensor,  # [T, H]
        expert_ids: torch.Tensor,  # [T, K]
        weights: torch.Tensor,  # [T, K]
        dead: frozenset[str] = frozenset(),  # shards ``table`` already excludes (cache key)
    ) -> tuple[list[str], ShardSplit]:
        """The layer's shard ids [S] and its tokens split among them (``LayerRoutes.split``)."""
        return self._routes.split(table, layer, hidden, expert_ids, weights, dead, self.near)
