"""A routing simulation (not a measurement of the engine): many replicas, LRU block caches,
FIFO queues and KV events with lag and loss, for bench/multiturn.py.

Each replica serves one request at a time, in arrival order, at ``tokens_per_s`` tokens of
work (uncached prompt tokens plus output tokens); a finished request's prompt blocks enter
its LRU cache of ``cache_blocks``, and the cache's changes reach the event-fed router as a
numbered batch ``event_lag_s`` later (a share ``event_loss`` of batches is lost; the router
notices the gap and asks for a snapshot, which arrives one lag later). The oracle is the same
cost-based router fed every change at once (it knows every cache at every moment). Hits are
what each request finds in its replica's cache when it starts, whoever routed it. A replica's
queued work (``busiest_vs_mean_queue``) is what its queue will cost: each waiting request's
uncached tokens as they will be when it starts, the LRU replayed forward over the requests
ahead of it (until 2026-12-04 it was read from the cache at the sampling moment, which
counted every request queued behind the first computation of a document as a full miss).

Workloads: ``business``: documents shared by many requests (Zipf popularity), each request a
document and a short question; ``chat``: sessions of turns with growing history, sessions
starting as a Poisson process and thinking between turns. Arrival rates are set for
``load`` (0.9) of the replicas' capacity with every shared prefix cached, so a router that
misses overloads its replicas.
"""

from __future__ import annotations

import heapq
import random
import statistics
import struct
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from bench.harness import percentile
from router.baseline_routers import PowerOfTwoRouter, TextAffinityRouter
from router.prefix_index import PrefixIndex
from router.prefix_router import PrefixRouter, PrefixRouterConfig

BS = 16  # tokens per block


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 64
    requests: int = 20_000
    load: float = 0.9
    tokens_per_s: float = 4_000.0
    think_s: float = 2.0  # mean pause between a chat session's turns
    cache_blocks: int = 4096
    event_lag_s: float = 0.05
    event_loss: float = 0.005
    seed: int = 0


@dataclass
class Req:
    rid: int
    keys: list[bytes]  # full prompt blocks
    prompt_tokens: int
    output_tokens: int
    session: str = ""
    turn: int = 0


def _key(*parts: int) -> bytes:
    return struct.pack("<3q", *parts)


def business(cfg: SimConfig, rng: random.Random) -> tuple[list[tuple[float, Req]], float]:
    """Shared documents (Zipf 1.1 over 256, 1000-3000 tokens, 8 tenants), a 30-80 token
    question each, 50 output tokens."""
    docs = [(rng.randrange(8), rng.randint(1000, 3000)) for _ in range(256)]
    weights = [1 / (i + 1) ** 1.1 for i in range(len(docs))]
    reqs = []
    for i in range(cfg.requests):
        d = rng.choices(range(len(docs)), weights)[0]
        tenant, length = docs[d]
        q = rng.randint(30, 80)
        n_doc = length // BS
        keys = [_key(tenant, d, b) for b in range(n_doc)]
        keys += [_key(-1, i, b) for b in range((length + q) // BS - n_doc)]
        reqs.append(Req(i, keys, length + q, 50))
    ideal = statistics.mean(q.prompt_tokens - BS * _shared(q) + q.output_tokens for q in reqs)
    rate = cfg.load * cfg.replicas * cfg.tokens_per_s / ideal
    t, arrivals = 0.0, []
    for r in reqs:
        t += rng.expovariate(rate)
        arrivals.append((t, r))
    return arrivals, rate


def _shared(r: Req) -> int:
    return sum(1 for k in r.keys if struct.unpack("<3q", k)[0] >= 0)


@dataclass
class Session:
    sid: int
    system: int
    history_tokens: int = 200
    turns_left: int = 8


def chat_turn(s: Session, rng: random.Random, rid: int) -> Req:
    """The session's next turn: its whole history (a 200-token system prompt shared by all
    sessions of that prompt, then its own messages and replies) plus a new message."""
    msg = rng.randint(50, 150)
    prompt = s.history_tokens + msg
    keys = [_key(-2, s.system, b) for b in range(200 // BS)]
    keys += [_key(-3, s.sid, b) for b in range(200 // BS, prompt // BS)]
    out = rng.randint(100, 300)
    s.history_tokens = prompt + out
    s.turns_left -= 1
    return Req(rid, keys, prompt, out, session=f"s{s.sid}", turn=8 - s.turns_left)


@dataclass
class Replica:
    name: str
    cache: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    queue: deque[Req] = field(default_factory=deque)  # waiting, FIFO
    busy: bool = False
    busy_until: float = 0.0  # when the running request finishes
    running: Req | None = None
    work: float = 0.0
    seq_no: int = 0
    stored: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)

    def hit_blocks(self, keys: list[bytes]) -> int:
        n = 0
        for key in keys:
            if key not in self.cache:
                break
            self.cache.move_to_end(key)
            n += 1
        return n

    def backlog(self, now: float, tokens_per_s: float, capacity: int) -> float:
        """Tokens of work queued: the running request's rest and each waiting one's uncached
        prompt and output, as it will be when it starts (the cache replayed forward, FIFO:
        blocks the requests ahead of it compute, and what they evict; nothing is touched)."""
        left = max(0.0, self.busy_until - now) * tokens_per_s if self.busy else 0.0
        if not self.queue:
            return left
        replay = _Replay(self.cache, capacity)
        ahead = [self.running] if self.running is not None else []
        for r in ahead + list(self.queue):
            if r is not self.running:
                left += r.prompt_tokens - replay.hit_blocks(r.keys) * BS + r.output_tokens
            replay.insert(r.keys)
        return left

    def insert(self, keys: list[bytes], capacity: int) -> None:
        self.removed += _lru_insert(self.cache, keys, capacity, self.stored)


def _lru_insert(
    cache: OrderedDict[bytes, None],
    keys: list[bytes],
    capacity: int,
    stored: list[bytes] | None = None,
) -> list[bytes]:
    """Insert (or refresh) ``keys`` in an LRU of ``capacity``; the keys it evicted."""
    removed = []
    for key in keys:
        if key in cache:
            cache.move_to_end(key)
            continue
        cache[key] = None
        if stored is not None:
            stored.append(key)
        if len(cache) > capacity:
            old, _ = cache.popitem(last=False)
            removed.append(old)
    return removed


class _Replay:
    """An LRU cache's future, replayed without copying it: keys the replay inserted or
    refreshed sit in their own LRU after the untouched ones, and evictions take the
    cache's untouched keys, oldest first, before the replay's own."""

    def __init__(self, cache: OrderedDict[bytes, None], capacity: int) -> None:
        self.cache, self.capacity = cache, capacity
        self.untouched = iter(cache)  # the cache's keys, oldest first
        self.touched: OrderedDict[bytes, None] = OrderedDict()
        self.evicted: set[bytes] = set()
        self.size = len(cache)

    def holds(self, key: bytes) -> bool:
        return key in self.touched or (key in self.cache and key not in self.evicted)

    def hit_blocks(self, keys: list[bytes]) -> int:
        n = 0
        for key in keys:
            if not self.holds(key):
                break
            n += 1
        return n

    def insert(self, keys: list[bytes]) -> None:
        for key in keys:
            if key in self.touched:
                self.touched.move_to_end(key)
                continue
            held = key in self.cache and key not in self.evicted
            self.touched[key] = None
            if held:
                continue
            self.size += 1
            if self.size > self.capacity:
                self._evict()

    def _evict(self) -> None:
        for key in self.untouched:
            if key not in self.touched and key not in self.evicted:
                self.evicted.add(key)
                self.size -= 1
                return
        old, _ = self.touched.popitem(last=False)
        self.evicted.add(old)
        self.size -= 1


@dataclass(frozen=True)
class Batch:
    epoch: str
    seq_no: int
    stored: tuple[bytes, ...]
    removed: tuple[bytes, ...]
    snapshot: bool = False


def simulate(cfg: SimConfig, workload: str, policy: str) -> dict[str, Any]:
    """One run; ``policy``: oracle | events | text_affinity | power_of_two."""
    rng = random.Random(cfg.seed)
    names = [f"r{i}" for i in range(cfg.replicas)]
    reps = {n: Replica(n) for n in names}
    now = 0.0
    index = PrefixIndex(expect_ttl_s=max(0.2, 4 * cfg.event_lag_s), clock=lambda: now)
    router = PrefixRouter(index, PrefixRouterConfig(block_size=BS))
    for n in names:
        router.add_replica(n)
        index.apply(n, Batch("e", 0, (), (), True))
    pow2 = PowerOfTwoRouter(names, random.Random(cfg.seed + 1))
    text = TextAffinityRouter(names, granularity=1, rng=random.Random(cfg.seed + 2))
    in_flight = dict.fromkeys(names, 0)
    heap: list[tuple[float, int, str, Any]] = []
    order = 0

    def push(t: float, kind: str, item: Any) -> None:
        nonlocal order
        order += 1
        heapq.heappush(heap, (t, order, kind, item))

    sessions: dict[str, Session] = {}
    if workload == "business":
        arrivals, rate = business(cfg, rng)
        for t, r in arrivals:
            push(t, "arrive", r)
    else:
        ideal_turn = 100 + 200  # new message + output, history cached
        rate = cfg.load * cfg.replicas * cfg.tokens_per_s / ideal_turn  # turns per second
        t = 0.0
        for sid in range(cfg.requests // 8):
            t += rng.expovariate(rate / 8)
            s = Session(sid, rng.randrange(4))
            sessions[f"s{sid}"] = s
            push(t, "arrive", chat_turn(s, rng, order))
    hit_tokens = prompt_tokens = 0
    decision_s: list[float] = []
    choices: dict[int, Any] = {}
    queue_ratio: list[float] = []
    queue_sum = dict.fromkeys(names, 0.0)  # queued tokens of work, summed over samples
    done = 0
    while heap:
        now, _, kind, item = heapq.heappop(heap)
        if kind == "arrive":
            req: Req = item
            start = time.perf_counter()
            if policy in ("oracle", "events"):
                choice = router.choose(req.keys, req.prompt_tokens, req.output_tokens, req.session)
                choices[req.rid] = choice
                name = choice.replica
            elif policy == "text_affinity":
                name = text.choose(req.keys, in_flight)
            else:
                name = pow2.choose(in_flight)
            decision_s.append(time.perf_counter() - start)
            rep = reps[name]
            in_flight[name] += 1
            rep.queue.append(req)
            if not rep.busy:
                hit_tokens, prompt_tokens = _start(rep, now, cfg, push, hit_tokens, prompt_tokens)
            if req.rid % 50 == 0:
                lengths = [
                    x.backlog(now, cfg.tokens_per_s, cfg.cache_blocks) for x in reps.values()
                ]
                for rname, queued_now in zip(names, lengths, strict=True):
                    queue_sum[rname] += queued_now
                mean = statistics.mean(lengths)
                if mean > 0:
                    queue_ratio.append(max(lengths) / mean)
        elif kind == "finish":
            name, r = item
            rep = reps[name]
            in_flight[name] -= 1
            rep.insert(r.keys, cfg.cache_blocks)
            rep.busy, rep.running = False, None
            if rep.queue:
                hit_tokens, prompt_tokens = _start(rep, now, cfg, push, hit_tokens, prompt_tokens)
            if r.rid in choices:
                router.done(choices.pop(r.rid))
            _publish(rep, policy, cfg, rng, index, router, now, push)
            done += 1
            sess = sessions.get(r.session)
            if sess is not None and sess.turns_left > 0:
                turn = chat_turn(sess, rng, 10**9 + done)
                push(now + rng.expovariate(1 / cfg.think_s), "arrive", turn)
        elif kind == "deliver":
            name, batch = item
            if not index.apply(name, batch):
                snap = Batch("e", reps[name].seq_no, tuple(reps[name].cache), (), True)
                reps[name].seq_no += 1
                push(now + cfg.event_lag_s, "deliver", (name, snap))
    works = [x.work for x in reps.values()]
    mean_queue = max(1e-9, statistics.mean(queue_sum.values()))
    return {
        "policy": policy,
        "workload": workload,
        "requests": done,
        "arrival_rate_per_s": round(rate, 1),
        "hit_rate": round(hit_tokens / prompt_tokens, 4),
        "busiest_vs_mean_work": round(max(works) / statistics.mean(works), 3),
        # the busiest replica's queued work (tokens) over the run, time-averaged, vs the mean
        "busiest_vs_mean_queue": round(max(queue_sum.values()) / mean_queue, 3),
        # the same at one moment (max over replicas of the queue then), median of samples
        "busiest_vs_mean_queue_instant_p50": round(percentile(queue_ratio, 50), 3),
        "decision_us_p50": round(percentile(decision_s, 50) * 1e6, 1),
        "decision_us_p99": round(percentile(decision_s, 99) * 1e6, 1),
    }


def _start(
    rep: Replica, now: float, cfg: SimConfig, push: Any, hit_tokens: int, prompt_tokens: int
) -> tuple[int, int]:
    """Start the replica's next request: its hit is what the cache holds now."""
    r = rep.queue.popleft()
    rep.busy, rep.running = True, r
    hit = rep.hit_blocks(r.keys)
    work = r.prompt_tokens - hit * BS + r.output_tokens
    rep.work += work
    rep.busy_until = now + work / cfg.tokens_per_s
    push(rep.busy_until, "finish", (rep.name, r))
    return hit_tokens + hit * BS, prompt_tokens + r.prompt_tokens


def _publish(
    rep: Replica,
    policy: str,
    cfg: SimConfig,
    rng: random.Random,
    index: PrefixIndex,
    router: PrefixRouter,
    now: float,
    push: Any,
) -> None:
    """The replica's cache changes as one batch: at once to the oracle, after the lag (and
    maybe lost) to the event-fed router."""
    if not rep.stored and not rep.removed:
        return
    batch = Batch("e", rep.seq_no, tuple(rep.stored), tuple(rep.removed))
    rep.seq_no += 1
    rep.stored, rep.removed = [], []
    if policy == "oracle":
        index.apply(rep.name, batch)
    elif policy == "events" and rng.random() >= cfg.event_loss:
        push(now + cfg.event_lag_s, "deliver", (rep.name, batch))
