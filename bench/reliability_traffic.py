"""Open-loop gRPC traffic for ``bench.reliability``: requests go out at Poisson times whatever
the others are doing, each streaming ``Generate`` with a deadline; one fault is injected at a
set time while they run.

The server's own limit (``grpc.request_timeout_s``) is the request's deadline; the client waits
a margin longer, so a call the server neither answered nor refused by then ends on the
client's timer and counts as lost. The channel reconnects fast (a killed gateway's successor
is found within a second of listening).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.reliability_outcomes import Outcome, Spec

CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _message(spec: Spec, tier: str) -> Any:
    from deploy.proto import moecluster_v1_pb2 as pb

    message = pb.GenerateRequest(
        token_ids=list(spec.token_ids), tier=tier, max_tokens=spec.max_tokens, ignore_eos=True
    )
    if spec.temperature > 0:
        message.temperature = spec.temperature
        assert spec.seed is not None, f"spec {spec.index} samples without a seed"
        message.seed = spec.seed
    return message


async def _one(stub: Any, spec: Spec, tier: str, timeout_s: float, clock0: float) -> Outcome:
    import grpc

    out = Outcome(spec.index, time.monotonic() - clock0)

    async def stream() -> None:
        async for chunk in stub.Generate(_message(spec, tier), timeout=timeout_s):
            out.tokens.extend(chunk.token_ids)

    try:
        # a hard stop a little after the client's deadline, should grpc's own timer not fire
        await asyncio.wait_for(stream(), timeout_s + 5.0)
        out.code = "OK"
    except grpc.aio.AioRpcError as err:
        out.code, out.details = err.code().name, err.details() or ""
    except TimeoutError:
        out.code = None  # lost
    out.ended_at = time.monotonic() - clock0
    return out


def run_traffic(
    address: str,
    tier: str,
    specs: Sequence[Spec],
    arrivals: Sequence[float],
    timeout_s: float,
    fault_at: float | None = None,
    fault: Callable[[], Any] | None = None,
    min_in_flight: int = 0,
    max_delay_s: float = 3.0,
) -> tuple[list[Outcome], float | None, Any]:
    """Send ``specs[k % len(specs)]`` at ``arrivals[k]`` (seconds from the start); call the
    blocking ``fault`` (in a thread) at ``fault_at``, or later once ``min_in_flight`` streams
    are open (``max_delay_s`` later at most), so that it lands mid-stream. Returns every
    outcome (once each has ended), when the fault was injected (seconds on the same clock) and
    how many streams were open then."""
    import grpc

    from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc

    async def main() -> tuple[list[Outcome], float | None, Any]:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.MoEClusterStub(channel)
            clock0 = time.monotonic()
            injected: list[Any] = []
            open_streams = [0]

            async def inject() -> None:
                assert fault is not None and fault_at is not None
                await asyncio.sleep(fault_at)
                latest = time.monotonic() + max_delay_s
                while open_streams[0] < min_in_flight and time.monotonic() < latest:
                    await asyncio.sleep(0.01)
                at, streams = time.monotonic() - clock0, open_streams[0]
                await asyncio.get_running_loop().run_in_executor(None, fault)
                injected.append((at, streams))

            async def send(k: int, at: float) -> Outcome:
                await asyncio.sleep(max(0.0, at - (time.monotonic() - clock0)))
                open_streams[0] += 1
                try:
                    return await _one(stub, specs[k % len(specs)], tier, timeout_s, clock0)
                finally:
                    open_streams[0] -= 1

            injecting = asyncio.create_task(inject()) if fault is not None else None
            outcomes = list(await asyncio.gather(*(send(k, at) for k, at in enumerate(arrivals))))
            if injecting is not None:
                await injecting
            at, result = injected[0] if injected else (None, None)
            return outcomes, at, result

    return asyncio.run(main())


def probe(address: str, tier: str, spec: Spec, reference: Sequence[int], timeout_s: float) -> bool:
    """One request; True when it completed with the reference tokens."""
    outcomes, _, _ = run_traffic(address, tier, [spec], [0.0], timeout_s)
    return outcomes[0].code == "OK" and outcomes[0].tokens == list(reference)


def wait_until_serving(
    address: str,
    tiers: Sequence[str],
    spec: Spec,
    reference: Sequence[int],
    timeout_s: float,
    request_timeout_s: float,
) -> float | None:
    """Probe each tier until all answer right; the seconds it took, None past ``timeout_s``."""
    start = time.monotonic()
    pending = list(tiers)
    while pending:
        if probe(address, pending[0], spec, reference, request_timeout_s):
            pending.pop(0)
            continue
        if time.monotonic() - start > timeout_s:
            return None
        time.sleep(0.5)
    return round(time.monotonic() - start, 2)
