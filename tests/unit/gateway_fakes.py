"""A scripted in-process ``TierClient`` and drivers for the Gateway's tests (no Ray, no model).

``FakeTierClient`` streams what each tier's ``Script`` says (``TierTokens`` batches, or a
``TierRejected``, or a ``TierBusyError``/``TierUnavailableError`` on the first ``anext``)
and records every call: the tier, the ``TierRequest`` it got, how many items it handed
out, and whether the stream was closed (``aclose``) before its end, i.e. cancelled. Each
test drives ``Gateway.generate`` inside ``asyncio.run``; the ``test_gateway_*`` modules share
these by topic.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cluster.serving.tier_messages import (
    TierInfo,
    TierItem,
    TierRejected,
    TierRequest,
    TierStats,
    TierTokens,
)
from deploy.api import ApiError
from deploy.config import AuthConfig, ClusterConfig, load_config, parse_config
from deploy.gateway import Gateway
from deploy.proto import moecluster_v1_pb2 as pb

HEX32 = re.compile(r"[0-9a-f]{32}")
PROMPT_TOKENS, CACHED_TOKENS, TRUNCATED_TOKENS = 7, 3, 1
PROBE = 4  # cascade probe tokens in these tests
T = TypeVar("T")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# --- the fake tier client ----------------------------------------------------------------------


def batch(
    ids: Sequence[int],
    logprobs: float | Sequence[float] = -0.1,
    text: str | None = None,
    finish: str | None = None,
) -> TierTokens:
    """One ``TierTokens`` batch; ``text`` defaults to one letter per token id."""
    lps = [logprobs] * len(ids) if isinstance(logprobs, float | int) else list(logprobs)
    assert len(lps) == len(ids)
    return TierTokens(
        token_ids=list(ids),
        logprobs=[float(x) for x in lps],
        text="".join(chr(ord("a") + i % 26) for i in ids) if text is None else text,
        finish_reason=finish,
        num_prompt_tokens=PROMPT_TOKENS,
        num_cached_prompt_tokens=CACHED_TOKENS,
        num_truncated_tokens=TRUNCATED_TOKENS,
    )


@dataclass
class Script:
    """What a tier does on each call: items to stream, or an error on the first ``anext``."""

    items: list[TierItem] = field(default_factory=list)
    error: type[Exception] | None = None  # raised on the first anext
    error_after: type[Exception] | None = None  # raised once every item was handed out
    release: asyncio.Event | None = None  # awaited before the first item


def stream(*batches: TierTokens) -> Script:
    return Script(list(batches))


def rejected(code: str, message: str) -> Script:
    return Script([TierRejected(code, message)])


@dataclass
class Call:
    tier: str
    request: TierRequest
    handed_out: int = 0  # items the gateway received
    total: int = 0  # items the script had
    cancelled: bool = False  # closed with aclose() before the script's last item
    closed: bool = False  # the generator is finished (ran out, raised or was closed)


class FakeTierClient:
    """A ``TierClient`` whose tiers follow scripts and whose calls are recorded."""

    def __init__(
        self,
        scripts: dict[str, Script] | None = None,
        infos: dict[str, TierInfo | Exception] | None = None,
    ) -> None:
        self.scripts = scripts or {}
        self.infos = infos or {}
        self.calls: list[Call] = []

    def calls_to(self, tier: str) -> list[Call]:
        return [c for c in self.calls if c.tier == tier]

    async def generate(self, tier: str, request: TierRequest) -> AsyncGenerator[TierItem, None]:
        script = self.scripts[tier]
        call = Call(tier, request, total=len(script.items))
        self.calls.append(call)
        try:
            if script.release is not None:
                await script.release.wait()
            if script.error is not None:
                raise script.error(f"tier {tier!r}: scripted {script.error.__name__}")
            for item in script.items:
                call.handed_out += 1
                yield item
            if script.error_after is not None:
                raise script.error_after(f"tier {tier!r}: scripted {script.error_after.__name__}")
        except GeneratorExit:
            call.cancelled = call.handed_out < call.total
            raise
        finally:
            call.closed = True

    async def info(self, tier: str) -> TierInfo:
        found = self.infos.get(tier)
        if isinstance(found, Exception):
            raise found
        if found is None:
            return TierInfo(tier, f"models/{tier}", "mixtral", True, 2048)
        return found

    async def stats(self, tier: str) -> TierStats:
        return TierStats(0, 0, 64, 0, 0, 0, 0, 0, num_aborted=0)


# --- configs and drivers -----------------------------------------------------------------------


def make_config(
    *,
    keys: Sequence[str] = (),
    cascade: dict[str, Any] | None = None,
    shadow: dict[str, Any] | None = None,
    fast_limit: int = 4096,
    strong_limit: int = 4096,
) -> ClusterConfig:
    """Tiers fast and strong; the cascade probes ``PROBE`` tokens unless ``cascade`` says."""
    data = {
        "auth": {"api_keys": list(keys), "api_keys_env": None},
        "tiers": [
            {"name": "fast", "model": "models/fast", "max_tokens_limit": fast_limit},
            {"name": "strong", "model": "models/strong", "max_tokens_limit": strong_limit},
        ],
        "policy": {
            "cascade": {"probe_tokens": PROBE, **(cascade or {})},
            "shadow": shadow or {},
        },
    }
    return parse_config(data, base_dir=Path("/srv/cluster"))


def shadow_config(probe_tokens: int = 4) -> ClusterConfig:
    return make_config(
        cascade={"enabled": False},
        shadow={
            "enabled": True,
            "share": 1.0,
            "primary_tier": "fast",
            "candidate_tier": "strong",
            "probe_tokens": probe_tokens,
        },
    )


async def collect(
    gateway: Gateway, request: pb.GenerateRequest, metadata: dict[str, str] | None = None
) -> list[pb.GenerateChunk]:
    return [chunk async for chunk in gateway.generate(request, metadata or {})]


def run_generate(
    gateway: Gateway, request: pb.GenerateRequest, metadata: dict[str, str] | None = None
) -> list[pb.GenerateChunk]:
    return asyncio.run(collect(gateway, request, metadata))


def api_error(
    gateway: Gateway, request: pb.GenerateRequest, metadata: dict[str, str] | None = None
) -> ApiError:
    with pytest.raises(ApiError) as info:
        run_generate(gateway, request, metadata)
    return info.value


async def drain_background() -> None:
    """Wait for every other task (the gateway's shadow runs); re-raise what any raised."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    await asyncio.wait_for(asyncio.gather(*others), timeout=5.0)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


def tokens_of(chunks: Sequence[pb.GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text_of(chunks: Sequence[pb.GenerateChunk]) -> str:
    return "".join(c.text for c in chunks)


def assert_only_last_is_final(chunks: Sequence[pb.GenerateChunk]) -> pb.GenerateChunk:
    assert chunks, "no chunks"
    for chunk in chunks[:-1]:
        assert chunk.finish_reason == ""
        assert not chunk.HasField("usage") and not chunk.HasField("tier")
        assert chunk.request_id == "" and chunk.trace_id == ""
    last = chunks[-1]
    assert last.finish_reason
    assert last.HasField("usage") and last.HasField("tier")
    return last


def assert_all_closed(fake: FakeTierClient) -> None:
    for call in fake.calls:
        assert call.closed, f"the {call.tier} stream was left open"


async def take_then_leave(gateway: Gateway, request: pb.GenerateRequest, n: int) -> list[int]:
    gen = gateway.generate(request, {})
    assert isinstance(gen, AsyncGenerator)
    got: list[int] = []
    for _ in range(n):
        got += (await anext(gen)).token_ids
    await gen.aclose()
    return got


def demo_gateway(fake: FakeTierClient) -> Gateway:
    config = load_config(None)
    config = config.model_copy(update={"auth": AuthConfig(api_keys_env=None)})
    return Gateway(config, fake)


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    async def call() -> T:
        return await make()

    return asyncio.run(call())


# a three-token generation, ending on length
SIMPLE = stream(batch([1, 2]), batch([3], finish="length"))
