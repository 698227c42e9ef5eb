"""A tier's token stream as the gateway reads it: opened, checked, chained, turned into routing.

``open_tier_stream`` starts generation on a tier and waits for its first item, so a replica's
refusal (``TierRejected``, a full queue, no replica) becomes an ``ApiError`` before the caller
sees a token; what follows is a stream of ``TierTokens`` only, in which a replica lost (its
actor died, its engine stopped) is a ``ReplicaLostError`` (UNAVAILABLE) and any other failure
an ``ApiError``. Closing the returned stream closes the tier's, which is how a client leaving
early cancels the tier's work. ``resumable_stream`` (``deploy.resubmit``) resubmits a request
whose replica was lost. Torch-free, like the rest of the gateway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

import grpc

from cluster.serving.tier_client import (
    TierBusyError,
    TierClient,
    TierReplicaLostError,
    TierUnavailableError,
)
from cluster.serving.tier_messages import TierRejected, TierRequest, TierTokens
from deploy.api import ApiError
from deploy.proto import moecluster_v1_pb2 as pb

REJECTION_CODES = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


class ReplicaLostError(ApiError):
    """The replica serving a request is gone (its actor died, or its engine stopped): nothing
    was wrong with the request, and another replica of the tier can take it over."""

    def __init__(self, tier: str, detail: str) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            f"tier {tier!r} lost the replica serving this request ({detail}); retry",
        )
        self.tier = tier
        self.detail = detail

    def __reduce__(self) -> tuple[type[ReplicaLostError], tuple[str, str]]:
        return (ReplicaLostError, (self.tier, self.detail))


def _rejection(tier: str, item: TierRejected) -> ApiError:
    if item.engine_stopped:
        return ReplicaLostError(tier, item.message)
    return ApiError(REJECTION_CODES.get(item.code, grpc.StatusCode.UNAVAILABLE), item.message)


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
    except TierReplicaLostError as err:
        raise ReplicaLostError(tier, str(err)) from None
    if isinstance(first, TierRejected):
        await stream.aclose()
        raise _rejection(tier, first)
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
                raise _rejection(tier, item)
            assert isinstance(item, TierTokens), f"unexpected {type(item).__name__} mid-stream"
            yield item
    except TierReplicaLostError as err:
        raise ReplicaLostError(tier, str(err)) from None
    except (TierBusyError, TierUnavailableError) as err:
        raise ApiError(
            grpc.StatusCode.UNAVAILABLE, f"tier {tier!r} failed during generation ({err}); retry"
        ) from None
    finally:
        await stream.aclose()


@dataclass(frozen=True)
class Resubmission:
    """When the gateway resubmits a request whose replica was lost: at most
    ``max_resubmissions`` times, none starting after ``deadline`` (on ``clock``), the second
    and later ones after ``backoff_s`` times their number less one (the first goes at once:
    Serve's router has dropped a dead actor by then). ``on_resubmit(error, attempt, sent)``
    is told of each (the trace's event, the metric)."""

    max_resubmissions: int
    deadline: float
    on_resubmit: Callable[[ReplicaLostError, int, int], None]
    clock: Callable[[], float] = time.monotonic
    backoff_s: float = 0.5


async def open_resumable(
    tiers: TierClient, tier: str, request: TierRequest, policy: Resubmission
) -> AsyncGenerator[TierTokens, None]:
    """``open_tier_stream``, resubmitted to another replica of ``tier`` when the one serving
    it is lost (``ReplicaLostError``), at open or mid-stream, within ``policy``.

    A resubmission carries every token already passed on (``resume_token_ids``) with the
    same seed: the new replica treats them as generated output and goes on from the next
    token, drawing what the lost one would have (``experts.sampling.draw_seed``), so the
    caller sees one stream, with no token repeated or missing. Any other failure (a refusal,
    a full queue, a cancel) ends the stream as before.
    """
    count = [0]  # resubmissions so far, for both phases
    stream = await _reopen(tiers, tier, request, [], policy, count, None)
    return _resumed(tiers, tier, request, stream, policy, count)


async def _reopen(
    tiers: TierClient,
    tier: str,
    request: TierRequest,
    sent: Sequence[int],
    policy: Resubmission,
    count: list[int],
    lost: ReplicaLostError | None,
) -> AsyncGenerator[TierTokens, None]:
    """Open (``lost`` None) or resubmit (after ``lost``) until a replica takes the request."""
    while True:
        if lost is not None:
            if count[0] >= policy.max_resubmissions or policy.clock() >= policy.deadline:
                raise lost
            count[0] += 1
            policy.on_resubmit(lost, count[0], len(sent))
            wait = policy.backoff_s * (count[0] - 1)
            if wait > 0:
                await asyncio.sleep(min(wait, max(0.0, policy.deadline - policy.clock())))
        resumed = replace(request, resume_token_ids=tuple(sent)) if sent else request
        try:
            return await open_tier_stream(tiers, tier, resumed)
        except ReplicaLostError as err:
            lost = err


async def _resumed(
    tiers: TierClient,
    tier: str,
    request: TierRequest,
    stream: AsyncGenerator[TierTokens, None],
    policy: Resubmission,
    count: list[int],
) -> AsyncGenerator[TierTokens, None]:
    sent: list[int] = []  # every token passed on: the context of a resubmission
    try:
        while True:
            try:
                async for batch in stream:
                    sent += batch.token_ids
                    yield batch
                return
            except ReplicaLostError as err:
                await stream.aclose()
                stream = await _reopen(tiers, tier, request, sent, policy, count, err)
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
