"""An engine in a process of its own, with the in-process engine's async API.

Why a process: the engine's step is Python between torch calls, and any other
Python thread of its process (a Serve replica's request handling, its event
loop, the object store's callbacks) takes the same GIL. ``bench/gil_contention.py``
measured a 0.1-core Python load on a thread beside the engine costing it 11% of
its throughput, and the same load in another process costing nothing within
noise. A tier replica therefore runs its engine here (vLLM splits its engine
core out of the API server for the same reason): the replica keeps the
tokenizer, validation, traces and streaming; the child only schedules and steps.

The child runs the same loop as the in-process engine (``cluster.engine.loop``); this
process keeps the streams (``cluster.engine.streams``). Wire: a socket pair carrying
pickled messages (``multiprocessing.connection``), one message per engine step however
many requests it served::

    to the child     ("start", EngineLaunch) once, then the loop's commands:
                     AddRequest, AbortRequest, SetRoutingTable, StopEngine
    from the child   ("ready", ModelSpec, EngineCounters) or ("error", message) once,
                     then a StepResult after each step or batch of commands (its
                     table_version acknowledges a SetRoutingTable), and
                     EngineStopped(reason) when the loop ends (shut down, or a step raised)

The child is started with ``python -m cluster.engine.engine_process``, not
``multiprocessing``'s spawn (which would re-run a Ray worker's ``__main__``). It
inherits the replica's environment, so its GPU is the one Ray gave the replica.
It exits when told to, when a step fails, or when the replica's end of the
socket closes (the replica died). Requests it had then fail with
``EngineStoppedError``, new ones are refused with it at once, and ``is_alive``
turns false (Serve's health check then replaces the replica). A request the
engine fails alone (``failed``: its row could not be sampled) ends with
``RequestFailedError`` while the others go on.

Experts in a shard pool reach the child through ``EngineLaunch.experts``, a factory it
builds them from: the replica opens the shards' side of a data-plane channel, the child
joins it without a Ray call (``cluster.expert_parallel.engine_experts``). Only a pool on
the ``ray`` data plane keeps a tier's engine in the replica's process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cluster.engine.client import EngineClient
from cluster.engine.counters import EngineCounters
from cluster.engine.launch import EngineLaunch, build_engine
from cluster.engine.loop import Command, EngineStopped, StepResult, StopEngine, run_engine_loop
from cluster.engine.streams import EngineStoppedError
from experts.spec import ModelSpec

START_TIMEOUT_S = 600.0  # loading a large checkpoint onto a device can take minutes
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


class EngineProcess(EngineClient):
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
        try:
            self._send(("start", launch))
            spec, counters = self._wait_ready(start_timeout_s)
        except BaseException:
            self._kill()
            self._conn.close()
            raise
        super().__init__(spec, launch.config, counters)
        self._reader = threading.Thread(target=self._read, name="engine-process-reader")
        self._reader.daemon = True
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def is_alive(self) -> bool:
        return not self._streams.stopped_because and self._process.poll() is None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the child; unfinished requests get ``EngineStoppedError``."""
        self._refuse_new()
        try:
            self._send(StopEngine())
            self._process.wait(timeout)
        except (EngineStoppedError, subprocess.TimeoutExpired):
            self._kill()
        self._reader.join(timeout)
        self._conn.close()

    def _post(self, command: Command) -> None:
        self._send(command)

    def _send(self, message: Any) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as err:  # ValueError: the connection is closed
            raise EngineStoppedError(f"the engine process is gone ({err})") from err

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
        """The reader thread: the child's step results, into the stream registry."""
        reason = "the engine process exited"
        try:
            while True:
                message = self._conn.recv()
                if isinstance(message, EngineStopped):
                    reason = message.reason
                    break
                self._deliver(message)
        except (EOFError, OSError):
            pass
        except Exception as err:  # a message that does not unpickle: trust nothing after it
            reason = f"the engine process channel broke: {err!r}"
            self._kill()
        self._streams.stop(reason)


# the child's side ------------------------------------------------------------------------


class _SocketChannel:
    """The loop's side of the engine process: commands and results over the socket."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def receive(self, wait: bool) -> Command | None:
        if not wait and not self._conn.poll():
            return None
        command: Command = self._conn.recv()
        return command

    def publish(self, result: StepResult) -> None:
        self._conn.send(result)

    def stopped(self, reason: str) -> None:
        self._conn.send(EngineStopped(reason))


def main(fd: int) -> int:
    # Ctrl-C in a terminal reaches the whole process group; this process ends with its replica
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        _, launch = conn.recv()
        try:
            engine = build_engine(launch)
        except Exception as err:
            conn.send(("error", f"{type(err).__name__}: {err}"))
            return 1
        conn.send(("ready", engine.model.spec, engine.counters()))
        run_engine_loop(engine, _SocketChannel(conn))
    except (EOFError, OSError):
        pass  # the replica is gone
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
