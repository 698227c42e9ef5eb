"""The error a checkpoint that cannot be served raises (kept apart so every parser can use it)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message says what is wrong and how to fix it."""
