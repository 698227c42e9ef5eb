"""The Gateway's shadow runs: in the background, measuring divergence, never failing the caller,
with the tiers played by ``tests.unit.gateway_fakes.FakeTierClient``.
"""

from __future__ import annotations

import asyncio

import pytest

from cluster.serving.tier_client import TierBusyError, TierUnavailableError
from deploy.gateway import Gateway
from deploy.proto import moecluster_v1_pb2 as pb
from router.shadow import divergence
from tests.unit.gateway_fakes import (
    SIMPLE,
    FakeTierClient,
    Script,
    assert_all_closed,
    assert_only_last_is_final,
    batch,
    collect,
    drain_background,
    rejected,
    shadow_config,
    stream,
    take_then_leave,
    tokens_of,
    wait_until,
)

# --- shadow ----------------------------------------------------------------------------------


def test_shadow_runs_in_the_background_and_records_divergence() -> None:
    fast_ids, fast_lps = [1, 2, 3, 4, 5], [-0.1, -0.2, -0.3, -0.4, -0.5]
    shadow_ids, shadow_lps = [1, 2, 8, 4], [-1.0, -1.0, -2.0, -2.0]
    release = asyncio.Event()

    async def scenario() -> None:
        fake = FakeTierClient(
            {
                "fast": stream(
                    batch(fast_ids[:3], fast_lps[:3]),
                    batch(fast_ids[3:], fast_lps[3:], finish="length"),
                ),
                "strong": Script(
                    [batch(shadow_ids, shadow_lps, finish="length")],
                    release=release,
                ),
            }
        )
        gateway = Gateway(shadow_config(probe_tokens=4), fake)
        request = pb.GenerateRequest(prompt="hi", max_tokens=50)
        # the caller finishes although the shadow tier has not produced anything yet
        chunks = await asyncio.wait_for(collect(gateway, request, {"request_id": "r-1"}), 5.0)
        assert tokens_of(chunks) == fast_ids
        last = assert_only_last_is_final(chunks)
        assert (last.tier.name, last.tier.reason) == ("fast", "default")
        assert gateway.policy.shadow.num_samples == 0

        await wait_until(lambda: len(fake.calls) == 2, "the shadow call")
        shadow_call = fake.calls[1]
        assert shadow_call.tier == "strong"
        assert shadow_call.request.request_id == f"{last.request_id}-shadow"
        assert shadow_call.request.params.max_tokens == 4  # min(shadow probe_tokens, 50)
        assert shadow_call.request.prompt == "hi"
        assert gateway.policy.shadow.num_samples == 0  # still waiting

        release.set()
        await drain_background()
        tracker = gateway.policy.shadow
        assert tracker.num_samples == 1
        expected = divergence(fast_ids, fast_lps, shadow_ids, shadow_lps, k=4)
        assert expected.token_agreement == 0.75  # 1, 2, _, 4 agree over the first 4
        assert tracker.mean_divergence == pytest.approx(0.25)
        assert tracker.mean_logprob_gap == pytest.approx(expected.logprob_gap)
        assert tracker.mean_logprob_gap == pytest.approx(abs(-0.25 - -1.5))
        assert_all_closed(fake)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "shadow",
    [
        rejected("resource_exhausted", "strong is full"),
        rejected("invalid_argument", "prompt too long for strong"),
        Script(error=TierBusyError),
        Script(error=TierUnavailableError),
    ],
    ids=["rejected-busy", "rejected-invalid", "busy", "unavailable"],
)
def test_failing_shadow_records_nothing_and_raises_nothing(shadow: Script) -> None:
    async def scenario() -> None:
        fake = FakeTierClient({"fast": SIMPLE, "strong": shadow})
        gateway = Gateway(shadow_config(), fake)
        chunks = await collect(gateway, pb.GenerateRequest(prompt="hi"))
        assert tokens_of(chunks) == [1, 2, 3]
        await wait_until(lambda: len(fake.calls) == 2, "the shadow call")
        await drain_background()  # re-raises anything the shadow task raised
        assert gateway.policy.shadow.num_samples == 0
        assert gateway.policy.shadow.num_recorded == 0

    asyncio.run(scenario())


def test_requests_served_by_the_candidate_are_not_shadowed() -> None:
    async def scenario() -> None:
        fake = FakeTierClient({"fast": SIMPLE, "strong": SIMPLE})
        gateway = Gateway(shadow_config(), fake)
        await collect(gateway, pb.GenerateRequest(prompt="hi", tier="strong"))
        await drain_background()
        assert [c.tier for c in fake.calls] == ["strong"]
        assert gateway.policy.shadow.num_samples == 0

    asyncio.run(scenario())


def test_client_leaving_early_spawns_no_shadow() -> None:
    async def scenario() -> None:
        fake = FakeTierClient({"fast": SIMPLE, "strong": SIMPLE})
        gateway = Gateway(shadow_config(), fake)
        await take_then_leave(gateway, pb.GenerateRequest(prompt="hi"), 1)
        await drain_background()
        assert [c.tier for c in fake.calls] == ["fast"]

    asyncio.run(scenario())
