"""bench/multiturn.py's side phases: the fetch threshold measured on this machine, and the
64-replica routing simulation.

Fetch threshold: for T new prompt tokens after a locally cached prefix, the time to the first
token when the engine computes them, against when it fetches their blocks from the store
(another engine published them) and computes one token. The threshold is the smallest T
(a multiple of the block size) from which fetching is faster in the median of the trials:
below it, ``kv_store.min_fetch_tokens`` should keep the engine from asking the store. The
store is one in-process shard (``--threshold-store local``, a thread hop) or one Ray shard
actor on this node (``ray``: an actor call, what a deployment pays on one node).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from bench.harness import FIRST_ORDINARY_ID, say, wait_for_quiet
from bench.routing_sim import SimConfig, simulate
from cache.kv_store import BlockStore
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest
from cluster.kv_store.client import StoreClient, local_store
from cluster.kv_store.config import KVStoreConfig
from experts.model import MoEModel
from experts.sampling_params import SamplingParams

SIZES = (16, 32, 64, 128, 256)
PREFIX = 256


def _ttft(engine: LLMEngine, rid: str, prompt: list[int]) -> float:
    """Seconds from add_request to the first token (the engine stepped here, alone)."""
    start = time.perf_counter()
    engine.add_request(EngineRequest(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True)))
    first = None
    while engine.has_unfinished():
        events = engine.step()
        if events and first is None:
            first = time.perf_counter()
    assert first is not None
    return first - start


def _store(kind: str) -> tuple[BlockStore, Any]:
    if kind == "ray":
        import ray

        from cluster.kv_store.shard_actor import RayShardCalls, start_store_shards

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        handles = start_store_shards(KVStoreConfig(enabled=True, capacity_bytes=1 << 28))
        return StoreClient(RayShardCalls(handles), list(handles)), ray.shutdown
    client, calls = local_store(1, capacity_bytes=1 << 28)
    return client, calls.shutdown


def measure_fetch_threshold(model: MoEModel, model_id: str, args: Any) -> dict[str, Any]:
    kind = args.threshold_store or ("local" if args.quick else "ray")
    trials = 3 if args.quick else 5
    store, close = _store(kind)
    try:
        config = EngineConfig(block_size=16, num_blocks=1024)
        kv = KVStoreConfig(enabled=True, min_fetch_tokens=0, fetch_timeout_s=5.0)
        writer, reader = LLMEngine(model, config), LLMEngine(model, config)
        writer.attach_kv(model_id, store, kv)
        reader.attach_kv(model_id, store, kv)
        plain = LLMEngine(model, config)
        rng = random.Random(7)
        vocab = model.spec.vocab_size
        rows = []
        for size in SIZES:
            compute, fetch = [], []
            for t in range(trials):
                prefix = [rng.randrange(FIRST_ORDINARY_ID, vocab) for _ in range(PREFIX)]
                new = [rng.randrange(FIRST_ORDINARY_ID, vocab) for _ in range(size + 1)]
                _ttft(writer, f"w{size}-{t}", prefix + new)  # publishes every full block
                assert writer.kv is not None and writer.kv.flush()
                _ttft(reader, f"p{size}-{t}", prefix)  # the prefix is local there
                _ttft(plain, f"q{size}-{t}", prefix)
                fetch.append(_ttft(reader, f"f{size}-{t}", prefix + new))
                compute.append(_ttft(plain, f"c{size}-{t}", prefix + new))
            rows.append(
                {
                    "new_tokens": size,
                    "compute_ms": round(statistics.median(compute) * 1e3, 2),
                    "fetch_ms": round(statistics.median(fetch) * 1e3, 2),
                }
            )
            row = rows[-1]
            say(f"  {size} tokens: compute {row['compute_ms']} ms, fetch {row['fetch_ms']} ms")
        assert reader.kv is not None
        fetched = reader.kv.num_fetched_blocks
        writer.kv.close() if writer.kv is not None else None
        reader.kv.close()
    finally:
        close()
    faster = [r["new_tokens"] for r in rows if r["fetch_ms"] < r["compute_ms"]]
    first = next((s for s in SIZES if all(x >= s for x in faster) and s in faster), None)
    return {
        "store": kind,
        "prefix_tokens": PREFIX,
        "rows": rows,
        "blocks_fetched": fetched,
        # the smallest size from which every larger one fetched faster; none: never faster
        "min_fetch_tokens": first if first is not None else SIZES[-1] * 2,
    }


def run_simulation(args: Any) -> dict[str, Any]:
    """Every policy on both workloads at 64 replicas; the targets' figures over workloads."""
    requests = args.sim_requests or (3000 if args.quick else 10_000)
    cfg = SimConfig(replicas=64, requests=requests, seed=args.seed)
    results: dict[str, dict[str, Any]] = {}
    for workload in ("business", "chat"):
        results[workload] = {}
        for policy in ("oracle", "events", "text_affinity", "power_of_two"):
            quiet = wait_for_quiet(args)  # decision times are wall-clock: not during a burst
            results[workload][policy] = simulate(cfg, workload, policy) | quiet
            r = results[workload][policy]
            say(
                f"  sim {workload} {policy}: hit {r['hit_rate']}, busiest/mean queue "
                f"{r['busiest_vs_mean_queue']}, decision p50 {r['decision_us_p50']} us"
            )
    events = [results[w]["events"] for w in results]
    return {
        "label": "simulation (bench/routing_sim.py), not the engine",
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "results": results,
        "hit_vs_oracle": {
            w: round(results[w]["events"]["hit_rate"] / results[w]["oracle"]["hit_rate"], 4)
            for w in results
        },
        "hit_vs_oracle_min": min(
            results[w]["events"]["hit_rate"] / results[w]["oracle"]["hit_rate"] for w in results
        ),
        "busiest_vs_mean_queue_max": max(r["busiest_vs_mean_queue"] for r in events),
        "decision_us_p50_max": max(r["decision_us_p50"] for r in events),
    }
