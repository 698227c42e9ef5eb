"""The gRPC edge of the KV cache: request pins checked at the edge, and the usage's split of
cached tokens (local cache vs cluster store) with the miss reasons."""

from __future__ import annotations

import grpc
import pytest

from cluster.serving.tier_messages import TierTokens
from deploy.api import ApiError, RequestLimits, parse_generate, usage_message
from deploy.proto import moecluster_v1_pb2 as pb
from router.route_notes import ROUTED_ELSEWHERE, note_routed_elsewhere, routed_elsewhere


def rejection(request: pb.GenerateRequest, limits: RequestLimits | int = 4096) -> str:
    with pytest.raises(ApiError) as info:
        parse_generate(request, limits)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.message


def test_a_pin_passes_through() -> None:
    args = parse_generate(pb.GenerateRequest(prompt="hi", pin_tokens=256, pin_ttl_s=60.0), 64)
    assert (args.pin_tokens, args.pin_ttl_s) == (256, 60.0)
    bare = parse_generate(pb.GenerateRequest(prompt="hi"), 64)
    assert (bare.pin_tokens, bare.pin_ttl_s) == (0, 0.0)


def test_pin_tokens_bounded_by_the_prompt_limit() -> None:
    limits = RequestLimits(max_prompt_tokens=1000)
    message = rejection(pb.GenerateRequest(prompt="hi", pin_tokens=1001, pin_ttl_s=5), limits)
    assert "pin_tokens=1001" in message and "[0, 1000]" in message
    ok = parse_generate(pb.GenerateRequest(prompt="hi", pin_tokens=1000, pin_ttl_s=5), limits)
    assert ok.pin_tokens == 1000


@pytest.mark.parametrize("ttl", [-1.0, 86_401.0, float("inf"), float("nan")])
def test_pin_ttl_out_of_range(ttl: float) -> None:
    message = rejection(pb.GenerateRequest(prompt="hi", pin_tokens=16, pin_ttl_s=ttl))
    assert "pin_ttl_s=" in message and "86400" in message


@pytest.mark.parametrize(("tokens", "ttl"), [(16, 0.0), (0, 30.0)])
def test_pin_needs_both_fields(tokens: int, ttl: float) -> None:
    message = rejection(pb.GenerateRequest(prompt="hi", pin_tokens=tokens, pin_ttl_s=ttl))
    assert "pin_tokens" in message and "pin_ttl_s" in message and "both" in message


def tokens(cached: int, store: int, miss: str) -> TierTokens:
    return TierTokens(
        token_ids=[1],
        logprobs=[0.0],
        text="",
        finish_reason="length",
        num_prompt_tokens=100,
        num_cached_prompt_tokens=cached,
        num_truncated_tokens=0,
        num_store_cached_tokens=store,
        kv_miss=miss,
    )


def test_usage_splits_cached_tokens_and_names_the_miss() -> None:
    usage = usage_message(tokens(64, 48, "evicted_local"), 7, "req-a")
    assert (usage.prompt_tokens, usage.cached_prompt_tokens, usage.completion_tokens) == (
        100,
        64,
        7,
    )
    assert (usage.store_cached_tokens, usage.local_cached_tokens) == (48, 16)
    assert list(usage.kv_miss_reasons) == ["evicted_local"]
    full = usage_message(tokens(96, 0, ""), 1, "req-b")
    assert (full.local_cached_tokens, list(full.kv_miss_reasons)) == (96, [])


def test_usage_adds_routed_elsewhere_once() -> None:
    note_routed_elsewhere("req-c")
    usage = usage_message(tokens(0, 0, "never_seen"), 1, "req-c")
    assert list(usage.kv_miss_reasons) == ["never_seen", ROUTED_ELSEWHERE]
    again = usage_message(tokens(0, 0, "never_seen"), 1, "req-c")  # the note was taken
    assert list(again.kv_miss_reasons) == ["never_seen"]


def test_route_notes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import router.route_notes as notes

    monkeypatch.setattr(notes, "MAX_NOTES", 3)
    for i in range(5):
        note_routed_elsewhere(f"bounded-{i}")
    assert not routed_elsewhere("bounded-0") and not routed_elsewhere("bounded-1")
    assert all(routed_elsewhere(f"bounded-{i}") for i in (2, 3, 4))
    note_routed_elsewhere("")  # no id: nothing noted
    assert not routed_elsewhere("")
