"""The engine in its own process: the same tokens as in-process, rejection, abort, routing
counts, a request failing alone, and what callers see when the child dies, fails to load,
or is shut down."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cluster.engine.async_engine import AsyncEngine, EngineStoppedError, RequestFailedError
from cluster.engine.config import EngineConfig
from cluster.engine.engine_process import EngineLaunch, EngineProcess
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, TokenEvent
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.checkpoints import build_family_checkpoint
from tests.failing_rows import POISONED_TOKEN, poison_token_embedding

CONFIG = EngineConfig(num_blocks=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint("mixtral", tmp_path_factory.mktemp("proc") / "m", seed=4)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[EngineProcess]:
    """One child for the module's tests that leave it healthy (each starts one otherwise)."""
    process = EngineProcess(EngineLaunch(str(model_dir), CONFIG, count_routing=True))
    yield process
    process.shutdown()


def _request(rid: str, n: int = 12, length: int = 20) -> EngineRequest:
    prompt = torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(len(rid)))
    return EngineRequest(rid, prompt.tolist(), SamplingParams(max_tokens=n, ignore_eos=True))


async def _collect(engine: EngineProcess | AsyncEngine, request: EngineRequest) -> list[TokenEvent]:
    return [event async for event in engine.generate(request)]


def _wait_idle(engine: EngineProcess, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        counters = engine.counters()
        if not (counters.num_running or counters.num_waiting or counters.num_blocks_held):
            return
        assert time.monotonic() < deadline, f"the engine did not go idle: {counters}"
        time.sleep(0.01)


def test_streams_match_the_in_process_engine(engine: EngineProcess, model_dir: Path) -> None:
    requests = [_request("m" * (i + 1), n=6 + i) for i in range(5)]

    async def main(core: EngineProcess | AsyncEngine) -> list[list[TokenEvent]]:
        return await asyncio.gather(*(_collect(core, r) for r in requests))

    theirs = asyncio.run(main(engine))
    local = AsyncEngine(LLMEngine(MoEModel.from_checkpoint(model_dir), CONFIG))
    try:
        ours = asyncio.run(main(local))
    finally:
        local.shutdown()
    for got, want in zip(theirs, ours, strict=True):
        assert [e.token_id for e in got] == [e.token_id for e in want]
        assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=1e-5)
        assert [e.index for e in got] == list(range(len(got)))
        assert got[-1].finish_reason == "length"
    assert engine.spec.architecture == MoEModel.from_checkpoint(model_dir).spec.architecture
    _wait_idle(engine)
    counters = engine.counters()
    assert counters.num_blocks == 64 and counters.num_steps > 0


def test_counters_are_current_when_the_last_stream_ends(engine: EngineProcess) -> None:
    # the step's counters land before its events: no wait for the reader thread
    for i in range(20):
        asyncio.run(_collect(engine, _request(f"c{i}", n=2)))
        counters = engine.counters()
        assert (counters.num_running, counters.num_waiting, counters.num_blocks_held) == (0, 0, 0)


def test_streams_on_two_event_loops_at_once(engine: EngineProcess) -> None:
    results: dict[str, list[TokenEvent]] = {}

    def caller(rid: str) -> None:
        results[rid] = asyncio.run(_collect(engine, _request(rid, n=10)))

    threads = [threading.Thread(target=caller, args=(rid,)) for rid in ("loop-a", "loop-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert {rid: len(events) for rid, events in results.items()} == {"loop-a": 10, "loop-b": 10}


def test_routing_counts_cross_over(engine: EngineProcess, model_dir: Path) -> None:
    engine.take_routed_counts()  # start afresh
    request = _request("routed", n=5, length=11)
    asyncio.run(_collect(engine, request))
    model = MoEModel.from_checkpoint(model_dir)
    local = LLMEngine(model, CONFIG)
    local.runner.count_routing = True
    local.add_request(request)
    while local.has_unfinished():
        local.step()
    want = local.runner.take_routed_counts()
    assert want and engine.take_routed_counts() == want
    assert engine.take_routed_counts() == {}


def test_a_request_the_child_refuses_raises_value_error(engine: EngineProcess) -> None:
    too_long = EngineRequest("long", [5] * 10, SamplingParams(max_tokens=10**6))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.validate(too_long)  # the replica checks before it sends...

    async def main() -> None:
        with pytest.raises(ValueError, match="exceeds the model's context"):
            await _collect(engine, too_long)  # ...and the child checks again

    asyncio.run(main())


def test_leaving_early_aborts_in_the_child_and_frees_blocks(engine: EngineProcess) -> None:
    engine.take_routed_counts()  # start afresh

    async def main() -> int:
        seen = 0
        async for _ in engine.generate(_request("leaver", n=300)):
            seen += 1
            if seen == 3:
                break
        return seen

    assert asyncio.run(main()) == 3
    _wait_idle(engine)
    assert engine.take_routed_counts()  # an aborted request's routing is counted too


def test_a_duplicate_request_id_is_refused(engine: EngineProcess) -> None:
    async def main() -> None:
        stream = engine.generate(_request("twice", n=300))
        await anext(stream)
        with pytest.raises(ValueError, match="already in use"):
            await _collect(engine, _request("twice"))
        await stream.aclose()

    asyncio.run(main())
    _wait_idle(engine)


def test_a_killed_child_fails_its_streams_and_refuses_new_ones(model_dir: Path) -> None:
    process = EngineProcess(EngineLaunch(str(model_dir), CONFIG))
    try:

        async def main() -> None:
            stream = process.generate(_request("orphan", n=400, length=8))
            await anext(stream)
            os.kill(process.pid, signal.SIGKILL)
            with pytest.raises(EngineStoppedError, match="exited"):
                async for _ in stream:
                    pass
            with pytest.raises(EngineStoppedError):
                await _collect(process, _request("late"))

        asyncio.run(main())
        assert not process.is_alive()
    finally:
        process.shutdown()


def test_shutdown_fails_pending_streams(model_dir: Path) -> None:
    process = EngineProcess(EngineLaunch(str(model_dir), CONFIG))

    async def main() -> None:
        stream = process.generate(_request("long", n=400, length=8))
        assert (await anext(stream)).index == 0
        await asyncio.to_thread(process.shutdown)
        with pytest.raises(EngineStoppedError, match="shut down"):
            async for _ in stream:
                pass

    asyncio.run(main())
    assert not process.is_alive()


def test_a_checkpoint_that_does_not_load_says_which(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=f"could not load {tmp_path}"):
        EngineProcess(EngineLaunch(str(tmp_path), CONFIG))


def test_tiny_temperatures_do_not_stop_the_child(engine: EngineProcess) -> None:
    """A subnormal temperature used to raise in the child's step, which then exited."""
    prompt = _request("tiny").prompt_ids

    def request(rid: str, temperature: float) -> EngineRequest:
        params = SamplingParams(max_tokens=8, temperature=temperature, seed=1, ignore_eos=True)
        return EngineRequest(rid, prompt, params)

    async def main() -> list[list[TokenEvent]]:
        streams = [_collect(engine, request(f"t{t}", t)) for t in (1e-38, 1e-45, 5e-324)]
        streams.append(_collect(engine, _request("beside", n=8)))
        return list(await asyncio.wait_for(asyncio.gather(*streams), 60))

    *tiny, beside = asyncio.run(main())
    greedy = asyncio.run(_collect(engine, request("greedy", 0.0)))
    for events in tiny:
        assert [e.token_id for e in events] == [e.token_id for e in greedy]
    assert len(beside) == 8 and engine.is_alive()
    _wait_idle(engine)


def test_a_request_the_child_fails_ends_alone(tmp_path: Path) -> None:
    """NaN logits from the model for one request (a poisoned token in its prompt): that
    stream ends with ``RequestFailedError``; the others, in the same steps, are unaffected."""
    model_dir = build_family_checkpoint("mixtral", tmp_path / "m", seed=4)
    poison_token_embedding(model_dir)
    process = EngineProcess(EngineLaunch(str(model_dir), CONFIG))
    others = [_request("o" * (i + 1), n=8 + i) for i in range(3)]
    bad = EngineRequest("bad", [5, 6, POISONED_TOKEN, 7], SamplingParams(max_tokens=20))

    async def together() -> list[list[TokenEvent] | BaseException]:
        streams = [_collect(process, r) for r in [bad, *others]]
        return list(await asyncio.gather(*streams, return_exceptions=True))

    def alone(request: EngineRequest) -> list[int]:
        solo = EngineRequest(f"solo-{request.request_id}", request.prompt_ids, request.params)
        return [e.token_id for e in asyncio.run(_collect(process, solo))]

    try:
        failure, *results = asyncio.run(asyncio.wait_for(together(), 60))
        assert isinstance(failure, RequestFailedError) and "not finite" in str(failure)
        for request, events in zip(others, results, strict=True):
            assert not isinstance(events, BaseException)
            assert [e.token_id for e in events] == alone(request)
        assert process.is_alive()
        _wait_idle(process)
    finally:
        process.shutdown()
