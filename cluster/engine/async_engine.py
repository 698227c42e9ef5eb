"""The in-process transport: the engine loop on a background thread of this process.

The synchronous ``LLMEngine`` is stepped by ``run_engine_loop`` on one thread, which waits
for a command while no request is unfinished. Callers never touch the engine: their
commands go through a queue the loop drains between steps, and each step's result comes
back through the ``StreamRegistry`` (see ``cluster.engine.client`` for what callers see).
A tier needs this transport when its engine calls its experts through Ray (a shard pool
on the ``ray`` data plane: actor handles work only in a Ray worker); otherwise
``cluster.engine.engine_process`` keeps the engine's GIL to itself.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.engine.client import EngineClient
from cluster.engine.launch import EngineLaunch, build_engine
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.loop import Command, StepResult, StopEngine, run_engine_loop
from cluster.engine.streams import StreamRegistry

if TYPE_CHECKING:
    from experts.backend import ExpertBackend


@dataclass(frozen=True)
class _ThreadChannel:
    """The loop's side of the in-process transport: a queue in, the client's results out."""

    inbox: queue.SimpleQueue[Command]
    streams: StreamRegistry
    deliver: Callable[[StepResult], None]

    def receive(self, wait: bool) -> Command | None:
        try:
            return self.inbox.get(block=wait)
        except queue.Empty:
            return None

    def publish(self, result: StepResult) -> None:
        self.deliver(result)

    def stopped(self, reason: str) -> None:
        self.streams.stop(reason)


class AsyncEngine(EngineClient):
    """Drives an ``LLMEngine`` from a background thread; many concurrent async streams."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__(engine.model.spec, engine.config, engine.counters())
        self.engine = engine
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        channel = _ThreadChannel(self._inbox, self._streams, self._deliver)
        self._thread = threading.Thread(
            target=run_engine_loop, args=(engine, channel), name="engine-loop", daemon=True
        )
        self._thread.start()

    @classmethod
    def start(cls, launch: EngineLaunch, experts: ExpertBackend | None = None) -> AsyncEngine:
        """Build the engine as an engine process would (``build_engine``), here; ``experts``
        may be a live backend (a shard pool's, reachable from this process only)."""
        return cls(build_engine(launch, experts))

    def is_alive(self) -> bool:
        return not self._streams.stopped_because and self._thread.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop (it aborts every request); unfinished ones get ``EngineStoppedError``."""
        self._refuse_new()
        self._inbox.put(StopEngine())
        self._thread.join(timeout)

    def _post(self, command: Command) -> None:
        self._inbox.put(command)
