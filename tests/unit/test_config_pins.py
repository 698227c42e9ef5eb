"""Config-file pins across engine, events and router: ``tiers[].engine.pinned_prefixes`` is
bounded (count, length, share of the cache), an engine computes and pins each prefix at
start, its KV events carry the pin, the index and the hub keep it, and the router prefers a
replica holding pinned blocks (soft: in the cost's unit and under its load bound)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cache.block_key import KeySpace, KVLayout, model_fingerprint
from cache.prefix_hash import hash_blocks, root_hash
from cluster.engine.config import MAX_CONFIG_PINS, EngineConfig, PinnedPrefix
from cluster.engine.config_pins import PIN_REQUEST_PREFIX, pin_config_prefixes, pin_requests
from cluster.engine.kv_events import KVEventBatch, KVEventLog
from cluster.engine.llm_engine import LLMEngine
from cluster.kv_store.config import KVStoreConfig
from cluster.kv_store.event_hub import KVEventHub
from deploy.config import ConfigError, parse_config
from experts.model import MoEModel
from router.prefix_index import PrefixIndex
from router.prefix_router import PrefixRouter, PrefixRouterConfig
from tests.checkpoints import BuildCheckpoint

BS = 16
SPACE = KeySpace("m", KVLayout("float32", 1, 1, 4, BS))
SYSTEM = [5 + (i * 37) % 200 for i in range(48)]  # three full blocks


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Batch:
    epoch: str
    seq_no: int
    stored: tuple[bytes, ...] = ()
    removed: tuple[bytes, ...] = ()
    snapshot: bool = False
    pinned: tuple[tuple[bytes, float], ...] = ()


def keys(n: int, start: int = 0, salt: str = "") -> list[bytes]:
    ids = list(range(start, start + BS * n))
    return SPACE.keys(salt, hash_blocks(ids, BS, root=root_hash(salt)))


# --- config -------------------------------------------------------------------------------------


def tiers(engine: dict[str, Any]) -> dict[str, Any]:
    fast = {"name": "fast", "model": "/m", "engine": engine}
    return {"tiers": [fast, {"name": "strong", "model": "/s"}]}


def test_config_pins_are_bounded_with_the_field_named() -> None:
    config = parse_config(
        tiers({"pinned_prefixes": [{"text": "You are a helpful assistant.", "ttl_s": 600}]}),
        Path("."),
    )
    assert config.tiers[0].engine.pinned_prefixes == (
        PinnedPrefix(text="You are a helpful assistant.", ttl_s=600.0),
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"pinned_prefixes": [{"text": "a", "token_ids": [1]}]}, "exactly one of 'text'"),
        ({"pinned_prefixes": [{"token_ids": [1], "ttl_s": 0}]}, "ttl_s=0.0 is out of range"),
        ({"pinned_prefixes": [{"token_ids": list(range(8193))}]}, "allowed at most 8192"),
        ({"pinned_prefixes": [{"text": "x"}] * (MAX_CONFIG_PINS + 1)}, "allowed at most 16"),
        (
            {"num_blocks": 8, "pinned_prefixes": [{"token_ids": list(range(64))}]},
            "pinned_prefixes=4 blocks is out of range: allowed at most 2",
        ),
        (
            {"enable_prefix_caching": False, "pinned_prefixes": [{"text": "x"}]},
            "need enable_prefix_caching",
        ),
    ]
    for engine, message in cases:
        with pytest.raises(ConfigError, match=r"tiers\.0\.engine\.pinned_prefixes") as info:
            parse_config(tiers(engine), Path("."))
        assert message in str(info.value), str(info.value)


def test_pin_requests_need_a_tokenizer_for_text() -> None:
    (request,) = pin_requests([PinnedPrefix(token_ids=(1, 2, 3), ttl_s=60, tenant="t")], None)
    assert request.request_id == f"{PIN_REQUEST_PREFIX}0" and list(request.prompt_ids) == [1, 2, 3]
    assert (request.pin_tokens, request.pin_ttl_s, request.cache_salt) == (3, 60.0, "t")
    assert request.params.max_tokens == 1
    with pytest.raises(ValueError, match=r"pinned_prefixes\[0\].text needs the model's tokenizer"):
        pin_requests([PinnedPrefix(text="hello")], None)


# --- engine -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def path(shared_checkpoint: BuildCheckpoint) -> Path:
    return shared_checkpoint("mixtral", seed=3)


def test_an_engine_pins_its_configured_prefix_and_announces_it(path: Path) -> None:
    model = MoEModel.from_checkpoint(path)
    pins = (PinnedPrefix(token_ids=tuple(SYSTEM), ttl_s=600),)
    engine = LLMEngine(model, EngineConfig(block_size=BS, num_blocks=64, pinned_prefixes=pins))
    engine.attach_kv(model_fingerprint(path), None, KVStoreConfig(enabled=True))
    assert pin_config_prefixes(engine) == 1
    for _ in range(100):
        if not engine.has_unfinished():
            break
        engine.step()  # the pin request's token goes to nobody
    assert not engine.has_unfinished() and engine.blocks.num_held == 0
    hashes = hash_blocks(SYSTEM, BS, root=root_hash(""))
    assert len(hashes) == 3 and all(engine.blocks.pinned_until(h) > 0 for h in hashes)
    assert engine.kv is not None
    batches = []
    while (batch := engine.kv.take_events()) is not None:
        batches.append(batch)
    announced = {key for b in batches for key, left in b.pinned if left > 0}
    assert announced == set(engine.kv.keyspace.keys("", hashes))
    snapshot = engine.kv.snapshot()  # a router resyncing sees the pins too
    assert {k for k, _ in snapshot.pinned} == announced


# --- events, index, hub, router -----------------------------------------------------------------


def test_event_log_carries_pins_until_evicted_or_ended() -> None:
    clock = Clock()
    log = KVEventLog(SPACE, clock)
    log.take()  # the first (empty) snapshot
    log.stored("", [1, 2, 3], [30.0, 30.0, 0.0])
    batch = log.take()
    assert batch is not None and [left for _, left in batch.pinned] == [30.0, 30.0]
    clock.now = 10.0
    log.evicted([2])
    assert [left for _, left in log.snapshot().pinned] == [20.0]
    clock.now = 40.0  # the pin ended
    assert log.snapshot().pinned == ()


def test_index_keeps_pins_per_replica_until_they_end() -> None:
    clock = Clock()
    index = PrefixIndex(clock=clock)
    k = keys(4)
    index.apply("a", Batch("ea", 0, tuple(k), snapshot=True, pinned=((k[0], 10.0), (k[1], 10.0))))
    index.apply("b", Batch("eb", 0, tuple(k), snapshot=True, pinned=((k[1], 10.0),)))
    assert index.has_pins and index.pinned_prefix(k) == {"a": 2}  # b lacks the first pin
    index.apply("a", Batch("ea", 1, removed=(k[1],)))
    assert index.pinned_prefix(k) == {"a": 1}
    clock.now = 11.0
    assert index.pinned_prefix(k) == {}
    index.apply("a", Batch("ea", 2, snapshot=True))  # a snapshot without pins drops them
    index.remove_replica("b")
    assert not index.has_pins


def test_router_prefers_the_pinned_holder_within_the_load_bound() -> None:
    k = keys(10)

    def fresh() -> PrefixRouter:
        r = PrefixRouter(PrefixIndex(), PrefixRouterConfig(block_size=BS, slack_tokens=500))
        for name in ("r0", "r1"):
            r.add_replica(name)
        r.index.apply("r0", Batch("e0", 0, tuple(k), snapshot=True))
        pins = tuple((key, 60.0) for key in k[:8])
        r.index.apply("r1", Batch("e1", 0, tuple(k), snapshot=True, pinned=pins))
        return r

    r = fresh()
    r.queued.update({"r0": 0.0, "r1": 40.0})  # r1 a little busier, but it holds the pin
    assert r.choose(k, 170).replica == "r1"
    r = fresh()
    r.queued.update({"r0": 0.0, "r1": 100.0})  # 100 queued outweighs the pin's 64 tokens
    assert r.choose(k, 170).replica == "r0"
    r = fresh()
    r.queued.update({"r0": 0.0, "r1": 5000.0})  # past the load bound: the pin does not tie it
    assert r.choose(k, 170).replica == "r0"


def test_hub_snapshots_keep_the_pins() -> None:
    clock = Clock()
    hub = KVEventHub(clock=clock)
    k = keys(3)
    pins = ((k[0], 30.0),)
    hub.push("a", [KVEventBatch("ea", 0, tuple(k), (), True, (), None, pins)])
    clock.now = 10.0
    (snap,) = hub.poll({"a": ("old", 0)}).batches["a"]
    assert snap.snapshot and snap.pinned == ((k[0], 20.0),)
