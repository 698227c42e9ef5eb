"""Text <-> token ids for a checkpoint, and incremental detokenisation for streaming."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The checkpoint's ``tokenizer.json``, or None when it has none (token ids only)."""
    file = Path(path) / "tokenizer.json"
    return Tokenizer.from_file(str(file)) if file.is_file() else None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Byte-level tokens can split a UTF-8 character; a delta ending in the
    replacement character is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already returned

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta = text[self._emitted :]
        self._emitted = len(text)
        return delta
