"""The placement controller: turns reported expert load into plans, and applies them live.

One per cluster (``PlacementControllerHost`` in ``placement_host``: a Ray actor with
``num_cpus=0``, optionally detached and named), one ``TierPlacement`` per sharded tier. Tier
replicas send their engines' routed counts off the hot path (``report``: every few seconds or
as requests end); the controller keeps the tier's ``LoadWindow``, asks its ``ReplanPolicy``
whether to plan, plans with ``router.placement`` and, if the gain beats the move cost, moves
slots on a background thread while serving goes on, one group of layers at a time:

1. the shards load the group's new slots (``ShardControl.load``; shards write fixed slots
   in place and keep serving meanwhile);
2. the next routing table version is published: each replica gets it in the reply to its
   next report (told to report again soon while it is behind) and its engine swaps it in
   between two steps, then reports that version back;
3. once every live replica runs the new version, the group's old slots are dropped.

Engines on the old table and on the new one both find every expert they route to at every
moment (old slots stay until all have swapped), so no request fails or changes its output.
A replica silent for ``replica_ttl_s`` no longer holds a drop back; after ``ack_timeout_s``
the drop is deferred and retried on later reports.

Faults. The actor probes its tiers' shards (``WATCH_S``; each answers its incarnation and
slots) and hands the answers to ``TierPlacement.observe``. A shard that stops answering is lost:
its replicas leave the table and each is re-placed on a surviving shard (loaded from the
checkpoint first, ``router.placement.recover``), published as the next version, so every expert
has its replica count back; engines route around the dead shard meanwhile. A shard that answers
again (Ray restarted it, same handle) is reconciled to what the table gives it: it loads the
table's slots it lacks and drops the others. If the controller itself dies, serving goes on with
the last table; restarted (``max_restarts=-1``) and re-registered by the pool host, it reads the
table from what the live shards actually hold, re-places what only dead shards held, and takes a
version above any a replica reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster.expert_parallel.placement_faults import ShardFaults, ShardState, by_shard
from router.load_window import LoadWindow
from router.placement_tables import ShardLayout, plan_changes, plan_table, slots_per_shard
from router.replan_policy import ReplanConfig, ReplanPolicy, Verdict, balancedness
from router.routing_table import Replica, RoutingTable

log = logging.getLogger(__name__)

Slot = tuple[int, int]  # (layer, expert)
Placement = tuple[tuple[Slot, tuple[str, ...]], ...]  # a table's items: picklable
SOON_S = 0.05  # how soon a replica behind the published table reports again
WATCH_S = 0.5  # how often the actor probes its shards


class ShardControl(Protocol):
    """Load and drop slots on a tier's shards (``ExpertPool`` is one)."""

    def load(self, shard_id: str, slots: Sequence[Slot]) -> list[Slot]: ...

    def drop(self, shard_id: str, slots: Sequence[Slot]) -> list[Slot]: ...

    def states(self, timeout_s: float = 5.0) -> Mapping[str, ShardState]: ...


@dataclass(frozen=True)
class TierSetup:
    """What the controller must know of a tier to plan for it."""

    tier: str
    moe_layers: tuple[int, ...]
    num_experts: int
    node_of: Mapping[str, str]  # shard id -> node id
    bytes_per_slot: int  # one expert's weights
    config: ReplanConfig


@dataclass(frozen=True)
class ReportReply:
    """The controller's answer to a report: a newer table to swap in (``version`` -1: none),
    and when to report next."""

    version: int
    placement: Placement
    next_report_s: float

    @property
    def table(self) -> RoutingTable | None:
        return RoutingTable(self.version, dict(self.placement)) if self.version >= 0 else None


@dataclass
class _Replica:
    version: int
    seen_at: float


@dataclass
class PlacementStats:
    """What the controller did for a tier, for metrics and the ops status call."""

    table_version: int = 0
    balancedness: float = 1.0  # of the current table under the recent load
    planned_balancedness: float = 1.0  # of the last plan applied
    num_replans: int = 0
    num_rejected: int = 0
    moved_slots: int = 0  # in all
    moved_bytes: int = 0
    last_replan_s: float = 0.0  # load-to-drop duration of the last re-plan
    last_reason: str = ""
    deferred_drops: int = 0  # replicas (slots) still held because an engine had not swapped
    lost_shards: tuple[str, ...] = ()  # not answering now
    num_recoveries: int = 0  # lost shards whose replicas were re-placed
    num_restarts_seen: int = 0  # shards back (restarted), reconciled to the table
    last_recovery_s: float = 0.0  # loss seen -> new table published


class TierPlacement(ShardFaults):
    """One tier's load window, policy, published table and moves (thread-safe); its shards'
    faults are handled by ``ShardFaults``."""

    def __init__(
        self,
        setup: TierSetup,
        table: RoutingTable,
        shards: ShardControl,
        clock: Callable[[], float] = time.monotonic,
        background: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        cfg = setup.config
        self.setup = setup
        self.shards = shards
        self.clock = clock
        self.layout = ShardLayout.of(setup.node_of)
        self.slots = slots_per_shard(table, setup.moe_layers, cfg.extra_slots)
        # the configured replication: restored after a shard comes back (``ShardFaults``)
        self.replication = min((len(s) for s in table.placement.values()), default=1)
        self.window = LoadWindow(
            setup.moe_layers, setup.num_experts, cfg.window_s, cfg.num_windows, cfg.ema_alpha
        )
        self.policy = ReplanPolicy(cfg)
        self.stats = PlacementStats(table_version=table.version)
        self._table = table
        self._replicas: dict[str, _Replica] = {}
        self._pending_drops: list[tuple[int, list[Replica]]] = []  # (needed version, replicas)
        self._moving = False
        self._cond = threading.Condition()
        self._background = background or _thread
        self._incarnation: dict[str, str] = {}
        self._lost: set[str] = set()

    @property
    def table(self) -> RoutingTable:
        with self._cond:
            return self._table

    # --- reports ----------------------------------------------------------------------------

    def report(
        self, replica_id: str, counts: Mapping[Slot, int], table_version: int
    ) -> ReportReply:
        """Record a replica's counts and the table version its engine runs; maybe re-plan."""
        now = self.clock()
        with self._cond:
            if counts:
                self.window.add(counts, now)
            self._replicas[replica_id] = _Replica(table_version, now)
            if table_version > self._table.version:  # a restarted controller: catch up, one
                # above, so that every replica swaps to the table read from the shards
                self._table = RoutingTable(table_version + 1, self._table.placement)
                self.stats.table_version = self._table.version
            self._cond.notify_all()
            table = self._table
            drops = self._ready_drops(now)
        for _, replicas in drops:
            self._drop(replicas)
        try:
            self.check(now)
        except Exception:  # a planner bug must not cost the replica its report or its table
            log.exception("tier %s: planning failed; placement unchanged", self.setup.tier)
        cfg = self.setup.config
        if table_version < table.version:
            return ReportReply(table.version, tuple(table.placement.items()), SOON_S)
        return ReportReply(-1, (), SOON_S if self._moving else cfg.report_interval_s)

    def _live(self, now: float) -> list[_Replica]:
        ttl = self.setup.config.replica_ttl_s
        return [r for r in self._replicas.values() if now - r.seen_at <= ttl]

    def _all_at(self, version: int, now: float) -> bool:
        return all(r.version >= version for r in self._live(now))

    def _ready_drops(self, now: float) -> list[tuple[int, list[Replica]]]:
        """Deferred drops whose version every live replica now runs (under the lock)."""
        ready = [d for d in self._pending_drops if self._all_at(d[0], now)]
        self._pending_drops = [d for d in self._pending_drops if d not in ready]
        self.stats.deferred_drops = sum(len(r) for _, r in self._pending_drops)
        return ready

    # --- deciding ---------------------------------------------------------------------------

    def check(self, now: float | None = None) -> Verdict | None:
        """Ask the policy; plan and start a move when it says so. None: no plan computed."""
        now = self.clock() if now is None else now
        setup = self.setup
        with self._cond:
            if self._moving:
                return None
            load = self.window.planning_load()
            table = self._table
            current = balancedness(load, setup.moe_layers, table, self.layout.shard_ids)
            self.stats.balancedness = current
            trigger = self.policy.consider(
                now, current, self.window.drift(), self.window.num_tokens()
            )
            if trigger is None:
                return None
            self._moving = True  # claimed: no second plan starts meanwhile
        try:
            plan = plan_table(
                load,
                setup.moe_layers,
                table,
                self.layout,
                self.slots,
                setup.config.max_moved_slots,
                setup.bytes_per_slot,
            )
            changes = plan_changes(plan, table, setup.moe_layers, self.layout)
            target = table
            for add, remove in changes.values():
                target = target.with_changes(add, remove)
            planned = balancedness(load, setup.moe_layers, target, self.layout.shard_ids)
            verdict = self.policy.accept(current, planned, plan.moved_bytes or 0)
        except BaseException:
            with self._cond:
                self._moving = False
            raise
        self.stats.last_reason = f"{trigger.reason}: {verdict.reason}"
        if not verdict.apply or not changes:
            self.stats.num_rejected += 1
            with self._cond:
                self._moving = False
            return verdict
        with self._cond:
            self.window.mark_planned()
        self.stats.planned_balancedness = planned
        self._background(lambda: self._move(changes, plan.moved_slots, plan.moved_bytes or 0))
        return verdict

    # --- moving -----------------------------------------------------------------------------

    def _move(
        self, changes: Mapping[int, tuple[list[Replica], list[Replica]]], slots: int, nbytes: int
    ) -> None:
        """Load, publish, wait for every engine, drop: one group of layers at a time."""
        cfg = self.setup.config
        started = time.monotonic()
        layers = sorted(changes)
        step = cfg.layers_per_step or len(layers)
        try:
            for i in range(0, len(layers), step):
                group = layers[i : i + step]
                add = [r for layer in group for r in changes[layer][0]]
                remove = [r for layer in group for r in changes[layer][1]]
                self._load(add)
                with self._cond:
                    self._table = self._table.with_changes(add, remove)
                    version = self._table.version
                    self.stats.table_version = version
                if not self._wait_for(version, cfg.ack_timeout_s):
                    log.warning(
                        "tier %s: not every engine swapped to table v%d within %.0f s; its "
                        "old slots stay until they do",
                        self.setup.tier,
                        version,
                        cfg.ack_timeout_s,
                    )
                    with self._cond:
                        self._pending_drops.append((version, remove))
                    continue
                self._drop(remove)
            self.stats.num_replans += 1
            self.stats.moved_slots += slots
            self.stats.moved_bytes += nbytes
            self.stats.last_replan_s = time.monotonic() - started
        except Exception:
            log.exception("tier %s: a re-placement failed; serving goes on", self.setup.tier)
        finally:
            with self._cond:
                self._moving = False

    def _load(self, add: Sequence[Replica]) -> None:
        for sid, slots in by_shard(add).items():
            self.shards.load(sid, slots)

    def _drop(self, remove: Sequence[Replica]) -> None:
        for sid, slots in by_shard(remove).items():
            self.shards.drop(sid, slots)

    def _wait_for(self, version: int, timeout_s: float) -> bool:
        """Until every live replica reports ``version`` (replicas time out of ``_live``), and
        at least two report intervals have passed since it was published.

        The grace covers replicas the controller has not heard from yet (one just started,
        or its first report was lost): every replica reports at least once per interval, so
        by then each one running an older table is known, and holds the drop back.
        """
        grace_s = 2 * self.setup.config.report_interval_s
        published = time.monotonic()
        deadline = published + max(timeout_s, grace_s)
        with self._cond:
            while not (
                self._all_at(version, self.clock()) and time.monotonic() - published >= grace_s
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5, max(grace_s / 4, 0.01)))
        return True

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Until no move is in progress (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._moving:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True


def _thread(work: Callable[[], None]) -> None:
    threading.Thread(target=work, name="placement-move", daemon=True).start()


def table_from_slots(held: Mapping[str, Sequence[Slot]], version: int) -> RoutingTable:
    """The table the shards' slots describe (a restarted controller resumes from it)."""
    placement: dict[Slot, list[str]] = {}
    for sid, slots in held.items():
        for layer, expert in slots:
            placement.setdefault((int(layer), int(expert)), []).append(sid)
    return RoutingTable(version, {slot: tuple(s) for slot, s in placement.items()})


@dataclass
class PlacementController:
    """The cluster's tiers by name; what the Ray actor hosts."""

    tiers: dict[str, TierPlacement] = field(default_factory=dict)

    def register(self, placement: TierPlacement) -> None:
        self.tiers[placement.setup.tier] = placement

    def report(
        self, tier: str, replica_id: str, counts: Mapping[Slot, int], table_version: int
    ) -> ReportReply:
        placement = self.tiers.get(tier)
        if placement is None:  # not registered (yet): keep the table, ask again later
            return ReportReply(-1, (), 1.0)
        return placement.report(replica_id, counts, table_version)

    def table(self, tier: str) -> tuple[int, Placement] | None:
        placement = self.tiers.get(tier)
        if placement is None:
            return None
        table = placement.table
        return table.version, tuple(table.placement.items())

    def stats(self, tier: str) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self.tiers[tier].stats)


class InProcessShards:
    """``ShardControl`` over shards in this process (``InProcessPool.shards``): tests, benches."""

    def __init__(self, shards: Mapping[str, Any]) -> None:
        self.shards = dict(shards)

    def load(self, shard_id: str, slots: Sequence[Slot]) -> list[Slot]:
        result: list[Slot] = self.shards[shard_id].load(slots)
        return result

    def drop(self, shard_id: str, slots: Sequence[Slot]) -> list[Slot]:
        result: list[Slot] = self.shards[shard_id].drop(slots)
        return result

    def states(self, timeout_s: float = 5.0) -> dict[str, ShardState]:
        return {sid: shard.state() for sid, shard in self.shards.items()}
