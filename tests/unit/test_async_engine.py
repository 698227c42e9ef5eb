"""What only the in-process transport can show (its engine is reachable from the test): a
row failing inside a patched step, a step that raises, and shutdown freeing every block.
The contract both transports share is ``test_engine_transports``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, TokenEvent
from cluster.engine.streams import EngineStoppedError, RequestFailedError
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.checkpoints import build_family_checkpoint
from tests.engine_runs import collect, random_request, run_to_end
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


@pytest.mark.parametrize("how", ["nan", "raise"])
def test_a_failing_row_fails_its_stream_alone(
    engine: AsyncEngine, model: MoEModel, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    others = [random_request("p" * (i + 1), n=10 + i) for i in range(3)]
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
        streams = [collect(engine, r) for r in others]
        seen, *rest = await asyncio.gather(failing(), *streams)
        return seen, rest

    seen, rest = asyncio.run(asyncio.wait_for(main(), 60))
    assert [e.index for e in seen] == [0, 1, 2]
    for request, events in zip(others, rest, strict=True):
        alone = run_to_end(LLMEngine(model, EngineConfig(num_blocks=64)), [request])
        assert [e.token_id for e in events] == [e.token_id for e in alone[request.request_id]]
    assert engine.is_alive()
    assert len(asyncio.run(collect(engine, random_request("after", n=4)))) == 4
    assert engine.engine.blocks.num_held == 0 and not engine.engine.samplers


def test_shutdown_aborts_every_request_and_frees_its_blocks(model: MoEModel) -> None:
    async_engine = AsyncEngine(LLMEngine(model, EngineConfig(num_blocks=64)))

    async def main() -> None:
        streams = [async_engine.generate(random_request(f"long{i}", n=400)) for i in range(3)]
        for stream in streams:
            assert (await anext(stream)).index == 0
        await asyncio.to_thread(async_engine.shutdown)
        for stream in streams:  # after the tokens that came before the shutdown
            with pytest.raises(EngineStoppedError, match="shut down"):
                async for _ in stream:
                    pass

    asyncio.run(main())
    assert async_engine.engine.blocks.num_held == 0 and async_engine.engine.num_requests == 0


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
            await collect(async_engine, random_request("first"))
        for i in range(3):  # a hang guard, not a timing assertion: each is refused at once
            with pytest.raises(EngineStoppedError, match="injected step failure"):
                await asyncio.wait_for(collect(async_engine, random_request(f"later{i}")), 10)

    try:
        asyncio.run(main())
        assert not async_engine.is_alive()
    finally:
        async_engine.shutdown()
