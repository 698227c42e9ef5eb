"""The fuzz oracle: which status a case may end with, and what its details may not say."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from deploy.proto import moecluster_v1_pb2 as pb
from tests.unit.fuzz.cases import (
    ALLOWED,
    CALL_TIMEOUT_S,
    GOOD_AUTH,
    LEAK_CHARS,
    MAX_DETAILS_CHARS,
    MAX_MESSAGE_BYTES,
    TIERS,
    VOCAB,
    Case,
)

# --- the oracle --------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    chunks: list[pb.GenerateChunk]
    finished: bool  # read to the end of the stream


def plainly_invalid(request: pb.GenerateRequest) -> str | None:
    """Why the proto's documented ranges refuse this request, when they plainly do."""
    floats = [
        ("temperature", lambda v: 0.0 <= v <= 100.0),
        ("top_p", lambda v: 0.0 < v <= 1.0),
        ("retrieval_confidence", lambda v: 0.0 <= v <= 1.0),
    ]
    for name, ok in floats:
        if request.HasField(name) and not ok(getattr(request, name)):
            return f"{name} out of range"
    if bool(request.prompt) == bool(request.token_ids):
        return "not exactly one of prompt and token_ids"
    if request.tier not in ("", *TIERS):
        return "unknown tier"
    if request.max_tokens > 4096:
        return "max_tokens over the tiers' limit"
    if request.kv_policy.kind not in ("", "full", "window"):
        return "unknown kv_policy kind"
    if any(not s for s in request.stop):
        return "an empty stop string"
    return None


def expected_code(case: Case, request: pb.GenerateRequest) -> grpc.StatusCode | None:
    """The one status this case must end with, where the case settles it."""
    if case.read_chunks == 0 or case.timeout_s != CALL_TIMEOUT_S:
        return None  # cancelled at once, or a deadline that may pass at any point
    if request.ByteSize() > MAX_MESSAGE_BYTES:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if case.auth not in GOOD_AUTH:
        return grpc.StatusCode.UNAUTHENTICATED
    if plainly_invalid(request):
        return grpc.StatusCode.INVALID_ARGUMENT
    return None


def problems(case: Case, request: pb.GenerateRequest, outcome: Outcome) -> list[str]:
    """What is wrong with the answer to this case (nothing: an empty list)."""
    code, details = outcome.code, outcome.details
    tiny_deadline = case.timeout_s != CALL_TIMEOUT_S
    found = []
    if code not in ALLOWED and not (code == grpc.StatusCode.DEADLINE_EXCEEDED and tiny_deadline):
        found.append(f"{code.name} is not an answer this call may get")
    if code == grpc.StatusCode.CANCELLED and case.read_chunks not in (0, len(outcome.chunks)):
        found.append(f"cancelled by the server after {len(outcome.chunks)} chunk(s)")
    expected = expected_code(case, request)
    if expected is not None and code != expected:
        found.append(f"expected {expected.name} ({plainly_invalid(request) or case.auth})")
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
        if not details.strip():
            found.append("no details")
        if len(details) > MAX_DETAILS_CHARS:
            found.append(f"details of {len(details)} characters")
        if "Traceback" in details:
            found.append("a traceback in the details")
        values = case.secrets()
        for i in range(len(details) - LEAK_CHARS + 1):
            piece = details[i : i + LEAK_CHARS]
            if any(piece in value for value in values):
                found.append(f"the details echo {piece!r} from the request")
                break
    if outcome.finished:
        found += finish_problems(case, request, outcome.chunks)
    return found


def finish_problems(
    case: Case, request: pb.GenerateRequest, chunks: list[pb.GenerateChunk]
) -> list[str]:
    """A stream read to its end: the last chunk's finish, usage, tier and request id."""
    if not chunks:
        return ["an OK stream without a chunk"]
    last = chunks[-1]
    tokens = [t for c in chunks for t in c.token_ids]
    checks = {
        "finish_reason": last.finish_reason in ("stop", "length")
        and not any(c.finish_reason for c in chunks[:-1]),
        "token count": len(tokens) <= (request.max_tokens or 64)
        and last.usage.completion_tokens == len(tokens),
        "token ids": all(0 <= t < VOCAB for t in tokens),
        "tier": last.tier.name in TIERS and last.tier.name == (request.tier or last.tier.name),
        "request_id": len(last.request_id) == 32 and last.request_id != case.request_id,
    }
    return [f"wrong {name} in the finished stream" for name, ok in checks.items() if not ok]
