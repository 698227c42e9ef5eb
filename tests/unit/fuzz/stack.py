"""The whole serving stack on one event loop in a background thread, for the fuzz test.

The gRPC front door on loopback, the real ``Gateway`` (counting its calls) and one
``TierReplica`` per tier with its engine in-process; a replica that stops or does not settle
after a case is replaced, as Serve would.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any, TypeVar, cast

import grpc

from cluster.serving.tier_client import InProcessTierClient
from cluster.serving.tier_replica import TierReplica
from deploy.config import ClusterConfig
from deploy.front_door import start_server
from deploy.gateway import Gateway
from deploy.proto import moecluster_v1_pb2 as pb
from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc
from tests.unit.fuzz.cases import CANARY, CANARY_EVERY, KEY, MAX_DETAILS_CHARS, Case
from tests.unit.fuzz.oracle import Outcome, problems

T = TypeVar("T")

# --- the stack, on one event loop in a background thread ---------------------------------------


class Stack:
    """Front door, gateway and replicas on one event loop that runs in its own thread.

    A replica whose engine stopped, or that does not settle after a case, is replaced by a
    fresh one (as Serve would), and the case fails: the cases after it, and hypothesis's
    shrinking of it, meet healthy tiers again, so the failure reported is the case's own.
    """

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.tiers = InProcessTierClient({t.name: self._replica(t.name) for t in config.tiers})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.thread.start()
        self.num_cases = 0
        self.num_canaries = 0
        self.num_restarts = 0
        self.gateway = CountingGateway(config, self.tiers)
        self.server: grpc.aio.Server = self.run(start_server(self.gateway, config.grpc))
        self.channel: grpc.aio.Channel = self.run(self._open_channel())
        self.stub = pb_grpc.MoEClusterStub(self.channel)
        self.canary_tokens = self.run(self.canary())
        assert isinstance(self.canary_tokens, list) and len(self.canary_tokens) == 8

    def _replica(self, name: str) -> TierReplica:
        tier = self.config.tier(name)
        return TierReplica(name, tier.model, tier.to_engine_config(), engine_process=False)

    @property
    def replicas(self) -> dict[str, TierReplica]:
        return cast(dict[str, TierReplica], self.tiers.replicas)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            raise AssertionError(f"no answer within {timeout} s: the stack hangs") from None

    async def _open_channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"127.0.0.1:{self.config.grpc.port}")

    async def canary(self) -> list[int] | str:
        """The canary's tokens, or how its call failed."""
        metadata = (("authorization", f"Bearer {KEY}"),)
        try:
            chunks = [c async for c in self.stub.Generate(CANARY, metadata=metadata, timeout=30)]
        except grpc.aio.AioRpcError as err:
            return f"{err.code().name}: {err.details()}"
        return [t for c in chunks for t in c.token_ids]

    async def call(self, case: Case, request: pb.GenerateRequest) -> Outcome:
        metadata = case.metadata()
        call = self.stub.Generate(request, metadata=metadata, timeout=case.timeout_s)
        chunks: list[pb.GenerateChunk] = []
        try:
            if case.read_chunks == 0:
                await asyncio.sleep(0)
            while len(chunks) < case.read_chunks:
                chunk = await call.read()
                if chunk is grpc.aio.EOF:
                    return Outcome(await call.code(), await call.details() or "", chunks, True)
                chunks.append(chunk)
            call.cancel()
            return Outcome(grpc.StatusCode.CANCELLED, "", chunks, False)
        except grpc.aio.AioRpcError as err:
            return Outcome(err.code(), err.details() or "", chunks, False)

    def fuzz(self, case: Case) -> None:
        """Run one case (with the canary alongside every ``CANARY_EVERY``-th) and check it."""
        request = case.request()
        self.num_cases += 1
        with_canary = self.num_cases % CANARY_EVERY == 0
        calls = self.gateway.num_started + 1 + with_canary
        outcome, tokens = self.run(self._case(case, request, with_canary))
        self.wait_for_gateway(calls)
        unhealthy = self.settle()
        found = [f"tier {name!r}: {why}" for name, why in unhealthy.items()]
        found += problems(case, request, outcome)
        if with_canary and tokens != self.canary_tokens:
            found.append(f"the canary gave {tokens}, not {self.canary_tokens}")
        if found:
            # an engine that failed this case may still be on its way down (failing streams
            # before it says it stopped): fresh replicas keep it from failing the next case
            self.replace(list(self.replicas))
        # one assertion for every problem: hypothesis tells failures apart by where they
        # are raised, and which symptom of a broken engine shows first is down to timing
        got = f"{outcome.code.name} {outcome.details[: MAX_DETAILS_CHARS + 100]!r}"
        assert not found, f"{'; '.join(found)} (the call: {got})"

    async def _case(
        self, case: Case, request: pb.GenerateRequest, with_canary: bool
    ) -> tuple[Outcome, list[int] | str | None]:
        if not with_canary:
            return await self.call(case, request), None
        outcome, tokens = await asyncio.gather(self.call(case, request), self.canary())
        self.num_canaries += 1
        return outcome, tokens

    def wait_for_gateway(self, num_started: int, grace_s: float = 0.05) -> None:
        """Wait until the gateway has ended every call it started (a cancel reaches it after
        the client has moved on) and has started ``num_started``, or ``grace_s`` passed (a
        call cancelled at once, or refused by the front door, never reaches it)."""
        gateway = self.gateway
        grace = time.monotonic() + grace_s
        deadline = time.monotonic() + 10.0
        while gateway.num_open or (gateway.num_started < num_started and time.monotonic() < grace):
            assert time.monotonic() < deadline, f"{gateway.num_open} gateway call(s) never ended"
            time.sleep(0.001)

    def settle(self, timeout: float = 10.0) -> dict[str, str]:
        """Wait until every engine holds no KV block and runs and queues nothing; return why
        not for each tier whose engine stopped or did not settle in ``timeout`` (each is
        replaced by a fresh replica)."""
        deadline = time.monotonic() + timeout
        while True:
            stopped = {
                n: "its engine stopped" for n, r in self.replicas.items() if not r.engine.is_alive()
            }
            busy = {n: why for n, r in self.replicas.items() if (why := _busy(r))}
            if stopped or not busy:
                unhealthy = stopped
                break
            if time.monotonic() > deadline:
                unhealthy = {n: f"not settled in {timeout} s: {why}" for n, why in busy.items()}
                break
            time.sleep(0.002)
        self.replace(list(unhealthy))
        return unhealthy

    def replace(self, names: list[str]) -> None:
        """Shut these tiers' replicas down and serve the tiers from fresh ones."""
        for name in names:
            self.replicas[name].shutdown()
            self.replicas[name] = self._replica(name)
            self.num_restarts += 1

    def close(self) -> None:
        self.run(self.channel.close())
        self.run(self.server.stop(None))
        for replica in self.replicas.values():
            replica.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class CountingGateway(Gateway):
    """The real gateway, counting its Generate calls: a case is over when they have ended."""

    num_started = 0
    num_ended = 0

    @property
    def num_open(self) -> int:
        return self.num_started - self.num_ended

    async def generate(
        self,
        request: pb.GenerateRequest,
        metadata: Mapping[str, str],
        request_id: str | None = None,
        budget_s: float | None = None,
    ) -> AsyncIterator[pb.GenerateChunk]:
        self.num_started += 1
        try:
            async for chunk in super().generate(request, metadata, request_id, budget_s):
                yield chunk
        finally:
            self.num_ended += 1


def _busy(replica: TierReplica) -> str:
    """What the replica's engine still holds or has to do ("" when idle)."""
    s = replica.stats()
    if not (s.num_blocks_held or s.num_running or s.num_waiting):
        return ""
    return f"{s.num_blocks_held} KV blocks held, {s.num_running} running, {s.num_waiting} waiting"
