"""A tier's token stream as the gateway reads it: opened, checked, chained, turned into routing.

``open_tier_stream`` starts generation on a tier and waits for its first item, so a replica's
refusal (``TierRejected``, a full queue, no replica) becomes an ``ApiError`` before the caller
sees a token; what follows is a stream of ``TierTokens`` only, in which a replica lost or stopped
mid-stream is an UNAVAILABLE ``ApiError``. Closing the returned stream closes the tier's, which
is how a client leaving early cancels the tier's work. Torch-free, like the rest of the gateway.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace

import grpc

from cluster.serving.tier_client import TierBusyError, TierClient, TierUnavailableError
from cluster.serving.tier_messages import TierRejected, TierRequest, TierTokens
from deploy.api import ApiError
from deploy.proto import moecluster_v1_pb2 as pb

REJECTION_CODES = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


async def open_tier_stream(
    tiers: TierClient, tier: str, request: TierRequest
) -> AsyncGenerator[TierTokens, None]:
    """Start generation on a tier; the replica's refusal becomes an ``ApiError``."""
    # stamped at each call (an escalation or a shadow run is a new wait in a new queue)
    stream = tiers.generate(tier, replace(request, sent_at=time.time()))
    try:
        first = await anext(stream)
    except TierBusyError:
        raise ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"tier {tier!r} is at capacity (its queue is full); retry later",
        ) from None
    except TierUnavailableError:
        raise ApiError(
            grpc.StatusCode.UNAVAILABLE, f"tier {tier!r} has no replica available; retry later"
        ) from None
    if isinstance(first, TierRejected):
        await stream.aclose()
        code = REJECTION_CODES.get(first.code, grpc.StatusCode.UNAVAILABLE)
        raise ApiError(code, first.message)
    return _tokens_only(tier, first, stream)


async def _tokens_only(
    tier: str, first: object, stream: AsyncGenerator[object, None]
) -> AsyncGenerator[TierTokens, None]:
    """The token batches from the first on; a tier lost or stopped mid-stream becomes
    UNAVAILABLE."""
    try:
        assert isinstance(first, TierTokens), f"unexpected first item {type(first).__name__}"
        yield first
        async for item in stream:
            if isinstance(item, TierRejected):  # the replica's engine stopped mid-stream
                code = REJECTION_CODES.get(item.code, grpc.StatusCode.UNAVAILABLE)
                raise ApiError(code, item.message)
            assert isinstance(item, TierTokens), f"unexpected {type(item).__name__} mid-stream"
            yield item
    except (TierBusyError, TierUnavailableError) as err:
        raise ApiError(
            grpc.StatusCode.UNAVAILABLE, f"tier {tier!r} failed during generation ({err}); retry"
        ) from None
    finally:
        await stream.aclose()


async def chain_held(
    held: list[TierTokens], stream: AsyncIterator[TierTokens]
) -> AsyncIterator[TierTokens]:
    """The batches a cascade probe held back, then the rest of the stream (unless they ended)."""
    for batch in held:
        yield batch
        if batch.finish_reason is not None:
            return
    async for batch in stream:
        yield batch


def routing_chunks(first_index: int, batch: TierTokens) -> list[pb.TokenRouting]:
    """``batch``'s per-token routing as proto messages, indexed from ``first_index``."""
    if batch.routing is None:
        return []
    return [
        pb.TokenRouting(
            index=first_index + i,
            layers=[pb.LayerRouting(layer=layer, experts=experts) for layer, experts in token],
        )
        for i, token in enumerate(batch.routing)
    ]
