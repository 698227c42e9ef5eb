"""An index of cached partial blocks: the KV of 1..block_size-1 tokens after a full-block prefix.

An entry names a block whose first ``len(tokens)`` slots hold the K/V of ``tokens``, computed
after the prefix that ``parent`` names: a chained full-block hash, or at the start the chain's
root (``prefix_hash.root_hash`` of the tenant's salt), so tenants never share an entry. A
slot's K/V depends only on the tokens up to it, so a sequence whose cached full blocks end at
``parent`` can reuse the first m slots of any entry there whose tokens agree with its next m
tokens. Entries are found by (parent, first token), then by the longest common prefix.
Ids and tokens only: which blocks are held or evictable is the block manager's business.
"""

from __future__ import annotations

from collections.abc import Sequence

Key = tuple[int | None, int]  # (parent hash, first token)


class PartialBlocks:
    """Cached partial blocks by parent hash and first token; at most one entry per block."""

    def __init__(self) -> None:
        self._by_key: dict[Key, dict[int, tuple[int, ...]]] = {}  # key -> {block: tokens}
        self._entry_of: dict[int, tuple[int | None, tuple[int, ...]]] = {}  # block -> entry

    def __len__(self) -> int:
        return len(self._entry_of)

    def __contains__(self, block: int) -> bool:
        return block in self._entry_of

    def entry(self, block: int) -> tuple[int | None, tuple[int, ...]]:
        """(parent hash, tokens) of a cached partial block."""
        return self._entry_of[block]

    def add(self, block: int, parent: int | None, tokens: Sequence[int]) -> None:
        assert tokens, "a partial block holds at least one token"
        assert block not in self._entry_of, f"block {block} is already a partial entry"
        entry = tuple(tokens)
        self._by_key.setdefault((parent, entry[0]), {})[block] = entry
        self._entry_of[block] = (parent, entry)

    def remove(self, block: int) -> None:
        parent, tokens = self._entry_of.pop(block)
        key = (parent, tokens[0])
        siblings = self._by_key[key]
        del siblings[block]
        if not siblings:
            del self._by_key[key]

    def longest_match(
        self, parent: int | None, token_ids: Sequence[int], max_tokens: int
    ) -> tuple[int, int] | None:
        """(block, m): the entry under ``parent`` whose tokens share the longest common prefix
        with ``token_ids``, m of them (1 <= m <= max_tokens); None when none shares one."""
        limit = min(max_tokens, len(token_ids))
        if limit <= 0:
            return None
        best: tuple[int, int] | None = None
        for block, tokens in self._by_key.get((parent, token_ids[0]), {}).items():
            m = common_prefix(tokens, token_ids, limit)
            if best is None or m > best[1]:
                best = (block, m)
        return best

    def covering(self, parent: int | None, tokens: Sequence[int]) -> tuple[list[int], list[int]]:
        """Entries under ``parent`` comparable with ``tokens``: (blocks whose tokens start with
        ``tokens``, which make an entry for ``tokens`` redundant; blocks whose tokens are a
        proper prefix of ``tokens``, which such an entry makes redundant)."""
        covers, covered = [], []
        for block, entry in self._by_key.get((parent, tokens[0]), {}).items():
            if entry[: len(tokens)] == tuple(tokens):
                covers.append(block)
            elif tuple(tokens[: len(entry)]) == entry:
                covered.append(block)
        return covers, covered


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
