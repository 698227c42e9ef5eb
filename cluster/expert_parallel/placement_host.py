"""The placement controller's Ray side: the actor body (``PlacementControllerHost``, which
also probes its tiers' shards every ``WATCH_S``) and ``start_controller``, the one way to
start or find it (``CONTROLLER_NAME``). The controller itself is ``placement_controller``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from cluster.expert_parallel.placement_controller import (
    WATCH_S,
    Placement,
    PlacementController,
    ReportReply,
    Slot,
    TierPlacement,
    TierSetup,
    table_from_slots,
)
from router.routing_table import RoutingTable

log = logging.getLogger(__name__)


class PlacementControllerHost:
    """The actor body: a ``PlacementController`` whose tiers control shard actors."""

    def __init__(self) -> None:
        self.controller = PlacementController()
        self._watcher: threading.Thread | None = None

    def register_tier(
        self, setup: TierSetup, version: int, placement: Placement, handles: Mapping[str, Any]
    ) -> int:
        """Take charge of a tier; the table is read from what the live shards hold now (so a
        restarted controller resumes where the last one stopped), and what only dead shards
        held is re-placed. Returns its version."""
        from cluster.expert_parallel.expert_pool import ExpertPool

        # the pool's control calls; its "ray" transport opens nothing (no layer goes here)
        shards = ExpertPool(handles, data_plane="ray")
        states = shards.states()
        held = {sid: state[1] for sid, state in states.items() if state is not None}
        table = table_from_slots(held, version) if any(held.values()) else None
        if table is None or not table.placement:
            table = RoutingTable(version, dict(placement))
        tier = TierPlacement(setup, table, shards)
        tier.observe(states)
        self.controller.register(tier)
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="shard-watch", daemon=True)
            self._watcher.start()
        return tier.table.version

    def _watch(self) -> None:
        """Probe every tier's shards, forever (the actor's life)."""
        while True:
            time.sleep(WATCH_S)
            for tier in list(self.controller.tiers.values()):
                try:
                    tier.observe(tier.shards.states(timeout_s=2.0))
                except Exception:  # one tier's trouble must not stop watching the others
                    log.exception("tier %s: probing its shards failed", tier.setup.tier)

    def report(
        self, tier: str, replica_id: str, counts: dict[Slot, int], table_version: int
    ) -> ReportReply:
        return self.controller.report(tier, replica_id, counts, table_version)

    def table(self, tier: str) -> tuple[int, Placement] | None:
        return self.controller.table(tier)

    def stats(self, tier: str) -> dict[str, Any]:
        return self.controller.stats(tier)


CONTROLLER_NAME = "moe-placement-controller"
HEAD_RESOURCE = "node:__internal_head__"


def start_controller(name: str | None = CONTROLLER_NAME, detached: bool = False) -> Any:
    """The cluster's controller actor: started, or found by ``name`` if it runs already.

    ``num_cpus=0``: it waits on reports and shard loads, it does not compute. Several
    threads, so that a move waiting for engines never holds up their reports. It runs on the
    head node (a sliver of the head's own resource, which a replacement head carries too):
    expert nodes are the ones drained, preempted or lost, and a controller lost with a node's
    shards would re-place nothing until it restarted elsewhere. (A soft node affinity would
    not do: Ray places an actor that asks for no resources on any node, whatever its soft
    affinity says.)
    """
    import ray

    actor = ray.remote(PlacementControllerHost)
    # "DEFAULT": never captured by the caller's placement group (a Serve replica's), whose
    # bundles sit on expert nodes and hold no share of the head.
    options: dict[str, Any] = {
        "num_cpus": 0,
        "max_concurrency": 8,
        "max_restarts": -1,
        "scheduling_strategy": "DEFAULT",
    }
    if any(HEAD_RESOURCE in node.get("Resources", {}) for node in ray.nodes()):
        options["resources"] = {HEAD_RESOURCE: 0.001}
    if name is not None:
        options.update(name=name, get_if_exists=True)
    if detached:
        options["lifetime"] = "detached"
    return actor.options(**options).remote()
