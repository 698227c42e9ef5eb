"""An engine in a process of its own, with the in-process engine's async API.

Why a process: the engine's step is Python between torch calls, and any other
Python thread of its process (a Serve replica's request handling, its event
loop, the object store's callbacks) takes the same GIL. ``bench/gil_contention.py``
measured a 0.1-core Python load on a thread beside the engine costing it 11% of
its throughput, and the same load in another process costing nothing within
noise. A tier replica therefore runs its engine here (vLLM splits its engine
core out of the API server for the same reason): the replica keeps the
tokenizer, validation, traces and streaming; the child only schedules and steps.

Wire: a socket pair carrying pickled messages (``multiprocessing.connection``),
one message per engine step however many requests it served::

    to the child     ("start", EngineLaunch) once, then ("add", EngineRequest),
                     ("abort", request_id), ("stop",)
    from the child   ("ready", ModelSpec, EngineCounters) or ("error", message) once,
                     then ("step", events, rejected, failed, counters, routed) after each
                     step or batch of commands, and ("failed", message) if a step raised

The child is started with ``python -m cluster.engine.engine_process``, not
``multiprocessing``'s spawn (which would re-run a Ray worker's ``__main__``). It
inherits the replica's environment, so its GPU is the one Ray gave the replica.
It exits when told to, when a step fails, or when the replica's end of the
socket closes (the replica died). Requests it had then fail with
``EngineStoppedError``, new ones are refused with it at once, and ``is_alive``
turns false (Serve's health check then replaces the replica). A request the
engine fails alone (``failed``: its row could not be sampled) ends with
``RequestFailedError`` while the others go on.

Experts in a shard pool (Ray actor handles) need the engine in a Ray worker:
such a tier keeps its engine in the replica's process (``cluster.engine.async_engine``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.engine.admission import validate_request
from cluster.engine.async_engine import (
    EngineStoppedError,
    EventStream,
    RequestFailedError,
    describe_step_error,
    stream_events,
)
from cluster.engine.config import EngineConfig
from cluster.engine.counters import EngineCounters
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, TokenEvent
from experts.spec import ModelSpec

if TYPE_CHECKING:
    from experts.backend import ExpertBackendFactory

_Delivery = tuple[EventStream, TokenEvent | BaseException]
START_TIMEOUT_S = 600.0  # loading a large checkpoint onto a device can take minutes
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class EngineLaunch:
    """What the child needs to build the engine."""

    model_dir: str
    config: EngineConfig
    device: str = "cpu"
    torch_threads: int | None = None  # None: torch's default in the child
    count_routing: bool = False  # keep per-(layer, expert) counts for the metrics
    # where the experts live when not in the child itself (a shard pool); built in the child
    experts: ExpertBackendFactory | None = None


class EngineProcess:
    """An ``LLMEngine`` in a child process; ``generate`` streams its tokens to any event loop."""

    def __init__(self, launch: EngineLaunch, start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.launch = launch
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PROJECT_ROOT, env.get("PYTHONPATH", "")) if p
        )
        self._process = subprocess.Popen(
            [sys.executable, "-m", "cluster.engine.engine_process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _streams, _routed and _counters
        self._streams: dict[str, EventStream] = {}
        self._routed: Counter[tuple[int, int]] = Counter()
        self._stopping = False
        self._stopped_because = ""  # set once the child is gone; new requests are refused
        try:
            self._send(("start", launch))
            self._spec, self._counters = self._wait_ready(start_timeout_s)
        except BaseException:
            self._kill()
            self._conn.close()
            raise
        self._reader = threading.Thread(target=self._read, name="engine-process-reader")
        self._reader.daemon = True
        self._reader.start()

    # the replica's side ------------------------------------------------------------------

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def pid(self) -> int:
        return self._process.pid

    def validate(self, request: EngineRequest) -> None:
        num_blocks = self._counters.num_blocks
        validate_request(request, self._spec, self.launch.config.block_size, num_blocks)

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        """Stream the request's tokens; bad input raises ``ValueError`` on first iteration."""
        stream = EventStream(asyncio.get_running_loop(), asyncio.Queue())
        request_id = request.request_id
        with self._lock:
            if self._stopping or self._stopped_because:
                raise EngineStoppedError(self._stopped_because or "the engine is shut down")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        try:
            self._send(("add", request))
        except EngineStoppedError:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        async for event in stream_events(stream, lambda: self.abort(request_id)):
            yield event

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
        try:
            self._send(("abort", request_id))
        except EngineStoppedError:
            pass  # the child is gone, and the request with it

    def counters(self) -> EngineCounters:
        """As of the child's last message (it sends one after every step or command)."""
        return self._counters

    def take_routed_counts(self) -> dict[tuple[int, int], int]:
        with self._lock:
            counts, self._routed = dict(self._routed), Counter()
        return counts

    def is_alive(self) -> bool:
        return not self._stopped_because and self._process.poll() is None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the child; unfinished requests get ``EngineStoppedError``."""
        self._stopping = True
        try:
            self._send(("stop",))
            self._process.wait(timeout)
        except (EngineStoppedError, subprocess.TimeoutExpired):
            self._kill()
        self._reader.join(timeout)
        self._conn.close()

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as err:  # ValueError: the connection is closed
            raise EngineStoppedError(
                self._stopped_because or f"the engine process is gone ({err})"
            ) from err

    def _kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()

    def _wait_ready(self, timeout_s: float) -> tuple[ModelSpec, EngineCounters]:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.5):
            code = self._process.poll()
            if code is not None:
                raise RuntimeError(f"the engine process exited with code {code} while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the engine process did not load {self.launch.model_dir} in {timeout_s:.0f} s"
                )
        message = self._conn.recv()
        if message[0] == "error":
            raise RuntimeError(
                f"the engine process could not load {self.launch.model_dir}: {message[1]}"
            )
        _, spec, counters = message
        return spec, counters

    def _read(self) -> None:
        """The reader thread: the child's messages, fanned out to each caller's event loop."""
        reason = "the engine process exited"
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "failed":
                    reason = message[1]
                    break
                _, events, rejected, failed, counters, routed = message
                self._deliver(events, rejected, failed, counters, routed)
        except (EOFError, OSError):
            pass
        except Exception as err:  # a message that does not unpickle: trust nothing after it
            reason = f"the engine process channel broke: {err!r}"
            self._kill()
        if self._stopping:
            reason = "the engine was shut down"
        with self._lock:
            self._stopped_because = reason
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.send(EngineStoppedError(reason))

    def _deliver(
        self,
        events: list[TokenEvent],
        rejected: list[tuple[str, str]],
        failed: list[tuple[str, str]],
        counters: EngineCounters,
        routed: dict[tuple[int, int], int],
    ) -> None:
        batches: dict[asyncio.AbstractEventLoop, list[_Delivery]] = {}
        with self._lock:
            self._routed.update(routed)
            # after the routed counts (idle counters mean every count is here) and before
            # the events: a caller whose stream just ended reads this step's counters
            self._counters = counters
            ended: list[tuple[str, Exception]] = [(r, ValueError(why)) for r, why in rejected]
            ended += [(r, RequestFailedError(why)) for r, why in failed]
            for request_id, error in ended:
                stream = self._streams.pop(request_id, None)
                if stream is not None:
                    batches.setdefault(stream.loop, []).append((stream, error))
            for event in events:
                stream = self._streams.get(event.request_id)
                if stream is None:
                    continue  # aborted meanwhile
                if event.finish_reason is not None:
                    del self._streams[event.request_id]
                batches.setdefault(stream.loop, []).append((stream, event))
        # one wake-up per event loop per step, however many of its streams got a token
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: its callers left
                for _, item in items:
                    if isinstance(item, TokenEvent) and item.finish_reason is None:
                        self.abort(item.request_id)


def _put_all(items: list[_Delivery]) -> None:
    for stream, item in items:
        stream.events.put_nowait(item)


# the child's side ------------------------------------------------------------------------


def _serve(conn: Connection, engine: LLMEngine) -> None:
    """Apply the replica's commands between steps; one message back per step."""
    while True:
        rejected: list[tuple[str, str]] = []
        if not engine.has_unfinished() and not _apply(conn.recv(), engine, rejected):
            return
        while conn.poll():
            if not _apply(conn.recv(), engine, rejected):
                return
        events: list[TokenEvent] = []
        failed: list[tuple[str, str]] = []
        if engine.has_unfinished():
            try:
                events = engine.step()
            except Exception as err:
                conn.send(("failed", describe_step_error(err)))
                raise
            failed = [(f.request_id, f.reason) for f in engine.failures]
        routed = {}  # handed over when a request ends (the replica records them then) or at idle
        done = failed or any(e.finish_reason for e in events) or not engine.has_unfinished()
        if engine.runner.count_routing and done:
            routed = engine.runner.take_routed_counts()
        conn.send(("step", events, rejected, failed, engine.counters(), routed))


def _apply(message: tuple[Any, ...], engine: LLMEngine, rejected: list[tuple[str, str]]) -> bool:
    kind = message[0]
    if kind == "add":
        try:
            engine.add_request(message[1])
        except ValueError as err:
            rejected.append((message[1].request_id, str(err)))
    elif kind == "abort":
        engine.abort(message[1])
    elif kind == "stop":
        return False
    return True


def _load(launch: EngineLaunch) -> LLMEngine:
    import torch

    from experts.model import MoEModel
    from experts.tokenizer import load_tokenizer

    if launch.torch_threads is not None:
        torch.set_num_threads(launch.torch_threads)
    experts = launch.experts.build() if launch.experts is not None else None
    model = MoEModel.from_checkpoint(launch.model_dir, device=launch.device, experts=experts)
    engine = LLMEngine(model, launch.config, load_tokenizer(launch.model_dir))
    engine.runner.count_routing = launch.count_routing and model.spec.is_moe
    return engine


def main(fd: int) -> int:
    # Ctrl-C in a terminal reaches the whole process group; this process ends with its replica
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        _, launch = conn.recv()
        try:
            engine = _load(launch)
        except Exception as err:
            conn.send(("error", f"{type(err).__name__}: {err}"))
            return 1
        conn.send(("ready", engine.model.spec, engine.counters()))
        _serve(conn, engine)
    except (EOFError, OSError):
        pass  # the replica is gone
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
