"""KV oracles and invariants that several test modules check.

``check_partition``: the block manager's pool is exactly free + evictable + held blocks, with
refcounts that agree. ``simulate_window``: which positions each token attends under the
``window`` KV policy, derived from its documented rule (never from the engine's state), and
``visibility_mask``, the dense reference's attention mask for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cache.block_manager import BlockManager


def check_partition(manager: BlockManager) -> None:
    """Free, evictable and held blocks partition the pool; refcounts agree."""
    free = list(manager.allocator._free)
    evictable = list(manager._evictable) + list(manager._pinned)  # unheld cached blocks
    held = [b for b in range(manager.num_blocks) if manager.allocator.refcount(b) > 0]
    assert len(set(free)) == len(free) and len(set(evictable)) == len(evictable)
    assert sorted(free + evictable + held) == list(range(manager.num_blocks))
    assert manager.num_held == len(held)
    assert all(manager.allocator.refcount(b) == 0 for b in free + evictable)
    assert all((b in manager._hash_of) != (b in manager._partials) for b in evictable)
    assert all(b in evictable for b in manager._partials._entry_of)  # partials are never held


@dataclass(frozen=True)
class WindowTrace:
    """What the documented rule predicts for one request."""

    visible: list[list[int]]  # visible[i]: positions token i attends when it is computed
    truncated: list[int]  # evicted tokens so far when each generated token is emitted
    kept_blocks: list[int]  # logical blocks cached after the last eviction


def simulate_window(
    num_prompt: int,
    num_new: int,
    *,
    block_size: int,
    budget: int,
    window: int,
    sinks: int,
    anchors: Sequence[tuple[int, int]],
) -> WindowTrace:
    """Replay the policy rule step by step, then one token a step.

    The prompt is prefilled in chunks of ``min(budget, window)`` tokens (the documented cap
    for windowed prompts). A ``window`` at least as long as the sequence never evicts (plain
    causal attention).
    """

    def pinned(block: int) -> bool:
        lo, hi = block * block_size, (block + 1) * block_size
        return lo < sinks or any(start < hi and lo < end for start, end in anchors)

    chunk = min(budget, window)
    steps = [(s, min(s + chunk, num_prompt)) for s in range(0, num_prompt, chunk)]
    steps += [(p, p + 1) for p in range(num_prompt, num_prompt + num_new - 1)]
    kept: list[int] = []
    visible: list[list[int]] = []
    truncated: list[int] = []
    for start, end in steps:
        cached = [p for b in kept for p in range(b * block_size, min((b + 1) * block_size, start))]
        visible.extend(cached + list(range(start, p + 1)) for p in range(start, end))
        if end >= num_prompt:  # this step's last logits give a token, emitted before eviction
            truncated.append(start - len(cached))
            if len(truncated) == num_new:
                break  # finished: nothing is evicted after the last step
        kept = sorted({*kept, *range(start // block_size, (end - 1) // block_size + 1)})
        num_keys = sum(min((b + 1) * block_size, end) - b * block_size for b in kept)
        for block in list(kept[:-1]):
            if num_keys <= window:
                break
            if not pinned(block):
                kept.remove(block)
                num_keys -= block_size
    assert len(visible) == num_prompt + num_new - 1 and len(truncated) == num_new
    return WindowTrace(visible, truncated, kept)


def visibility_mask(visible: Sequence[Sequence[int]]) -> torch.Tensor:
    """[1, 1, T, T] additive float mask: 0 where row i may attend column j, -inf elsewhere."""
    size = len(visible)
    allowed = torch.zeros(size, size, dtype=torch.bool)
    for i, cols in enumerate(visible):
        assert all(j <= i for j in cols), f"row {i} attends a later token"
        allowed[i, list(cols)] = True
    mask = torch.zeros(size, size).masked_fill(~allowed, float("-inf"))
    return mask[None, None]
