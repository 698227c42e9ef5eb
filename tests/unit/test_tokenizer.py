"""Incremental detokenisation: the streamed deltas add up to the whole output's decode."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from deploy.demo_model import demo_tokenizer
from experts.tokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return demo_tokenizer()


def _stream(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.push(i) for i in ids], detok.flush()


def test_deltas_rebuild_multibyte_text(tokenizer: Tokenizer) -> None:
    text = "héllo wörld — 日本語 ok 🙂 done"
    ids = tokenizer.encode(text).ids
    deltas, rest = _stream(tokenizer, ids)
    assert "".join(deltas) + rest == text
    assert rest == ""
    assert not any("\ufffd" in d for d in deltas)  # a split character waits for its bytes


def test_random_ids_match_the_full_decode(tokenizer: Tokenizer) -> None:
    rng = random.Random(7)
    held_back = 0
    for _ in range(200):
        ids = [rng.randrange(tokenizer.get_vocab_size()) for _ in range(rng.randint(1, 60))]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        deltas, rest = _stream(tokenizer, ids)
        assert "".join(deltas) + rest == full
        held_back += rest != ""
    assert held_back  # some random streams end inside a UTF-8 sequence: flush gives it


def test_special_tokens_are_skipped(tokenizer: Tokenizer) -> None:
    ids = [0, *tokenizer.encode("the batcher").ids, 1]  # bos ... eos
    deltas, rest = _stream(tokenizer, ids)
    assert "".join(deltas) + rest == "the batcher"


def test_flush_twice_gives_nothing_new(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    for i in tokenizer.encode("a_GPU").ids:
        detok.push(i)
    detok.flush()
    assert detok.flush() == ""
