"""Text <-> token ids for a checkpoint, and incremental detokenisation for streaming."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The checkpoint's ``tokenizer.json``, or None when it has none (token ids only)."""
    file = Path(path) / "tokenizer.json"
    return Tokenizer.from_file(str(file)) if file.is_file() else None


def max_token_bytes(tokenizer: Tokenizer) -> int:
    """An upper bound on the text bytes one token stands for: the longest vocabulary entry
    in UTF-8 (byte-level and sentencepiece markers spell a byte in 1 to 6 bytes, never
    fewer than they stand for). A text longer than context x this cannot fit the context,
    which a replica can tell without tokenizing it."""
    return max((len(t.encode()) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, in constant time per token.

    ``tokenizers``' ``DecodeStream`` decodes only a short window of recent ids (decoding
    the whole list each time costs O(n) per token: 10 us at 64 tokens, 68 us at 512 here).
    Byte-level tokens can split a UTF-8 character; such a delta is held back until the
    next token completes it, and ``flush`` gives what is still held at the end, so the
    deltas always add up to the whole list's decode.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted = 0  # characters returned so far

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        delta = self._stream.step(self._tokenizer, token_id) or ""
        self._emitted += len(delta)
        return delta

    def flush(self) -> str:
        """At the end: text still held back (an unfinished UTF-8 sequence decodes as U+FFFD)."""
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        rest = text[self._emitted :]
        self._emitted = len(text)
        return rest
