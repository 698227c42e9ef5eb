"""Live re-placement on this machine: step times of a tier during a re-plan vs without one.

A tier with sharded experts (two shards in this process, ``InProcessPool``: the shard actor
body without Ray, so the move's weight loads compete with the steps for the same CPUs and
GIL) serves the same concurrent greedy traffic twice per round: once with no re-plan, once with
a re-plan forced once the batch decodes (after ``--warm-steps`` steps: a skewed load
injected into the controller's window, so it replicates hot experts and moves slots while
the requests run). Each engine step is timed; a round's ratio is the slowest step while
the move was in progress over the median step of the round's run without one, and the
target is the median of the rounds' ratios. Outputs of both runs must be identical
(checked).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.harness import (
    demo_checkpoint,
    median,
    model_label,
    parser,
    percentile,
    quick_or,
    say,
    target,
    wait_for_quiet,
    write_results,
)


def _run(
    model_dir: Path, num_requests: int, max_tokens: int, replan: bool, warm_steps: int
) -> dict[str, Any]:
    from cluster.engine.async_engine import AsyncEngine
    from cluster.engine.config import EngineConfig
    from cluster.engine.launch import EngineLaunch
    from cluster.engine.requests import EngineRequest
    from cluster.expert_parallel.expert_pool import InProcessPool
    from cluster.expert_parallel.placement_controller import (
        InProcessShards,
        TierPlacement,
        TierSetup,
    )
    from cluster.expert_parallel.remote_experts import RemoteExperts
    from experts.checkpoint import CheckpointReader
    from experts.sampling_params import SamplingParams
    from router.replan_policy import ReplanConfig
    from router.routing_table import round_robin

    spec = CheckpointReader(model_dir).spec
    shard_ids = ["s0", "s1"]
    table = round_robin(spec.moe_layers, spec.num_experts, shard_ids)
    pool = InProcessPool.start(str(model_dir), {s: table.experts_on(s) for s in shard_ids})
    config = replace(
        ReplanConfig(),
        enabled=True,
        min_tokens=1,
        imbalance_threshold=1.0,
        margin=0.0,
        min_interval_s=3600.0,
        extra_slots=0.5,
        report_interval_s=0.02,
    )
    bytes_per_slot = 3 * spec.hidden_size * spec.moe_intermediate_size * 4
    setup = TierSetup(
        "bench",
        tuple(spec.moe_layers),
        spec.num_experts,
        {"s0": "n0", "s1": "n1"},
        bytes_per_slot,
        config,
    )
    placement = TierPlacement(setup, table, InProcessShards(pool.shards))
    experts = RemoteExperts(pool, table, "bench")
    engine = AsyncEngine.start(
        EngineLaunch(
            str(model_dir),
            EngineConfig(num_blocks=512, max_num_seqs=64),
            torch_threads=1,
            count_routing=True,
        ),
        experts=experts,
    )
    steps: list[tuple[float, float, bool]] = []  # (start, seconds, a move was in progress)
    llm = engine.engine
    inner = llm.step

    def timed_step() -> Any:
        moving = placement._moving
        t0 = time.perf_counter()
        out = inner()
        steps.append((t0, time.perf_counter() - t0, moving or placement._moving))
        return out

    llm.step = timed_step  # type: ignore[method-assign]
    stop = threading.Event()

    def reporter() -> None:
        while replan and len(steps) < warm_steps and not stop.is_set():
            time.sleep(0.005)
        if replan:
            hot = {(layer, e): 5000 for layer in spec.moe_layers for e in (0, 2)}
            placement.window.add(hot, time.monotonic())
        while not stop.is_set():
            counts = engine.take_routed_counts() if replan else {}
            reply = placement.report("r0", counts, engine.table_version) if replan else None
            if reply is not None and reply.table is not None:
                engine.set_routing_table(reply.version, reply.placement)
            time.sleep(0.02)

    requests = [
        EngineRequest(
            f"r{i}",
            [3 + i % 200, 17, 40 + i % 50, 9],
            SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        )
        for i in range(num_requests)
    ]

    async def all_requests() -> dict[str, list[int]]:
        async def one(r: EngineRequest) -> tuple[str, list[int]]:
            return r.request_id, [e.token_id async for e in engine.generate(r)]

        return dict(await asyncio.gather(*(one(r) for r in requests)))

    thread = threading.Thread(target=reporter, daemon=True)
    thread.start()
    try:
        outputs = asyncio.run(all_requests())
        placement.wait_idle(60)
    finally:
        stop.set()
        thread.join(5)
        engine.shutdown()
    times = [s for _, s, _ in steps]
    during = [s for _, s, moving in steps if moving]
    return {
        "outputs": outputs,
        "num_steps": len(times),
        "median_step_ms": median(times) * 1e3,
        "p99_step_ms": percentile(times, 99) * 1e3,
        "max_step_ms": max(times) * 1e3,
        "steps_during_move": len(during),
        "max_step_during_move_ms": max(during) * 1e3 if during else None,
        "p99_step_during_move_ms": percentile(during, 99) * 1e3 if during else None,
        "replan_s": placement.stats.last_replan_s,
        "moved_slots": placement.stats.moved_slots,
        "moved_bytes": placement.stats.moved_bytes,
        "table_version": placement.table.version,
    }


def main() -> None:
    p = parser("placement_live", __doc__)
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--warm-steps", type=int, default=8, help="steps before the move starts")
    args = p.parse_args()
    started = time.perf_counter()
    model_dir = demo_checkpoint("tiny")
    num_requests = quick_or(args, args.requests, 8, 32)
    max_tokens = quick_or(args, args.max_tokens, 24, 64)
    rounds = quick_or(args, args.rounds, 1, 3)
    runs: list[dict[str, Any]] = []
    ratios: list[float] = []
    identical = True
    for r in range(rounds):
        wait_for_quiet(args)
        say(f"round {r + 1}/{rounds}: run without a re-plan")
        base = _run(model_dir, num_requests, max_tokens, False, args.warm_steps)
        wait_for_quiet(args)
        say(f"round {r + 1}/{rounds}: same traffic, a re-plan forced once it decodes")
        live = _run(model_dir, num_requests, max_tokens, True, args.warm_steps)
        identical = identical and base.pop("outputs") == live.pop("outputs")
        worst = live["max_step_during_move_ms"]
        if worst is not None:
            ratios.append(worst / base["median_step_ms"])
        runs.append({"without_replan": base, "with_replan": live})
        say(f"round {r + 1}: max step during the move / median without: {ratios[-1]:.2f}")
    ratio = median(ratios) if ratios else None
    print(f"{'round':>5} | {'median ms':>9} | {'max during move ms':>18} | {'ratio':>5}")
    for i, run in enumerate(runs):
        worst = run["with_replan"]["max_step_during_move_ms"]
        print(
            f"{i + 1:>5} | {run['without_replan']['median_step_ms']:>9.1f} | "
            f"{worst if worst is not None else float('nan'):>18.1f} | "
            f"{ratios[i] if i < len(ratios) else float('nan'):>5.2f}"
        )
    report = {
        "model": model_label(model_dir),
        "requests": num_requests,
        "max_tokens": max_tokens,
        "warm_steps": args.warm_steps,
        "rounds": runs,
        "ratio_by_round": [round(x, 3) for x in ratios],
        "outputs_identical": identical,
        "note": "shards in this process (InProcessPool): loads compete with steps for CPU/GIL",
    }
    targets = {
        "live_max_step_vs_median": target(ratio, 1.5, at_least=False),
        "outputs_identical": target(1 if identical else 0, 1, at_least=True),
    }
    write_results(args, report, targets, started=started)


if __name__ == "__main__":
    main()
