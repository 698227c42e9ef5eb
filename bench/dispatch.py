"""Remote-expert dispatch: per-MoE-layer dispatch + combine overhead, and its end-to-end cost.

Both parts run in one process on one local Ray instance (``ray.init(num_cpus=2)``), with the
experts split over two shard actors by ``router.routing_table.round_robin`` (even experts
on ``s0``, odd ones on ``s1``), through the product's ``RemoteExperts`` and ``ExpertPool``.

1. **One MoE layer** (Mixtral-style, hidden 1024, 8 experts top-2, intermediate 2048: a
   one-layer random checkpoint written by transformers into a temporary folder). For 1, 32
   and 256 tokens, fixed-seed inputs routed by a random gate go, every repetition, through
   colocated experts (this process, torch's default threads), ``RemoteExperts`` on the
   default ``torch_dist`` data plane (here every shard shares the driver's node, so its pairs
   are shared memory), the same over no-op shards (the data plane alone), no-op shards over
   ``gloo`` pairs (what a shard on another node gets), both again over the ``ray`` data
   plane, and timed pools that split a layer's time, and the no-op round trip's, into
   phases (bench/dispatch_layer.py).
   Overhead = median remote - median colocated: it mixes the data plane with a compute
   difference (two 1-thread shards in parallel against one 2-thread process), which the
   no-op run separates out.
2. **End to end**: a demo checkpoint (``bench``; ``--quick``: ``tiny``) loaded three times,
   with colocated experts and with ``RemoteExperts`` over two shard actors on each data
   plane. The same ``--requests`` requests (fixed-seed prompts of 32..64 tokens, greedy,
   ``ignore_eos``) go to a fresh ``LLMEngine`` at once and are stepped to completion;
   ``--repeats`` rounds, each running the three back to back in rotating order.

Targets, each on medians: ``overhead_ms_per_layer_32_tokens`` and
``noop_dispatch_round_trip_ms_32_tokens`` (goal <= 1 ms; a negative overhead says nothing
about the data plane and never counts as met), ``remote_vs_colocated_throughput`` (the
median over rounds of remote / colocated tok/s, goal >= 0.6). Writes
``bench/results/dispatch.json``.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

# The driver is the backbone here and its shards share its two cores: with OpenMP's default
# active wait, the driver's torch threads spin after every op and take the core a shard
# needs next. A CPU backbone with shards on its node should run with passive waits.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import ray
import torch

from bench.dispatch_layer import (
    LAYER_MODEL,
    SHARD_IDS,
    LayerBench,
    measure,
    summary_ms,
)
from bench.harness import (
    FIRST_ORDINARY_ID,
    demo_checkpoint,
    median,
    parser,
    quick_or,
    say,
    target,
    wait_for_quiet,
    write_results,
)
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest
from cluster.expert_parallel.expert_pool import ExpertPool, ShardSpec
from cluster.expert_parallel.remote_experts import RemoteExperts
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from router.routing_table import round_robin
from tests.checkpoints import build_family_checkpoint

OVERHEAD_GOAL_MS = 1.0  # per MoE layer at 32 tokens, at most
THROUGHPUT_GOAL = 0.6  # remote / colocated output tok/s, at least
MODELS = ("colocated", "remote", "remote_ray")


def parse_args(argv: Sequence[str] | None) -> Any:
    p = parser("dispatch", __doc__)
    p.add_argument("--preset", default=None, help="end-to-end checkpoint (default bench)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token-counts", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--layer-reps", type=int, default=None, help="per token count (default 300)")
    p.add_argument("--warmup", type=int, default=None, help="default 10 (quick: 3)")
    p.add_argument("--layer-inputs", type=int, default=16, help="input sets per size")
    p.add_argument("--requests", type=int, default=32, help="concurrent engine requests")
    p.add_argument("--new-tokens", type=int, default=None, help="default 64 (quick: 16)")
    p.add_argument("--repeats", type=int, default=None, help="end-to-end rounds (default 3)")
    args = p.parse_args(argv)
    args.preset = quick_or(args, args.preset, "tiny", "bench")
    args.layer_reps = quick_or(args, args.layer_reps, 20, 300)
    args.warmup = quick_or(args, args.warmup, 3, 10)
    args.new_tokens = quick_or(args, args.new_tokens, 16, 64)
    args.repeats = quick_or(args, args.repeats, 1, 3)
    if min(args.token_counts) < 1 or args.layer_reps < 2 or args.layer_inputs < 1:
        p.error("token counts and --layer-inputs must be >= 1, --layer-reps >= 2")
    return args


def bench_layer(args: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="dispatch-layer-") as tmp:
        shape: dict[str, Any] = dict(LAYER_MODEL)
        model_dir = build_family_checkpoint("mixtral", Path(tmp), seed=args.seed, **shape)
        bench = LayerBench(model_dir)
        try:
            empty = bench.empty_calls(20 + (50 if args.quick else 300))[20:]
            results = []
            for num_tokens in args.token_counts:
                reps = max(2, args.layer_reps // 4) if num_tokens > 64 else args.layer_reps
                results.append(measure(bench, args, num_tokens, reps))
        finally:
            bench.close()
    facts = {
        "model": {**LAYER_MODEL, "family": "mixtral", "dtype": "float32"},
        "empty_two_actor_call": summary_ms(empty),
        "actor_niceness": bench.niceness,
        "torch_threads": {"colocated_driver": torch.get_num_threads(), "each_shard_actor": 1},
    }
    return results, facts


def run_engine(model: MoEModel, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """All requests added at once to a fresh engine (no prefix reuse across runs), run out."""
    engine = LLMEngine(model, EngineConfig())
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", prompt, params))
    while engine.has_unfinished():
        for event in engine.step():
            tokens[event.request_id].append(event.token_id)
    wall = time.perf_counter() - start
    out = list(tokens.values())
    assert all(len(t) == new_tokens for t in out), [len(t) for t in out]
    return {"wall_s": wall, "tok_s": sum(map(len, out)) / wall, "tokens": out}


def bench_engine(args: Any) -> dict[str, Any]:
    model_dir = demo_checkpoint(args.preset)
    colocated = MoEModel.from_checkpoint(model_dir)
    spec = colocated.spec
    table = round_robin(spec.moe_layers, spec.num_experts, list(SHARD_IDS))
    specs = [ShardSpec(sid, tuple(table.experts_on(sid))) for sid in SHARD_IDS]
    pool = ExpertPool.start(str(model_dir), specs)
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(FIRST_ORDINARY_ID, spec.vocab_size) for _ in range(rng.randint(32, 64))]
        for _ in range(args.requests)
    ]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in MODELS}
    quiet = []
    try:
        over_ray = RemoteExperts(ExpertPool(pool.handles, "ray"), table)  # the same shards
        models = {
            "colocated": colocated,
            "remote": MoEModel.from_checkpoint(model_dir, experts=RemoteExperts(pool, table)),
            "remote_ray": MoEModel.from_checkpoint(model_dir, experts=over_ray),
        }
        for model in models.values():
            run_engine(model, prompts[:2], 4)  # warm-up
        for rep in range(args.repeats):
            quiet.append(wait_for_quiet(args))
            for name in MODELS[rep % 3 :] + MODELS[: rep % 3]:
                runs[name].append(run_engine(models[name], prompts, args.new_tokens))
            say(
                f"end to end round {rep + 1}: "
                + ", ".join(f"{n} {runs[n][-1]['tok_s']:.1f} tok/s" for n in MODELS)
            )
    finally:
        pool.shutdown()
    firsts = [runs[name][0]["tokens"] for name in MODELS]
    identical = sum(a == b == c for a, b, c in zip(*firsts, strict=True))

    def ratios(name: str) -> list[float]:
        pairs = zip(runs[name], runs["colocated"], strict=True)
        return [round(r["tok_s"] / c["tok_s"], 4) for r, c in pairs]

    return {
        "preset": args.preset,
        "engine_config": asdict(EngineConfig()),
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        **{
            name: {
                "wall_s": [round(r["wall_s"], 3) for r in runs[name]],
                "tok_s": [round(r["tok_s"], 2) for r in runs[name]],
                "tok_s_median": round(median([r["tok_s"] for r in runs[name]]), 2),
            }
            for name in MODELS
        },
        "remote_vs_colocated_by_round": ratios("remote"),
        "remote_ray_vs_colocated_by_round": ratios("remote_ray"),
        "sequences_identical": f"{identical}/{len(prompts)}",
        "machine_before_each_round": quiet,
    }


def print_tables(layers: Sequence[dict[str, Any]], engine: dict[str, Any]) -> None:
    names = ("colocated", "remote", "noop", "noop_gloo", "remote_ray", "noop_ray")
    print("One MoE layer, median ms (remote/noop: torch_dist, shared memory; *_ray: Ray calls)")
    print(f"{'tokens':>6} | " + " | ".join(f"{n:>10}" for n in names) + " | overhead |  wire")
    for r in layers:
        cells = " | ".join(f"{r[n]['median_ms']:>10.3f}" for n in names)
        wire = r["timed_breakdown"]["wire"]["median_ms"]
        print(f"{r['num_tokens']:>6} | {cells} | {r['overhead_ms_median']:>8.3f} | {wire:5.2f}")
    print("No-op round trip by phase (shared memory), median ms")
    for r in layers:
        phases = r["noop_breakdown"]
        cells = ", ".join(f"{k} {v['median_ms']:.3f}" for k, v in phases.items())
        print(f"{r['num_tokens']:>6} | {cells}")
    print(f"End to end ({engine['requests']} requests, {engine['new_tokens']} new tokens)")
    for name in MODELS:
        print(f"{name:>10} | {engine[name]['tok_s_median']:>8.1f} tok/s (median of rounds)")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        layers, facts = bench_layer(args)
        engine = bench_engine(args)
    finally:
        ray.shutdown()
    print_tables(layers, engine)
    targets: dict[str, dict[str, Any]] = {}
    at_32 = [r for r in layers if r["num_tokens"] == 32]
    if at_32:
        overhead = at_32[0]["overhead_ms_median"]
        targets["overhead_ms_per_layer_32_tokens"] = target(overhead, OVERHEAD_GOAL_MS, False)
        targets["overhead_ms_per_layer_32_tokens"]["met"] = 0 <= overhead <= OVERHEAD_GOAL_MS
        noop = at_32[0]["noop"]["median_ms"]
        targets["noop_dispatch_round_trip_ms_32_tokens"] = target(noop, OVERHEAD_GOAL_MS, False)
    ratio = median(engine["remote_vs_colocated_by_round"])
    targets["remote_vs_colocated_throughput"] = target(ratio, THROUGHPUT_GOAL, True)
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "layer": {**facts, "results": layers},
        "end_to_end": engine,
    }
    variant = "" if args.preset == "bench" else f".{args.preset}"
    write_results(args, report, targets, variant, started)


if __name__ == "__main__":
    main()
