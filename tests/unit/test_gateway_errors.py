"""The Gateway's errors (tier refusals, tiers lost mid-stream, bad requests) and a client leaving
early, with the tiers played by ``tests.unit.gateway_fakes.FakeTierClient``.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cluster.serving.tier_client import TierBusyError, TierUnavailableError
from cluster.serving.tier_messages import TierRejected
from deploy.api import ApiError
from deploy.gateway import Gateway
from deploy.proto import moecluster_v1_pb2 as pb
from tests.unit.gateway_fakes import (
    SIMPLE,
    FakeTierClient,
    Script,
    api_error,
    assert_all_closed,
    batch,
    make_config,
    rejected,
    run_generate,
    stream,
    take_then_leave,
)

# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("invalid_argument", grpc.StatusCode.INVALID_ARGUMENT),
        ("resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("unavailable", grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_tier_rejection_becomes_an_api_error(code: str, status: grpc.StatusCode) -> None:
    message = "prompt is 9000 tokens: the model's context is 2048"
    fake = FakeTierClient({"strong": rejected(code, message)})
    err = api_error(Gateway(make_config(), fake), pb.GenerateRequest(prompt="hi", tier="strong"))
    assert err.code == status
    assert err.message == message
    assert_all_closed(fake)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (TierBusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (TierUnavailableError, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_tier_errors_on_open(error: type[Exception], status: grpc.StatusCode) -> None:
    fake = FakeTierClient({"strong": Script(error=error)})
    err = api_error(Gateway(make_config(), fake), pb.GenerateRequest(prompt="hi", tier="strong"))
    assert err.code == status
    assert "'strong'" in err.message
    assert "retry later" in err.message


def test_tier_unavailable_mid_stream_becomes_unavailable() -> None:
    """BUG (gateway.py, ``generate``/``_tokens_only``): ``TierUnavailableError`` (a replica
    lost mid-generation, as ``ServeTierClient`` reports it) is only mapped to an ``ApiError``
    on the first ``anext``. Raised after the first batch it escapes ``Gateway.generate`` as a
    bare ``TierUnavailableError``, so ``deploy/app.py`` answers INTERNAL "internal error"
    instead of UNAVAILABLE."""
    fake = FakeTierClient({"strong": Script([batch([1])], error_after=TierUnavailableError)})
    gateway = Gateway(make_config(), fake)
    with pytest.raises(Exception) as info:
        run_generate(gateway, pb.GenerateRequest(prompt="hi", tier="strong"))
    assert isinstance(info.value, ApiError), f"got {type(info.value).__name__}: {info.value}"
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_tier_whose_engine_stopped_mid_stream_gives_unavailable() -> None:
    """A replica whose engine process died ends its stream with a ``TierRejected``."""
    message = "tier 'strong' stopped generating (the engine process exited); retry"
    script = Script([batch([1]), TierRejected("unavailable", message)])
    gateway = Gateway(make_config(), FakeTierClient({"strong": script}))
    err = api_error(gateway, pb.GenerateRequest(prompt="hi", tier="strong"))
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.message == message


def test_unknown_tier() -> None:
    fake = FakeTierClient({})
    err = api_error(Gateway(make_config(), fake), pb.GenerateRequest(prompt="hi", tier="huge"))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown tier 'huge'" in err.message
    assert "['fast', 'strong']" in err.message
    assert fake.calls == []


def test_max_tokens_above_the_tiers_limit() -> None:
    fake = FakeTierClient({"fast": SIMPLE, "strong": SIMPLE})
    gateway = Gateway(make_config(fast_limit=32), fake)
    err = api_error(gateway, pb.GenerateRequest(prompt="hi", tier="fast", max_tokens=100))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens=100" in err.message
    assert "'fast'" in err.message
    assert "[1, 32]" in err.message
    # the cascade starts on fast, so its limit applies there too
    err = api_error(gateway, pb.GenerateRequest(prompt="hi", max_tokens=100))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "[1, 32]" in err.message
    # above every tier's limit: refused while parsing, naming the largest limit
    err = api_error(gateway, pb.GenerateRequest(prompt="hi", tier="strong", max_tokens=5000))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "[1, 4096]" in err.message
    # strong takes 100
    chunks = run_generate(gateway, pb.GenerateRequest(prompt="hi", tier="strong", max_tokens=100))
    assert chunks[-1].tier.name == "strong"
    assert [c.tier for c in fake.calls] == ["strong"]


def test_invalid_request_reaches_no_tier() -> None:
    fake = FakeTierClient({"fast": SIMPLE})
    err = api_error(Gateway(make_config(), fake), pb.GenerateRequest(tier="fast"))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fake.calls == []


# --- the client leaving early ----------------------------------------------------------------


@pytest.mark.parametrize("tier", ["fast", None], ids=["explicit", "cascade"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_client_leaving_early_cancels_the_tier_stream(tier: str | None, n: int) -> None:
    fast = stream(
        batch([1, 2], -0.1),
        batch([3, 4], -0.1),
        batch([5], -0.1),
        batch([6], -0.1),
        batch([7], -0.1, finish="length"),
    )
    fake = FakeTierClient({"fast": fast})
    gateway = Gateway(make_config(), fake)
    request = pb.GenerateRequest(prompt="hi", tier=tier or "")
    got = asyncio.run(take_then_leave(gateway, request, n))
    assert got == [1, 2, 3, 4, 5, 6, 7][: [0, 2, 4, 5][n]]
    [call] = fake.calls
    assert call.cancelled
    assert call.closed


def test_client_going_away_closes_the_tier_stream_at_once() -> None:
    fake = FakeTierClient(
        {"fast": stream(batch([1]), batch([2]), batch([3]), batch([4], finish="length"))}
    )
    request = pb.GenerateRequest(prompt="hi", tier="fast")

    async def first_chunk_then_leave() -> None:
        chunks = Gateway(make_config(), fake).generate(request, {})
        await anext(chunks)
        await chunks.aclose()  # what Serve does when the client cancels
        [call] = fake.calls
        assert call.closed and call.cancelled  # before any garbage collection runs

    asyncio.run(first_chunk_then_leave())
