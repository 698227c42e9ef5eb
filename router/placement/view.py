"""The re-plan's fast path: a current layer under new load, fixed by a few swaps."""

from __future__ import annotations

import bisect
from collections import Counter
from itertools import chain
from operator import truediv

from router.placement.bounds import lightest
from router.placement.geometry import NODE_SPREAD, Geometry, Shards, ShardsIn


class View:
    """A current plan's layer under new load, for the fast path: lists and floats only.

    ``swap_until`` brings every shard under a target by swapping replicas between the
    heaviest shards and the lightest ones (2 slots moved each), the usual repair after
    a small drift; ``None`` when a shard finds no single swap that does it.
    """

    def __init__(self, load: list[float], shards: ShardsIn, geometry: Geometry) -> None:
        tally = Counter(list(chain.from_iterable(shards)))  # a list: Counter's fast path
        counts = list(map(tally.__getitem__, range(len(load))))  # [E], C-level loops
        self.load = load
        self.counts = counts
        if all(counts):
            self.w = w = list(map(truediv, load, counts))  # [E] load per replica
        else:
            self.w = w = [x / c if c else 0.0 for x, c in zip(load, counts, strict=True)]
        self.shards = shards
        self.shard_load = [sum(map(w.__getitem__, held)) for held in shards]  # [G]
        self.geometry = geometry
        self.max_load = max(self.shard_load)
        self.new_max = self.max_load  # after swap_until

    def sound(self) -> bool:
        """Every expert placed, and every replicated one on enough nodes."""
        if not all(self.counts):
            return False
        g = self.geometry
        floor = min(NODE_SPREAD, g.num_nodes)
        if floor < 2:
            return True
        node = g.node
        nodes: dict[int, set[int]] = {}
        counts = self.counts
        for s, held in enumerate(self.shards):
            for e in held:
                if counts[e] > 1:
                    nodes.setdefault(e, set()).add(node[s])
        return all(len(n) >= floor for n in nodes.values())

    def swap_until(
        self, target: float, bar: float, budget: int | None, tries: int = 4
    ) -> Shards | None:
        """Swap replicas from shards over ``target`` to shards under it until none is over.

        First, while an expert's load per replica is above ``bar`` (the largest under the
        from-scratch replica counts) and keeps its shards over the target, it gets one
        more replica in the slot of a spare replica of another expert (1 slot moved): a
        hot expert whose load rose lifts every shard holding it, and one slot fixes
        them all. Then, for the heaviest shard ``A`` and each of the ``tries`` lightest
        shards ``B``, every replica ``a`` on ``A`` looks up (bisect over ``B``'s sorted
        loads) the replica ``b`` that moves the most load without putting ``B`` over; the
        first swap (or move to a free slot) that brings ``A`` under the target is taken,
        else the one moving most, and ``A`` goes on. None when no step helps or ``budget``
        runs out: the caller takes the slow path.
        """
        shard_load, w, counts = list(self.shard_load), list(self.w), list(self.counts)
        shards = [list(h) for h in self.shards]
        slots = self.geometry.slots
        node = self.geometry.node
        spread = min(NODE_SPREAD, self.geometry.num_nodes)
        used = 0
        if max(w) > bar * (1 + 1e-9):
            grown = self._grow_hot(shards, shard_load, w, counts, target, bar, budget)
            if grown is None:
                return None
            used = grown
        under = sorted((x, g) for g, x in enumerate(shard_load) if x < target)
        by_weight: dict[int, tuple[list[float], list[int]]] = {}  # shard -> sorted (w, e)
        on_node: dict[int, list[int]] = {}  # replicated expert -> [N] replicas per node

        def node_ok(e: int, src: int, dst: int) -> bool:
            """Does moving ``e`` from ``src`` to ``dst`` keep it on ``spread`` nodes?"""
            if spread < 2 or counts[e] < 2 or node[src] == node[dst]:
                return True
            per_node = on_node.get(e)
            if per_node is None:
                per_node = on_node[e] = [0] * self.geometry.num_nodes
                for g, h in enumerate(shards):
                    if e in h:
                        per_node[node[g]] += 1
            after = len(per_node) - per_node.count(0)
            after -= per_node[node[src]] == 1
            after += per_node[node[dst]] == 0
            return after >= spread

        def moved_node(e: int, src: int, dst: int) -> None:
            per_node = on_node.get(e)
            if per_node is not None:
                per_node[node[src]] -= 1
                per_node[node[dst]] += 1

        def best_step(a_shard: int, excess: float) -> tuple[float, int, int, int] | None:
            """(load moved, a, B, b or -1 for a free slot), or None."""
            part: tuple[float, int, int, int] | None = None  # the one moving most
            held_a = shards[a_shard]
            for _, b_shard in under[:tries]:
                room = target - shard_load[b_shard]
                held_b = shards[b_shard]
                cached = by_weight.get(b_shard)
                if cached is None:
                    pairs = sorted(zip(map(w.__getitem__, held_b), held_b, strict=True))
                    cached = by_weight[b_shard] = ([x for x, _ in pairs], [b for _, b in pairs])
                keys, experts = cached
                free = len(held_b) < slots
                for a in held_a:
                    wa = w[a]
                    if wa <= 0.0 or a in held_b:
                        continue
                    moved, b = -1.0, -1
                    if free and wa <= room:
                        moved = wa
                    else:
                        i = bisect.bisect_left(keys, wa - room)
                        while i < len(keys) and keys[i] < wa:
                            if experts[i] not in held_a and node_ok(experts[i], b_shard, a_shard):
                                moved, b = wa - keys[i], experts[i]
                                break
                            i += 1
                    if moved <= 0.0 or not node_ok(a, a_shard, b_shard):
                        continue
                    if moved >= excess:
                        return (moved, a, b_shard, b)  # the first that brings A under
                    if part is None or moved > part[0]:
                        part = (moved, a, b_shard, b)
            return part

        for a_shard in sorted(range(len(shards)), key=shard_load.__getitem__, reverse=True):
            if shard_load[a_shard] <= target:
                break
            while shard_load[a_shard] > target:
                step = best_step(a_shard, shard_load[a_shard] - target)
                cost = 2 if step is not None and step[3] >= 0 else 1
                if step is None or (budget is not None and used + cost > budget):
                    return None
                moved, a, b_shard, b = step
                held_a, held_b = shards[a_shard], shards[b_shard]
                if b < 0:
                    held_a.remove(a)
                    held_b.append(a)
                else:
                    held_a[held_a.index(a)] = b
                    held_b[held_b.index(b)] = a
                    moved_node(b, b_shard, a_shard)
                moved_node(a, a_shard, b_shard)
                used += cost
                shard_load[a_shard] -= moved
                old = shard_load[b_shard]
                shard_load[b_shard] = old + moved
                under.remove((old, b_shard))
                if old + moved < target:
                    bisect.insort(under, (old + moved, b_shard))
                by_weight.pop(b_shard, None)
        self.new_max = max(shard_load)
        return shards

    def _grow_hot(
        self,
        shards: Shards,
        shard_load: list[float],
        w: list[float],
        counts: list[int],
        target: float,
        bar: float,
        budget: int | None,
    ) -> int | None:
        """Give hot experts a replica in a spare replica's slot (see ``swap_until``).

        Updates the lists in place; slots moved, or None when ``budget`` runs out.
        """
        load, node, geometry = self.load, self.geometry.node, self.geometry
        spread = min(NODE_SPREAD, geometry.num_nodes)
        others = lightest(w, counts, geometry.slots - 1)
        used = 0
        while True:
            x = max(range(len(w)), key=w.__getitem__)
            if w[x] <= bar * (1 + 1e-9) or w[x] + others <= target:
                return used
            if counts[x] >= geometry.max_replicas:
                return used
            if budget is not None and used + 1 > budget:
                return None
            holds_x = [g for g, h in enumerate(shards) if x in h]
            nodes_x = {node[g] for g in holds_x}
            donors = sorted(
                (load[y] / (c - 1) - w[y], y) for y, c in enumerate(counts) if c >= 2 and y != x
            )
            step: tuple[int, int] | None = None  # (donor, shard)
            for _, y in donors:
                if load[y] / (counts[y] - 1) >= w[x]:
                    break  # its replicas would outweigh x's: no gain
                holds_y = [g for g, h in enumerate(shards) if y in h]
                for b in sorted(holds_y, key=shard_load.__getitem__):
                    if x in shards[b]:
                        continue
                    if spread >= 2:
                        rest_y = {node[g] for g in holds_y if g != b}
                        if len(rest_y) < min(counts[y] - 1, spread):
                            continue
                        if len(nodes_x | {node[b]}) < min(counts[x] + 1, spread):
                            continue
                    step = (y, b)
                    break
                if step is not None:
                    break
            if step is None:
                return used
            y, b = step
            new_x, new_y = load[x] / (counts[x] + 1), load[y] / (counts[y] - 1)
            for g in holds_x:
                shard_load[g] += new_x - w[x]
            for g, h in enumerate(shards):
                if y in h and g != b:
                    shard_load[g] += new_y - w[y]
            shard_load[b] += new_x - w[y]
            shards[b][shards[b].index(y)] = x
            counts[x] += 1
            counts[y] -= 1
            w[x], w[y] = new_x, new_y
            used += 1
