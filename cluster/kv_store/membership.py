"""Store shards follow the cluster's nodes: a node that joins gets a shard on the hash ring,
a node that leaves takes its shard off it.

``plan_membership`` (pure) compares the shards a client uses with the nodes alive now: nodes
without a shard get one, shards whose node is gone leave. ``ShardMembership`` runs it every
``interval_s`` on a daemon thread of a Ray worker holding a ``StoreClient`` (a tier replica):
it starts (or finds by name: ``get_if_exists``) the new nodes' shards, gives their handles to
the client's ``RayShardCalls``, then the new shard set to the client, whose consistent-hash
ring moves only the joining or leaving shard's share of the keys. Every replica runs one;
starting a shard is idempotent, so they agree without talking. A failed look is logged and
tried again at the next interval (a shard that stops answering meanwhile is skipped by the
client's ``retry_down_s``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from cluster.kv_store.client import StoreClient
from cluster.kv_store.config import KVStoreConfig

log = logging.getLogger(__name__)
SHARD_ID_CHARS = 16  # a shard's id: the first hex digits of its node's id


def shard_id_of(node_id: str) -> str:
    return node_id[:SHARD_ID_CHARS]


@dataclass(frozen=True)
class MembershipChange:
    """Nodes that need a shard (by node id), and shards whose node left (by shard id)."""

    join: tuple[str, ...]
    leave: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.join or self.leave)


def plan_membership(shards: Collection[str], alive_nodes: Collection[str]) -> MembershipChange:
    """Which nodes join and which shards leave, for a client using ``shards`` while
    ``alive_nodes`` are up. No node alive at all is read as a failed look: nothing leaves."""
    alive = {shard_id_of(n): n for n in alive_nodes}
    join = tuple(sorted(n for s, n in alive.items() if s not in shards))
    leave = tuple(sorted(s for s in shards if s not in alive)) if alive else ()
    return MembershipChange(join, leave)


class ShardMembership:
    """Keeps a Ray-backed ``StoreClient``'s shards in step with the alive nodes (module doc)."""

    def __init__(self, client: StoreClient, calls: Any, config: KVStoreConfig) -> None:
        self.client, self.calls, self.config = client, calls, config
        self.num_changes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-store-membership", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import ray

        while not self._stop.wait(self.config.membership_interval_s) and ray.is_initialized():
            try:
                self.step([n["NodeID"] for n in ray.nodes() if n.get("Alive")])
            except Exception as err:  # the GCS busy or restarting: look again next time
                log.warning("KV store membership: could not read the nodes (%r)", err)

    def step(self, alive_nodes: Collection[str]) -> MembershipChange:
        """Apply one look at the nodes: start the joining shards, then swap the ring."""
        from cluster.kv_store.shard_actor import start_store_shards

        change = plan_membership(self.client.ring.shards, alive_nodes)
        if not change:
            return change
        handles = dict(self.calls.handles)
        if change.join:
            handles.update(start_store_shards(self.config, list(change.join)))
        for shard in change.leave:
            handles.pop(shard, None)
        self.calls.handles = handles  # one assignment: calls in flight keep theirs
        self.client.set_shards(sorted(handles))
        self.num_changes += 1
        log.info("KV store shards: %d joined, %d left", len(change.join), len(change.leave))
        return change
