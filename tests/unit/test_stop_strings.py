"""Stop strings over streamed text deltas: what is emitted when, and nothing after a stop.

Besides hand-picked cases, every way of splitting a text into deltas must give the output that
one delta gives: where a tier's batches happen to break the text must not change the answer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from experts.stop_strings import StopStringMatcher


def stream(stops: Sequence[str], deltas: Sequence[str]) -> tuple[list[str], str, bool]:
    """Push each delta; return what each push emitted, what flush released, and stopped."""
    matcher = StopStringMatcher(stops)
    pieces = [matcher.push(d) for d in deltas]
    return pieces, matcher.flush(), matcher.stopped


def output(stops: Sequence[str], deltas: Sequence[str]) -> tuple[str, bool]:
    pieces, rest, stopped = stream(stops, deltas)
    return "".join(pieces) + rest, stopped


def splits(text: str) -> list[list[str]]:
    """Every way of cutting ``text`` into non-empty consecutive deltas."""
    result = []
    for mask in itertools.product([False, True], repeat=max(len(text) - 1, 0)):
        parts, start = [], 0
        for i, cut in enumerate(mask, start=1):
            if cut:
                parts.append(text[start:i])
                start = i
        parts.append(text[start:])
        result.append(parts)
    return result


def test_stop_inside_one_delta() -> None:
    pieces, rest, stopped = stream(["###"], ["abc###def"])
    assert pieces == ["abc"]
    assert rest == ""
    assert stopped


def test_stop_split_across_deltas() -> None:
    pieces, rest, stopped = stream(["###"], ["abc#", "#", "#def"])
    assert pieces == ["abc", "", ""]  # "#" and "##" are held back: they might start "###"
    assert rest == ""
    assert stopped


def test_stop_split_over_many_single_characters() -> None:
    assert output(["STOP"], list("xSTOPy")) == ("x", True)


def test_stop_at_the_very_start() -> None:
    assert stream(["###"], ["###rest"]) == ([""], "", True)
    assert stream(["###"], ["#", "##x"]) == (["", ""], "", True)


def test_earliest_stop_wins() -> None:
    # "lo" starts at 3, before "world" at 6, whatever the order they are given in
    assert output(["world", "lo"], ["hello world"]) == ("hel", True)
    assert output(["lo", "world"], ["hello world"]) == ("hel", True)
    assert output(["world", "lo"], ["hel", "lo wor", "ld"]) == ("hel", True)


def test_later_stop_is_not_taken_when_an_earlier_one_completes() -> None:
    assert output(["xyz", "b"], ["a", "b", "xyz"]) == ("a", True)


def test_held_back_text_is_released_on_flush() -> None:
    pieces, rest, stopped = stream(["STOP"], ["abc ST"])
    assert pieces == ["abc "]
    assert rest == "ST"
    assert not stopped


def test_held_back_text_is_released_when_the_next_delta_settles_it() -> None:
    pieces, rest, stopped = stream(["STOP"], ["ST", "AR", "!"])
    assert pieces == ["", "STAR", "!"]
    assert rest == ""
    assert not stopped


def test_nothing_after_a_stop() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.push("one END two") == "one "
    assert matcher.stopped
    assert matcher.push("three") == ""
    assert matcher.push("END") == ""
    assert matcher.flush() == ""
    assert matcher.stopped


@pytest.mark.parametrize("stops", [[], [""], ["", ""]], ids=["none", "empty", "empties"])
def test_no_stops_is_passthrough(stops: list[str]) -> None:
    deltas = ["Hel", "lo", "", " wor", "ld#"]
    pieces, rest, stopped = stream(stops, deltas)
    assert pieces == deltas
    assert rest == ""
    assert not stopped


def test_overlapping_prefix() -> None:
    """'aaab' holds 'aab' at 1: the first 'aa' is a false start that must not hide it."""
    assert output(["aab"], ["aaab"]) == ("a", True)
    assert output(["aab"], list("aaab")) == ("a", True)
    pieces, _, _ = stream(["aab"], list("aaab"))
    assert pieces == ["", "", "a", ""]


def test_self_overlapping_stop_held_and_released() -> None:
    """'abcab' could start 'abcabd'; a 'c' next leaves only 'abc' as a possible start."""
    pieces, rest, stopped = stream(["abcabd"], ["abcab", "c", "x"])
    assert pieces == ["", "abc", "abcx"]
    assert (rest, stopped) == ("", False)


def test_unicode_stop() -> None:
    assert output(["→ fin"], ["naïve →", " fin ✓"]) == ("naïve ", True)


@pytest.mark.parametrize(
    ("stops", "text"),
    [
        (["###"], "ab##c###d"),
        (["aab"], "aaaab"),
        (["abcabd"], "abcabcabd!"),
        (["STOP"], "no STO ST"),
        (["world", "lo"], "hello world"),
        (["xy", "yz"], "axyz"),
        (["ab", "ba"], "xbab"),
    ],
)
def test_output_does_not_depend_on_where_deltas_break(stops: list[str], text: str) -> None:
    whole = output(stops, [text])
    for deltas in splits(text):
        assert output(stops, deltas) == whole, deltas


def test_nested_stop_strings_do_not_depend_on_where_deltas_break() -> None:
    """BUG: with one stop inside a longer one, the answer depends on the delta boundaries.

    Stops "bc" and "abcd", text "abcd". In one delta, "abcd" starts first (at 0) and wins:
    output "". Pushed as "abc" then "d" (or one character at a time, as a token-by-token
    engine produces it), "bc" is complete in "abc" before "abcd" can be, so the output is "a".
    The same generation thus ends with different text depending on how the tier batched it.
    """
    results = {tuple(d): output(["bc", "abcd"], d) for d in splits("abcd")}
    assert len(set(results.values())) == 1, results


def test_held_back_text_is_the_longest_suffix_that_could_start_a_stop() -> None:
    """Exhaustively over short texts: a push emits all but the longest suffix of the text that
    is a proper prefix of the stop string (found from where the stop's first character occurs,
    not by trying every suffix length)."""

    def held(text: str, stop: str) -> int:
        sizes = range(min(len(text), len(stop) - 1), 0, -1)
        return next((n for n in sizes if text.endswith(stop[:n])), 0)

    words = ["".join(w) for n in range(7) for w in itertools.product("ab", repeat=n)]
    for stop in (w for w in words if w):
        for text in (w for w in words if stop not in w):
            emitted = StopStringMatcher([stop]).push(text)
            assert emitted == text[: len(text) - held(text, stop)], (text, stop)
