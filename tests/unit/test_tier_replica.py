"""The tier replica without Ray: acceptance, streamed token items, stream_interval and its
adaptation to the number of open streams, and refusals when its engine stops or fails one
request."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.config import EngineConfig
from cluster.engine.engine_process import EngineProcess
from cluster.engine.requests import TokenEvent
from cluster.serving.tier_messages import TierItem, TierRejected, TierRequest, TierTokens
from cluster.serving.tier_replica import TierReplica, stream_interval_for
from experts.sampling_params import SamplingParams
from tests.checkpoints import build_family_checkpoint
from tests.failing_rows import POISONED_TOKEN, poison_token_embedding

PROMPT = (5, 6, 7, 8, 9)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint("mixtral", tmp_path_factory.mktemp("replica") / "m", seed=5)


@pytest.fixture
def replica(model_dir: Path, request: pytest.FixtureRequest) -> Iterator[TierReplica]:
    # param: stream_interval, or (stream_interval, engine_process)
    param = getattr(request, "param", 1)
    interval, engine_process = param if isinstance(param, tuple) else (param, False)
    replica = TierReplica(
        "t",
        model_dir,
        EngineConfig(num_blocks=32),
        stream_interval=interval,
        engine_process=engine_process,
    )
    yield replica
    replica.shutdown()


def _items(replica: TierReplica, max_tokens: int, **fields: object) -> list[TierItem]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    fields = {"token_ids": PROMPT} | fields
    request = TierRequest("r", params, **fields)  # type: ignore[arg-type]

    async def collect() -> list[TierItem]:
        return [item async for item in replica.generate(request)]

    return asyncio.run(collect())


@pytest.mark.parametrize("replica", [1, 4, (1, True)], indirect=True)
def test_items_carry_every_token_once_in_order(replica: TierReplica) -> None:
    items = _items(replica, 11)
    batches = [i for i in items if isinstance(i, TierTokens)]
    assert len(batches) == len(items)  # no separate acceptance item: the first batch is it
    assert batches[0].num_prompt_tokens == len(PROMPT)
    ids = [t for b in batches for t in b.token_ids]
    assert len(ids) == 11
    assert [b.finish_reason for b in batches] == [None] * (len(batches) - 1) + ["length"]
    assert batches[0].queue_s is not None and batches[0].queue_s >= 0


@pytest.mark.parametrize("replica", [4], indirect=True)
def test_stream_interval_sends_the_first_token_at_once_then_groups(
    replica: TierReplica,
) -> None:
    batches = [i for i in _items(replica, 11) if isinstance(i, TierTokens)]
    # the first item is whatever was ready when the first token came: usually just it
    assert 1 <= len(batches[0].token_ids) < 4 or len(batches) == 1
    assert all(len(b.token_ids) >= 4 for b in batches[1:-1])
    assert len(batches) <= 1 + -(-10 // 4)


@pytest.mark.parametrize("replica", [1, (1, True)], indirect=True)
def test_bad_request_is_rejected_before_acceptance(replica: TierReplica) -> None:
    items = _items(replica, 1, token_ids=(10**6,))
    assert isinstance(items[0], TierRejected) and items[0].code == "invalid_argument"
    assert len(items) == 1


def test_stream_interval_must_be_positive(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="stream_interval=0"):
        TierReplica("t", model_dir, EngineConfig(num_blocks=8), stream_interval=0)


def test_stream_interval_for_grows_with_the_open_streams() -> None:
    assert stream_interval_for(1, 1, 4) == 1
    assert stream_interval_for(4, 1, 4) == 1
    assert stream_interval_for(5, 1, 4) == 2
    assert stream_interval_for(32, 1, 4) == 8
    assert stream_interval_for(32, 16, 4) == 16  # never below the tier's stream_interval
    assert stream_interval_for(32, 2, 0) == 2  # 0: no adaptation


@pytest.mark.parametrize("engine_process", [False, True])
def test_concurrent_streams_get_bigger_items_and_every_token(
    model_dir: Path, engine_process: bool
) -> None:
    replica = TierReplica(
        "t",
        model_dir,
        EngineConfig(num_blocks=64),
        stream_items_per_step=1,
        engine_process=engine_process,
    )
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    async def collect(i: int) -> list[TierItem]:
        request = TierRequest(f"r{i}", params, token_ids=PROMPT)
        return [item async for item in replica.generate(request)]

    async def run() -> list[list[TierItem]]:
        return list(await asyncio.gather(*(collect(i) for i in range(4))))

    try:
        results = asyncio.run(run())
        stats = replica.stats()
    finally:
        replica.shutdown()
    assert replica.num_streams == 0
    assert stats.num_blocks == 64 and stats.num_steps >= 12
    assert stats.num_prompt_tokens_computed >= len(PROMPT)
    for items in results:
        batches = [i for i in items if isinstance(i, TierTokens)]
        assert sum(len(b.token_ids) for b in batches) == 12
        assert batches[-1].finish_reason == "length"
        # 4 streams, 1 item per step: the middle items hold up to 4 tokens each, so a
        # stream sends fewer items than tokens
        assert len(batches) < 12, [len(b.token_ids) for b in batches]


def test_stream_items_per_step_must_not_be_negative(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="stream_items_per_step=-1"):
        TierReplica("t", model_dir, EngineConfig(num_blocks=8), stream_items_per_step=-1)


def test_an_engine_process_cannot_use_a_shard_pool(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="cannot reach a shard pool"):
        TierReplica(
            "t", model_dir, EngineConfig(num_blocks=8), experts=object(), engine_process=True
        )  # type: ignore[arg-type]


@pytest.mark.parametrize("engine_process", [False, True])
def test_an_engine_that_stops_ends_streams_with_unavailable(
    model_dir: Path, engine_process: bool
) -> None:
    """Mid-stream and for later requests: a refusal the gateway maps to UNAVAILABLE, never
    a hang or a bare exception."""
    replica = TierReplica(
        "t", model_dir, EngineConfig(num_blocks=64), engine_process=engine_process
    )
    params = SamplingParams(max_tokens=400, ignore_eos=True)

    async def main() -> tuple[TierItem, list[TierItem]]:
        stream = replica.generate(TierRequest("long", params, token_ids=PROMPT))
        assert isinstance(await anext(stream), TierTokens)
        engine = replica.engine
        if isinstance(engine, EngineProcess):
            os.kill(engine.pid, signal.SIGKILL)  # the child dies
        else:
            await asyncio.to_thread(engine.shutdown)
        last = [item async for item in stream][-1]
        later = TierRequest("later", params, token_ids=PROMPT)
        return last, [item async for item in replica.generate(later)]

    try:
        last, later = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        replica.shutdown()
    for item in (last, *later):
        assert isinstance(item, TierRejected) and item.code == "unavailable", item
        assert "stopped generating" in item.message
    assert len(later) == 1 and replica.num_aborted == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_crashed_in_process_engine_refuses_new_requests_at_once(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replica = TierReplica("t", model_dir, EngineConfig(num_blocks=32))
    assert isinstance(replica.engine, AsyncEngine)

    def broken_step() -> list[TokenEvent]:
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(replica.engine.engine, "step", broken_step)
    params = SamplingParams(max_tokens=5, ignore_eos=True)

    async def collect(rid: str) -> list[TierItem]:
        request = TierRequest(rid, params, token_ids=PROMPT)
        return [item async for item in replica.generate(request)]

    async def main() -> list[list[TierItem]]:
        first = await asyncio.wait_for(collect("first"), 30)  # its step raised
        # a hang guard, not a timing assertion: later requests are refused at once
        return [first] + [await asyncio.wait_for(collect(f"later{i}"), 10) for i in range(3)]

    try:
        results = asyncio.run(main())
        assert not replica.engine.is_alive()
    finally:
        replica.shutdown()
    for items in results:
        assert len(items) == 1 and isinstance(items[0], TierRejected), items
        assert items[0].code == "unavailable" and "injected step failure" in items[0].message


@pytest.fixture(scope="module")
def poisoned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_family_checkpoint("mixtral", tmp_path_factory.mktemp("poisoned") / "m", seed=5)
    poison_token_embedding(path)
    return path


@pytest.mark.parametrize("engine_process", [False, True])
def test_a_request_the_engine_fails_is_refused_alone(
    poisoned_dir: Path, engine_process: bool
) -> None:
    """NaN logits for one request (a poisoned token in its prompt), subnormal temperatures for
    others: the first is refused with UNAVAILABLE, the rest finish, and the tier serves on."""
    replica = TierReplica(
        "t", poisoned_dir, EngineConfig(num_blocks=64), engine_process=engine_process
    )
    greedy = SamplingParams(max_tokens=9, ignore_eos=True)
    requests = [
        TierRequest("bad", greedy, token_ids=(5, POISONED_TOKEN, 7)),
        TierRequest("greedy", greedy, token_ids=PROMPT),
        *(
            TierRequest(f"tiny{t}", replace(greedy, temperature=t, seed=2), token_ids=PROMPT)
            for t in (1e-38, 1e-45, 5e-324)
        ),
    ]

    async def collect(request: TierRequest) -> list[TierItem]:
        return [item async for item in replica.generate(request)]

    async def main() -> list[list[TierItem]]:
        return list(await asyncio.wait_for(asyncio.gather(*map(collect, requests)), 60))

    def tokens(items: list[TierItem]) -> list[int]:
        return [t for item in items if isinstance(item, TierTokens) for t in item.token_ids]

    try:
        bad, *rest = asyncio.run(main())
        again = asyncio.run(main())  # the tier serves on, the same way
    finally:
        replica.shutdown()
    assert len(bad) == 1 and isinstance(bad[0], TierRejected) and bad[0].code == "unavailable"
    assert "failed this request" in bad[0].message and "not finite" in bad[0].message
    greedy_tokens = tokens(rest[0])
    assert len(greedy_tokens) == 9
    assert all(tokens(items) == greedy_tokens for items in rest), rest  # tiny: greedy
    assert again[0] == bad
    assert [tokens(items) for items in again[1:]] == [greedy_tokens] * 4, again


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deploy.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo") / "fast", "fast")


def _prompt_items(replica: TierReplica, prompt: str) -> list[TierItem]:
    request = TierRequest("p", SamplingParams(max_tokens=1), prompt=prompt)

    async def collect() -> list[TierItem]:
        return [item async for item in replica.generate(request)]

    return asyncio.run(collect())


def test_a_prompt_too_long_for_the_context_is_refused_untokenized(
    demo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 MiB prompt took 1-5 s to tokenize on the replica's event loop before the context
    check refused it; now its size alone refuses it."""
    replica = TierReplica("t", demo_dir, EngineConfig(num_blocks=32))
    try:
        assert replica.tokenizer is not None
        bound = replica.max_prompt_bytes
        assert bound >= replica.engine.spec.max_position_embeddings
        calls: list[str] = []
        tokenizer = replica.tokenizer

        class Spy:
            def encode(self, text: str) -> object:
                calls.append("encode")
                return tokenizer.encode(text)

            def encode_batch(self, texts: list[str]) -> object:
                calls.append("encode_batch")
                return tokenizer.encode_batch(texts)

        monkeypatch.setattr(replica, "tokenizer", Spy())
        for prompt in ("x" * 2**20, "é" * (bound // 2 + 1)):  # over in characters, in bytes
            [item] = _prompt_items(replica, prompt)
            assert isinstance(item, TierRejected) and item.code == "invalid_argument"
            assert f"over {bound} bytes" in item.message and len(item.message) < 200
        assert calls == []  # never tokenized
        # a long prompt within the bound is tokenized off the event loop (GIL released)
        [item] = _prompt_items(replica, "ab " * (bound // 3))
        assert calls == ["encode_batch"]
        assert isinstance(item, TierRejected) and "context" in item.message
    finally:
        replica.shutdown()


def test_a_request_that_waited_too_long_for_the_replica_is_shed(model_dir: Path) -> None:
    """Under overload a request that sat in the tier's queue past ``max_queue_wait_s`` is
    refused on arrival (RESOURCE_EXHAUSTED), so admitted requests are never served late."""
    import time

    replica = TierReplica("t", model_dir, EngineConfig(num_blocks=32), max_queue_wait_s=1.0)
    try:
        params = SamplingParams(max_tokens=2, ignore_eos=True)

        def first(sent_at: float) -> TierItem:
            request = TierRequest("w", params, token_ids=PROMPT, sent_at=sent_at)

            async def collect() -> list[TierItem]:
                return [item async for item in replica.generate(request)]

            return asyncio.run(collect())[0]

        stale = first(time.time() - 5.0)
        assert isinstance(stale, TierRejected) and stale.code == "resource_exhausted"
        assert "max_queue_wait_s 1" in stale.message
        assert isinstance(first(time.time()), TierTokens)  # fresh
        assert isinstance(first(0.0), TierTokens)  # no stamp: never shed
        assert replica.stats().num_blocks_held == 0
    finally:
        replica.shutdown()
