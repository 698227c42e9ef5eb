"""Multi-turn conversations over several engine replicas: local caches, routing, the KV store.

N sessions x T turns with growing history (a shared system prompt, then each session's
messages and replies), over R in-process engine replicas (each on its own loop thread, one
torch thread each), turn by turn (every session sends turn k, all wait, then turn k+1). In the
same run, on the same workload: no cache (power-of-two routing); local caches with
power-of-two routing; local caches with text-prefix affinity (Ray Serve LLM's published rule,
reimplemented: ``router.baseline_routers``); local caches + the cluster KV store (in-process
shards) + event-driven routing (``router.prefix_router`` fed by the engines' KV events); and
the last two again with one replica restarted (fresh engine, empty cache) before turn
``--restart-turn``. Per configuration: prompt tokens computed, hit rate, tokens from the store,
TTFT p50/p99 per turn, and greedy outputs compared with the no-cache run.

Also: the fetch threshold (prompt tokens below which recomputing beats a store fetch) measured
on this machine, and a routing simulation at 64 replicas (``bench.routing_sim``: a
simulation, not the engine). Targets: issue 17's.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.harness import (
    FIRST_ORDINARY_ID,
    demo_checkpoint,
    model_label,
    parser,
    percentile,
    quick_or,
    say,
    wait_for_quiet,
    write_results,
)
from bench.multiturn_phases import measure_fetch_threshold, run_simulation
from bench.multiturn_report import compute_targets, table
from cache.block_key import KeySpace, model_fingerprint
from cache.prefix_hash import hash_blocks, root_hash
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.config import EngineConfig
from cluster.engine.engine_kv import pool_layout
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest
from cluster.kv_store.client import StoreClient, local_store
from cluster.kv_store.config import KVStoreConfig
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from router.baseline_routers import PowerOfTwoRouter, TextAffinityRouter
from router.prefix_index import PrefixIndex
from router.prefix_router import PrefixRouter, PrefixRouterConfig

BS = 16
CONFIGS = (
    ("no_cache", "power_of_two", False, False),
    ("local_pow2", "power_of_two", False, False),
    ("local_text_affinity", "text_affinity", False, False),
    ("store_events", "events", True, False),
    ("local_text_affinity_restart", "text_affinity", False, True),
    ("store_events_restart", "events", True, True),
)


@dataclass(frozen=True)
class Workload:
    sessions: int
    turns: int
    system: list[int]
    messages: list[list[list[int]]]  # [session][turn] -> the user's new message
    reply_tokens: int


@dataclass
class TurnStats:
    ttft_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    store_tokens: int = 0


@dataclass
class ConfigRun:
    name: str
    turns: list[TurnStats]
    computed: int  # prompt tokens the engines computed
    outputs: dict[tuple[int, int], list[int]]
    wall_s: float
    misses: dict[str, int]

    @property
    def prompt_tokens(self) -> int:
        return sum(t.prompt_tokens for t in self.turns)

    def hit_rate(self, turns: slice = slice(None)) -> float:
        chosen = self.turns[turns]
        total = sum(t.prompt_tokens for t in chosen)
        return sum(t.cached_tokens for t in chosen) / total if total else 0.0

    def ttft(self, q: float, turns: slice = slice(None)) -> float:
        return percentile([x for t in self.turns[turns] for x in t.ttft_s], q)


def make_workload(
    sessions: int,
    turns: int,
    system_len: int,
    msg: tuple[int, int],
    reply: int,
    vocab: int,
    seed: int,
) -> Workload:
    rng = random.Random(seed)
    ids: Callable[[int], list[int]] = lambda n: [  # noqa: E731
        rng.randrange(FIRST_ORDINARY_ID, vocab) for _ in range(n)
    ]
    system = ids(system_len)
    messages = [[ids(rng.randint(*msg)) for _ in range(turns)] for _ in range(sessions)]
    return Workload(sessions, turns, system, messages, reply)


class Replicas:
    """R in-process engines, each on its loop thread, sharing (maybe) one store."""

    def __init__(
        self,
        models: list[MoEModel],
        config: EngineConfig,
        model_id: str,
        store: StoreClient | None,
        kv: KVStoreConfig,
    ) -> None:
        self.models, self.config, self.model_id, self.store, self.kv = (
            models,
            config,
            model_id,
            store,
            kv,
        )
        self.engines = [self._start(m) for m in models]
        self.names = [f"r{i}" for i in range(len(models))]

    def _start(self, model: MoEModel) -> AsyncEngine:
        engine = LLMEngine(model, self.config)
        if self.config.enable_prefix_caching:
            engine.attach_kv(self.model_id, self.store, self.kv)
        return AsyncEngine(engine)

    def restart(self, i: int) -> None:
        self.engines[i].shutdown()
        self.engines[i] = self._start(self.models[i])

    def keyspace(self) -> KeySpace:
        engine = self.engines[0].engine
        return KeySpace(self.model_id, pool_layout(engine.pool, self.config.block_size))

    def computed(self) -> int:
        return sum(e.engine.num_prompt_tokens_computed for e in self.engines)

    def shutdown(self) -> None:
        for e in self.engines:
            e.shutdown()


async def run_config(
    name: str,
    routing: str,
    use_store: bool,
    restart: bool,
    w: Workload,
    models: list[MoEModel],
    args: Any,
    model_id: str,
) -> ConfigRun:
    caching = name != "no_cache"
    config = EngineConfig(
        block_size=BS,
        num_blocks=args.kv_blocks,
        enable_prefix_caching=caching,
        max_num_batched_tokens=512,
    )
    kv = KVStoreConfig(
        enabled=use_store, min_fetch_tokens=args.min_fetch_tokens, fetch_timeout_s=2.0
    )
    store = local_store(2, capacity_bytes=1 << 30)[0] if use_store else None
    reps = Replicas(models, config, model_id, store, kv)
    names = reps.names
    space = reps.keyspace()
    pow2 = PowerOfTwoRouter(names, random.Random(args.seed))
    text = TextAffinityRouter(names, granularity=4, rng=random.Random(args.seed))
    router = PrefixRouter(PrefixIndex(), PrefixRouterConfig(block_size=BS))
    for n in names:
        router.add_replica(n)
    in_flight = dict.fromkeys(names, 0)
    histories = [list(w.system) for _ in range(w.sessions)]
    turns = [TurnStats() for _ in range(w.turns)]
    outputs: dict[tuple[int, int], list[int]] = {}
    misses: dict[str, int] = {}
    retired = 0  # prompt tokens computed by a replica's engine before its restart
    start = time.perf_counter()

    def feed_events() -> None:
        for n, engine in zip(names, reps.engines, strict=True):
            for batch in engine.take_kv_events():
                if not router.index.apply(n, batch):
                    engine.request_kv_snapshot()

    async def one(s: int, k: int) -> None:
        prompt = histories[s] + w.messages[s][k]
        rid = f"s{s}t{k}"
        keys = space.keys("", hash_blocks(prompt, BS, root=root_hash("")))
        choice = None
        if routing == "events":
            feed_events()
            choice = router.choose(keys, len(prompt), w.reply_tokens, session_id=f"s{s}")
            replica = choice.replica
        elif routing == "text_affinity":
            replica = text.choose(prompt, in_flight)
        else:
            replica = pow2.choose(in_flight)
        i = names.index(replica)
        in_flight[replica] += 1
        params = SamplingParams(max_tokens=w.reply_tokens, ignore_eos=True)
        sent = time.perf_counter()
        first: float | None = None
        tokens: list[int] = []
        last = None
        async for event in reps.engines[i].generate(EngineRequest(rid, prompt, params)):
            if first is None:
                first = time.perf_counter()
            tokens.append(event.token_id)
            last = event
        in_flight[replica] -= 1
        if choice is not None:
            router.done(choice)
        assert first is not None and last is not None
        stats = turns[k]
        stats.ttft_s.append(first - sent)
        stats.prompt_tokens += len(prompt)
        stats.cached_tokens += last.num_cached_prompt_tokens
        stats.store_tokens += last.num_store_cached_tokens
        if caching:  # (without a KV link no reason is known)
            reason = last.kv_miss or "none"
            misses[reason] = misses.get(reason, 0) + 1
        if choice is not None and choice.best_elsewhere > choice.cached_tokens:
            misses["routed_elsewhere"] = misses.get("routed_elsewhere", 0) + 1
        outputs[(s, k)] = tokens
        histories[s] = prompt + tokens

    try:
        for k in range(w.turns):
            if restart and k == args.restart_turn:
                retired += reps.engines[1].engine.num_prompt_tokens_computed
                reps.restart(1)  # a fresh engine: empty cache, a new KV event epoch
                text.reset(names[1])  # the replica is new to that router too
            await asyncio.gather(*(one(s, k) for s in range(w.sessions)))
        computed = reps.computed() + retired
    finally:
        reps.shutdown()
    return ConfigRun(name, turns, computed, outputs, time.perf_counter() - start, misses)


def summarize(run: ConfigRun, baseline: ConfigRun, restart_turn: int) -> dict[str, Any]:
    mismatched = sum(1 for k, v in run.outputs.items() if baseline.outputs.get(k) != v)
    return {
        "prompt_tokens": run.prompt_tokens,
        "prompt_tokens_computed": run.computed,
        "computed_vs_no_cache": round(run.computed / max(1, baseline.computed), 4),
        "hit_rate": round(run.hit_rate(), 4),
        "hit_rate_per_turn": [
            round(run.hit_rate(slice(k, k + 1)), 4) for k in range(len(run.turns))
        ],
        "store_tokens": sum(t.store_tokens for t in run.turns),
        "ttft_p50_ms_per_turn": [
            round(run.ttft(50, slice(k, k + 1)) * 1e3, 1) for k in range(len(run.turns))
        ],
        "ttft_p99_ms_per_turn": [
            round(run.ttft(99, slice(k, k + 1)) * 1e3, 1) for k in range(len(run.turns))
        ],
        "ttft_p50_ms_turn4_on": round(run.ttft(50, slice(3, None)) * 1e3, 1),
        "outputs_differing_from_no_cache": mismatched,
        "kv_miss_reasons": run.misses,
        "wall_s": round(run.wall_s, 1),
    }


def main() -> None:
    p = parser("multiturn", __doc__)
    p.add_argument("--sessions", type=int, default=None)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--preset", default="tiny")
    p.add_argument(
        "--restart-turn",
        type=int,
        default=4,
        help="turn index (0-based) before which replica 1 restarts",
    )
    p.add_argument("--kv-blocks", type=int, default=None, help="KV blocks per replica")
    p.add_argument("--min-fetch-tokens", type=int, default=None)
    p.add_argument("--sim-requests", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threshold-store",
        choices=("local", "ray"),
        default=None,
        help="store for the fetch-threshold phase (default: ray; quick: local)",
    )
    args = p.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(1)  # one core per replica's engine thread
    args.sessions = quick_or(args, args.sessions, 4, 10)
    args.rounds = quick_or(args, args.rounds, 1, 2)
    args.kv_blocks = args.kv_blocks or (1024 if args.quick else 1536)
    path = demo_checkpoint(args.preset)
    models = [MoEModel.from_checkpoint(path) for _ in range(args.replicas)]
    model_id = f"{model_fingerprint(path)}:{models[0].spec.kv_layout}"
    say("phase 1: the fetch threshold (recompute vs fetch from the store)")
    threshold = measure_fetch_threshold(models[0], model_id, args)
    if args.min_fetch_tokens is None:
        args.min_fetch_tokens = threshold["min_fetch_tokens"]
    w = make_workload(
        args.sessions, args.turns, 64, (24, 48), 16, models[0].spec.vocab_size, args.seed
    )
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(args.rounds):
        runs: dict[str, ConfigRun] = {}
        for name, routing, use_store, restart in CONFIGS:
            quiet = wait_for_quiet(args)
            say(f"round {r + 1}: {name} (others busy {quiet['others_cpu_busy_before']:.2f})")
            runs[name] = asyncio.run(
                run_config(name, routing, use_store, restart, w, models, args, model_id)
            )
        rounds.append(
            {
                n: summarize(run, runs["no_cache"], args.restart_turn) | {"_run": run}
                for n, run in runs.items()
            }
        )
        print(
            table({n: {k: v for k, v in s.items() if k != "_run"} for n, s in rounds[-1].items()})
        )
    say("phase 3: routing simulation at 64 replicas")
    sim = run_simulation(args)
    targets = compute_targets(rounds, sim, args.restart_turn)
    report = {
        "config": {
            "model": model_label(path),
            "replicas": args.replicas,
            "sessions": args.sessions,
            "turns": args.turns,
            "rounds": args.rounds,
            "block_size": BS,
            "kv_blocks": args.kv_blocks,
            "restart_turn": args.restart_turn,
            "min_fetch_tokens": args.min_fetch_tokens,
            "store": "in-process shards (2), hash ring, replication 1",
        },
        "fetch_threshold": threshold,
        "rounds": [
            {n: {k: v for k, v in s.items() if k != "_run"} for n, s in rd.items()} for rd in rounds
        ],
        "simulation": sim,
    }
    write_results(args, report, targets, started=started)


if __name__ == "__main__":
    main()
