"""One layer's mutable placement (``Layer``) and the longest-processing-time packing."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from router.placement.geometry import NODE_SPREAD, PACK_NODE_SLACK, Geometry, Shards, ShardsIn


class Layer:
    """Mutable placement of one layer: slots, replica counts, shard loads (ints and floats).

    ``can_host`` holds the two rules every step keeps: no expert twice on a shard, and a
    replica goes to a node without one unless the expert is on every node already (or the
    move leaves the number of its nodes unchanged). Node bookkeeping makes that O(1).
    """

    def __init__(self, load: Sequence[float], counts: list[int], geometry: Geometry) -> None:
        g = geometry
        self.load = load
        self.counts = counts  # [E] replicas
        self.w = [x / c if c else 0.0 for x, c in zip(load, counts, strict=True)]  # [E]
        self.slots = g.slots
        self.max_replicas = g.max_replicas
        self.num_nodes = g.num_nodes
        self.node = g.node  # [G] -> node
        self.shards: Shards = [[] for _ in range(g.num_shards)]
        self.shard_load = [0.0] * g.num_shards  # [G]
        self.where: list[list[int]] = [[] for _ in load]  # [E] -> shards holding it
        # [E * N] replicas of expert e on node n, [E] nodes holding e; only when N > 1
        self.on_node = [0] * (len(load) * g.num_nodes) if g.num_nodes > 1 else []
        self.spread = [0] * len(load)
        self.spread_floor = min(NODE_SPREAD, g.num_nodes)  # nodes a replicated expert spans

    @classmethod
    def from_shards(cls, load: Sequence[float], shards: ShardsIn, geometry: Geometry) -> Layer:
        counts = [0] * len(load)
        for held in shards:
            for e in held:
                counts[e] += 1
        layer = cls(load, counts, geometry)
        w, where = layer.w, layer.where
        layer.shards = [list(held) for held in shards]
        layer.shard_load = [sum([w[e] for e in held]) for held in shards]
        for g, held in enumerate(shards):
            for e in held:
                where[e].append(g)
                if layer.on_node:
                    layer._count_node(e, g, 1)
        return layer

    def sound(self) -> bool:
        """Every expert has a slot and every replicated one spans its nodes."""
        if not all(self.where):
            return False
        floor = self.spread_floor
        return not self.on_node or all(
            s >= min(c, floor) for s, c in zip(self.spread, self.counts, strict=True)
        )

    @property
    def max_load(self) -> float:
        return max(self.shard_load)

    def _count_node(self, e: int, g: int, step: int) -> None:
        i = e * self.num_nodes + self.node[g]
        before = self.on_node[i]
        self.on_node[i] = before + step
        if before == 0 or before + step == 0:
            self.spread[e] += step

    def add(self, e: int, g: int) -> None:
        self.shards[g].append(e)
        self.shard_load[g] += self.w[e]
        self.where[e].append(g)
        if self.on_node:
            self._count_node(e, g, 1)

    def remove(self, e: int, g: int) -> None:
        self.shards[g].remove(e)
        self.shard_load[g] -= self.w[e]
        self.where[e].remove(g)
        if self.on_node:
            self._count_node(e, g, -1)

    def move(self, e: int, src: int, dst: int) -> None:
        self.remove(e, src)
        self.add(e, dst)

    def reweight(self, e: int, count: int) -> None:
        """Set ``e``'s replica count, updating the load of every shard holding it."""
        new_w = self.load[e] / count if count else 0.0
        delta = new_w - self.w[e]
        for g in self.where[e]:
            self.shard_load[g] += delta
        self.w[e] = new_w
        self.counts[e] = count

    def can_host(self, e: int, dst: int, src: int = -1, grow: bool = False) -> bool:
        """May a replica of ``e`` go to ``dst`` (moving from ``src``, or new when -1)?

        Never twice on a shard; onto a node that holds ``e`` already only if ``e`` keeps
        ``min(replicas, spread_floor)`` nodes (a move may also keep its node count).
        ``grow``: the replica is one more than ``counts`` says (the count rises after).
        """
        if e in self.shards[dst]:
            return False
        if not self.on_node:
            return True
        nd = self.node[dst]
        if src >= 0 and self.node[src] == nd:
            return True
        base = e * self.num_nodes
        if self.on_node[base + nd] == 0:
            return True
        spread = self.spread[e]
        if src >= 0:
            if self.on_node[base + self.node[src]] > 1:
                return True  # the move keeps every node it had
            spread -= 1  # the move loses src's node
        return spread >= min(self.counts[e] + grow, self.spread_floor)

    def may_drop(self, e: int, g: int) -> bool:
        """May ``e``'s replica on ``g`` go, keeping ``min(replicas, spread_floor)`` nodes?"""
        if self.counts[e] < 2:
            return False
        if not self.on_node or self.on_node[e * self.num_nodes + self.node[g]] > 1:
            return True
        return self.spread[e] - 1 >= min(self.counts[e] - 1, self.spread_floor)

    # ------------------------------------------------------------------------- packing

    def pack(self) -> None:
        """Longest-processing-time packing of every replica, heaviest first (ties by id)."""
        w, counts = self.w, self.counts
        items = sorted(((w[e], e) for e, c in enumerate(counts) for _ in range(c)), reverse=True)
        heap = [(0.0, g) for g in range(len(self.shards))]
        slots, shards, shard_load = self.slots, self.shards, self.shard_load
        nodes = self.num_nodes
        slack = PACK_NODE_SLACK * sum(self.load) / len(shards)
        for _, e in items:
            if counts[e] == 1:
                _, g = heapq.heappop(heap)
            else:
                stash = []
                g = -1
                while heap:
                    entry = heapq.heappop(heap)
                    stash.append(entry)
                    if g >= 0 and entry[0] > shard_load[g] + slack:
                        break
                    if self.can_host(e, entry[1]):
                        if g < 0:
                            g = entry[1]
                        if not self.on_node or not self.on_node[e * nodes + self.node[entry[1]]]:
                            g = entry[1]  # a new node for e, at (nearly) the same load
                            break
                if g >= 0:
                    stash.remove((shard_load[g], g))
                for entry in stash:
                    heapq.heappush(heap, entry)
                if g < 0:
                    self._place_by_swap(e)
                    heap = [
                        (shard_load[s], s) for s in range(len(shards)) if len(shards[s]) < slots
                    ]
                    heapq.heapify(heap)
                    continue
            self.add(e, g)
            if len(shards[g]) < slots:
                heapq.heappush(heap, (shard_load[g], g))

    def _place_by_swap(self, e: int) -> None:
        """Place ``e`` when no open shard may take it: move some ``f`` to an open shard.

        Rare (replicas of one expert left for last); a linear search for the move that
        keeps the two shards' maximum lowest.
        """
        open_shards = [g for g, held in enumerate(self.shards) if len(held) < self.slots]
        best: tuple[float, int, int, int] | None = None
        for y, held in enumerate(self.shards):
            if not self.can_host(e, y):
                continue
            for f in held:
                for x in open_shards:
                    if x != y and self.can_host(f, x, src=y):
                        worst = max(
                            self.shard_load[x] + self.w[f],
                            self.shard_load[y] - self.w[f] + self.w[e],
                        )
                        if best is None or worst < best[0]:
                            best = (worst, f, y, x)
        if best is not None:
            _, f, y, x = best
            self.move(f, y, x)
            self.add(e, y)
            return
        # Only reachable when node spread is impossible; keep shards distinct at least.
        for x in sorted(open_shards, key=self.shard_load.__getitem__):
            if e not in self.shards[x]:
                self.add(e, x)
                return
        raise AssertionError(f"no shard can take a replica of expert {e}")
