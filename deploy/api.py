"""The gRPC request at the edge: validation into internal types, and API errors.

Every problem with a request becomes an ``ApiError`` carrying the gRPC status
and a message meant for the caller (the field, the value, what is allowed).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from cache.kv_policy import KVPolicy
from deploy.proto import moecluster_v1_pb2 as pb
from experts.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 64


class ApiError(Exception):
    """An error for the client: a gRPC status and a user-facing message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[ApiError], tuple[grpc.StatusCode, str]]:
        # crosses from the gateway replica to Serve's proxy: keep both fields
        return (ApiError, (self.code, self.message))


def invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


MAX_ATTENTION_FIRST_TOKENS = 1_000_000


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


def parse_generate(r: pb.GenerateRequest, max_tokens_limit: int) -> GenerateArgs:
    """Check a ``moecluster.v1.GenerateRequest``; raise ``ApiError`` naming the bad field."""
    prompt: str = r.prompt
    token_ids = tuple(int(t) for t in r.token_ids)
    if bool(prompt) == bool(token_ids):
        raise invalid("give exactly one of 'prompt' (text) or 'token_ids'")
    max_tokens = r.max_tokens or min(DEFAULT_MAX_TOKENS, max_tokens_limit)
    if max_tokens > max_tokens_limit:
        raise invalid(f"max_tokens={max_tokens} is out of range: allowed [1, {max_tokens_limit}]")
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=r.temperature if r.HasField("temperature") else 0.0,
            top_p=r.top_p if r.HasField("top_p") else 1.0,
            top_k=r.top_k,
            seed=r.seed if r.HasField("seed") else None,
            stop_token_ids=tuple(r.stop_token_ids),
            ignore_eos=r.ignore_eos,
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
    if confidence is not None and not 0.0 <= confidence <= 1.0:
        raise invalid(f"retrieval_confidence={confidence:g} is out of range: allowed [0, 1]")
    stops = tuple(r.stop)
    if any(not s for s in stops):
        raise invalid(f"stop={list(stops)!r}: stop strings must not be empty")
    first = r.attention_first_tokens
    if first > MAX_ATTENTION_FIRST_TOKENS:
        raise invalid(
            f"attention_first_tokens={first} is out of range: "
            f"allowed [0, {MAX_ATTENTION_FIRST_TOKENS}] (0 = off)"
        )
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
    )
