"""The gRPC request at the edge: validation into internal types, and API errors.

Every problem with a request becomes an ``ApiError`` carrying the gRPC status
and a message meant for the caller (the field, the value, what is allowed). Sizes come first:
every string and repeated field is measured against ``RequestLimits`` before anything is
converted, and a message never quotes an unbounded value (only its count or size), because
messages go back to the client and into logs and trace spans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import grpc

from cache.kv_policy import MAX_ANCHORS, KVPolicy
from cluster.engine.requests import MAX_ATTENTION_FIRST_TOKENS, MAX_PIN_TTL_S
from cluster.serving.tier_messages import TierTokens
from deploy.proto import moecluster_v1_pb2 as pb
from experts.sampling_params import DEFAULT_MAX_TOKENS, SamplingParams
from router.policy_checks import check_unit_interval
from router.route_notes import ROUTED_ELSEWHERE, routed_elsewhere

DEFAULT_MAX_TOKENS_LIMIT = 4096  # a tier's max_tokens_limit unless its config sets one


class ApiError(Exception):
    """An error for the client: a gRPC status and a user-facing message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[ApiError], tuple[grpc.StatusCode, str]]:
        # may cross processes (pickled): keep both fields
        return (ApiError, (self.code, self.message))


def invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on every string and repeated field of a Generate request, checked at the edge.

    Each bound keeps one request from costing the others: stop strings are matched on the
    gateway's event loop at every streamed batch, stop token ids are checked by the engine
    at every step, and all of them go into the audit record. Sizes of strings are in bytes
    of UTF-8 (what travels); ``max_tokens_limit`` is the largest of the tiers' own limits.
    Value bounds are not here but where the value is used: ``SamplingParams`` (max_tokens,
    temperature, top_p, top_k, seed), ``KVPolicy`` (kv_policy), the tier policy
    (retrieval_confidence) and the engine's requests (attention_first_tokens).
    """

    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT  # max_tokens
    max_prompt_bytes: int = 2**20  # prompt text
    max_prompt_tokens: int = 131_072  # token_ids: at most the largest tier's context
    max_stop: int = 16  # stop strings per request
    max_stop_bytes: int = 256  # each stop string
    max_stop_token_ids: int = 64
    max_session_id_bytes: int = 256
    max_anchors: int = MAX_ANCHORS  # kv_policy.anchors spans (KVPolicy's own bound)
    max_name_bytes: int = 64  # tier and kv_policy.kind: names looked up in a short list

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 1:
                raise ValueError(f"RequestLimits.{f.name}={value} must be >= 1")


@dataclass(frozen=True)
class GenerateArgs:
    """A validated Generate request."""

    params: SamplingParams
    kv_policy: KVPolicy
    prompt: str | None
    token_ids: tuple[int, ...] | None
    tier: str | None
    stop: tuple[str, ...]
    session_id: str
    retrieval_confidence: float | None
    return_routing: bool
    attention_first_tokens: int = 0  # attention diagnostics; 0 = off
    pin_tokens: int = 0  # pin the prompt's first tokens in the KV cache (soft) ...
    pin_ttl_s: float = 0.0  # ... for this long; both 0: no pin


def parse_generate(r: pb.GenerateRequest, limits: RequestLimits | int) -> GenerateArgs:
    """Check a ``moecluster.v1.GenerateRequest``; raise ``ApiError`` naming the bad field.

    ``limits`` as a bare int is ``RequestLimits(max_tokens_limit=limits)``. Token ids are
    uint32 on the wire and strings valid UTF-8 (protobuf refuses anything else while
    parsing); whether an id is inside a model's vocabulary is the engine's check.
    """
    if isinstance(limits, int):
        limits = RequestLimits(max_tokens_limit=limits)
    prompt: str = r.prompt  # read once: each read of a string field builds a new str
    _check_sizes(r, prompt, limits)
    token_ids = tuple(int(t) for t in r.token_ids)
    if bool(prompt) == bool(token_ids):
        raise invalid("give exactly one of 'prompt' (text) or 'token_ids'")
    max_tokens_limit = limits.max_tokens_limit
    max_tokens = r.max_tokens or min(DEFAULT_MAX_TOKENS, max_tokens_limit)
    if max_tokens > max_tokens_limit:
        raise invalid(f"max_tokens={max_tokens} is out of range: allowed [1, {max_tokens_limit}]")
    # optional fields the client left unset take SamplingParams' own defaults
    given: dict[str, Any] = {
        name: getattr(r, name) for name in ("temperature", "top_p", "seed") if r.HasField(name)
    }
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            top_k=r.top_k,
            stop_token_ids=tuple(r.stop_token_ids),
            ignore_eos=r.ignore_eos,
            **given,
        )
    except ValueError as err:
        raise invalid(str(err)) from None
    kv = r.kv_policy
    try:
        policy = KVPolicy(
            kind=kv.kind or "full",
            window=kv.window,
            sinks=kv.sinks,
            anchors=tuple((a.start, a.end) for a in kv.anchors),
        )
    except ValueError as err:
        raise invalid(f"kv_policy: {err}") from None
    confidence = r.retrieval_confidence if r.HasField("retrieval_confidence") else None
    if confidence is not None:
        try:
            check_unit_interval("retrieval_confidence", confidence)
        except ValueError as err:
            raise invalid(str(err)) from None
    stops = tuple(r.stop)
    first = r.attention_first_tokens
    if first > MAX_ATTENTION_FIRST_TOKENS:
        raise invalid(
            f"attention_first_tokens={first} is out of range: "
            f"allowed [0, {MAX_ATTENTION_FIRST_TOKENS}] (0 = off)"
        )
    pin_tokens, pin_ttl_s = _check_pin(r.pin_tokens, r.pin_ttl_s, limits.max_prompt_tokens)
    return GenerateArgs(
        params=params,
        kv_policy=policy,
        prompt=prompt or None,
        token_ids=token_ids or None,
        tier=r.tier or None,
        stop=stops,
        session_id=r.session_id,
        retrieval_confidence=confidence,
        return_routing=r.return_routing,
        attention_first_tokens=first,
        pin_tokens=pin_tokens,
        pin_ttl_s=pin_ttl_s,
    )


def _check_pin(tokens: int, ttl_s: float, max_tokens: int) -> tuple[int, float]:
    """A pin is both fields or neither; the TTL is finite, positive and at most a day."""
    if tokens > max_tokens:
        raise invalid(f"pin_tokens={tokens} is out of range: allowed [0, {max_tokens}]")
    if not math.isfinite(ttl_s) or not 0.0 <= ttl_s <= MAX_PIN_TTL_S:
        raise invalid(f"pin_ttl_s={ttl_s} is out of range: allowed [0, {MAX_PIN_TTL_S:g}] seconds")
    if (tokens > 0) != (ttl_s > 0):
        raise invalid(
            f"pin_tokens={tokens} and pin_ttl_s={ttl_s}: give both (a pin) or neither (no pin)"
        )
    return tokens, float(ttl_s)


def usage_message(last: TierTokens, completion_tokens: int, request_id: str) -> pb.Usage:
    """The last chunk's usage: cached prompt tokens split into the cluster store's and the
    replica's own, and why full prompt blocks were computed (the engine's reason, and
    ``routed_elsewhere`` when this process's prefix router sent the request away from a
    replica holding more of its prefix)."""
    store = min(last.num_store_cached_tokens, last.num_cached_prompt_tokens)
    reasons = [last.kv_miss] if last.kv_miss else []
    if routed_elsewhere(request_id):
        reasons.append(ROUTED_ELSEWHERE)
    return pb.Usage(
        prompt_tokens=last.num_prompt_tokens,
        cached_prompt_tokens=last.num_cached_prompt_tokens,
        completion_tokens=completion_tokens,
        truncated_tokens=last.num_truncated_tokens,
        store_cached_tokens=store,
        local_cached_tokens=last.num_cached_prompt_tokens - store,
        kv_miss_reasons=reasons,
    )


def _check_sizes(r: pb.GenerateRequest, prompt: str, limits: RequestLimits) -> None:
    """Refuse any string or repeated field over its limit, before any of them is copied."""
    _check_count("token_ids", len(r.token_ids), limits.max_prompt_tokens, "token ids")
    _check_bytes("prompt", prompt, limits.max_prompt_bytes)
    _check_count("stop", len(r.stop), limits.max_stop, "stop strings")
    for index, stop in enumerate(r.stop):
        if not stop:
            raise invalid(f"stop[{index}] is empty: stop strings must not be empty")
        _check_bytes(f"stop[{index}]", stop, limits.max_stop_bytes)
    _check_count("stop_token_ids", len(r.stop_token_ids), limits.max_stop_token_ids, "ids")
    session_id = r.session_id
    _check_bytes("session_id", session_id, limits.max_session_id_bytes)
    if not session_id.isprintable():
        bad = next(i for i, c in enumerate(session_id) if not c.isprintable())
        raise invalid(
            f"session_id has the non-printable character {session_id[bad]!r} at {bad}: "
            "a session id is printable text"
        )
    _check_bytes("tier", r.tier, limits.max_name_bytes)
    _check_bytes("kv_policy.kind", r.kv_policy.kind, limits.max_name_bytes)
    _check_count("kv_policy.anchors", len(r.kv_policy.anchors), limits.max_anchors, "spans")


def _check_count(name: str, count: int, limit: int, items: str) -> None:
    if count > limit:
        raise invalid(f"{name} has {count} {items}: allowed at most {limit}")


def _check_bytes(name: str, value: str, limit: int) -> None:
    # a character is 1 to 4 bytes: a string short enough in characters is encoded to count
    # its bytes, one far too long is reported in characters rather than copied
    if len(value) <= limit and len(value.encode()) <= limit:
        return
    size = f"{len(value.encode())} bytes" if len(value) <= 4 * limit else f"{len(value)} characters"
    raise invalid(f"{name} is {size}: allowed at most {limit} bytes of UTF-8")
