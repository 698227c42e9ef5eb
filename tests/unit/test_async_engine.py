"""The async API: concurrent streams, cancellation, errors, a request failing alone,
shutdown, and a crashed loop refusing new requests at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import torch

from cluster.engine.async_engine import AsyncEngine, EngineStoppedError, RequestFailedError
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, TokenEvent
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.checkpoints import build_family_checkpoint
from tests.failing_rows import fail_row


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> MoEModel:
    path = build_family_checkpoint("mixtral", tmp_path_factory.mktemp("async") / "m", seed=4)
    return MoEModel.from_checkpoint(path)


@pytest.fixture
def engine(model: MoEModel) -> Iterator[AsyncEngine]:
    async_engine = AsyncEngine(LLMEngine(model, EngineConfig(num_blocks=64)))
    yield async_engine
    async_engine.shutdown()


def _request(rid: str, n: int = 12, length: int = 20) -> EngineRequest:
    prompt = torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(len(rid)))
    return EngineRequest(rid, prompt.tolist(), SamplingParams(max_tokens=n, ignore_eos=True))


async def _collect(engine: AsyncEngine, request: EngineRequest) -> list[TokenEvent]:
    return [event async for event in engine.generate(request)]


def _wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.engine.has_unfinished() or engine.engine.blocks.num_held:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.01)


def test_concurrent_streams_match_the_sync_engine(engine: AsyncEngine, model: MoEModel) -> None:
    requests = [_request("a" * (i + 1), n=8 + i) for i in range(4)]

    async def main() -> list[list[TokenEvent]]:
        return await asyncio.gather(*(_collect(engine, r) for r in requests))

    streams = asyncio.run(main())
    sync = LLMEngine(model, EngineConfig(num_blocks=64))
    for request in requests:
        sync.add_request(request)
    expected: dict[str, list[int]] = {r.request_id: [] for r in requests}
    while sync.has_unfinished():
        for event in sync.step():
            expected[event.request_id].append(event.token_id)
    for request, events in zip(requests, streams, strict=True):
        assert [e.token_id for e in events] == expected[request.request_id]
        assert [e.index for e in events] == list(range(len(events)))
        assert events[-1].finish_reason == "length"
        assert all(e.finish_reason is None for e in events[:-1])
    _wait_idle(engine)


def test_leaving_a_stream_early_aborts_and_frees_blocks(engine: AsyncEngine) -> None:
    async def main() -> tuple[int, list[TokenEvent]]:
        seen = 0
        async for _ in engine.generate(_request("leaver", n=200)):
            seen += 1
            if seen == 3:
                break
        other = await _collect(engine, _request("stayer", n=5))
        return seen, other

    seen, other = asyncio.run(main())
    assert seen == 3 and len(other) == 5
    _wait_idle(engine)


def test_cancelling_the_task_aborts(engine: AsyncEngine) -> None:
    async def main() -> None:
        task = asyncio.create_task(_collect(engine, _request("cancelled", n=400)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    _wait_idle(engine)


def test_bad_request_raises_in_the_stream(engine: AsyncEngine) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="prompt is empty"):
            await _collect(engine, EngineRequest("bad", []))

    asyncio.run(main())


def test_shutdown_fails_pending_streams(model: MoEModel) -> None:
    async_engine = AsyncEngine(LLMEngine(model, EngineConfig(num_blocks=64)))

    async def main() -> None:
        stream = async_engine.generate(_request("long", n=400))
        first = await anext(stream)
        assert first.index == 0
        async_engine.shutdown()
        with pytest.raises(EngineStoppedError, match="shut down"):
            async for _ in stream:
                pass

    asyncio.run(main())
    assert async_engine.engine.blocks.num_held == 0


def _solo(model: MoEModel, request: EngineRequest) -> list[int]:
    engine = LLMEngine(model, EngineConfig(num_blocks=64))
    engine.add_request(request)
    tokens = []
    while engine.has_unfinished():
        tokens += [e.token_id for e in engine.step()]
    return tokens


@pytest.mark.parametrize("how", ["nan", "raise"])
def test_a_failing_row_fails_its_stream_alone(
    engine: AsyncEngine, model: MoEModel, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    others = [_request("p" * (i + 1), n=10 + i) for i in range(3)]
    params = SamplingParams(max_tokens=50, temperature=0.9, seed=3, ignore_eos=True)
    bad = EngineRequest("bad", [9] * 25, params)
    fail_row(engine.engine, monkeypatch, "bad", after=3, how=how)

    async def failing() -> list[TokenEvent]:
        seen: list[TokenEvent] = []
        with pytest.raises(RequestFailedError, match=r"not finite|raised RuntimeError"):
            async for event in engine.generate(bad):
                seen.append(event)
        return seen

    async def main() -> tuple[list[TokenEvent], list[list[TokenEvent]]]:
        streams = [_collect(engine, r) for r in others]
        seen, *rest = await asyncio.gather(failing(), *streams)
        return seen, rest

    seen, rest = asyncio.run(asyncio.wait_for(main(), 60))
    assert [e.index for e in seen] == [0, 1, 2]
    for request, events in zip(others, rest, strict=True):
        assert [e.token_id for e in events] == _solo(model, request)
    assert engine.is_alive()
    assert len(asyncio.run(_collect(engine, _request("after", n=4)))) == 4
    _wait_idle(engine)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_crashed_loop_refuses_new_requests_at_once(
    model: MoEModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    async_engine = AsyncEngine(LLMEngine(model, EngineConfig(num_blocks=64)))

    def broken_step() -> list[TokenEvent]:
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(async_engine.engine, "step", broken_step)

    async def main() -> None:
        with pytest.raises(EngineStoppedError, match="injected step failure"):
            await _collect(async_engine, _request("first"))
        for i in range(3):  # a hang guard, not a timing assertion: each is refused at once
            with pytest.raises(EngineStoppedError, match="injected step failure"):
                await asyncio.wait_for(_collect(async_engine, _request(f"later{i}")), 10)

    try:
        asyncio.run(main())
        assert not async_engine.is_alive()
    finally:
        async_engine.shutdown()
