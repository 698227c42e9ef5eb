"""Fuzz every ``GenerateRequest`` field against the real front door, gateway and engines.

The whole stack runs in this process, on one event loop in a background thread kept for the
module: the gRPC front door (``deploy/front_door.py``) on loopback, the real ``Gateway`` with
an API key and the fast -> strong cascade on, and one ``TierReplica`` per tier with its engine
in-process (a dense ``fast`` demo model and the MoE ``tiny`` one, sharing a tokenizer), each
with a KV pool small enough that a request can be refused for never fitting it.

Hypothesis draws a ``Case``: every field of the request, its metadata (API key, traceparent,
request id), the client's deadline and how many chunks to read before cancelling. Each field
is drawn "tame" (mostly accepted values, extremes included: 1e-45 is a valid temperature) or,
for the few fields a case picks, "wild" (the field's whole wire domain: NaN, inf, subnormals,
uint32/uint64 extremes, odd unicode, sizes past every limit), so that about half the cases
reach an engine while every field's wild values are still covered. Long values are kept as
descriptions (``Repeated``, ``RandomIds``, ...) so that a failing case prints short.

Oracle, per case: the call ends OK (or cancelled by the test after its chunks) or with
INVALID_ARGUMENT, RESOURCE_EXHAUSTED or UNAUTHENTICATED (DEADLINE_EXCEEDED only under a tiny
deadline the case chose), whose details are short, hold no traceback and no 64-character
piece of the prompt, a stop string or the session id; a plainly invalid request (per the
proto's documented ranges) is INVALID_ARGUMENT, a missing or wrong key UNAUTHENTICATED, an
oversized message RESOURCE_EXHAUSTED. After every case, once the gateway has ended its calls,
both engines must be alive and settle to no KV block held and nothing running or waiting;
every ``CANARY_EVERY`` cases a fixed greedy request runs alongside the case and must give the
tokens recorded at start.

Prompts of 1 MiB + 1, 2 and 5 MB (refused by size at the gateway and at the message limit)
and one just under the edge's 1 MiB (refused by the replica's context bound, untokenized)
are in.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar, cast

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from cluster.serving.tier_client import InProcessTierClient
from cluster.serving.tier_replica import TierReplica
from deploy.config import ClusterConfig, parse_config
from deploy.demo_model import build_demo_model
from deploy.front_door import start_server
from deploy.gateway import Gateway
from deploy.proto import moecluster_v1_pb2 as pb
from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc

T = TypeVar("T")
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


# --- strategies --------------------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of the strategies, each ``weight`` times as likely (``one_of`` is uniform, and
    one_of a strategy repeated counts it once)."""
    indices = [i for i, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(indices).flatmap(lambda i: choices[i][1])


ODD_CHARS = (
    "\x00\x01\t\n\r\x7f\x85\xa0\xad\u200b\u200d\u202e\u2028\u2029\ufeff\ufffd\uffff"
    "é中\U0001f600\U0001f468\u200d\U0001f469\U0010ffff"
)
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
odd_text = st.text(st.sampled_from(ODD_CHARS), min_size=1, max_size=60)
printable_ascii = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
units = st.sampled_from(["x", "ab ", "é", "\U0001f600", "a\u200db", "<s>", "\x00"])


def of_bytes(sizes: Sequence[int]) -> st.SearchStrategy[Repeated]:
    """A ``Repeated`` of each size in bytes of UTF-8, or a little more (whole units)."""
    return st.builds(
        lambda unit, size: Repeated(unit, -(-size // len(unit.encode()))),
        units,
        st.sampled_from(sizes),
    )


_SPECIALS = "nan inf -inf 0 -0 1e-45 -1e-45 1e-38 9.99e-6 1e-5 1 1.0000001 100 100.00001 -1 3.4e38"
FLOAT_SPECIALS = tuple(float(x) for x in _SPECIALS.split())
any_f32 = st.one_of(st.sampled_from(FLOAT_SPECIALS), st.floats(width=32))  # NaN, inf, subnormals
TEMPERATURES = (0.0, 1e-45, 1e-38, 1.2e-38, 9.99e-6, 1e-5, 1e-3, 0.7, 1.0, 100.0)

# prompts are short, long ones rare: a prefill costs about 0.2 ms a token (900: ten short cases),
# and most characters drawn are 2 to 4 tokens
tame_prompt: st.SearchStrategy[Text] = weighted(
    (16, st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=24)),
    (4, odd_text),
    (1, of_bytes([600, 2000])),
)
tame_ids: st.SearchStrategy[Ids] = weighted(
    (16, st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=32)),
    (
        1,
        st.builds(
            RandomIds,
            st.sampled_from([200, 900]),
            st.just(0),
            st.just(VOCAB - 1),
            st.integers(0, 99),
        ),
    ),
)
wild_prompt: st.SearchStrategy[Text] = weighted(
    (3, any_text),
    (1, odd_text),
    (1, of_bytes([2**20 - 1, 2**20 + 1, 2 * 2**20, 5 * 2**20, 8000])),
)


def beyond(limit: int, top: int, specials: Sequence[int]) -> st.SearchStrategy[int]:
    """Integers in [0, top], half of them past ``limit`` (hypothesis favours small ones), and
    ``specials``, ``limit + 1`` and ``top``."""
    edges = st.sampled_from([*specials, limit + 1, top])
    return st.one_of(st.integers(0, top), st.integers(limit + 1, top), edges)


any_uint32 = st.one_of(st.integers(0, UINT32), st.sampled_from([0, 1, 2**31, UINT32]))
wild_ids: st.SearchStrategy[Ids] = weighted(
    (2, st.just([])),
    (3, st.lists(st.one_of(st.integers(0, VOCAB - 1), any_uint32), max_size=80)),
    (
        1,
        st.builds(
            RandomIds,
            st.sampled_from([1000, 1025, 4095, 4096, 4097, 5000, 131_072, 131_073, 200_000]),
            st.sampled_from([0, VOCAB - 8]),
            st.sampled_from([VOCAB - 1, VOCAB, UINT32]),
            st.integers(0, 99),
        ),
    ),
)


@st.composite
def inputs(draw: st.DrawFn, wild: bool) -> tuple[Text, Ids]:
    """(prompt, token_ids): exactly one of them when tame, both drawn freely when wild."""
    if wild:
        return draw(wild_prompt), draw(wild_ids)
    if draw(st.booleans()):
        return draw(tame_prompt), []
    return "", draw(tame_ids)


@st.composite
def kv_policies(draw: st.DrawFn, wild: bool) -> tuple[str, int, int, Any]:
    """(kind, window, sinks, anchors)."""
    if wild:
        kind = draw(
            st.one_of(
                st.sampled_from(["", "full", "window", "Window", "junk", "window\x00", "w" * 65]),
                any_text,
            )
        )
        size = st.one_of(
            any_uint32, st.sampled_from([16, 48, 64, 1024, 4096, 4097, 2**20, 2**20 + 1])
        )
        span = st.tuples(size, size)
        anchors: st.SearchStrategy[list[tuple[int, int]] | RandomSpans] = st.one_of(
            st.lists(span, max_size=70),
            st.builds(RandomSpans, st.sampled_from([65, 1000]), st.integers(0, 99)),
        )
        return kind, draw(size), draw(size), draw(anchors)
    kind = draw(st.sampled_from(["", "full", "window"]))
    if kind != "window":
        return kind, 0, 0, []
    start = draw(st.integers(0, 200))
    spans = draw(st.lists(st.tuples(st.just(start), st.integers(start + 1, 240)), max_size=3))
    return kind, draw(st.integers(64, 1024)), draw(st.integers(0, 40)), spans


wild_stop: st.SearchStrategy[Text] = weighted(
    (3, any_text),
    (1, odd_text),
    (1, st.just("")),
    (1, of_bytes([255, 256, 257, 100_000])),
)
FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    # name: (tame, wild); wild is the field's domain beyond what tame draws
    "tier": (
        st.sampled_from(["", "fast", "strong", "fast", "strong"]),  # "": the cascade
        st.one_of(st.sampled_from(["FAST", " strong", "fast\x00", "t" * 65, "é" * 33]), any_text),
    ),
    "max_tokens": (
        weighted((1, st.just(0)), (3, st.integers(1, 16)), (1, st.integers(17, 400))),
        beyond(4096, UINT32, [4096, 4097, 10**6, 2**31]),
    ),
    "temperature": (
        st.one_of(st.none(), st.sampled_from(TEMPERATURES), st.floats(0, 100, width=32)),
        any_f32,
    ),
    "top_p": (
        st.one_of(
            st.none(),
            st.sampled_from([1e-45, 1e-38, 0.5, 1.0]),
            st.floats(0, 1, exclude_min=True, width=32),
        ),
        any_f32,
    ),
    "top_k": (
        st.one_of(st.just(0), st.integers(1, 3000), st.sampled_from([VOCAB - 1, VOCAB, 10**6])),
        beyond(10**6, UINT32, [VOCAB, 10**6]),
    ),
    "seed": (
        st.one_of(st.none(), st.integers(0, 2**63 - 1)),
        beyond(2**63 - 1, UINT64, []),
    ),
    "stop": (
        st.lists(
            st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12), max_size=4
        ),
        st.one_of(
            st.lists(wild_stop, min_size=1, max_size=20),
            st.builds(ManyStops, units, st.sampled_from([17, 1000, 5000])),
        ),
    ),
    "stop_token_ids": (
        st.lists(st.integers(0, VOCAB - 1), max_size=8),
        st.one_of(
            st.lists(any_uint32, max_size=80),
            st.builds(
                RandomIds,
                st.sampled_from([65, 5000, 100_000]),
                st.just(0),
                st.sampled_from([VOCAB - 1, UINT32]),
                st.integers(0, 99),
            ),
        ),
    ),
    "ignore_eos": (st.booleans(), st.booleans()),
    "session_id": (
        st.one_of(
            st.just(""), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
        ),
        st.one_of(any_text, odd_text, of_bytes([256, 257, 258, 100_000])),
    ),
    "return_routing": (st.booleans(), st.booleans()),
    "attention_first_tokens": (
        weighted((3, st.just(0)), (1, st.integers(1, 64))),
        beyond(10**6, UINT32, [10**6]),
    ),
    "retrieval_confidence": (
        st.one_of(st.none(), st.floats(0, 1, width=32)),
        any_f32,
    ),
    "auth": (
        st.sampled_from(["key", "key", "key", "lower"]),
        st.sampled_from(sorted(set(AUTH) - set(GOOD_AUTH))),
    ),
    "traceparent": (
        st.one_of(
            st.none(),
            st.builds(
                "00-{:032x}-{:016x}-01".format, st.integers(0, 2**128 - 1), st.integers(0, UINT64)
            ),
        ),
        st.one_of(st.none(), printable_ascii),
    ),
    "request_id": (
        st.one_of(st.none(), st.text("0123456789abcdef", min_size=32, max_size=32)),
        st.one_of(st.none(), printable_ascii),
    ),
    "timeout_s": (st.just(CALL_TIMEOUT_S), st.sampled_from([CALL_TIMEOUT_S, *TINY_DEADLINES])),
    "read_chunks": (weighted((4, st.integers(1, 2)), (1, st.integers(3, 6))), st.integers(0, 6)),
}
WILD_CHOICES = sorted([*FIELDS, "input", "kv_policy"])


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A case whose fields are tame but for a few (sometimes none) drawn from their whole domain."""
    some = st.sets(st.sampled_from(WILD_CHOICES), min_size=1, max_size=6)
    wild = draw(weighted((1, st.just(set())), (6, some)))
    values = {name: draw(pair[name in wild]) for name, pair in FIELDS.items()}
    prompt, token_ids = draw(inputs("input" in wild))
    kind, window, sinks, anchors = draw(kv_policies("kv_policy" in wild))
    return Case(
        prompt=prompt,
        token_ids=token_ids,
        kv_kind=kind,
        kv_window=window,
        kv_sinks=sinks,
        kv_anchors=anchors,
        **values,
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


# --- the stack, on one event loop in a background thread ---------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Stack:
    """Front door, gateway and replicas on one event loop that runs in its own thread.

    A replica whose engine stopped, or that does not settle after a case, is replaced by a
    fresh one (as Serve would), and the case fails: the cases after it, and hypothesis's
    shrinking of it, meet healthy tiers again, so the failure reported is the case's own.
    """

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.tiers = InProcessTierClient({t.name: self._replica(t.name) for t in config.tiers})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.thread.start()
        self.num_cases = 0
        self.num_canaries = 0
        self.num_restarts = 0
        self.gateway = CountingGateway(config, self.tiers)
        self.server: grpc.aio.Server = self.run(start_server(self.gateway, config.grpc))
        self.channel: grpc.aio.Channel = self.run(self._open_channel())
        self.stub = pb_grpc.MoEClusterStub(self.channel)
        self.canary_tokens = self.run(self.canary())
        assert isinstance(self.canary_tokens, list) and len(self.canary_tokens) == 8

    def _replica(self, name: str) -> TierReplica:
        tier = self.config.tier(name)
        return TierReplica(name, tier.model, tier.to_engine_config(), engine_process=False)

    @property
    def replicas(self) -> dict[str, TierReplica]:
        return cast(dict[str, TierReplica], self.tiers.replicas)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            raise AssertionError(f"no answer within {timeout} s: the stack hangs") from None

    async def _open_channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"127.0.0.1:{self.config.grpc.port}")

    async def canary(self) -> list[int] | str:
        """The canary's tokens, or how its call failed."""
        metadata = (("authorization", f"Bearer {KEY}"),)
        try:
            chunks = [c async for c in self.stub.Generate(CANARY, metadata=metadata, timeout=30)]
        except grpc.aio.AioRpcError as err:
            return f"{err.code().name}: {err.details()}"
        return [t for c in chunks for t in c.token_ids]

    async def call(self, case: Case, request: pb.GenerateRequest) -> Outcome:
        metadata = case.metadata()
        call = self.stub.Generate(request, metadata=metadata, timeout=case.timeout_s)
        chunks: list[pb.GenerateChunk] = []
        try:
            if case.read_chunks == 0:
                await asyncio.sleep(0)
            while len(chunks) < case.read_chunks:
                chunk = await call.read()
                if chunk is grpc.aio.EOF:
                    return Outcome(await call.code(), await call.details() or "", chunks, True)
                chunks.append(chunk)
            call.cancel()
            return Outcome(grpc.StatusCode.CANCELLED, "", chunks, False)
        except grpc.aio.AioRpcError as err:
            return Outcome(err.code(), err.details() or "", chunks, False)

    def fuzz(self, case: Case) -> None:
        """Run one case (with the canary alongside every ``CANARY_EVERY``-th) and check it."""
        request = case.request()
        self.num_cases += 1
        with_canary = self.num_cases % CANARY_EVERY == 0
        calls = self.gateway.num_started + 1 + with_canary
        outcome, tokens = self.run(self._case(case, request, with_canary))
        self.wait_for_gateway(calls)
        unhealthy = self.settle()
        found = [f"tier {name!r}: {why}" for name, why in unhealthy.items()]
        found += problems(case, request, outcome)
        if with_canary and tokens != self.canary_tokens:
            found.append(f"the canary gave {tokens}, not {self.canary_tokens}")
        if found:
            # an engine that failed this case may still be on its way down (failing streams
            # before it says it stopped): fresh replicas keep it from failing the next case
            self.replace(list(self.replicas))
        # one assertion for every problem: hypothesis tells failures apart by where they
        # are raised, and which symptom of a broken engine shows first is down to timing
        got = f"{outcome.code.name} {outcome.details[: MAX_DETAILS_CHARS + 100]!r}"
        assert not found, f"{'; '.join(found)} (the call: {got})"

    async def _case(
        self, case: Case, request: pb.GenerateRequest, with_canary: bool
    ) -> tuple[Outcome, list[int] | str | None]:
        if not with_canary:
            return await self.call(case, request), None
        outcome, tokens = await asyncio.gather(self.call(case, request), self.canary())
        self.num_canaries += 1
        return outcome, tokens

    def wait_for_gateway(self, num_started: int, grace_s: float = 0.05) -> None:
        """Wait until the gateway has ended every call it started (a cancel reaches it after
        the client has moved on) and has started ``num_started``, or ``grace_s`` passed (a
        call cancelled at once, or refused by the front door, never reaches it)."""
        gateway = self.gateway
        grace = time.monotonic() + grace_s
        deadline = time.monotonic() + 10.0
        while gateway.num_open or (gateway.num_started < num_started and time.monotonic() < grace):
            assert time.monotonic() < deadline, f"{gateway.num_open} gateway call(s) never ended"
            time.sleep(0.001)

    def settle(self, timeout: float = 10.0) -> dict[str, str]:
        """Wait until every engine holds no KV block and runs and queues nothing; return why
        not for each tier whose engine stopped or did not settle in ``timeout`` (each is
        replaced by a fresh replica)."""
        deadline = time.monotonic() + timeout
        while True:
            stopped = {
                n: "its engine stopped" for n, r in self.replicas.items() if not r.engine.is_alive()
            }
            busy = {n: why for n, r in self.replicas.items() if (why := _busy(r))}
            if stopped or not busy:
                unhealthy = stopped
                break
            if time.monotonic() > deadline:
                unhealthy = {n: f"not settled in {timeout} s: {why}" for n, why in busy.items()}
                break
            time.sleep(0.002)
        self.replace(list(unhealthy))
        return unhealthy

    def replace(self, names: list[str]) -> None:
        """Shut these tiers' replicas down and serve the tiers from fresh ones."""
        for name in names:
            self.replicas[name].shutdown()
            self.replicas[name] = self._replica(name)
            self.num_restarts += 1

    def close(self) -> None:
        self.run(self.channel.close())
        self.run(self.server.stop(None))
        for replica in self.replicas.values():
            replica.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class CountingGateway(Gateway):
    """The real gateway, counting its Generate calls: a case is over when they have ended."""

    num_started = 0
    num_ended = 0

    @property
    def num_open(self) -> int:
        return self.num_started - self.num_ended

    async def generate(
        self,
        request: pb.GenerateRequest,
        metadata: Mapping[str, str],
        request_id: str | None = None,
    ) -> AsyncIterator[pb.GenerateChunk]:
        self.num_started += 1
        try:
            async for chunk in super().generate(request, metadata, request_id):
                yield chunk
        finally:
            self.num_ended += 1


def _busy(replica: TierReplica) -> str:
    """What the replica's engine still holds or has to do ("" when idle)."""
    s = replica.stats()
    if not (s.num_blocks_held or s.num_running or s.num_waiting):
        return ""
    return f"{s.num_blocks_held} KV blocks held, {s.num_running} running, {s.num_waiting} waiting"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("fuzz")
    models = {
        "fast": build_demo_model(root / "fast", "fast"),
        "strong": build_demo_model(root / "tiny", "tiny"),
    }
    engine = {"num_blocks": NUM_BLOCKS}
    config = parse_config(
        {
            "grpc": {"port": _free_port()},
            "auth": {"api_keys": [KEY], "api_keys_env": None},
            "tiers": [{"name": n, "model": str(m), "engine": engine} for n, m in models.items()],
            "policy": {"cascade": CASCADE},
        },
        base_dir=root,
    )
    built = Stack(config)
    yield built
    built.close()


# --- the tests ---------------------------------------------------------------------------------


def _case(**changes: Any) -> Case:
    """A tame accepted case with ``changes``: the issue's reproductions, as explicit examples."""
    base: dict[str, Any] = {f.name: None for f in fields(Case)} | {
        "prompt": "",
        "token_ids": [5, 6, 7, 8],
        "tier": "",
        "max_tokens": 8,
        "top_k": 0,
        "stop": [],
        "stop_token_ids": [],
        "ignore_eos": True,
        "session_id": "",
        "kv_kind": "",
        "kv_window": 0,
        "kv_sinks": 0,
        "kv_anchors": [],
        "return_routing": False,
        "attention_first_tokens": 0,
        "auth": "key",
        "timeout_s": CALL_TIMEOUT_S,
        "read_chunks": 6,
    }
    return Case(**(base | changes))


def test_every_generate_request_field_gets_a_clear_answer_and_the_tiers_stay_healthy(
    stack: Stack,
) -> None:
    before = stack.num_cases

    @example(_case(temperature=1e-45, tier="fast"))
    @example(_case(temperature=1e-38, tier="strong"))
    @example(_case(temperature=1e-45, top_k=1, top_p=1e-45))
    @example(_case(token_ids=RandomIds(200_000, 0, 2047, 0), kv_kind="window", kv_window=64))
    @example(
        _case(
            token_ids=RandomIds(4000, 0, 2047, 1),
            tier="strong",
            kv_kind="window",
            kv_window=64,
            max_tokens=4000,
            read_chunks=2,
        )
    )
    @example(_case(kv_kind="window", kv_window=2048, kv_anchors=[(i, i + 1) for i in range(64)]))
    @example(_case(kv_kind="window", kv_window=64, kv_sinks=UINT32))
    @example(_case(kv_kind="window", kv_window=64, kv_anchors=[(0, UINT32)] * 64))
    @example(_case(stop=ManyStops("s", 100_000)))
    @example(_case(stop_token_ids=RandomIds(2_000_000, 0, 2047, 0)))
    @example(_case(prompt=Repeated("x", 5 * 2**20), token_ids=[]))
    @given(case=cases())
    @settings(
        max_examples=NUM_CASES,
        deadline=None,
        derandomize=True,
        database=None,
        # no explain phase: the lines it finds "only run by failing cases" are the replicas'
        # replacement after a failure
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    def fuzz(case: Case) -> None:
        stack.fuzz(case)

    fuzz()
    assert stack.num_cases - before >= NUM_CASES
    assert stack.num_canaries >= NUM_CASES // CANARY_EVERY
    assert stack.run(stack.canary()) == stack.canary_tokens
    assert not stack.settle()
    assert stack.num_restarts == 0
