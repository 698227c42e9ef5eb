"""Prefix-aware replica choice: the least work, in tokens, under a bound on imbalance.

For each replica the cost of a request is, in one unit (tokens of work):

    cost = uncached prefill tokens it would compute there + the tokens already queued on it

where the cached part is the replica's matched prefix in the ``PrefixIndex`` (fed by the
engines' KV events, so exact up to event lag; routed-but-unconfirmed blocks count too). The
queue is the router's own count of work it sent and has not seen finish (prefill left plus
expected decode tokens). The cheapest replica wins among those whose queue is within the
bound ``max(imbalance_factor x mean queue, mean queue + slack_tokens)``: a hot prefix may pull
traffic to its holders only until they are that much busier than the rest (bounded loads).

Pins: blocks a replica holds pinned (its events say so) will still be there when the request
runs, and keeping a pinned prefix's traffic on its holders is what the pin is for; so each
pinned cached token lowers that replica's cost by ``pin_weight`` more tokens. A preference in
the same unit, inside the same load bound: a pin never ties a prefix to a busy replica.

Ties, and requests whose prefix no replica holds, are broken by rendezvous hashing of the
session id when there is one, else of the first block key, so the turns of one conversation
and the requests sharing a new system prompt land together before any event arrives.
Pure logic: ids, keys and integers; tested with fake replicas and an injected clock.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cache.block_key import BlockKey
from router.prefix_index import PrefixIndex


@dataclass(frozen=True)
class PrefixRouterConfig:
    block_size: int = 16
    imbalance_factor: float = 1.5  # a replica's queue may be at most this x the mean ...
    slack_tokens: int = 1024  # ... or the mean plus this, whichever is larger
    decode_weight: float = 1.0  # tokens of work per expected output token
    pin_weight: float = 0.5  # extra cost tokens saved per pinned cached token

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} is out of range: allowed >= 1")
        if self.imbalance_factor < 1.0:
            raise ValueError(f"imbalance_factor={self.imbalance_factor} must be >= 1")
        if self.slack_tokens < 0:
            raise ValueError(f"slack_tokens={self.slack_tokens} must be >= 0")
        if self.decode_weight < 0:
            raise ValueError(f"decode_weight={self.decode_weight} must be >= 0")
        if not 0 <= self.pin_weight <= 1:
            raise ValueError(f"pin_weight={self.pin_weight} is out of range: allowed [0, 1]")


@dataclass(frozen=True)
class Choice:
    """Where a request goes, what it should find cached there, and why."""

    replica: str
    cached_tokens: int  # by the index, at routing time
    work_tokens: int  # added to the replica's queue until ``done``
    reason: str  # "prefix" | "balance" | "affinity"
    best_elsewhere: int = 0  # cached tokens on the best other replica (a "routed elsewhere")


@dataclass
class PrefixRouter:
    """Cost-based choice over the replicas of one deployment (see the module doc)."""

    index: PrefixIndex
    config: PrefixRouterConfig = field(default_factory=PrefixRouterConfig)
    queued: dict[str, float] = field(default_factory=dict)  # replica -> tokens of work

    def add_replica(self, replica: str) -> None:
        self.index.add_replica(replica)
        self.queued.setdefault(replica, 0.0)

    def remove_replica(self, replica: str) -> None:
        self.index.remove_replica(replica)
        self.queued.pop(replica, None)

    def choose(
        self,
        keys: Sequence[BlockKey],
        num_prompt_tokens: int,
        max_new_tokens: int = 0,
        session_id: str = "",
        loads: Mapping[str, float] | None = None,
    ) -> Choice:
        """The replica for a request whose prompt's full-block keys are ``keys``; its work
        is counted in ``queued``. ``loads``, when given, names the candidates (the replicas
        the caller can reach now: a replica that died is in the index until its removal is
        seen, and must not be chosen) and their queue figures."""
        queued = self.queued if loads is None else dict(loads)
        assert queued, "no replica to route to"
        size = self.config.block_size
        usable = max(0, (num_prompt_tokens - 1) // size)  # one token is always computed
        matched = self.index.matches(keys[:usable])  # only replicas holding some prefix
        if loads is not None and not matched.keys() <= queued.keys():
            matched = {r: m for r, m in matched.items() if r in queued}
        loads_now = queued.values()
        mean = sum(loads_now) / len(queued)
        bound = max(self.config.imbalance_factor * mean, mean + self.config.slack_tokens)
        # candidates: the holders of some prefix under the bound, and the least loaded
        # replicas (with no hit, the cheapest of the rest is the least loaded)
        least_queue = min(loads_now)
        base = num_prompt_tokens + least_queue
        costs = [(base, r) for r, q in queued.items() if q <= least_queue]
        if matched:
            over = bound + 1
            if self.index.has_pins:
                pinned = self.index.pinned_prefix(keys[:usable])
                bonus = self.config.pin_weight * size
                costs += [
                    (num_prompt_tokens - m * size + queued[r] - bonus * pinned.get(r, 0), r)
                    for r, m in matched.items()
                    if queued.get(r, over) <= bound
                ]
            else:
                costs += [
                    (num_prompt_tokens - m * size + q, r)
                    for r, m in matched.items()
                    if (q := queued.get(r, over)) <= bound
                ]
        least = min(costs)[0]
        tied = [r for c, r in costs if c <= least]
        tie = session_id.encode() if session_id else (keys[0] if keys else b"")
        replica = tied[0] if len(tied) == 1 else max(tied, key=lambda r: _rendezvous(tie, r))
        mine = matched.pop(replica, 0)  # (matches returns a fresh dict)
        cached = mine * size
        elsewhere = max(matched.values(), default=0) * size
        reason = "prefix" if cached else ("affinity" if len(tied) > 1 else "balance")
        if cached < elsewhere:
            reason = "balance"
        work = (num_prompt_tokens - cached) + self.config.decode_weight * max_new_tokens
        self.queued[replica] = self.queued.get(replica, 0.0) + work
        # what it will compute counts as held there until events confirm it
        self.index.expect(replica, keys[cached // size : usable])
        return Choice(replica, cached, int(work), reason, elsewhere)

    def done(self, choice: Choice) -> None:
        """The request finished (or failed): its work leaves the replica's queue."""
        if choice.replica in self.queued:
            self.queued[choice.replica] = max(0.0, self.queued[choice.replica] - choice.work_tokens)


def _rendezvous(tie: bytes, replica: str) -> int:
    """Highest-random-weight hashing (a stable weight per tie and replica, the same in every
    router process)."""
    return zlib.crc32(replica.encode(), zlib.crc32(tie))
