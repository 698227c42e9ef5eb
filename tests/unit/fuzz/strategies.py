"""Hypothesis strategies drawing fuzz ``Case``s: each field "tame" (mostly accepted values,
extremes included) or, for the few fields a case picks, "wild" (the field's whole wire domain).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from hypothesis import strategies as st

from tests.unit.fuzz.cases import (
    AUTH,
    CALL_TIMEOUT_S,
    GOOD_AUTH,
    TINY_DEADLINES,
    UINT32,
    UINT64,
    VOCAB,
    Case,
    Ids,
    ManyStops,
    RandomIds,
    RandomSpans,
    Repeated,
    Text,
)

T = TypeVar("T")

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
