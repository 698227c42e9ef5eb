"""A tier's KV event hub: its replicas push their engines' KV event batches, routers poll.

Why a hub: a request router runs inside every process holding a handle to the tier (each
gateway replica), and Serve gives it no channel to a given replica. So each tier replica
pushes its engine's batches (``cluster.engine.kv_events``) to one named actor per tier, which
mirrors every replica's block keys and keeps a short log of recent batches; a router polls it
with its cursor per replica and gets the batches after it, or, when its cursor is too old or
of another epoch (a restart), a snapshot of the mirror. The hub itself resynchronises from the
engine: a gap in a replica's pushes answers the push with "send a snapshot", and the replica
asks its engine for one (``request_kv_snapshot``). Replicas silent for ``forget_after_s`` are
dropped. The hub also holds the tier's key space (model id and KV layout), which routers need
to name a request's blocks.

``KVEventHub`` is plain logic (tested without Ray); ``start_event_hub`` hosts it in a named
actor (``num_cpus=0``: it only moves keys).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cache.block_key import BlockKey, KVLayout
from cluster.engine.kv_events import KVEventBatch

HUB_NAME_PREFIX = "kv-events-"
LOG_BATCHES = 256  # recent batches kept per replica for pollers


@dataclass
class _Mirror:
    epoch: str = ""
    next_seq: int = 0
    keys: set[BlockKey] = field(default_factory=set)
    pins: dict[BlockKey, float] = field(default_factory=dict)  # key -> pinned until (hub clock)
    log: deque[KVEventBatch] = field(default_factory=lambda: deque(maxlen=LOG_BATCHES))
    seen_at: float = 0.0


@dataclass(frozen=True)
class HubUpdate:
    """A poll's answer: per replica the batches to apply in order, and the key space."""

    batches: dict[str, list[KVEventBatch]]
    keyspace: tuple[str, KVLayout] | None  # (model id, layout); None until a replica says
    replicas: tuple[str, ...]  # every replica the hub knows


class KVEventHub:
    """Mirrors each replica's block keys from its pushes; answers pollers (module doc)."""

    def __init__(
        self, forget_after_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.forget_after_s = forget_after_s
        self.clock = clock
        self._mirrors: dict[str, _Mirror] = {}
        self._keyspace: tuple[str, KVLayout] | None = None

    def push(self, replica: str, batches: list[KVEventBatch]) -> bool:
        """Apply a replica's batches (an empty list: a heartbeat); True when its engine should
        send a snapshot (a gap)."""
        mirror = self._mirrors.setdefault(replica, _Mirror())
        mirror.seen_at = self.clock()
        gap = False
        for batch in batches:
            if batch.keyspace is not None:
                self._keyspace = batch.keyspace
            if batch.epoch != mirror.epoch:  # a new engine: its cache starts empty
                mirror.epoch, mirror.next_seq = batch.epoch, batch.seq_no
                mirror.keys.clear()
                mirror.pins.clear()
                mirror.log.clear()
                gap = not batch.snapshot and batch.seq_no != 0
            elif batch.seq_no < mirror.next_seq:
                continue
            elif batch.seq_no > mirror.next_seq:
                gap = True
            if batch.snapshot:
                mirror.keys = set(batch.stored)
                mirror.pins.clear()
                gap = False
            else:
                mirror.keys.update(batch.stored)
                mirror.keys.difference_update(batch.removed)
                for key in batch.removed:
                    mirror.pins.pop(key, None)
            now = self.clock()
            mirror.pins.update((key, now + left) for key, left in batch.pinned)
            mirror.next_seq = batch.seq_no + 1
            mirror.log.append(batch)
        return gap

    def poll(self, cursors: Mapping[str, tuple[str, int]]) -> HubUpdate:
        """Batches after each cursor ((epoch, next sequence number) per replica), or a
        snapshot of the mirror where the log no longer reaches back to it."""
        self._forget()
        out: dict[str, list[KVEventBatch]] = {}
        for replica, mirror in self._mirrors.items():
            if not mirror.epoch:
                continue
            epoch, next_seq = cursors.get(replica, ("", -1))
            if epoch == mirror.epoch and next_seq == mirror.next_seq:
                continue  # up to date
            oldest = mirror.log[0].seq_no if mirror.log else mirror.next_seq
            if epoch == mirror.epoch and oldest <= next_seq <= mirror.next_seq:
                out[replica] = [b for b in mirror.log if b.seq_no >= next_seq]
            else:
                seq, keys = mirror.next_seq - 1, tuple(mirror.keys)
                now = self.clock()
                pins = tuple((k, t - now) for k, t in mirror.pins.items() if t > now)
                snap = KVEventBatch(mirror.epoch, seq, keys, (), True, (), self._keyspace, pins)
                out[replica] = [snap]
        return HubUpdate(out, self._keyspace, tuple(self._mirrors))

    def _forget(self) -> None:
        now = self.clock()
        silent = [r for r, m in self._mirrors.items() if now - m.seen_at > self.forget_after_s]
        for replica in silent:
            del self._mirrors[replica]


def start_event_hub(tier: str, detached: bool = False) -> Any:
    """The tier's hub actor, started or found by name."""
    import ray

    options: dict[str, Any] = {
        "name": HUB_NAME_PREFIX + tier,
        "get_if_exists": True,
        "num_cpus": 0,  # one call at a time: the mirrors are plain dicts
    }
    if detached:
        options["lifetime"] = "detached"
    return ray.remote(KVEventHub).options(**options).remote()
