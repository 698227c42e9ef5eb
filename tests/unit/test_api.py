"""The edge of the gRPC API: ``parse_generate`` validation and ``ApiError`` across processes.

Every rejected field must come back as INVALID_ARGUMENT whose message names the field, the
value sent and what is allowed, so a client can fix the request from the message alone.
Float fields are proto ``float`` (32-bit), so expected values are read back from the message.
"""

from __future__ import annotations

import math
import pickle

import grpc
import pytest

from cache.kv_policy import KVPolicy
from deploy.api import (
    DEFAULT_MAX_TOKENS,
    ApiError,
    GenerateArgs,
    RequestLimits,
    invalid,
    parse_generate,
)
from deploy.proto import moecluster_v1_pb2 as pb
from experts.sampling_params import MAX_TOP_K

LIMIT = 4096


def parse(request: pb.GenerateRequest, limit: int | RequestLimits = LIMIT) -> GenerateArgs:
    return parse_generate(request, limit)


def rejection(request: pb.GenerateRequest, limit: int | RequestLimits = LIMIT) -> str:
    """The INVALID_ARGUMENT message ``parse_generate`` raises for ``request``."""
    with pytest.raises(ApiError) as info:
        parse_generate(request, limit)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, info.value.message
    assert str(info.value) == info.value.message
    return info.value.message


# --- defaults and the prompt ------------------------------------------------------------------


def test_defaults_for_a_bare_prompt() -> None:
    args = parse(pb.GenerateRequest(prompt="hello"))
    assert args.prompt == "hello"
    assert args.token_ids is None
    p = args.params
    assert p.max_tokens == DEFAULT_MAX_TOKENS == 64  # max_tokens 0 means 64
    assert p.greedy and p.temperature == 0.0
    assert p.top_p == 1.0
    assert p.top_k == 0
    assert p.seed is None
    assert p.stop_token_ids == ()
    assert p.ignore_eos is False
    assert args.kv_policy == KVPolicy()  # an empty kv_policy message is "full"
    assert args.tier is None  # empty: the policy decides
    assert args.stop == ()
    assert args.session_id == ""
    assert args.retrieval_confidence is None
    assert args.return_routing is False


def test_token_ids_prompt() -> None:
    args = parse(pb.GenerateRequest(token_ids=[5, 0, 7]))
    assert args.token_ids == (5, 0, 7)
    assert args.prompt is None


def test_explicit_max_tokens_is_kept() -> None:
    assert parse(pb.GenerateRequest(prompt="x", max_tokens=5)).params.max_tokens == 5


@pytest.mark.parametrize(
    "request_",
    [
        pb.GenerateRequest(),
        pb.GenerateRequest(prompt="hi", token_ids=[1, 2]),
    ],
    ids=["neither", "both"],
)
def test_exactly_one_of_prompt_or_token_ids(request_: pb.GenerateRequest) -> None:
    message = rejection(request_)
    assert "exactly one of 'prompt'" in message
    assert "'token_ids'" in message


def test_other_fields_pass_through() -> None:
    request = pb.GenerateRequest(
        prompt="hi",
        tier="strong",
        top_k=40,
        stop=["\n\n", "END"],
        stop_token_ids=[2, 3],
        ignore_eos=True,
        session_id="chat-9",
        return_routing=True,
    )
    args = parse(request)
    assert args.tier == "strong"
    assert args.params.top_k == 40
    assert args.stop == ("\n\n", "END")
    assert args.params.stop_token_ids == (2, 3)
    assert args.params.ignore_eos is True
    assert args.session_id == "chat-9"
    assert args.return_routing is True


# --- range checks ------------------------------------------------------------------------------


def test_max_tokens_over_the_limit() -> None:
    message = rejection(pb.GenerateRequest(prompt="x", max_tokens=101), limit=100)
    assert "max_tokens=101" in message
    assert "[1, 100]" in message


def test_max_tokens_at_the_limit_is_accepted() -> None:
    assert parse(pb.GenerateRequest(prompt="x", max_tokens=100), limit=100).params.max_tokens == 100


@pytest.mark.parametrize("value", [100.5, -0.5, 1e9, math.nan, math.inf])
def test_temperature_out_of_range(value: float) -> None:
    request = pb.GenerateRequest(prompt="x", temperature=value)
    message = rejection(request)
    assert f"temperature={request.temperature!r}" in message
    assert "[0, 100]" in message


@pytest.mark.parametrize("value", [0.0, 100.0])
def test_temperature_bounds_are_accepted(value: float) -> None:
    assert parse(pb.GenerateRequest(prompt="x", temperature=value)).params.temperature == value


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, math.nan])
def test_top_p_out_of_range(value: float) -> None:
    request = pb.GenerateRequest(prompt="x", top_p=value)
    message = rejection(request)
    assert f"top_p={request.top_p!r}" in message
    assert "(0, 1]" in message


def test_top_k_cannot_be_negative_on_the_wire() -> None:
    """top_k is uint32: the proto refuses a negative value."""
    with pytest.raises(ValueError):
        pb.GenerateRequest(prompt="x", top_k=-1)


def test_top_k_is_bounded() -> None:
    limit = MAX_TOP_K  # SamplingParams' bound, checked when the edge builds one
    assert parse(pb.GenerateRequest(prompt="x", top_k=limit)).params.top_k == limit
    message = rejection(pb.GenerateRequest(prompt="x", top_k=2**32 - 1))
    assert f"top_k=4294967295 is out of range: allowed [0, {limit}]" in message


@pytest.mark.parametrize("value", [2**63, 2**64 - 1])
def test_seed_out_of_range(value: int) -> None:
    message = rejection(pb.GenerateRequest(prompt="x", seed=value))
    assert f"seed={value}" in message
    assert "[0, 2**63)" in message


def test_largest_seed_is_accepted() -> None:
    assert parse(pb.GenerateRequest(prompt="x", seed=2**63 - 1)).params.seed == 2**63 - 1


@pytest.mark.parametrize("value", [1.5, -0.25, 2.0, math.nan])
def test_retrieval_confidence_out_of_range(value: float) -> None:
    message = rejection(pb.GenerateRequest(prompt="x", retrieval_confidence=value))
    assert f"retrieval_confidence={value:g}" in message
    assert "[0, 1]" in message


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_retrieval_confidence_bounds_are_accepted(value: float) -> None:
    request = pb.GenerateRequest(prompt="x", retrieval_confidence=value)
    assert parse(request).retrieval_confidence == value


def test_empty_stop_string() -> None:
    message = rejection(pb.GenerateRequest(prompt="x", stop=["ok", ""]))
    assert "stop[1] is empty" in message
    assert "stop strings must not be empty" in message


def test_empty_stop_string_message_does_not_echo_the_others() -> None:
    """The message once quoted the whole list: 15 stop strings of 256 bytes made it 4 KB."""
    stops = ["s" * 256] * 15 + [""]
    message = rejection(pb.GenerateRequest(prompt="x", stop=stops))
    assert "stop[15] is empty" in message
    assert "sss" not in message and len(message) < 100


# --- kv_policy -------------------------------------------------------------------------------


def test_window_kv_policy_with_anchors() -> None:
    kv = pb.KVPolicy(
        kind="window",
        window=256,
        sinks=4,
        anchors=[pb.Span(start=0, end=32), pb.Span(start=40, end=48)],
    )
    args = parse(pb.GenerateRequest(prompt="x", kv_policy=kv))
    assert args.kv_policy == KVPolicy(
        kind="window", window=256, sinks=4, anchors=((0, 32), (40, 48))
    )
    assert args.kv_policy.is_window


def test_explicit_full_kv_policy() -> None:
    args = parse(pb.GenerateRequest(prompt="x", kv_policy=pb.KVPolicy(kind="full")))
    assert args.kv_policy == KVPolicy()


def test_unknown_kv_policy_kind() -> None:
    message = rejection(pb.GenerateRequest(prompt="x", kv_policy=pb.KVPolicy(kind="ring")))
    assert message.startswith("kv_policy: ")
    assert "'ring'" in message
    assert "full, window" in message  # what is allowed


def test_window_kv_policy_needs_a_window() -> None:
    message = rejection(pb.GenerateRequest(prompt="x", kv_policy=pb.KVPolicy(kind="window")))
    assert message.startswith("kv_policy: ")
    assert "window=0" in message
    assert "> 0" in message


@pytest.mark.parametrize("span", [(5, 5), (9, 3)])
def test_bad_anchor_span(span: tuple[int, int]) -> None:
    kv = pb.KVPolicy(kind="window", window=64, anchors=[pb.Span(start=span[0], end=span[1])])
    message = rejection(pb.GenerateRequest(prompt="x", kv_policy=kv))
    assert message.startswith("kv_policy: ")
    assert f"[{span[0]}, {span[1]})" in message
    assert "0 <= start < end" in message


@pytest.mark.parametrize(
    "kv",
    [
        pb.KVPolicy(window=64),
        pb.KVPolicy(kind="full", sinks=4),
        pb.KVPolicy(kind="full", anchors=[pb.Span(start=0, end=8)]),
    ],
    ids=["window", "sinks", "anchors"],
)
def test_window_settings_need_the_window_kind(kv: pb.KVPolicy) -> None:
    message = rejection(pb.GenerateRequest(prompt="x", kv_policy=kv))
    assert message.startswith("kv_policy: ")
    assert "only to kv_policy 'window'" in message


# --- optional fields: set to the default value vs unset -----------------------------------------


def test_optional_fields_unset() -> None:
    request = pb.GenerateRequest(prompt="x")
    for name in ("temperature", "top_p", "seed", "retrieval_confidence"):
        assert not request.HasField(name)
    args = parse(request)
    assert args.params.temperature == 0.0
    assert args.params.top_p == 1.0
    assert args.params.seed is None
    assert args.retrieval_confidence is None


def test_optional_fields_set_to_zero_are_kept() -> None:
    """Zero is a value, not "unset": seed 0 is reproducible, confidence 0 escalates."""
    args = parse(pb.GenerateRequest(prompt="x", seed=0, retrieval_confidence=0.0, temperature=0.0))
    assert args.params.seed == 0
    assert args.retrieval_confidence == 0.0
    assert args.params.temperature == 0.0
    assert args.params.greedy


def test_optional_fields_set() -> None:
    request = pb.GenerateRequest(
        prompt="x", temperature=0.7, top_p=0.9, seed=1234, retrieval_confidence=0.25
    )
    args = parse(request)
    assert args.params.temperature == pytest.approx(0.7, rel=1e-6)
    assert not args.params.greedy
    assert args.params.top_p == pytest.approx(0.9, rel=1e-6)
    assert args.params.seed == 1234
    assert args.retrieval_confidence == 0.25


# --- ApiError --------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED]
)
def test_api_error_pickles(code: grpc.StatusCode, protocol: int) -> None:
    """ApiError crosses from the gateway replica to Serve's proxy: code and message survive."""
    err = ApiError(code, "max_tokens=9 is out of range: allowed [1, 8]")
    copy = pickle.loads(pickle.dumps(err, protocol=protocol))
    assert type(copy) is ApiError
    assert copy.code == code
    assert copy.message == err.message
    assert str(copy) == err.message


def test_api_error_from_parse_pickles() -> None:
    with pytest.raises(ApiError) as info:
        parse(pb.GenerateRequest(prompt="x", top_p=2.0))
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.code == grpc.StatusCode.INVALID_ARGUMENT
    assert copy.message == info.value.message


def test_invalid_helper() -> None:
    err = invalid("bad thing")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == "bad thing"
