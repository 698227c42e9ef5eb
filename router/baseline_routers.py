"""The routers prefix-aware routing is measured against (benchmarks and the simulation).

``PowerOfTwoRouter``: Ray Serve's default: two replicas at random, the one with fewer requests
in flight.

``TextAffinityRouter``: the rule Ray Serve LLM's ``PrefixCacheAffinityRouter`` publishes,
reimplemented from its documentation (no code copied): when the replicas' queue lengths
differ by less than ``imbalanced_threshold`` (10), the prompt is matched against an
approximate prefix tree of the prompts each replica was sent (not what its cache holds); if the
best match covers at least ``match_rate_threshold`` (0.1) of the prompt, the candidates are the
best-matching replicas, else those whose tree is smallest; power-of-two among the candidates
(all replicas when imbalanced). The chosen replica's tree then gets the prompt. The tree here
is a set of prefix hashes every ``granularity`` symbols per replica (a prompt's prefixes are
all inserted, so the longest match is found by bisection), trimmed least recently inserted
first beyond ``max_symbols``; symbols are whatever the caller passes (characters, or token
ids). No tenant salt and no model id: two tenants' identical prompts match, as published.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class PowerOfTwoRouter:
    """Two random replicas, the less loaded (requests in flight) of the two."""

    replicas: list[str]
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    in_flight: dict[str, int] = field(default_factory=dict)

    def choose(self, loads: Mapping[str, int] | None = None) -> str:
        loads = self.in_flight if loads is None else loads
        if len(self.replicas) == 1:
            return self.replicas[0]
        a, b = self.rng.sample(self.replicas, 2)
        return a if loads.get(a, 0) <= loads.get(b, 0) else b


def prefix_hashes(symbols: Sequence[object], granularity: int) -> list[int]:
    """Hashes of ``symbols[:g]``, ``symbols[:2g]``, ...: one per full step (stable within a
    process, which is all a router's own tree needs)."""
    out: list[int] = []
    h = 0
    for end in range(granularity, len(symbols) + 1, granularity):
        h = hash((h, tuple(symbols[end - granularity : end])))
        out.append(h)
    return out


@dataclass
class _Tree:
    """One replica's approximate tree: prefix hash -> prompts holding it; prompts by age."""

    refs: dict[int, int] = field(default_factory=dict)
    prompts: OrderedDict[int, list[int]] = field(default_factory=OrderedDict)

    def insert(self, hashes: list[int], max_entries: int) -> None:
        if not hashes:
            return
        key = hashes[-1]
        if key in self.prompts:
            self.prompts.move_to_end(key)
            return
        self.prompts[key] = hashes
        for h in hashes:
            self.refs[h] = self.refs.get(h, 0) + 1
        while len(self.refs) > max_entries and len(self.prompts) > 1:
            _, old = self.prompts.popitem(last=False)
            for h in old:
                left = self.refs[h] - 1
                if left:
                    self.refs[h] = left
                else:
                    del self.refs[h]

    def match(self, hashes: list[int]) -> int:
        """How many leading prefix hashes are in the tree (prefixes are downward closed)."""
        low, high = 0, len(hashes)
        while low < high:
            mid = (low + high + 1) // 2
            if hashes[mid - 1] in self.refs:
                low = mid
            else:
                high = mid - 1
        return low


@dataclass
class TextAffinityRouter:
    """Ray Serve LLM's published prefix-affinity rule over an approximate tree (module doc)."""

    replicas: list[str]
    imbalanced_threshold: int = 10
    match_rate_threshold: float = 0.1
    granularity: int = 4
    max_symbols: int = 400_000
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    in_flight: dict[str, int] = field(default_factory=dict)
    trees: dict[str, _Tree] = field(default_factory=dict)

    def reset(self, replica: str) -> None:
        """Forget what a replica was sent (this router cannot tell when its cache empties;
        used only where a router would restart with it)."""
        self.trees.pop(replica, None)

    def choose(self, symbols: Sequence[object], loads: Mapping[str, int] | None = None) -> str:
        loads = self.in_flight if loads is None else loads
        queue = [loads.get(r, 0) for r in self.replicas]
        hashes = prefix_hashes(symbols, self.granularity)
        candidates = self.replicas
        if max(queue) - min(queue) < self.imbalanced_threshold and hashes:
            trees = {r: self.trees.setdefault(r, _Tree()) for r in self.replicas}
            matched = {r: trees[r].match(hashes) for r in self.replicas}
            best = max(matched.values())
            if best * self.granularity / max(1, len(symbols)) >= self.match_rate_threshold:
                candidates = [r for r in self.replicas if matched[r] == best]
            else:
                smallest = min(len(t.refs) for t in trees.values())
                candidates = [r for r in self.replicas if len(trees[r].refs) == smallest]
        chosen = _power_of_two(candidates, loads, self.rng)
        limit = max(1, self.max_symbols // self.granularity)
        self.trees.setdefault(chosen, _Tree()).insert(hashes, limit)
        return chosen


def _power_of_two(candidates: list[str], loads: Mapping[str, int], rng: random.Random) -> str:
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(candidates, 2)
    return a if loads.get(a, 0) <= loads.get(b, 0) else b
