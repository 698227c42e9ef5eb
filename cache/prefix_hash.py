"""Chained hashes that name full KV blocks by their whole prefix.

A block's hash covers its parent block's hash and its own token ids, so equal
hashes mean equal prefixes up to and including the block. The hash is stable
across processes (blake2b, not Python's salted ``hash``), which lets a
cluster-wide KV store and request routers agree on block names.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence


def hash_block(parent: int | None, token_ids: Sequence[int]) -> int:
    """64-bit hash of one full block given its parent's hash (None for the first block)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(b"root" if parent is None else parent.to_bytes(8, "little"))
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little")


def hash_blocks(
    token_ids: Sequence[int], block_size: int, max_blocks: int | None = None
) -> list[int]:
    """Hashes of the full blocks of ``token_ids`` (at most ``max_blocks``), in order."""
    count = len(token_ids) // block_size
    if max_blocks is not None:
        count = min(count, max_blocks)
    hashes: list[int] = []
    parent = None
    for i in range(count):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes
