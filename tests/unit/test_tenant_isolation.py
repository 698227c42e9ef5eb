"""Tenant isolation of the prefix cache: a tenant's cache salt starts its chain of block hashes,
so another tenant never reuses its full or partial blocks, and ``num_cached_prompt_tokens``
(or the time a prefill takes) tells nothing about what another tenant sent."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache.block_manager import BlockManager
from cache.kv_policy import KVPolicy
from cache.partial_blocks import PartialBlocks
from cache.prefix_hash import hash_block, hash_blocks, root_hash
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import MAX_CACHE_SALT_CHARS, EngineRequest, TokenEvent
from cluster.engine.sequence import Sequence
from cluster.serving.tier_messages import TierItem, TierRejected, TierRequest, TierTokens
from cluster.serving.tier_replica import TierReplica
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.checkpoints import BuildCheckpoint, build_family_checkpoint
from tests.scheduler_harness import BS as HARNESS_BS
from tests.scheduler_harness import Harness
from tests.unit.kv_checks import check_partition

BS = 16
# A's prompt: one full block and 8 tokens; after 2 generated tokens A has computed 25
# positions, so its cache holds block 0 full and positions 16..24 as a partial tail
PROMPT_A = [7 + (i * 37) % 200 for i in range(24)]
RIGHT_GUESS = [*PROMPT_A[:20], PROMPT_A[20], 3]  # a 20-token prefix, the next token guessed
WRONG_GUESS = [*PROMPT_A[:20], PROMPT_A[20] + 1, 3]
# what the cache would give any request for them after A's run (one token is always computed):
# 16 from the full block, then as many tail slots as agree
PROBES = {"same": (PROMPT_A, 23), "right": (RIGHT_GUESS, 21), "wrong": (WRONG_GUESS, 20)}


# --- hashing -------------------------------------------------------------------------------------


def test_the_empty_salt_keeps_the_unsalted_chain() -> None:
    ids = list(range(3, 3 + 40))
    assert root_hash("") is None and root_hash(b"") is None
    assert hash_blocks(ids, BS) == hash_blocks(ids, BS, root=root_hash(""))
    assert hash_blocks(ids, BS)[0] == hash_block(None, ids[:BS])


def test_salts_start_distinct_chains_that_never_share_a_block_name() -> None:
    ids = list(range(3, 3 + 48))
    roots = [root_hash(s) for s in ("", "tenant-a", "tenant-b", "tenant-a ")]
    assert len(set(roots)) == 4
    for root in roots[1:]:
        assert root is not None and 0 <= root < 2**64
    chains = [hash_blocks(ids, BS, root=r) for r in roots]
    for i, chain in enumerate(chains):
        assert chain[0] == hash_block(roots[i], ids[:BS])
        for other in chains[i + 1 :]:
            assert not set(chain) & set(other)  # not one block named alike, at any depth


def test_root_hash_is_stable_and_takes_str_or_bytes() -> None:
    assert root_hash("tenant-a") == root_hash("tenant-a") == root_hash(b"tenant-a")
    assert root_hash("t\u00e9nant") == root_hash("t\u00e9nant".encode())
    # a lone surrogate cannot be encoded strictly; it must still name a root, not raise
    assert root_hash("\ud800") not in (None, root_hash("?"))
    # a salt is not a block: its root differs from the hash of any block under the root
    assert root_hash("x") != hash_block(None, [ord("x")])


def test_a_sequence_carries_its_tenants_root() -> None:
    params, policy = SamplingParams(max_tokens=1), KVPolicy()
    assert Sequence("r", [1], params, policy, 0.0).root_hash is None
    salted = Sequence("r", [1], params, policy, 0.0, cache_salt="tenant-a")
    assert salted.root_hash == root_hash("tenant-a")


# --- block bookkeeping ---------------------------------------------------------------------------


def test_partial_entries_are_keyed_by_the_tenants_root() -> None:
    index = PartialBlocks()
    a, b = root_hash("tenant-a"), root_hash("tenant-b")
    index.add(5, a, [20, 21, 22])
    index.add(6, None, [20, 21])
    assert index.longest_match(a, [20, 21, 22, 23], 3) == (5, 3)
    assert index.longest_match(b, [20, 21, 22, 23], 3) is None
    assert index.longest_match(None, [20, 21, 22, 23], 3) == (6, 2)
    assert index.covering(b, [20, 21]) == ([], [])
    assert index.covering(a, [20, 21]) == ([5], [])
    assert index.entry(5) == (a, (20, 21, 22))


def test_the_block_manager_matches_full_and_partial_blocks_within_a_tenant_only() -> None:
    bs = 4
    manager = BlockManager(num_blocks=8, block_size=bs)
    a, b = root_hash("tenant-a"), root_hash("tenant-b")
    ids = [10, 11, 12, 13, 14, 15, 16, 17, 20, 21]
    blocks = manager.allocate(3)
    hashes = hash_blocks(ids, bs, root=a)
    for block, block_hash in zip(blocks, hashes, strict=False):
        manager.register(block, block_hash)
    manager.release_partial(blocks[2], hashes[-1], ids[8:])
    manager.free(blocks[:2])
    assert manager.match_prefix(ids, 2, a) == (blocks[:2], hashes)
    assert manager.match_prefix(ids, 2, b) == ([], [])
    assert manager.match_prefix(ids, 2) == ([], [])  # the default tenant is a tenant too
    assert manager.match_partial(hashes[-1], [20, 21], 3) == (blocks[2], 2)
    # a first partial block: keyed by the root, so another tenant's start finds nothing
    head = manager.allocate(1)[0]
    manager.release_partial(head, a, [30, 31])
    assert manager.match_partial(a, [30, 31, 32], 3) == (head, 2)
    assert manager.match_partial(b, [30, 31, 32], 3) is None
    assert manager.match_partial(None, [30, 31, 32], 3) is None
    check_partition(manager)


def _harness_seq(request_id: str, prompt: list[int], salt: str) -> Sequence:
    params = SamplingParams(max_tokens=2)
    return Sequence(request_id, prompt, params, KVPolicy(), 0.0, cache_salt=salt)


def test_the_scheduler_admits_another_tenant_with_nothing_cached() -> None:
    h = Harness(num_blocks=16)
    prompt = list(range(3, 3 + 3 * HARNESS_BS + 2))  # full blocks and a partial tail
    h.add(_harness_seq("a1", prompt, "tenant-a"))
    h.run_until_done()
    assert h.blocks.num_cached_partial == 1
    b = _harness_seq("b", prompt, "tenant-b")
    h.add(b)
    out = h.step()
    assert b.num_cached_prompt_tokens == 0 and not out.copies
    h.run_until_done()
    a2 = _harness_seq("a2", prompt, "tenant-a")
    h.add(a2)
    out = h.step()
    assert a2.num_cached_prompt_tokens == len(prompt) - 1 and len(out.copies) == 1
    h.run_until_done()


# --- a real engine -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(shared_checkpoint: BuildCheckpoint) -> Path:
    return shared_checkpoint("mixtral", seed=4)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> MoEModel:
    return MoEModel.from_checkpoint(model_dir)


def _run(engine: LLMEngine, request_id: str, prompt: list[int], salt: str) -> list[TokenEvent]:
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    engine.add_request(EngineRequest(request_id, prompt, params, cache_salt=salt))
    events: list[TokenEvent] = []
    while engine.has_unfinished():
        events.extend(engine.step())
    assert engine.blocks.num_held == 0, "blocks leaked"
    check_partition(engine.blocks)
    return events


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_another_tenant_learns_nothing_from_the_cache_and_a_tenant_keeps_its_own(
    model: MoEModel, probe: str
) -> None:
    prompt, _ = PROBES[probe]
    engine = LLMEngine(model, EngineConfig(block_size=BS, num_blocks=32))
    first = _run(engine, "a1", PROMPT_A, "tenant-a")
    assert first[0].num_cached_prompt_tokens == 0
    before = engine.num_prompt_tokens_computed
    other = _run(engine, "b", prompt, "tenant-b")
    assert [e.num_cached_prompt_tokens for e in other] == [0, 0]
    assert engine.num_prompt_tokens_computed - before == len(prompt)  # no shared compute either
    if probe == "same":  # same tokens, computed from scratch
        assert [e.token_id for e in other] == [e.token_id for e in first]
    # A's own repeat still reuses its full block and its partial tail, B's run notwithstanding
    again = _run(engine, "a2", PROMPT_A, "tenant-a")
    assert again[0].num_cached_prompt_tokens == PROBES["same"][1]
    assert [e.token_id for e in again] == [e.token_id for e in first]


@pytest.mark.parametrize("salt", ["", "tenant-a"])
@pytest.mark.parametrize("probe", sorted(PROBES))
def test_the_same_salt_reuses_full_blocks_and_partial_tails(
    model: MoEModel, salt: str, probe: str
) -> None:
    prompt, cached = PROBES[probe]
    engine = LLMEngine(model, EngineConfig(block_size=BS, num_blocks=32))
    _run(engine, "first", PROMPT_A, salt)
    second = _run(engine, "second", prompt, salt)
    assert second[0].num_cached_prompt_tokens == cached


def test_the_cache_salt_has_a_bounded_length() -> None:
    EngineRequest("ok", [1], cache_salt="s" * MAX_CACHE_SALT_CHARS)
    too_long = "s" * (MAX_CACHE_SALT_CHARS + 1)
    with pytest.raises(ValueError, match=r"cache_salt of 129 characters .* <= 128"):
        EngineRequest("bad", [1], cache_salt=too_long)


# --- through a tier replica (both engine layouts) ------------------------------------------------


@pytest.fixture(params=[False, True], ids=["in_process", "engine_process"])
def replica(model_dir: Path, request: pytest.FixtureRequest) -> Iterator[TierReplica]:
    replica = TierReplica(
        "t", model_dir, EngineConfig(block_size=BS, num_blocks=32), engine_process=request.param
    )
    yield replica
    replica.shutdown()


def _generate(replica: TierReplica, request_id: str, prompt: list[int], salt: str) -> TierItem:
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    request = TierRequest(request_id, params, token_ids=tuple(prompt), cache_salt=salt)

    async def first() -> TierItem:
        items = [item async for item in replica.generate(request)]
        return items[0]

    return asyncio.run(first())


def test_a_tier_replica_passes_the_salt_to_its_engine(replica: TierReplica) -> None:
    def cached(request_id: str, prompt: list[int], salt: str) -> int:
        item = _generate(replica, request_id, prompt, salt)
        assert isinstance(item, TierTokens), item
        return item.num_cached_prompt_tokens

    assert cached("a1", PROMPT_A, "tenant-a") == 0
    assert cached("b1", RIGHT_GUESS, "tenant-b") == 0
    assert cached("c1", PROMPT_A, "tenant-c") == 0
    assert cached("a2", PROMPT_A, "tenant-a") == PROBES["same"][1]
    rejected = _generate(replica, "c", PROMPT_A, "s" * (MAX_CACHE_SALT_CHARS + 1))
    assert isinstance(rejected, TierRejected) and rejected.code == "invalid_argument"
    assert "cache_salt" in rejected.message


# --- through the gateway, with two API keys ----------------------------------------------------


def test_two_api_keys_are_two_tenants_through_the_gateway(tmp_path: Path) -> None:
    """The gateway salts each request with its key's tenant id: other keys learn nothing from
    the cache of key A's prompt, while A's own repeats are served from it."""
    from cluster.serving.tier_client import InProcessTierClient
    from deploy.config import parse_config
    from deploy.gateway import Gateway
    from deploy.proto import moecluster_v1_pb2 as pb

    model_dir = build_family_checkpoint("llama", tmp_path / "m", seed=3)
    config = parse_config(
        {
            "auth": {"api_keys": ["key-a", *(f"key-{p}" for p in PROBES)], "api_keys_env": None},
            "tiers": [{"name": "t", "model": str(model_dir)}],
            "policy": {"default_tier": "t", "cascade": {"enabled": False}},
        },
        base_dir=tmp_path,
    )
    replica = TierReplica("t", model_dir, EngineConfig(block_size=BS, num_blocks=64))
    gateway = Gateway(config, InProcessTierClient({"t": replica}))

    def cached(key: str, ids: list[int]) -> int:
        request = pb.GenerateRequest(token_ids=ids, max_tokens=2, ignore_eos=True)
        metadata = {"authorization": f"Bearer {key}"}

        async def run() -> int:
            chunks = [c async for c in gateway.generate(request, metadata)]
            return int(chunks[-1].usage.cached_prompt_tokens)

        return asyncio.run(run())

    try:
        assert cached("key-a", PROMPT_A) == 0
        for probe, (ids, _) in PROBES.items():  # a tenant per probe: none sees its own
            assert cached(f"key-{probe}", ids) == 0  # the oracle gives nothing
        for ids, expected in PROBES.values():
            assert cached("key-a", ids) == expected  # A's own cache still serves A
    finally:
        replica.shutdown()
