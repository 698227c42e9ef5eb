"""The Gateway's cascade (a fast-tier probe, then escalation or not) and stop strings, with the
tiers played by ``tests.unit.gateway_fakes.FakeTierClient``.
"""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest

from deploy.api import ApiError
from deploy.gateway import Gateway
from deploy.proto import moecluster_v1_pb2 as pb
from tests.unit.gateway_fakes import (
    HEX32,
    FakeTierClient,
    api_error,
    assert_all_closed,
    assert_only_last_is_final,
    batch,
    make_config,
    rejected,
    run_generate,
    stream,
    text_of,
    tokens_of,
)

# --- cascade ---------------------------------------------------------------------------------


def test_cascade_confident_fast_tier_serves_and_keeps_the_probe_tokens() -> None:
    fast = stream(
        batch([1, 2, 3], [-0.1, -0.2, -0.3]),
        batch([4, 5], [-0.4, -8.0]),  # crosses the probe boundary: only -0.4 counts
        batch([6], -9.0),
        batch([7], -9.0, finish="length"),
    )
    fake = FakeTierClient({"fast": fast, "strong": stream(batch([99], finish="length"))})
    gateway = Gateway(make_config(), fake)
    chunks = run_generate(gateway, pb.GenerateRequest(prompt="hi"))

    assert [list(c.token_ids) for c in chunks] == [[1, 2, 3], [4, 5], [6], [7]]
    assert text_of(chunks) == "bcdefgh"
    last = assert_only_last_is_final(chunks)
    assert last.finish_reason == "length"
    assert last.tier.name == "fast"
    assert last.tier.reason == "confident"
    assert last.tier.escalated is False
    assert last.tier.HasField("confidence")
    assert last.tier.confidence == pytest.approx(-0.25, rel=1e-6)  # mean of the first 4
    assert last.usage.completion_tokens == 7
    assert fake.calls_to("strong") == []
    [call] = fake.calls_to("fast")
    assert not call.cancelled
    assert gateway.policy.num_by_reason["confident"] == 1
    assert_all_closed(fake)


def test_cascade_unconfident_fast_tier_escalates_to_strong_from_scratch() -> None:
    fast = stream(
        batch([1, 2], -5.0, text="FA"),
        batch([3, 4], -4.0, text="ST"),
        batch([5, 6], -4.0, text="!!"),
        batch([7], -4.0, text="?", finish="length"),
    )
    strong = stream(batch([10, 11], text="go"), batch([12], text="od", finish="stop"))
    fake = FakeTierClient({"fast": fast, "strong": strong})
    gateway = Gateway(make_config(), fake)
    request = pb.GenerateRequest(prompt="hi", max_tokens=20)
    chunks = run_generate(gateway, request, {"request_id": "r-esc"})

    assert tokens_of(chunks) == [10, 11, 12]  # none of the fast tier's tokens
    assert text_of(chunks) == "good"
    last = assert_only_last_is_final(chunks)
    assert last.finish_reason == "stop"
    assert last.tier.name == "strong"
    assert last.tier.model == "strong"
    assert last.tier.reason == "low_confidence"
    assert last.tier.escalated is True
    assert last.tier.confidence == pytest.approx(-4.5)
    assert last.usage.completion_tokens == 3
    assert last.request_id != "r-esc" and HEX32.fullmatch(last.request_id)

    fast_call, strong_call = fake.calls
    assert (fast_call.tier, strong_call.tier) == ("fast", "strong")
    assert fast_call.cancelled  # the fast stream was closed mid-way
    assert fast_call.handed_out == 2  # the two probe batches, nothing more
    # the same request, from scratch; stamped anew, as its wait in the strong tier's queue
    # starts now
    assert replace(strong_call.request, sent_at=0) == replace(fast_call.request, sent_at=0)
    assert 0 < fast_call.request.sent_at <= strong_call.request.sent_at
    assert not strong_call.cancelled
    assert gateway.policy.num_escalations == 1
    assert_all_closed(fake)


def test_low_retrieval_confidence_goes_straight_to_strong() -> None:
    fake = FakeTierClient(
        {"fast": stream(batch([1], finish="length")), "strong": stream(batch([5], finish="stop"))}
    )
    gateway = Gateway(make_config(), fake)
    chunks = run_generate(gateway, pb.GenerateRequest(prompt="hi", retrieval_confidence=0.2))
    assert tokens_of(chunks) == [5]
    tier = chunks[-1].tier
    assert (tier.name, tier.reason, tier.escalated) == ("strong", "low_retrieval_confidence", True)
    assert tier.confidence == pytest.approx(0.2)
    assert [c.tier for c in fake.calls] == ["strong"]  # fast never touched


def test_high_retrieval_confidence_still_probes_the_fast_tier() -> None:
    fake = FakeTierClient({"fast": stream(batch([1, 2, 3, 4, 5], -0.5, finish="length"))})
    chunks = run_generate(
        Gateway(make_config(), fake), pb.GenerateRequest(prompt="hi", retrieval_confidence=0.9)
    )
    assert tokens_of(chunks) == [1, 2, 3, 4, 5]
    assert chunks[-1].tier.reason == "confident"
    assert [c.tier for c in fake.calls] == ["fast"]


@pytest.mark.parametrize("finish", ["length", "stop"])
def test_generation_ending_before_the_probe_is_full_stays_on_fast(finish: str) -> None:
    fake = FakeTierClient(
        {
            "fast": stream(batch([1], -0.2), batch([2], -0.4, finish=finish)),
            "strong": stream(batch([9], finish="length")),
        }
    )
    chunks = run_generate(Gateway(make_config(), fake), pb.GenerateRequest(prompt="hi"))
    assert [list(c.token_ids) for c in chunks] == [[1], [2]]  # each token exactly once
    last = assert_only_last_is_final(chunks)
    assert last.finish_reason == finish
    assert (last.tier.name, last.tier.reason) == ("fast", "confident")
    assert last.tier.confidence == pytest.approx(-0.3)
    assert last.usage.completion_tokens == 2
    assert [c.tier for c in fake.calls] == ["fast"]
    assert not fake.calls[0].cancelled
    assert_all_closed(fake)


def test_short_unconfident_generation_escalates() -> None:
    fake = FakeTierClient(
        {
            "fast": stream(batch([1], -6.0, finish="length")),
            "strong": stream(batch([7, 8], finish="length")),
        }
    )
    chunks = run_generate(Gateway(make_config(), fake), pb.GenerateRequest(prompt="hi"))
    assert tokens_of(chunks) == [7, 8]
    assert chunks[-1].tier.reason == "low_confidence"
    assert chunks[-1].tier.confidence == pytest.approx(-6.0)
    assert_all_closed(fake)


def test_probe_with_no_tokens_counts_as_confident() -> None:
    fake = FakeTierClient({"fast": stream(batch([], finish="stop"))})
    chunks = run_generate(Gateway(make_config(), fake), pb.GenerateRequest(prompt="hi"))
    last = assert_only_last_is_final(chunks)
    assert (last.tier.reason, last.finish_reason) == ("confident", "stop")
    assert not last.tier.HasField("confidence")
    assert last.usage.completion_tokens == 0


def test_escalation_target_rejecting_closes_the_fast_stream() -> None:
    fake = FakeTierClient(
        {
            "fast": stream(batch([1, 2, 3, 4], -9.0), batch([5], finish="length")),
            "strong": rejected("resource_exhausted", "strong queue full"),
        }
    )
    err = api_error(Gateway(make_config(), fake), pb.GenerateRequest(prompt="hi"))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.message == "strong queue full"
    assert fake.calls_to("fast")[0].cancelled
    assert_all_closed(fake)


def test_escalation_respects_the_strong_tiers_max_tokens_limit() -> None:
    """BUG (gateway.py, ``generate``): ``max_tokens`` is checked only against the tier the
    policy starts on. With fast's limit 4096 and strong's 32, max_tokens=100 passes the check
    on fast, the probe escalates, and the strong tier is sent max_tokens=100, above its
    max_tokens_limit. Expected: INVALID_ARGUMENT (as for an explicit or retrieval-escalated
    strong request), or at least no request above strong's limit."""
    fake = FakeTierClient(
        {
            "fast": stream(batch([1, 2, 3, 4], -9.0), batch([5], finish="length")),
            "strong": stream(batch([7], finish="length")),
        }
    )
    gateway = Gateway(make_config(strong_limit=32), fake)
    request = pb.GenerateRequest(prompt="hi", max_tokens=100)
    # the same request sent straight to strong is refused, naming strong's limit
    direct = api_error(gateway, pb.GenerateRequest(prompt="hi", max_tokens=100, tier="strong"))
    assert direct.code == grpc.StatusCode.INVALID_ARGUMENT and "[1, 32]" in direct.message
    try:
        run_generate(gateway, request)
    except ApiError as err:
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    over = [c.request.params.max_tokens for c in fake.calls_to("strong")]
    assert all(n <= 32 for n in over), f"strong (limit 32) was sent max_tokens={over}"


# --- stop strings ----------------------------------------------------------------------------


def test_stop_string_ends_the_stream_and_closes_the_tier() -> None:
    fake = FakeTierClient(
        {
            "fast": stream(
                batch([1, 2], text="hello E"),
                batch([3, 4], text="ND more"),
                batch([5], text="never"),
                batch([6], text="seen", finish="length"),
            )
        }
    )
    request = pb.GenerateRequest(prompt="hi", tier="fast", stop=["END"])
    chunks = run_generate(Gateway(make_config(), fake), request)
    assert len(chunks) == 2
    assert text_of(chunks) == "hello "
    assert chunks[0].text == "hello "  # "E" held back: it might start "END"
    last = assert_only_last_is_final(chunks)
    assert last.finish_reason == "stop"
    assert list(last.token_ids) == [3, 4]
    assert last.tier.name == "fast"
    [call] = fake.calls
    assert call.cancelled
    assert call.handed_out == 2  # two batches
    assert_all_closed(fake)


def test_stop_string_in_the_first_batch() -> None:
    fake = FakeTierClient({"fast": stream(batch([1], text="###x"), batch([2], finish="length"))})
    request = pb.GenerateRequest(prompt="hi", tier="fast", stop=["###"])
    chunks = run_generate(Gateway(make_config(), fake), request)
    assert [(c.text, c.finish_reason) for c in chunks] == [("", "stop")]
    assert fake.calls[0].cancelled


def test_held_back_text_is_released_at_the_end() -> None:
    fake = FakeTierClient(
        {"fast": stream(batch([1], text="abc E"), batch([2], text="N", finish="length"))}
    )
    request = pb.GenerateRequest(prompt="hi", tier="fast", stop=["END"])
    chunks = run_generate(Gateway(make_config(), fake), request)
    assert [c.text for c in chunks] == ["abc ", "EN"]
    assert chunks[-1].finish_reason == "length"


def test_stop_string_applies_to_the_cascade_probe_tokens() -> None:
    fake = FakeTierClient(
        {
            "fast": stream(
                batch([1, 2], -0.1, text="ok S"),
                batch([3, 4], -0.1, text="TOP"),
                batch([5], finish="length"),
            )
        }
    )
    chunks = run_generate(
        Gateway(make_config(), fake), pb.GenerateRequest(prompt="hi", stop=["STOP"])
    )
    assert text_of(chunks) == "ok "
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].tier.reason == "confident"
    assert fake.calls[0].cancelled
    assert_all_closed(fake)
