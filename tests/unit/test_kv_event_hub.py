"""The KV event path from a replica to Serve's request router, without Ray: the hub mirrors
each replica's keys and answers pollers with increments or snapshots, a gap asks the engine
for a snapshot, the replica's pusher sends and heartbeats, and the tier's request router ranks
fake replicas by where a request's prefix lives."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ray.serve._private.common import DeploymentHandleSource, DeploymentID

from cache.block_key import KeySpace, KVLayout
from cache.prefix_hash import hash_blocks, root_hash
from cluster.engine.kv_events import KVEventBatch
from cluster.kv_store.event_hub import HubUpdate, KVEventHub
from cluster.serving.kv_event_pusher import KVEventPusher
from cluster.serving.prefix_request_router import PrefixAwareRequestRouter
from cluster.serving.tier_messages import TierRequest
from experts.sampling_params import SamplingParams
from router.prefix_index import PrefixIndex

LAYOUT = KVLayout("float32", 1, 1, 4, 16)
SPACE = KeySpace("model", LAYOUT)


def keys(n: int, start: int = 0) -> list[bytes]:
    return SPACE.keys("", hash_blocks(list(range(start, start + 16 * n)), 16, root=root_hash("")))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def snap(epoch: str, seq: int, stored: list[bytes]) -> KVEventBatch:
    return KVEventBatch(epoch, seq, tuple(stored), (), True, (), ("model", LAYOUT))


def test_hub_answers_increments_snapshots_and_restarts() -> None:
    clock = Clock()
    hub = KVEventHub(forget_after_s=10, clock=clock)
    k = keys(6)
    assert not hub.push("a", [snap("e1", 0, []), KVEventBatch("e1", 1, tuple(k[:3]), ())])
    index = PrefixIndex()
    first = hub.poll({})
    assert first.keyspace == ("model", LAYOUT) and first.replicas == ("a",)
    assert [b.snapshot for b in first.batches["a"]] == [True]  # a new poller: a snapshot
    for batch in first.batches["a"]:
        index.apply("a", batch)
    assert index.matches(k) == {"a": 3}
    hub.push("a", [KVEventBatch("e1", 2, (k[3],), (k[2],))])
    inc = hub.poll(index.cursors())
    assert [b.seq_no for b in inc.batches["a"]] == [2]  # only what is new
    for batch in inc.batches["a"]:
        index.apply("a", batch)
    assert index.matches(k) == {"a": 2} and hub.poll(index.cursors()).batches == {}
    # a gap in the replica's pushes: keys kept, the engine asked for a snapshot
    assert hub.push("a", [KVEventBatch("e1", 5, (k[4],), ())])
    assert not hub.push("a", [snap("e1", 6, k[:5])])
    # a restart: a new epoch clears the mirror; a poller gets a snapshot of it
    hub.push("a", [snap("e2", 0, [])])
    again = hub.poll(index.cursors())
    for batch in again.batches["a"]:
        index.apply("a", batch)
    assert index.matches(k) == {}
    clock.now = 20.0  # silent for longer than forget_after_s
    assert hub.poll({}).replicas == ()


def test_pusher_sends_heartbeats_and_asks_for_snapshots() -> None:
    sent: list[tuple[str, list[KVEventBatch]]] = []
    snapshots: list[int] = []
    pending = [[snap("e", 0, [])], [], []]

    async def send(replica: str, batches: list[KVEventBatch]) -> bool:
        sent.append((replica, batches))
        return len(sent) == 1  # the hub wants a snapshot after the first push

    pusher = KVEventPusher(
        "r1",
        lambda: pending.pop(0) if pending else [],
        lambda: snapshots.append(1),
        send,
        heartbeat_s=0.0,
    )

    async def main() -> None:
        for _ in range(3):
            await pusher.push_once()

    asyncio.run(main())
    assert [len(b) for _, b in sent] == [1, 0, 0] and snapshots == [1]


@dataclass(frozen=True)
class FakeId:
    unique_id: str


@dataclass(frozen=True)
class FakeReplica:
    replica_id: FakeId
    max_ongoing_requests: int = 100


@dataclass
class FakeMeta:
    internal_request_id: str


@dataclass
class FakePending:
    args: list[object]
    metadata: FakeMeta


def test_serve_router_ranks_the_replica_holding_the_prefix_first() -> None:
    router = PrefixAwareRequestRouter(DeploymentID("tier-t", "app"), DeploymentHandleSource.UNKNOWN)
    router.initialize_state(tier="t", block_size=16)
    replicas = [FakeReplica(FakeId(f"r{i}")) for i in range(3)]
    prompt = tuple(range(3, 3 + 16 * 8 + 5))  # 8 full blocks and 5 tokens
    held = SPACE.keys("", hash_blocks(list(prompt), 16, root=root_hash("")))
    for r in replicas:
        router.router.add_replica(r.replica_id.unique_id)
    router._apply(HubUpdate({"r2": [snap("e", 0, held)]}, ("model", LAYOUT), ("r2",)))
    request = TierRequest("q", SamplingParams(max_tokens=4), token_ids=prompt)

    async def choose(rid: str) -> list[list[FakeReplica]]:
        pending = FakePending([request], FakeMeta(rid))
        ranked = await router.choose_replicas(replicas, pending)  # type: ignore[arg-type]
        if router._poller is not None:
            router._poller.cancel()
        return ranked  # type: ignore[return-value]

    ranked = asyncio.run(choose("q1"))
    assert ranked[0] == [replicas[2]] and set(ranked[1]) == {replicas[0], replicas[1]}
    assert router._choices["q1"].cached_tokens == 128
    router.on_request_completed(replicas[2].replica_id, "q1")  # type: ignore[arg-type]
    assert router.router.queued["r2"] == 0
    # another tenant's identical prompt finds nothing: routed by load
    other = TierRequest("o", SamplingParams(max_tokens=4), token_ids=prompt, cache_salt="b")
    request = other
    asyncio.run(choose("q2"))
    assert router._choices["q2"].cached_tokens == 0
