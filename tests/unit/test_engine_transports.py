"""The engine's async contract, once, over both transports: the loop on a thread of this
process (``AsyncEngine``) and in a child process (``EngineProcess``). Same tokens as the
synchronous engine, streams on several event loops, routing counts and counters, refusals,
abort on leaving, a request failing alone, and shutdown. What only one transport can show
(a monkeypatched step, a killed child) is in ``test_async_engine`` / ``test_engine_process``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.client import EngineClient
from cluster.engine.config import EngineConfig
from cluster.engine.engine_process import EngineProcess
from cluster.engine.launch import EngineLaunch, build_engine
from cluster.engine.requests import EngineRequest, TokenEvent
from cluster.engine.streams import EngineStoppedError, RequestFailedError
from experts.sampling_params import SamplingParams
from tests.checkpoints import build_family_checkpoint
from tests.engine_runs import collect, random_request, run_to_end
from tests.failing_rows import POISONED_TOKEN, poison_token_embedding

CONFIG = EngineConfig(num_blocks=64)
TRANSPORTS = ("in_process", "engine_process")


def start(kind: str, model_dir: Path, count_routing: bool = False) -> EngineClient:
    launch = EngineLaunch(str(model_dir), CONFIG, count_routing=count_routing)
    return AsyncEngine.start(launch) if kind == "in_process" else EngineProcess(launch)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint("mixtral", tmp_path_factory.mktemp("transports") / "m", seed=4)


@pytest.fixture(scope="module", params=TRANSPORTS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def engine(kind: str, model_dir: Path) -> Iterator[EngineClient]:
    """One engine per transport for the tests that leave it healthy (each starts one else)."""
    core = start(kind, model_dir, count_routing=True)
    yield core
    core.shutdown()


def _wait_idle(engine: EngineClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        counters = engine.counters()
        if not (counters.num_running or counters.num_waiting or counters.num_blocks_held):
            return
        assert time.monotonic() < deadline, f"the engine did not go idle: {counters}"
        time.sleep(0.01)


def test_concurrent_streams_match_the_sync_engine(engine: EngineClient, model_dir: Path) -> None:
    requests = [random_request("m" * (i + 1), n=6 + i) for i in range(5)]

    async def main() -> list[list[TokenEvent]]:
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    streams = asyncio.run(main())
    sync = build_engine(EngineLaunch(str(model_dir), CONFIG))  # stepped here, by hand
    expected = run_to_end(sync, requests)
    for request, got in zip(requests, streams, strict=True):
        want = expected[request.request_id]
        assert [e.token_id for e in got] == [e.token_id for e in want]
        assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=1e-5)
        assert [e.index for e in got] == list(range(len(got)))
        assert got[-1].finish_reason == "length"
        assert all(e.finish_reason is None for e in got[:-1])
    assert engine.spec == sync.model.spec
    _wait_idle(engine)
    counters = engine.counters()
    assert counters.num_blocks == 64 and counters.num_steps > 0


def test_batches_hold_every_token_that_arrived(engine: EngineClient) -> None:
    async def main() -> list[list[TokenEvent]]:
        batches = []
        async for batch in engine.generate_batches(random_request("batched", n=30)):
            batches.append(batch)
            await asyncio.sleep(0.2)  # busy elsewhere: tokens pile up meanwhile
        return batches

    batches = asyncio.run(main())
    events = [e for batch in batches for e in batch]
    assert [e.index for e in events] == list(range(30)) and events[-1].finish_reason
    assert len(batches) < 30 and all(batches)
    _wait_idle(engine)


def test_counters_are_current_when_the_last_stream_ends(engine: EngineClient) -> None:
    # the step's counters land before its events: no wait for the loop or the reader
    for i in range(20):
        asyncio.run(collect(engine, random_request(f"c{i}", n=2)))
        counters = engine.counters()
        assert (counters.num_running, counters.num_waiting, counters.num_blocks_held) == (0, 0, 0)


def test_streams_on_two_event_loops_at_once(engine: EngineClient) -> None:
    results: dict[str, list[TokenEvent]] = {}

    def caller(rid: str) -> None:
        results[rid] = asyncio.run(collect(engine, random_request(rid, n=10)))

    threads = [threading.Thread(target=caller, args=(rid,)) for rid in ("loop-a", "loop-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert {rid: len(events) for rid, events in results.items()} == {"loop-a": 10, "loop-b": 10}


def test_routing_counts_cross_over(engine: EngineClient, model_dir: Path) -> None:
    engine.take_routed_counts()  # start afresh
    request = random_request("routed", n=5, length=11)
    asyncio.run(collect(engine, request))
    local = build_engine(EngineLaunch(str(model_dir), CONFIG, count_routing=True))
    run_to_end(local, [request])
    want = local.runner.take_routed_counts()
    assert want and engine.take_routed_counts() == want  # complete as the stream ends
    assert engine.take_routed_counts() == {}


def test_a_request_the_engine_refuses_raises_value_error(engine: EngineClient) -> None:
    too_long = EngineRequest("long", [5] * 10, SamplingParams(max_tokens=10**6))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.validate(too_long)  # the caller checks before it sends...

    async def main() -> None:
        with pytest.raises(ValueError, match="exceeds the model's context"):
            await collect(engine, too_long)  # ...and the engine checks again
        with pytest.raises(ValueError, match="prompt is empty"):
            await collect(engine, EngineRequest("empty", []))

    asyncio.run(main())
    assert engine.is_alive()


def test_leaving_a_stream_early_aborts_and_frees_blocks(engine: EngineClient) -> None:
    engine.take_routed_counts()  # start afresh

    async def main() -> tuple[int, list[TokenEvent]]:
        seen = 0
        async for _ in engine.generate(random_request("leaver", n=300)):
            seen += 1
            if seen == 3:
                break
        return seen, await collect(engine, random_request("stayer", n=5))

    seen, other = asyncio.run(main())
    assert seen == 3 and len(other) == 5
    _wait_idle(engine)
    assert engine.take_routed_counts()  # an aborted request's routing is counted too


def test_cancelling_the_task_aborts(engine: EngineClient) -> None:
    async def main() -> None:
        task = asyncio.create_task(collect(engine, random_request("cancelled", n=400)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    _wait_idle(engine)


def test_a_duplicate_request_id_is_refused(engine: EngineClient) -> None:
    async def main() -> None:
        stream = engine.generate(random_request("twice", n=300))
        await anext(stream)
        with pytest.raises(ValueError, match="already in use"):
            await collect(engine, random_request("twice"))
        await stream.aclose()

    asyncio.run(main())
    _wait_idle(engine)


def test_tiny_temperatures_are_greedy_and_stop_nothing(engine: EngineClient) -> None:
    """A subnormal temperature used to raise in the step, which then stopped the engine."""
    prompt = random_request("tiny").prompt_ids

    def request(rid: str, temperature: float) -> EngineRequest:
        params = SamplingParams(max_tokens=8, temperature=temperature, seed=1, ignore_eos=True)
        return EngineRequest(rid, prompt, params)

    async def main() -> list[list[TokenEvent]]:
        streams = [collect(engine, request(f"t{t}", t)) for t in (1e-38, 1e-45, 5e-324)]
        streams.append(collect(engine, random_request("beside", n=8)))
        return list(await asyncio.wait_for(asyncio.gather(*streams), 60))

    *tiny, beside = asyncio.run(main())
    greedy = asyncio.run(collect(engine, request("greedy", 0.0)))
    for events in tiny:
        assert [e.token_id for e in events] == [e.token_id for e in greedy]
    assert len(beside) == 8 and engine.is_alive()
    _wait_idle(engine)


def test_shutdown_fails_pending_streams_and_refuses_new_ones(kind: str, model_dir: Path) -> None:
    core = start(kind, model_dir)

    async def main() -> None:
        stream = core.generate(random_request("long", n=400, length=8))
        assert (await anext(stream)).index == 0
        await asyncio.to_thread(core.shutdown)
        with pytest.raises(EngineStoppedError, match="shut down"):
            async for _ in stream:
                pass
        with pytest.raises(EngineStoppedError, match="shut down"):
            await collect(core, random_request("late"))

    asyncio.run(asyncio.wait_for(main(), 60))
    assert not core.is_alive()


@pytest.fixture(scope="module")
def poisoned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_family_checkpoint("mixtral", tmp_path_factory.mktemp("poisoned") / "m", seed=4)
    poison_token_embedding(path)
    return path


def test_a_request_the_engine_fails_ends_alone(kind: str, poisoned_dir: Path) -> None:
    """NaN logits from the model for one request (a poisoned token in its prompt): that
    stream ends with ``RequestFailedError``; the others, in the same steps, are unaffected,
    and the engine serves on."""
    core = start(kind, poisoned_dir)
    others = [random_request("o" * (i + 1), n=8 + i) for i in range(3)]
    bad = EngineRequest("bad", [5, 6, POISONED_TOKEN, 7], SamplingParams(max_tokens=20))

    async def together() -> list[list[TokenEvent] | BaseException]:
        streams = [collect(core, r) for r in [bad, *others]]
        return list(await asyncio.gather(*streams, return_exceptions=True))

    def alone(request: EngineRequest) -> list[int]:
        solo = EngineRequest(f"solo-{request.request_id}", request.prompt_ids, request.params)
        return [e.token_id for e in asyncio.run(collect(core, solo))]

    try:
        failure, *results = asyncio.run(asyncio.wait_for(together(), 60))
        assert isinstance(failure, RequestFailedError) and "not finite" in str(failure)
        for request, events in zip(others, results, strict=True):
            assert not isinstance(events, BaseException)
            assert [e.token_id for e in events] == alone(request)
        assert core.is_alive()
        _wait_idle(core)
    finally:
        core.shutdown()
