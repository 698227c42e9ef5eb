"""Bounded request fields at the edge: ``RequestLimits`` in ``parse_generate``.

Each oversized field is refused with INVALID_ARGUMENT naming the field and the limit, and the
message never quotes the oversized value: it goes back to the client and into logs and
spans, so it stays short (a count or a size) whatever was sent. Issue 13: 100k stop strings
cost the gateway's event loop 103 ms per streamed batch and went whole into the message and
the audit log; 2M stop token ids slowed every engine step of the batch.
"""

from __future__ import annotations

import grpc
import pytest

from cache.kv_policy import MAX_ANCHORS
from cluster.engine import requests
from deploy import api
from deploy.api import ApiError, GenerateArgs, RequestLimits, parse_generate
from deploy.config import TierConfig
from deploy.proto import moecluster_v1_pb2 as pb
from experts.sampling_params import MAX_TOP_K, SamplingParams

MAX_MESSAGE_CHARS = 300


def parse(request: pb.GenerateRequest, limits: RequestLimits | None = None) -> GenerateArgs:
    return parse_generate(request, limits or RequestLimits())


def rejection(request: pb.GenerateRequest, limits: RequestLimits | None = None) -> str:
    """The INVALID_ARGUMENT message for ``request``, checked to be short."""
    with pytest.raises(ApiError) as info:
        parse_generate(request, limits or RequestLimits())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, info.value.message
    assert len(info.value.message) < MAX_MESSAGE_CHARS, info.value.message[:500]
    return info.value.message


def test_documented_defaults() -> None:
    limits = RequestLimits()
    assert (limits.max_stop, limits.max_stop_bytes, limits.max_stop_token_ids) == (16, 256, 64)
    assert (limits.max_session_id_bytes, limits.max_anchors, limits.max_name_bytes) == (
        256,
        64,
        64,
    )
    assert limits.max_prompt_bytes == 2**20
    assert limits.max_prompt_tokens == 131_072
    assert limits.max_tokens_limit == 4096


def test_shared_bounds_have_one_source() -> None:
    """Bounds the edge shares with the runtime are the runtime's own constants."""
    assert RequestLimits().max_anchors == MAX_ANCHORS  # KVPolicy refuses more anyway
    assert api.MAX_ATTENTION_FIRST_TOKENS is requests.MAX_ATTENTION_FIRST_TOKENS
    assert api.DEFAULT_MAX_TOKENS == SamplingParams().max_tokens
    tier = TierConfig(name="t", model="m")
    assert tier.max_tokens_limit == RequestLimits().max_tokens_limit == api.DEFAULT_MAX_TOKENS_LIMIT
    assert MAX_TOP_K == 1_000_000


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"RequestLimits.max_stop=0 must be >= 1"):
        RequestLimits(max_stop=0)


def test_an_int_is_the_max_tokens_limit() -> None:
    """The gateway's call of today, ``parse_generate(request, max_tokens_limit)``, still works."""
    request = pb.GenerateRequest(prompt="x", max_tokens=100)
    assert parse_generate(request, 100) == parse(request, RequestLimits(max_tokens_limit=100))
    with pytest.raises(ApiError, match=r"\[1, 99\]"):
        parse_generate(request, 99)
    # and the other limits apply with their defaults
    with pytest.raises(ApiError, match="stop has 17 stop strings: allowed at most 16"):
        parse_generate(pb.GenerateRequest(prompt="x", stop=["a"] * 17), 100)


# --- stop strings ------------------------------------------------------------------------------


def test_100k_stop_strings_are_refused() -> None:
    message = rejection(pb.GenerateRequest(prompt="x", stop=[f"stop-{i}" for i in range(100_000)]))
    assert message == "stop has 100000 stop strings: allowed at most 16"


def test_stop_count_at_the_limit_is_accepted() -> None:
    stops = [f"s{i}" for i in range(16)]
    assert parse(pb.GenerateRequest(prompt="x", stop=stops)).stop == tuple(stops)
    rejection(pb.GenerateRequest(prompt="x", stop=[*stops, "one more"]))


def test_long_stop_string_is_refused_by_its_utf8_size() -> None:
    fits = "é" * 128  # 256 bytes
    assert parse(pb.GenerateRequest(prompt="x", stop=["ok", fits])).stop == ("ok", fits)
    message = rejection(pb.GenerateRequest(prompt="x", stop=["ok", fits + "é"]))
    assert message == "stop[1] is 258 bytes: allowed at most 256 bytes of UTF-8"


def test_huge_stop_string_is_not_echoed() -> None:
    message = rejection(pb.GenerateRequest(prompt="x", stop=["x" * 10**6]))
    assert message == "stop[0] is 1000000 characters: allowed at most 256 bytes of UTF-8"


def test_stop_strings_may_hold_control_characters() -> None:
    """Newlines are the most common stop strings; a NUL is harmless (it never matches)."""
    stops = ("\n\n", "\t", "\x00")
    assert parse(pb.GenerateRequest(prompt="x", stop=stops)).stop == stops


# --- stop token ids ----------------------------------------------------------------------------


def test_2m_stop_token_ids_are_refused_before_conversion() -> None:
    """The count is checked on the proto's container: no 2M-element tuple is built."""
    request = pb.GenerateRequest(prompt="x", stop_token_ids=range(2_000_000))
    message = rejection(request)
    assert message == "stop_token_ids has 2000000 ids: allowed at most 64"


def test_stop_token_ids_at_the_limit_are_accepted() -> None:
    args = parse(pb.GenerateRequest(prompt="x", stop_token_ids=range(64)))
    assert args.params.stop_token_ids == tuple(range(64))
    rejection(pb.GenerateRequest(prompt="x", stop_token_ids=range(65)))


# --- the prompt --------------------------------------------------------------------------------


def test_10mb_prompt_is_refused() -> None:
    message = rejection(pb.GenerateRequest(prompt="a" * 10 * 2**20))
    assert message == "prompt is 10485760 characters: allowed at most 1048576 bytes of UTF-8"


def test_prompt_is_measured_in_utf8_bytes() -> None:
    limits = RequestLimits(max_prompt_bytes=8)
    assert parse(pb.GenerateRequest(prompt="éééé"), limits).prompt == "éééé"  # 8 bytes
    message = rejection(pb.GenerateRequest(prompt="ééééé"), limits)
    assert message == "prompt is 10 bytes: allowed at most 8 bytes of UTF-8"


def test_prompt_is_valid_text_on_the_wire() -> None:
    """Protobuf refuses a string that is not UTF-8, both when set and when parsed."""
    with pytest.raises(ValueError):
        pb.GenerateRequest(prompt="\ud800")
    wire = pb.GenerateRequest(prompt="ok").SerializeToString().replace(b"ok", b"\xff\xfe")
    with pytest.raises(Exception, match="UTF-8"):
        pb.GenerateRequest.FromString(wire)


def test_too_many_token_ids_are_refused() -> None:
    message = rejection(pb.GenerateRequest(token_ids=[1] * 131_073))
    assert message == "token_ids has 131073 token ids: allowed at most 131072"


def test_token_ids_limit_is_the_callers_context() -> None:
    limits = RequestLimits(max_prompt_tokens=8)
    assert parse(pb.GenerateRequest(token_ids=range(8)), limits).token_ids == tuple(range(8))
    message = rejection(pb.GenerateRequest(token_ids=range(9)), limits)
    assert message == "token_ids has 9 token ids: allowed at most 8"


def test_token_ids_are_uint32_on_the_wire() -> None:
    """Negative or 64-bit ids cannot be sent; the vocabulary range is the engine's check."""
    for bad in (-1, 2**32):
        with pytest.raises(ValueError):
            pb.GenerateRequest(token_ids=[bad])
    assert parse(pb.GenerateRequest(token_ids=[2**32 - 1])).token_ids == (2**32 - 1,)


# --- session id, names, anchors ----------------------------------------------------------------


def test_long_session_id_is_refused() -> None:
    assert parse(pb.GenerateRequest(prompt="x", session_id="s" * 256)).session_id == "s" * 256
    message = rejection(pb.GenerateRequest(prompt="x", session_id="s" * 1000))
    assert message == "session_id is 1000 bytes: allowed at most 256 bytes of UTF-8"


@pytest.mark.parametrize("session_id", ["chat\n9", "a\x00b", "\x1b[31mred", "tab\there"])
def test_session_id_must_be_printable(session_id: str) -> None:
    """A session id goes into logs and spans: no line breaks, NULs or terminal escapes."""
    message = rejection(pb.GenerateRequest(prompt="x", session_id=session_id))
    assert message.startswith("session_id has the non-printable character ")
    assert "a session id is printable text" in message


def test_printable_unicode_session_id_is_accepted() -> None:
    assert parse(pb.GenerateRequest(prompt="x", session_id="chat 9 ✓")).session_id == "chat 9 ✓"


def test_long_tier_name_is_refused() -> None:
    message = rejection(pb.GenerateRequest(prompt="x", tier="t" * 10**6))
    assert message == "tier is 1000000 characters: allowed at most 64 bytes of UTF-8"


def test_long_kv_policy_kind_is_refused_without_echo() -> None:
    """KVPolicy quotes an unknown kind: only a short one reaches it."""
    kv = pb.KVPolicy(kind="w" * 10**6, window=8)
    message = rejection(pb.GenerateRequest(prompt="x", kv_policy=kv))
    assert message == "kv_policy.kind is 1000000 characters: allowed at most 64 bytes of UTF-8"


def test_anchor_count_is_refused() -> None:
    def request(n: int) -> pb.GenerateRequest:
        anchors = [pb.Span(start=2 * i, end=2 * i + 1) for i in range(n)]
        kv = pb.KVPolicy(kind="window", window=4096, anchors=anchors)
        return pb.GenerateRequest(prompt="x", kv_policy=kv)

    assert len(parse(request(64)).kv_policy.anchors) == 64
    message = rejection(request(100_000))
    assert message == "kv_policy.anchors has 100000 spans: allowed at most 64"


def test_anchor_count_is_checked_before_the_kind() -> None:
    """KVPolicy's 'window settings need kind window' message lists the anchors: bound them."""
    kv = pb.KVPolicy(anchors=[pb.Span(start=0, end=1)] * 10_000)
    message = rejection(pb.GenerateRequest(prompt="x", kv_policy=kv))
    assert message == "kv_policy.anchors has 10000 spans: allowed at most 64"


def test_a_request_at_every_limit_is_accepted() -> None:
    limits = RequestLimits(max_stop=2, max_stop_bytes=3, max_session_id_bytes=4, max_anchors=1)
    request = pb.GenerateRequest(
        prompt="p",
        stop=["abc", "def"],
        stop_token_ids=range(64),
        session_id="abcd",
        kv_policy=pb.KVPolicy(kind="window", window=64, anchors=[pb.Span(start=0, end=4)]),
    )
    args = parse(request, limits)
    assert args.stop == ("abc", "def") and args.session_id == "abcd"
