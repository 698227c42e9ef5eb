"""A tier's shard faults, as the placement controller sees them: a lost shard, a restarted one.

``ShardFaults`` is a part of ``TierPlacement`` (its table, lock, layout and shard control),
kept in a file of its own. ``observe`` takes one probe of the tier's shards (each answers its
incarnation and slots, or None when its actor is dead or restarting):

- a shard that stops answering is lost: its replicas leave the table and each is re-placed on a
  surviving shard (``router.placement.recover``: not on a shard holding that slot, another node
  first, the least-loaded), loaded from the checkpoint before the next table version is
  published, so every expert has its replica count back;
- a shard that answers again, or answers as a new incarnation (restarted between two probes),
  is reconciled to what the table gives it, plus a replica of every slot left below the
  configured replication while it was away (the ones it came back with first): it loads what
  it lacks and drops the others (a restarted actor comes back with the slots it was started
  with), and the additions are published as the next table version.

Moves and recoveries take turns (``_claim``): a recovery waits for a running move to end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from router.placement.recover import replace_lost, restore_replication
from router.placement_tables import ShardLayout, slots_per_shard

if TYPE_CHECKING:
    from router.routing_table import Replica, RoutingTable

log = logging.getLogger(__name__)

Slot = tuple[int, int]  # (layer, expert)
ShardState = tuple[str, list[Slot]] | None  # (incarnation, slots held); None: no answer


def by_shard(replicas: Sequence[Replica]) -> dict[str, list[Slot]]:
    out: dict[str, list[Slot]] = {}
    for layer, expert, sid in replicas:
        out.setdefault(sid, []).append((layer, expert))
    return out


class ShardFaults:
    """The fault half of ``TierPlacement`` (which sets every attribute named here)."""

    setup: Any  # TierSetup
    shards: Any  # ShardControl
    layout: ShardLayout
    slots: int
    replication: int  # the replica count every slot started with (restored after a restart)
    stats: Any  # PlacementStats
    _table: RoutingTable
    _cond: threading.Condition
    _moving: bool
    _pending_drops: list[tuple[int, list[Replica]]]
    _incarnation: dict[str, str]
    _lost: set[str]

    @property
    def table(self) -> RoutingTable:
        with self._cond:
            return self._table

    def observe(self, states: Mapping[str, ShardState]) -> None:
        """React to one probe of the shards: re-place what newly lost shards held; reconcile
        shards that answer again (or answer as a new incarnation: restarted unseen)."""
        lost, back = [], []
        for sid, state in sorted(states.items()):
            if state is None:
                if sid not in self._lost:
                    lost.append(sid)
                continue
            incarnation, held = state
            if sid in self._lost or self._incarnation.get(sid, incarnation) != incarnation:
                back.append((sid, held))
            self._incarnation[sid] = incarnation
        if lost:
            self._recover(lost)
        for sid, held in back:
            self._reconcile(sid, held)

    def _claim(self, timeout_s: float = 60.0) -> None:
        """Wait for a running move to end, then hold off others (released by ``_release``)."""
        with self._cond:
            deadline = time.monotonic() + timeout_s
            while self._moving and time.monotonic() < deadline:
                self._cond.wait(0.1)
            self._moving = True

    def _release(self) -> None:
        with self._cond:
            self._moving = False
            self._cond.notify_all()

    def _recover(self, lost: Sequence[str]) -> None:
        """Re-place the lost shards' replicas on the survivors and publish the table."""
        started = time.monotonic()
        self._claim()
        try:
            self._lost.update(lost)
            setup = self.setup
            alive = {s: n for s, n in setup.node_of.items() if s not in self._lost}
            table = self.table
            required = [(lyr, e) for lyr in setup.moe_layers for e in range(setup.num_experts)]
            add, remove = replace_lost(table, self._lost, sorted(alive), alive, required)
            loaded = []
            for sid, slots in by_shard(add).items():
                try:
                    self.shards.load(sid, slots)
                except Exception:  # another loss: the next probe re-places its share too
                    log.exception("tier %s: loading %s onto %s failed", setup.tier, slots, sid)
                    continue
                loaded += [(lyr, e, sid) for lyr, e in slots]
            with self._cond:
                self._table = self._table.with_changes(loaded, remove)
                self._pending_drops = [
                    (v, [r for r in rs if r[2] not in self._lost]) for v, rs in self._pending_drops
                ]
                if alive:
                    self.layout = ShardLayout.of(alive)
                self.slots = max(self.slots, slots_per_shard(self._table, setup.moe_layers, 0.0))
                self.stats.table_version = self._table.version
                self.stats.lost_shards = tuple(sorted(self._lost))
                self.stats.num_recoveries += len(lost)
                self.stats.last_recovery_s = time.monotonic() - started
                self._cond.notify_all()
            log.warning(
                "tier %s: shards %s lost; %d replicas re-placed on %s (table v%d)",
                setup.tier,
                list(lost),
                len(loaded),
                sorted({r[2] for r in loaded}),
                self.table.version,
            )
        finally:
            self._release()

    def _reconcile(self, sid: str, held: Sequence[Slot]) -> None:
        """A shard answering again holds what the table gives it, plus a replica of every slot
        left below the configured replication while it was away (``restore_replication``: the
        ones it still holds first): load the rest, drop extras, publish the additions."""
        self._claim()
        try:
            have = {(int(lyr), int(e)) for lyr, e in held}
            table = self.table
            add = restore_replication(table, sid, self.replication, self.slots, have)
            target = set(table.experts_on(sid)) | {(lyr, e) for lyr, e, _ in add}
            if target - have:
                self.shards.load(sid, sorted(target - have))
            if have - target:
                self.shards.drop(sid, sorted(have - target))
            with self._cond:
                if add:  # loaded: listed from the next version on
                    self._table = self._table.with_changes(add, [])
                    self.stats.table_version = self._table.version
                    self._cond.notify_all()
                if sid in self._lost:
                    self._lost.discard(sid)
                    alive = {s: n for s, n in self.setup.node_of.items() if s not in self._lost}
                    self.layout = ShardLayout.of(alive)
                self.stats.lost_shards = tuple(sorted(self._lost))
                self.stats.num_restarts_seen += 1
        except Exception:  # it died again: the next probe sees it
            log.exception("tier %s: reconciling restarted shard %s failed", self.setup.tier, sid)
        finally:
            self._release()
