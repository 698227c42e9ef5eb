"""Serving load: closed-loop clients through the gRPC front door, against a same-run baseline.

Two scenarios, each on a fixed-seed workload (prompts of 32..128 random ids, ``ignore_eos``),
at concurrency 1 / 8 / 32 with 4 requests per client, ``--rounds`` rounds whose modes
alternate (which goes first rotates), so the machine's background load falls on all alike:

- ``grpc`` (the default): one tier (``strong``: the ``tiny`` MoE demo model, its engine in a
  child process of its one replica) through the Serve application on a local Ray instance,
  ``grpc.aio`` clients naming the tier, against ``AsyncEngine`` in this process built as a
  replica builds it, with asyncio clients. The target is gRPC / in-process throughput at 32:
  what the serving path costs. The top level also runs in-process before Ray starts (not the
  target's baseline: the idle Serve application takes CPU from the in-process rounds too).
- ``sharded``: two tiers on the same ``tiny`` checkpoint, each with its experts in two shard
  actors (``experts: placement: sharded``), both through gRPC: ``before`` runs the engine in
  the replica's process (``engine_process: false``), ``after`` in a child process
  (``engine_process: true``). The target is after / before throughput at 32.

Each target is the median of the rounds' ratios at the top level. Writes
``bench/results/serve_load.json`` (the sharded scenario: ``serve_load.sharded.json``; other
non-default options name their own file).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bench.harness import (
    DEMO_DIR,
    demo_checkpoint,
    median,
    model_label,
    parser,
    quick_or,
    say,
    target,
    write_results,
)
from bench.serving import (
    Grpc,
    InProcess,
    LevelResult,
    Mode,
    ServeApp,
    format_levels,
    run_levels,
    workload,
)

GRPC_GOAL = 0.8  # gRPC / in-process at the top level, at least
SHARDED_GOAL = 1.0  # engine process / engine in the replica, sharded experts, at least
NO_AUTH: dict[str, Any] = {"api_keys": [], "api_keys_env": None}


def parse_args(argv: list[str] | None = None) -> Any:
    p = parser("serve_load", __doc__)
    p.add_argument("--scenario", choices=["grpc", "sharded"], default="grpc")
    p.add_argument("--max-tokens", type=int, default=None, help="per request (default 64)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per level (default 3)")
    p.add_argument(
        "--stream-items-per-step",
        type=int,
        default=None,
        help="the tier's stream_items_per_step (0: a fixed stream_interval; default: config's)",
    )
    p.add_argument(
        "--tier-replicas", type=int, default=None, help="replicas of the tier (default 1)"
    )
    p.add_argument(
        "--ray-niceness",
        type=int,
        default=None,
        help="niceness of the Ray workers (default: this process's; Ray's own default is 15)",
    )
    p.add_argument(
        "--engine-in-replica",
        action="store_true",
        help="grpc scenario: the engine in the replica's process (default: a child process)",
    )
    args = p.parse_args(argv)
    if args.tier_replicas is not None and args.tier_replicas < 1:
        p.error(f"--tier-replicas {args.tier_replicas} must be at least 1")
    return args


def tier_options(args: Any) -> dict[str, Any]:
    """The tier settings the flags change (none: the deployed defaults)."""
    options: dict[str, Any] = {}
    if args.stream_items_per_step is not None:
        options["stream_items_per_step"] = args.stream_items_per_step
    if args.tier_replicas is not None:
        options["replicas"] = args.tier_replicas
    if args.engine_in_replica:
        options["engine_process"] = False
    return options


def variant_of(args: Any) -> str:
    """The results file's suffix: the scenario and every option off its default."""
    labels = (
        ("sharded", "" if args.scenario == "sharded" else None),
        ("items", args.stream_items_per_step),
        ("nice", args.ray_niceness),
        ("replicas", args.tier_replicas),
        ("in-replica", "" if args.engine_in_replica else None),
    )
    return "".join(f".{label}{value}" for label, value in labels if value is not None)


def make_config(args: Any, model: Path) -> Any:
    """The cluster measured: one ``strong`` tier, or the sharded pair ``before``/``after``."""
    from deploy.config import parse_config

    base = {"model": str(model), **tier_options(args)}
    if args.scenario == "grpc":
        tiers = [{"name": "strong", **base}]
    else:
        sharded = {"placement": "sharded", "num_shards": 2}
        tiers = [
            {"name": name, **base, "experts": sharded, "engine_process": child}
            for name, child in (("before", False), ("after", True))
        ]
    policy = {"default_tier": tiers[0]["name"], "cascade": {"enabled": False}}
    return parse_config({"tiers": tiers, "policy": policy, "auth": NO_AUTH}, DEMO_DIR)


def round_ratios(results: dict[str, list[LevelResult]], top: str, base: str) -> list[float]:
    """The top level's ``top`` / ``base`` throughput, round by round (each pair back to back)."""
    tops, bases = results[top][-1].round_tokens_per_s, results[base][-1].round_tokens_per_s
    return [round(t / b, 3) for t, b in zip(tops, bases, strict=True)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    model = demo_checkpoint("tiny")
    config = make_config(args, model)
    first = config.tiers[0]
    concurrency = (1, 4) if args.quick else (1, 8, 32)
    max_tokens = quick_or(args, args.max_tokens, 16, 64)
    rounds = quick_or(args, args.rounds, 1, 3)
    # 4 requests per client: mostly steady state, not the first wave's synchronised start
    levels = [(c, workload(max(4 * c, 8), max_tokens, seed=c)) for c in concurrency]
    top = max(concurrency)
    say(f"scenario {args.scenario}, {max_tokens} tokens per request, {rounds} round(s)")
    extra: dict[str, Any] = {}
    local = None
    if args.scenario == "grpc":
        local = InProcess(model, first.to_engine_config())
        # the same top level before Ray starts, in one block (not the target's baseline)
        alone = LevelResult("in-process, no Ray", top)
        local.level(2, workload(2, 4, seed=99), LevelResult("warm", 2))
        for _ in range(rounds):
            local.level(top, levels[-1][1], alone)
        say(f"c{top} before Ray starts: in-process {alone.tokens_per_s:.1f} tok/s")
        extra["in_process_before_ray"] = alone.summary()
    if args.ray_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.ray_niceness)
    app = ServeApp(config)
    try:
        modes: dict[str, Mode] = {t.name: Grpc(app.address, t.name) for t in config.tiers}
        if local is not None:
            modes = {"in-process": local, "grpc": modes["strong"]}
        results = run_levels(modes, levels, rounds)
    finally:
        app.close()
        if local is not None:
            local.close()
    rows = [r.summary() for pair in zip(*results.values(), strict=True) for r in pair]
    print(format_levels(rows))
    if args.scenario == "grpc":
        key, goal, ratios = (
            "grpc_vs_inprocess",
            GRPC_GOAL,
            round_ratios(results, "grpc", "in-process"),
        )
        alone_rate = extra["in_process_before_ray"]["output_tokens_per_s"]
        grpc_rate = results["grpc"][-1].tokens_per_s
        extra["grpc_vs_inprocess_before_ray"] = round(grpc_rate / alone_rate, 3)
    else:
        key, goal = "engine_process_vs_in_replica", SHARDED_GOAL
        ratios = round_ratios(results, "after", "before")
    print(f"{key} at concurrency {top}, round by round: {', '.join(f'{r:.2f}' for r in ratios)}")
    report = {
        "scenario": args.scenario,
        "model": model_label(model),
        "tiers": {
            t.name: {
                "engine_process": t.runs_engine_process,
                "experts": t.experts.placement,
                "replicas": t.replicas,
                "stream_interval": t.stream_interval,
                "stream_items_per_step": t.stream_items_per_step,
                "torch_threads": t.torch_threads or "Ray default (OMP_NUM_THREADS)",
            }
            for t in config.tiers
        },
        "engine": asdict(first.to_engine_config()),
        "max_tokens": max_tokens,
        "rounds": rounds,
        "in_process_torch_threads": torch.get_num_threads(),
        "requests_per_level": {c: rounds * len(reqs) for c, reqs in levels},
        "levels": rows,
        f"{key}_c{top}_by_round": ratios,
        "options": {**tier_options(args), "ray_niceness": args.ray_niceness},
        **extra,
    }
    targets = {f"{key}_c{top}": target(median(ratios), goal, at_least=True)}
    write_results(args, report, targets, variant_of(args), started)


if __name__ == "__main__":
    main()
