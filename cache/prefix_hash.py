"""Chained hashes that name full KV blocks by their whole prefix.

A block's hash covers its parent block's hash and its own token ids, so equal
hashes mean equal prefixes up to and including the block. The hash is stable
across processes (blake2b, not Python's salted ``hash``), which lets a
cluster-wide KV store and request routers agree on block names.

Each chain starts at a root named by the tenant's cache salt (``root_hash``): the
first block's hash covers the root, so every later one does too, and two tenants
with different salts never name a block alike (nor key a partial block alike), so
neither can reuse, or time a hit on, the other's cached prompt. The empty salt's
root is None, which keeps the default tenant's hashes as they were before salts.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence


def root_hash(salt: str | bytes) -> int | None:
    """Where a tenant's chain starts: None for the empty salt, else a 64-bit hash of it.

    The salt is hashed in its own domain (blake2b ``person``), apart from block hashes.
    """
    if not salt:
        return None
    data = salt.encode("utf-8", "surrogatepass") if isinstance(salt, str) else salt
    digest = hashlib.blake2b(data, digest_size=8, person=b"kv-cache-salt")
    return int.from_bytes(digest.digest(), "little")


def hash_block(parent: int | None, token_ids: Sequence[int]) -> int:
    """64-bit hash of one full block given its parent's hash (for the first block: the
    chain's root, ``root_hash(salt)``, None for the default tenant)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(b"root" if parent is None else parent.to_bytes(8, "little"))
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little")


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    max_blocks: int | None = None,
    root: int | None = None,
) -> list[int]:
    """Hashes of the full blocks of ``token_ids`` (at most ``max_blocks``), in order, in the
    chain that starts at ``root`` (``root_hash`` of the tenant's salt)."""
    count = len(token_ids) // block_size
    if max_blocks is not None:
        count = min(count, max_blocks)
    hashes: list[int] = []
    parent = root
    for i in range(count):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes
