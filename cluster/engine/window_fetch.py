"""The cluster KV store for a model with sliding KV groups (gpt-oss): keys, fetch, insert.

A prefix of P full blocks serves such a model only with group 0's (full attention) K/V of all
P blocks and each sliding group's K/V of the blocks its window still sees at P
(``kv_groups.window_blocks``: those from the key ``P * B - W + 1`` on). When a block is named,
every group's block at that position exists (a sliding group frees a block only after the
step that filled it), so each is published (``EngineKV.after_update``) under its group's key
space (``group_spaces``: the group and its window are part of the model identity, so two
groups never share an entry) and its group's name (``kv_groups.group_key``).

Fetching (on the fetch thread, ``fetch_windows``): the first call asks for group 0's missing
blocks up to the longest candidate prefix and the sliding blocks of that prefix's window not
cached here. The prefix is then cut to what was found: group 0's run, and the sliding blocks
its window needs; a window block absent from the store bounds the prefix below it
(``servable``). A window not asked for yet (the prefix got shorter) is asked in a further
call, at most ``MAX_ROUNDS`` calls within the fetch's timeout; what stays unknown counts as
absent. ``insert_windows`` (on the engine's thread) re-checks against the cache as it is
then, writes the blocks the chosen prefix needs into fresh pool blocks named under their
group's key, cached and evictable: admission then takes them as it takes local hits
(``BlockManager.match_prefix``). A prefix whose window is missing is never served: a
shorter one is, or nothing (recompute).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cache.block_key import BlockKey, KeySpace
from cache.block_manager import BlockManager
from cache.kv_groups import Windows, group_key, servable_prefix, window_blocks
from cache.kv_store import MAX_KEYS_PER_CALL, BlockStore

MAX_ROUNDS = 3  # store calls per fetch: the first, then windows of shorter prefixes
Item = tuple[int, int]  # (group, logical block)
Has = Callable[[int, int], bool]


def group_spaces(keyspace: KeySpace, windows: Windows) -> list[KeySpace]:
    """Per KV group, its key space: group 0's is the engine's own (the routers' keys); a
    sliding group's names the group and its window besides the model and layout."""
    spaces = [keyspace]
    for group, window in enumerate(windows[1:], 1):
        model_id = f"{keyspace.model_id}|kv-group={group}|sliding-window={window}"
        spaces.append(KeySpace(model_id, keyspace.layout))
    return spaces


def group_block_key(spaces: Sequence[KeySpace], salt: str, block_hash: int, group: int) -> BlockKey:
    return spaces[group].key(salt, group_key(block_hash, group))


def servable(prefix: int, windows: Windows, block_size: int, has: Has) -> int:
    """The longest prefix of at most ``prefix`` blocks that ``has`` every group's blocks of:
    group 0's all, each sliding group's window (``kv_groups.servable_prefix``)."""
    p = 0
    while p < prefix and has(0, p):
        p += 1
    return servable_prefix(p, windows, block_size, has)


def _window_items(prefix: int, windows: Windows, block_size: int) -> list[Item]:
    return [
        (g, j)
        for g, window in enumerate(windows)
        if window is not None
        for j in window_blocks(prefix, window, block_size)
    ]


@dataclass
class WindowPlan:
    """What admission found here for a grouped model's prompt, and what to ask the store."""

    salt: str
    hashes: list[int]  # the prompt's full blocks' prefix hashes
    local0: int  # group 0's cached run here
    floor: int  # the prefix every group serves here
    end: int  # the longest prefix the store could give
    local: frozenset[Item]  # sliding groups' blocks cached here (below ``end``)
    windows: Windows
    block_size: int
    spaces: list[KeySpace] = field(repr=False, default_factory=list)

    def key(self, item: Item) -> BlockKey:
        return group_block_key(self.spaces, self.salt, self.hashes[item[1]], item[0])


def plan_windows(
    blocks: BlockManager, spaces: list[KeySpace], salt: str, hashes: list[int]
) -> WindowPlan:
    """Look the prompt's blocks up here: what is served already, what the store could add."""
    local0 = len(blocks.lookup(hashes))
    end = min(len(hashes), local0 + MAX_KEYS_PER_CALL // 2)
    local = frozenset(
        (g, j)
        for g in range(1, blocks.num_groups)
        for j in range(end)
        if blocks.lookup([group_key(hashes[j], g)])
    )
    size, windows = blocks.block_size, blocks.windows
    floor = servable_prefix(local0, windows, size, lambda g, j: (g, j) in local)
    return WindowPlan(salt, hashes, local0, floor, end, local, windows, size, spaces)


@dataclass(frozen=True)
class WindowResult:
    """What a grouped fetch found: the prefix it can serve and the blocks that serve it."""

    prefix: int
    found: dict[Item, np.ndarray] = field(default_factory=dict)
    evicted: frozenset[BlockKey] = frozenset()  # misses some owner had evicted
    failed_shards: tuple[str, ...] = ()


def fetch_windows(
    store: BlockStore, plan: WindowPlan, block_bytes: int, timeout_s: float
) -> WindowResult:
    """Ask the store for the blocks of the longest prefix it can serve (module doc); runs on
    the fetch thread, never touching the cache."""
    end_time = time.monotonic() + timeout_s
    found: dict[Item, np.ndarray] = {}
    asked: set[Item] = set()
    evicted: set[BlockKey] = set()
    failed: list[str] = []

    def ask(items: list[Item]) -> None:
        keys = [plan.key(item) for item in items]
        result = store.get_many(keys, max(0.001, end_time - time.monotonic()))
        for item, key in zip(items, keys, strict=True):
            block = result.blocks.get(key)
            if block is not None and block.dtype == np.uint8 and block.nbytes == block_bytes:
                found[item] = block
        asked.update(items)
        evicted.update(result.evicted)
        failed.extend(result.failed_shards)

    def here(g: int, j: int) -> bool:
        return (j < plan.local0) if g == 0 else (g, j) in plan.local

    def unknown(g: int, j: int) -> bool:  # a sliding block not asked for yet
        return g > 0 and not here(g, j) and (g, j) not in asked

    def window(p: int) -> list[Item]:
        return [i for i in _window_items(p, plan.windows, plan.block_size) if not here(*i)]

    first = [(0, j) for j in range(plan.local0, plan.end)] + window(plan.end)
    ask(first[:MAX_KEYS_PER_CALL])
    rounds = 1

    def has(g: int, j: int) -> bool:
        return here(g, j) or (g, j) in found

    p = plan.end
    while True:  # the longest prefix, counting blocks not asked for yet as present
        p = servable(p, plan.windows, plan.block_size, lambda g, j: has(g, j) or unknown(g, j))
        ask_next = [i for i in window(p) if unknown(*i)]
        if p <= plan.floor or not ask_next:
            break
        if rounds >= MAX_ROUNDS or time.monotonic() >= end_time:
            p = servable(p, plan.windows, plan.block_size, has)  # unknown: absent
            break
        ask(ask_next)
        rounds += 1
    return WindowResult(p, found, frozenset(evicted), tuple(failed))


def insert_windows(
    blocks: BlockManager,
    plan: WindowPlan,
    result: WindowResult,
    write: Callable[[Sequence[int], Sequence[np.ndarray]], None],
) -> tuple[int, int, int, list[int]]:
    """Write the blocks of the fetched prefix that the cache lacks now into fresh pool blocks,
    named (cached, evictable). Returns (the prefix served here before, blocks of prefix
    gained, blocks written, group 0's hashes named)."""
    hashes, size, windows = plan.hashes, blocks.block_size, blocks.windows
    held0 = blocks.lookup(hashes[: result.prefix])  # the cache may have changed meanwhile
    local0 = len(held0)

    def local_block(g: int, j: int) -> int | None:
        found = blocks.lookup([group_key(hashes[j], g)])
        return found[0] if found else None

    def local(g: int, j: int) -> bool:
        return j < local0 if g == 0 else local_block(g, j) is not None

    floor = servable_prefix(local0, windows, size, local)
    p = servable(result.prefix, windows, size, lambda g, j: local(g, j) or (g, j) in result.found)
    if p <= floor:
        return floor, 0, 0, []
    window = _window_items(p, windows, size)
    items = [(0, j) for j in range(local0, p)] + [i for i in window if not local(*i)]
    held = held0 + [b for i in window if (b := local_block(*i)) is not None]
    blocks.acquire(held)  # so that making room cannot evict them
    try:
        if len(items) > blocks.num_available:
            return floor, 0, 0, []
        fresh = blocks.allocate(len(items))
        write(fresh, [result.found[i] for i in items])
        named = [
            hashes[j]
            for b, (g, j) in zip(fresh, items, strict=True)
            if blocks.register(b, hashes[j], g) and g == 0
        ]
        blocks.free(fresh)  # cached and evictable now, like computed blocks
    finally:
        blocks.free(held)
    return floor, p - floor, len(items), named
