"""A fuzz case for ``GenerateRequest``: its fields, metadata, deadline and reads, and the limits
the fuzz test runs under.

Long values are kept as descriptions (``Repeated``, ``RandomIds``, ...) so that a failing case
prints short; ``build_text`` and ``build_ids`` spell them out when the request is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from deploy.proto import moecluster_v1_pb2 as pb

KEY = "fuzz-key-5b1e0c"
TIERS = ("fast", "strong")
VOCAB = 2048  # the demo tokenizer's, shared by both presets
NUM_BLOCKS = 64  # x 16 tokens: a request needing more than 1024 tokens never fits
NUM_CASES = 1000
CANARY_EVERY = 50
CANARY = pb.GenerateRequest(
    token_ids=list(range(300, 332)), tier="strong", max_tokens=8, ignore_eos=True
)
# the cascade's probe is short: every case that takes it runs both engines
CASCADE = {"enabled": True, "from_tier": "fast", "to_tier": "strong", "probe_tokens": 4}
CALL_TIMEOUT_S = 30.0  # the client's deadline on a normal case: a hang guard
TINY_DEADLINES = (0.001, 0.02, 0.2)  # DEADLINE_EXCEEDED is a fair answer to these
MAX_DETAILS_CHARS = 500
LEAK_CHARS = 64  # a piece of a request value this long in the details is an echo
MAX_MESSAGE_BYTES = 4 * 2**20  # the front door's default receive limit
UINT32, UINT64 = 2**32 - 1, 2**64 - 1
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.CANCELLED,  # only ever by the test itself (checked below)
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
}


# --- long values, described rather than spelled out ---------------------------------------------


@dataclass(frozen=True)
class Repeated:
    """``unit * count``: a long string that prints short."""

    unit: str
    count: int

    def build(self) -> str:
        return self.unit * self.count

    def pieces(self) -> str:
        """A short string holding every ``LEAK_CHARS``-long substring of ``build()``."""
        return self.unit * (2 + LEAK_CHARS // len(self.unit))


@dataclass(frozen=True)
class RandomIds:
    """``count`` ids in [low, high] from a seeded generator: a long list that prints short."""

    count: int
    low: int
    high: int
    seed: int

    def build(self) -> list[int]:
        rng = np.random.default_rng(self.seed)
        ids = rng.integers(self.low, self.high, self.count, endpoint=True, dtype=np.uint64)
        return [int(i) for i in ids.tolist()]


@dataclass(frozen=True)
class RandomSpans:
    """``count`` anchor spans with starts and ends anywhere in uint32, seeded."""

    count: int
    seed: int

    def build(self) -> list[tuple[int, int]]:
        rng = np.random.default_rng(self.seed)
        ends = rng.integers(0, UINT32, (self.count, 2), endpoint=True, dtype=np.uint64)
        return [(int(a), int(b)) for a, b in ends.tolist()]


@dataclass(frozen=True)
class ManyStops:
    """``count`` stop strings ``f"{unit}{i}"``."""

    unit: str
    count: int

    def build(self) -> list[str]:
        return [f"{self.unit}{i}" for i in range(self.count)]


Text = str | Repeated
Ids = list[int] | RandomIds


def build_text(value: Text) -> str:
    return value.build() if isinstance(value, Repeated) else value


def build_ids(value: Ids) -> list[int]:
    return value.build() if isinstance(value, RandomIds) else value


# --- a case: the request's fields, its metadata, the deadline and the reads ---------------------


@dataclass(frozen=True)
class Case:
    """One fuzz case: the request's fields (the kv_policy's flattened), its metadata, the
    client's deadline and how many chunks the client reads before it cancels."""

    prompt: Text
    token_ids: Ids
    tier: str
    max_tokens: int
    temperature: float | None
    top_p: float | None
    top_k: int
    seed: int | None
    stop: list[Text] | ManyStops
    stop_token_ids: Ids
    ignore_eos: bool
    session_id: Text
    kv_kind: str
    kv_window: int
    kv_sinks: int
    kv_anchors: list[tuple[int, int]] | RandomSpans
    return_routing: bool
    attention_first_tokens: int
    retrieval_confidence: float | None
    auth: str  # a key in AUTH
    traceparent: str | None
    request_id: str | None
    timeout_s: float
    read_chunks: int  # chunks read before cancelling; 0: cancel at once

    def request(self) -> pb.GenerateRequest:
        r = pb.GenerateRequest(
            prompt=build_text(self.prompt),
            token_ids=build_ids(self.token_ids),
            tier=self.tier,
            max_tokens=self.max_tokens,
            top_k=self.top_k,
            stop=self.stops(),
            stop_token_ids=build_ids(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            session_id=build_text(self.session_id),
            return_routing=self.return_routing,
            attention_first_tokens=self.attention_first_tokens,
        )
        anchors = self.kv_anchors
        spans = anchors.build() if isinstance(anchors, RandomSpans) else anchors
        r.kv_policy.CopyFrom(
            pb.KVPolicy(
                kind=self.kv_kind,
                window=self.kv_window,
                sinks=self.kv_sinks,
                anchors=[pb.Span(start=a, end=b) for a, b in spans],
            )
        )
        for name in ("temperature", "top_p", "retrieval_confidence", "seed"):
            value = getattr(self, name)
            if value is not None:
                setattr(r, name, value)
        return r

    def stops(self) -> list[str]:
        if isinstance(self.stop, ManyStops):
            return self.stop.build()
        return [build_text(s) for s in self.stop]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        pairs = {
            "authorization": AUTH[self.auth],
            "traceparent": self.traceparent,
            "request_id": self.request_id,  # the server must ignore it
        }
        return tuple((k, v) for k, v in pairs.items() if v is not None)

    def secrets(self) -> list[str]:
        """Values the details must never echo (long ones by a short equivalent)."""
        values: list[Text] = [self.prompt, self.session_id]
        values += [self.stop.unit] if isinstance(self.stop, ManyStops) else self.stop
        return [v.pieces() if isinstance(v, Repeated) else v for v in values]


AUTH: dict[str, str | None] = {
    "key": f"Bearer {KEY}",
    "lower": f"bearer {KEY}",  # the scheme is case-insensitive
    "none": None,
    "empty": "",
    "wrong": "Bearer not-the-key",
    "basic": f"Basic {KEY}",
    "bare": KEY,
    "spaces": f"Bearer  {KEY}",
    "prefix": f"Bearer {KEY[:-1]}",
}
GOOD_AUTH = ("key", "lower")
