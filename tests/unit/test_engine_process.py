"""What only the engine process can show: its child dying under its streams, a checkpoint the
child cannot load, and the child ending with its parent's socket. The contract both
transports share is ``test_engine_transports``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from cluster.engine.config import EngineConfig
from cluster.engine.engine_process import EngineProcess
from cluster.engine.launch import EngineLaunch
from cluster.engine.requests import EngineRequest, TokenEvent
from cluster.engine.streams import EngineStoppedError
from experts.sampling_params import SamplingParams
from tests.checkpoints import build_family_checkpoint

CONFIG = EngineConfig(num_blocks=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint("mixtral", tmp_path_factory.mktemp("proc") / "m", seed=4)


def _request(rid: str, n: int) -> EngineRequest:
    return EngineRequest(rid, [5, 6, 7, 8, 9, 10, 11, 12], SamplingParams(n, ignore_eos=True))


def test_a_killed_child_fails_its_streams_and_refuses_new_ones(model_dir: Path) -> None:
    process = EngineProcess(EngineLaunch(str(model_dir), CONFIG))
    try:

        async def main() -> None:
            streams = [process.generate(_request(f"orphan{i}", 400)) for i in range(2)]
            for stream in streams:
                await anext(stream)
            os.kill(process.pid, signal.SIGKILL)
            for stream in streams:
                with pytest.raises(EngineStoppedError, match="exited"):
                    async for _ in stream:
                        pass
            with pytest.raises(EngineStoppedError, match="exited"):
                await anext(process.generate(_request("late", 4)))

        asyncio.run(asyncio.wait_for(main(), 60))
        assert not process.is_alive()
    finally:
        process.shutdown()


def test_a_checkpoint_that_does_not_load_says_which(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=f"could not load {tmp_path}"):
        EngineProcess(EngineLaunch(str(tmp_path), CONFIG))


def test_the_child_ends_when_its_parent_socket_closes(model_dir: Path) -> None:
    """A replica that dies leaves no engine behind: the child's next read fails and it exits."""
    ours, theirs = socket.socketpair()
    child = subprocess.Popen(
        [sys.executable, "-m", "cluster.engine.engine_process", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    conn = Connection(ours.detach())
    try:
        conn.send(("start", EngineLaunch(str(model_dir), CONFIG)))
        assert conn.poll(120) and conn.recv()[0] == "ready"
        conn.close()
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_events_reach_a_caller_through_the_child(model_dir: Path) -> None:
    """A smoke test of the wire alone (the contract is ``test_engine_transports``)."""
    process = EngineProcess(EngineLaunch(str(model_dir), CONFIG))

    async def collect() -> list[TokenEvent]:
        return [event async for event in process.generate(_request("one", 5))]

    try:
        events = asyncio.run(asyncio.wait_for(collect(), 60))
    finally:
        process.shutdown()
    assert [e.index for e in events] == list(range(5)) and events[-1].finish_reason == "length"
    assert not process.is_alive()
