"""ServeTierClient over a fake Serve handle: when leaving a tier stream cancels the request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cluster.serving.tier_client import ServeTierClient
from cluster.serving.tier_messages import TierItem, TierRejected, TierRequest, TierTokens, is_last
from experts.sampling_params import SamplingParams


def _tokens(ids: list[int], finish: str | None = None) -> TierTokens:
    return TierTokens(ids, [0.0] * len(ids), "", finish, 3, 0, 0)


class _Response:
    """A streaming ``DeploymentResponseGenerator`` stand-in that records ``cancel``."""

    def __init__(self, items: list[TierItem]) -> None:
        self.items = items
        self.cancels = 0

    def __aiter__(self) -> AsyncIterator[TierItem]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TierItem]:
        for item in self.items:
            yield item

    def cancel(self) -> None:
        self.cancels += 1


class _Handle:
    def __init__(self, response: _Response) -> None:
        self.response = response

    def options(self, **_: Any) -> _Handle:
        return self

    def remote(self, request: TierRequest) -> _Response:
        return self.response


def _read(items: list[TierItem], how_many: int) -> int:
    """Read ``how_many`` items (all if more), leave the stream; the cancels it cost."""
    response = _Response(items)
    client = ServeTierClient({"t": _Handle(response)})
    request = TierRequest("r", SamplingParams(max_tokens=4))

    async def run() -> None:
        stream = client.generate("t", request)
        for _ in range(min(how_many, len(items))):
            await anext(stream)
        await stream.aclose()

    asyncio.run(run())
    return response.cancels


STREAM: list[TierItem] = [_tokens([1]), _tokens([2, 3]), _tokens([4], "length")]


@pytest.mark.parametrize("read", [1, 2])
def test_leaving_mid_stream_cancels_the_request(read: int) -> None:
    assert _read(STREAM, read) == 1


def test_leaving_after_the_last_item_costs_no_cancel() -> None:
    assert _read(STREAM, 3) == 0  # the gateway stops at the finishing batch


def test_a_refusal_costs_no_cancel() -> None:
    assert _read([TierRejected("invalid_argument", "bad")], 1) == 0


def test_is_last() -> None:
    assert not is_last(_tokens([1]))
    assert is_last(_tokens([1], "stop"))
    assert is_last(TierRejected("unavailable", "gone"))
