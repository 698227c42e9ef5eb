"""Local search on one layer: move, swap or re-purpose replicas off the heaviest shard."""

from __future__ import annotations

import heapq
import math

from router.placement.layer import Layer

# One improvement step: (new max load, slots moved, kind, expert a on the heaviest shard A,
# the other shard B, the other expert b or -1)
Step = tuple[float, int, int, int, int, int]
RELOCATE, SWAP, REPURPOSE = range(3)


class Choice:
    """The best improvement step offered so far in one round of ``improve``.

    ``best`` has the lowest new maximum (fewer slots moved on a tie); ``win`` is the
    cheapest that reaches the target. Steps moving more than ``room`` slots are refused.
    """

    def __init__(self, top: float, target: float, room: int, cheapest: bool) -> None:
        self.bar = top * (1.0 - 1e-12)  # a step must end below the heaviest shard's load
        self.target = target
        self.room = room
        self.cheapest = cheapest
        self.best: Step | None = None
        self.win: Step | None = None

    def offer(self, step: Step) -> None:
        val, cost = step[0], step[1]
        if cost > self.room:
            return
        if val <= self.target and (self.win is None or (cost, val) < (self.win[1], self.win[0])):
            self.win = step
        if self.best is None or (val, cost) < self.best[:2]:
            self.best = step

    def limit(self) -> float:
        """A new maximum below this may still be chosen."""
        low = self.bar if self.best is None else self.best[0]
        if self.cheapest:  # a cheaper step that still reaches the target counts too
            low = max(low, min(self.bar, math.nextafter(self.target, math.inf)))
        return low

    def chosen(self) -> Step | None:
        return self.win if self.cheapest and self.win is not None else self.best


# ------------------------------------------------------------------------- improvement


def improve(
    layer: Layer, target: float, budget: int | None, repair: bool = False, candidates: int = 4
) -> int:
    """Move replicas off the heaviest shard until it is <= ``target``; slots moved.

    Each step takes the heaviest shard ``A`` and the best of: relocating one of its
    replicas to a free slot (1 slot moved) or swapping it with one on another shard
    (2), looking at the ``candidates`` lightest shards, all shards if those offer
    nothing; re-purposing a spare replica of a cold expert elsewhere as a new replica
    of one on ``A`` (1) when swaps offer nothing or when repairing. A step must leave
    every shard it touches below ``A``'s load, which shrinks the sorted load vector,
    so the loop ends. It takes the lowest new maximum; when repairing, the cheapest
    step that reaches ``target``. At most ``budget`` slots move.
    """
    shards, shard_load, w, slots = layer.shards, layer.shard_load, layer.w, layer.slots
    num_shards = len(shards)
    used = 0
    for _ in range(4 * num_shards * slots):
        a_shard = max(range(num_shards), key=shard_load.__getitem__)
        top = shard_load[a_shard]
        if top <= target or num_shards == 1:
            break
        room = 3 if budget is None else budget - used
        choice = Choice(top, target, room, cheapest=repair)
        held_a = shards[a_shard]
        pool = heapq.nsmallest(candidates + 1, range(num_shards), key=shard_load.__getitem__)
        if repair:
            pool += [g for g in range(num_shards) if len(shards[g]) < slots and g not in pool]
        for wide in (False, True):  # all shards only when the lightest offer nothing
            if wide:
                if choice.best is not None or len(pool) >= num_shards:
                    break
                pool = [g for g in range(num_shards) if g not in pool]
            for b_shard in pool:
                low = shard_load[b_shard]
                gap = top - low
                if b_shard == a_shard or gap <= 0.0:
                    continue
                held_b = shards[b_shard]
                has_free = len(held_b) < slots
                cap = choice.limit()
                for a in held_a:
                    wa = w[a]
                    if wa <= 0.0 or top - wa >= cap:
                        continue  # no step with a can beat what is found
                    a_ok = -1  # lazily: may a go to B?
                    if has_free and wa < gap:
                        a_ok = int(layer.can_host(a, b_shard, a_shard))
                        if a_ok:
                            choice.offer((max(top - wa, low + wa), 1, RELOCATE, a, b_shard, -1))
                    for b in held_b:
                        d = wa - w[b]
                        if d <= 0.0 or d >= gap:
                            continue
                        val = top - d if top - d > low + d else low + d
                        if val >= cap:
                            continue
                        if a_ok < 0:
                            a_ok = int(layer.can_host(a, b_shard, a_shard))
                        if a_ok and layer.can_host(b, a_shard, b_shard):
                            choice.offer((val, 2, SWAP, a, b_shard, b))
        if choice.best is None or (repair and choice.win is None):
            for step in repurpose_steps(layer, a_shard, choice.limit()):
                choice.offer(step)
        chosen = choice.chosen()
        if chosen is None:
            break
        _, cost, kind, a, b_shard, b = chosen
        if kind == REPURPOSE:
            layer.remove(b, b_shard)
            layer.reweight(b, layer.counts[b] - 1)
            layer.reweight(a, layer.counts[a] + 1)
            layer.add(a, b_shard)
        else:
            layer.move(a, a_shard, b_shard)
            if kind == SWAP:
                layer.move(b, b_shard, a_shard)
        used += cost
    return used


def repurpose_steps(layer: Layer, a_shard: int, cap: float, donors: int = 3) -> list[Step]:
    """Steps giving an expert on ``a_shard`` one more replica in a spare replica's slot.

    Donors are the replicated experts whose load per replica rises least when they
    lose one; every shard holding either expert changes, so all of them are checked.
    """
    load, counts, w, shard_load = layer.load, layer.counts, layer.w, layer.shard_load
    spare = heapq.nsmallest(
        donors,
        ((load[y] / (c - 1) - w[y], y) for y, c in enumerate(counts) if c >= 2),
    )
    steps: list[Step] = []
    for x in layer.shards[a_shard]:
        if counts[x] >= layer.max_replicas or w[x] <= 0.0:
            continue
        after_x = load[x] / (counts[x] + 1)
        fall = w[x] - after_x
        holds_x = layer.where[x]
        for rise, y in spare:
            if y == x or rise >= fall:
                continue  # y's replicas would gain more than x's lose
            holds_y = layer.where[y]
            changed = {g: shard_load[g] - fall for g in holds_x}
            for g in holds_y:
                changed[g] = changed.get(g, shard_load[g]) + rise
            for b_shard in holds_y:
                if b_shard in changed and x in layer.shards[b_shard]:
                    continue
                if not (layer.may_drop(y, b_shard) and layer.can_host(x, b_shard, grow=True)):
                    continue
                new_b = shard_load[b_shard] - w[y] + after_x
                val = max(new_b, *(v for g, v in changed.items() if g != b_shard))
                if val < cap:
                    steps.append((val, 1, REPURPOSE, x, b_shard, y))
    return steps
