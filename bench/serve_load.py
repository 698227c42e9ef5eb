"""Serving load: closed-loop clients through gRPC vs the same workload on the in-process engine.

One tier (default ``strong``: the ``tiny`` MoE demo model) is measured two ways in
the same run, on the same fixed-seed workload:

- in-process: ``AsyncEngine`` in this process, ``C`` asyncio clients in a closed loop;
- gRPC: the Serve application on its own local Ray instance (gateway + tier deployment,
  one replica unless ``--tier-replicas``, the same engine settings), ``C`` ``grpc.aio``
  clients in a closed loop on one event loop (as the in-process clients are), each
  streaming ``Generate`` with the tier named explicitly (no cascade).

Both run side by side: each level runs ``--rounds`` times, the modes alternating, so
the machine's background load falls on both alike; figures pool the rounds. For each
concurrency level it reports output tokens/s, TTFT, time per output token and
end-to-end latency (p50/p95/p99), tokens per streamed chunk, and errors. The target is
the gRPC/in-process throughput ratio at concurrency 32 (the serving path's cost). The
top level also runs in-process before Ray starts, reported beside it (not the target): the
idle Ray node and Serve application take CPU from the in-process rounds as well.
Writes ``bench/results/serve_load.json`` (a suffix names non-default options). Run:
``.venv/bin/python bench/serve_load.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# run as `python bench/serve_load.py`, the script's folder is on the path, not the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import load_average, machine_summary

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / ".demo-models"
OUT = REPO / "bench" / "results"
RATIO_GOAL = 0.8


@dataclass(frozen=True)
class Request:
    token_ids: tuple[int, ...]
    max_tokens: int


@dataclass
class Sample:
    """One request's timings, in seconds from its own start."""

    ttft: float
    e2e: float
    tokens: int

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


@dataclass
class LevelResult:
    mode: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    chunks: int = 0  # streamed items the clients received (gRPC only)
    samples: list[Sample] = field(default_factory=list, repr=False)
    round_tokens_per_s: list[float] = field(default_factory=list)  # each round on its own

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict[str, Any]:
        ttft = [s.ttft for s in self.samples]
        tpot = [t for s in self.samples if (t := s.tpot) is not None]
        e2e = [s.e2e for s in self.samples]
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "wall_s": round(self.wall_s, 3),
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": round(self.tokens_per_s, 2),
            "tokens_per_chunk": round(self.output_tokens / self.chunks, 2) if self.chunks else None,
            "ttft_s": percentiles(ttft),
            "tpot_s": percentiles(tpot),
            "e2e_s": percentiles(e2e),
            "rounds_tokens_per_s": [round(r, 1) for r in self.round_tokens_per_s],
        }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


def workload(count: int, max_tokens: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [
        Request(tuple(rng.randrange(3, 2048) for _ in range(rng.randint(32, 128))), max_tokens)
        for _ in range(count)
    ]


class InProcess:
    """``AsyncEngine`` in this process; ``C`` asyncio clients in a closed loop. The engine is
    built as a tier replica builds it, with the checkpoint's tokenizer, so it also streams
    text deltas."""

    def __init__(self, model_dir: Path, engine_config: Any) -> None:
        from cluster.engine.async_engine import AsyncEngine
        from cluster.engine.llm_engine import LLMEngine
        from experts.model import MoEModel
        from experts.tokenizer import load_tokenizer

        model = MoEModel.from_checkpoint(model_dir)
        self.engine = AsyncEngine(LLMEngine(model, engine_config, load_tokenizer(model_dir)))
        self.counter = iter(range(10**9))

    def level(self, concurrency: int, requests: list[Request], result: LevelResult) -> None:
        from cluster.engine.requests import EngineRequest
        from experts.sampling_params import SamplingParams

        async def client(todo: list[Request]) -> None:
            while todo:
                req = todo.pop()
                params = SamplingParams(max_tokens=req.max_tokens, ignore_eos=True)
                request = EngineRequest(f"r{next(self.counter)}", req.token_ids, params)
                start = time.perf_counter()
                first, tokens = 0.0, 0
                async for _ in self.engine.generate(request):
                    tokens += 1
                    if tokens == 1:
                        first = time.perf_counter() - start
                result.samples.append(Sample(first, time.perf_counter() - start, tokens))
                result.output_tokens += tokens

        async def run() -> None:
            todo = list(reversed(requests))
            await asyncio.gather(*(client(todo) for _ in range(concurrency)))

        start = time.perf_counter()
        asyncio.run(run())
        result.wall_s += time.perf_counter() - start
        result.requests += len(requests)

    def close(self) -> None:
        self.engine.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Grpc:
    """The Serve application on its own local Ray instance; ``C`` ``grpc.aio`` clients on
    one event loop, each streaming ``Generate`` with the tier named explicitly (no cascade)."""

    def __init__(self, config: Any, tier: str) -> None:
        import grpc
        import ray
        from ray import serve

        from deploy.app import build_app
        from deploy.proto import moecluster_v1_pb2 as pb
        from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc

        # Ray starts its workers at niceness 15 (the raylet's worker_niceness); this process,
        # which runs the in-process engine and the gRPC clients, runs at 0. On a shared
        # machine that would let background load and the bench's own clients preempt
        # the serving path only, so the workers run at this process's niceness unless
        # RAY_worker_niceness says otherwise (--ray-niceness).
        os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
        # address "local": always a new instance, never one another process left running
        ray.init(
            address="local",
            num_cpus=os.cpu_count() or 2,
            include_dashboard=False,
            log_to_driver=False,
        )
        port = _free_port()
        # the gateway serves gRPC itself (deploy/front_door.py); Serve runs no proxy
        config = config.serving_on(port)
        serve.start(proxy_location="Disabled")
        serve.run(build_app(config), name="bench", route_prefix=None)
        self.tier = tier
        self.pb = pb
        self.pb_grpc = pb_grpc
        self.aio = grpc.aio
        self.rpc_error = grpc.RpcError
        self.address = f"127.0.0.1:{port}"

    async def _one(self, stub: Any, req: Request, result: LevelResult) -> None:
        message = self.pb.GenerateRequest(
            token_ids=list(req.token_ids),
            tier=self.tier,
            max_tokens=req.max_tokens,
            ignore_eos=True,
        )
        start = time.perf_counter()
        first, tokens, chunks = 0.0, 0, 0
        try:
            async for chunk in stub.Generate(message, timeout=600):
                if not tokens and chunk.token_ids:
                    first = time.perf_counter() - start
                tokens += len(chunk.token_ids)
                chunks += 1
        except self.rpc_error:
            result.errors += 1
            return
        result.samples.append(Sample(first, time.perf_counter() - start, tokens))
        result.output_tokens += tokens
        result.chunks += chunks

    def level(self, concurrency: int, requests: list[Request], result: LevelResult) -> None:
        async def run() -> None:
            todo = list(reversed(requests))
            async with self.aio.insecure_channel(self.address) as channel:
                stub = self.pb_grpc.MoEClusterStub(channel)

                async def client() -> None:
                    while todo:
                        await self._one(stub, todo.pop(), result)

                await asyncio.gather(*(client() for _ in range(concurrency)))

        start = time.perf_counter()
        asyncio.run(run())
        result.wall_s += time.perf_counter() - start
        result.requests += len(requests)

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def run_levels(
    local: InProcess, remote: Grpc, levels: list[tuple[int, list[Request]]], rounds: int
) -> tuple[list[LevelResult], list[LevelResult]]:
    """Each level ``rounds`` times, the two modes alternating (which goes first swaps each
    round), so that the machine's background load falls on both alike."""
    warm = workload(2, 4, seed=99)
    local.level(2, warm, LevelResult("in-process", 2, 0, 0, 0.0, 0))
    remote.level(2, warm, LevelResult("grpc", 2, 0, 0, 0.0, 0))
    local_results, remote_results = [], []
    for concurrency, requests in levels:
        mine = LevelResult("in-process", concurrency, 0, 0, 0.0, 0)
        theirs = LevelResult("grpc", concurrency, 0, 0, 0.0, 0)
        for i in range(rounds):
            runs: list[tuple[InProcess | Grpc, LevelResult]] = [(local, mine), (remote, theirs)]
            for mode, result in runs if i % 2 == 0 else runs[::-1]:
                tokens, wall = result.output_tokens, result.wall_s
                mode.level(concurrency, requests, result)
                rate = (result.output_tokens - tokens) / (result.wall_s - wall)
                result.round_tokens_per_s.append(rate)
                line = f"    c{concurrency} round {i + 1} {result.mode}: {rate:.1f} tok/s"
                print(line, flush=True)
        local_results.append(mine)
        remote_results.append(theirs)
        print(
            f"  c{concurrency}: in-process {mine.tokens_per_s:.1f} tok/s, "
            f"gRPC {theirs.tokens_per_s:.1f} tok/s",
            flush=True,
        )
    return local_results, remote_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--tier", default="strong", help="tier to load (fast or strong)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per request")
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=None,
        help="the tier's stream_interval (tokens per streamed item after the first, at least; "
        "default: the config's)",
    )
    parser.add_argument(
        "--stream-items-per-step",
        type=int,
        default=None,
        help="the tier's stream_items_per_step (0: a fixed stream_interval; default: the config's)",
    )
    parser.add_argument(
        "--tier-torch-threads",
        type=int,
        default=None,
        help="the tier replica's torch_threads (default: the config's, Ray's OMP_NUM_THREADS: 1 "
        "for num_cpus 0.5)",
    )
    parser.add_argument(
        "--ray-niceness",
        type=int,
        default=None,
        help="niceness of the Ray workers (default: this process's; Ray's own default is 15)",
    )
    parser.add_argument(
        "--tier-replicas",
        type=int,
        default=None,
        help="replicas of the measured tier (default: the config's, 1); each runs its own "
        "engine, so this is no longer one engine against one",
    )
    parser.add_argument(
        "--engine-in-replica",
        action="store_true",
        help="run the tier's engine in the replica's process, as before engine processes "
        "(default: the config's, a child process of the replica)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per level (default 3)")
    args = parser.parse_args()
    if args.tier_replicas is not None and args.tier_replicas < 1:
        parser.error(f"--tier-replicas {args.tier_replicas} must be at least 1")

    from deploy.config import default_config
    from deploy.up import ensure_demo_models

    ensure_demo_models(DEMO_DIR)
    config = default_config(DEMO_DIR)
    # Each mode runs as its users would run it: in-process with this process's torch threads,
    # the tier replica with the config's (Ray's OMP_NUM_THREADS=1 for num_cpus 0.5). Giving
    # the replica this process's thread count was measured slower here
    # (--tier-torch-threads): its threads then fight Ray's processes for the two cores.
    update: dict[str, Any] = {}
    if args.tier_torch_threads is not None:
        update["torch_threads"] = args.tier_torch_threads
    if args.stream_interval is not None:
        update["stream_interval"] = args.stream_interval
    if args.stream_items_per_step is not None:
        update["stream_items_per_step"] = args.stream_items_per_step
    if args.engine_in_replica:
        update["engine_process"] = False
    tiers = tuple(
        t.model_copy(
            update=update
            if args.tier_replicas is None or t.name != args.tier
            else {**update, "replicas": args.tier_replicas}
        )
        for t in config.tiers
    )
    config = config.model_copy(update={"tiers": tiers})
    tier = config.tier(args.tier)
    concurrency = (1, 4) if args.quick else (1, 8, 32)
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    # 4 requests per client: mostly steady state, not the first wave's synchronised start
    levels = [(c, workload(max(4 * c, 8), max_tokens, seed=c)) for c in concurrency]
    print(
        f"tier {tier.name} ({tier.model}), {max_tokens} tokens per request, {rounds} rounds, "
        f"stream_interval {tier.stream_interval}, stream_items_per_step "
        f"{tier.stream_items_per_step}, torch threads {tier.torch_threads}, "
        f"{tier.replicas} replica(s), engine in "
        f"{'a child process' if tier.runs_engine_process else 'the replica process'}",
        flush=True,
    )
    if args.ray_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.ray_niceness)
    load_start = load_average()
    local = InProcess(Path(tier.model), tier.to_engine_config())
    top = max(concurrency)
    alone = LevelResult("in-process, no Ray", top, 0, 0, 0.0, 0)
    try:
        # The same top level before Ray starts: an idle Ray node with the Serve application
        # (controller, GCS, proxy, replicas) takes CPU from the in-process rounds too.
        local.level(2, workload(2, 4, seed=99), LevelResult("in-process", 2, 0, 0, 0.0, 0))
        for _ in range(rounds):
            local.level(top, levels[-1][1], alone)
        print(f"  c{top} before Ray starts: in-process {alone.tokens_per_s:.1f} tok/s", flush=True)
        remote = Grpc(config, tier.name)
        try:
            local_results, remote_results = run_levels(local, remote, levels, rounds)
        finally:
            remote.close()
    finally:
        local.close()

    rows = [r.summary() for pair in zip(local_results, remote_results, strict=True) for r in pair]
    header = f"{'mode':<11}{'conc':>5}{'tok/s':>9}{'ttft p50/p99 s':>17}"
    header += f"{'tpot p50/p99 s':>17}{'e2e p50/p99 s':>17}{'tok/chunk':>10}{'errors':>8}"
    print(header)
    for row in rows:
        ttft, tpot, e2e = row["ttft_s"], row["tpot_s"], row["e2e_s"]
        print(
            f"{row['mode']:<11}{row['concurrency']:>5}{row['output_tokens_per_s']:>9.1f}"
            f"{ttft['p50']:>8.3f}/{ttft['p99']:<8.3f}{tpot['p50'] or 0:>8.3f}/"
            f"{tpot['p99'] or 0:<8.3f}{e2e['p50']:>8.3f}/{e2e['p99']:<8.3f}"
            f"{row['tokens_per_chunk'] or 0:>10.2f}{row['errors']:>8}"
        )
    by_level = {(r.mode, r.concurrency): r for r in local_results + remote_results}
    ratio = by_level[("grpc", top)].tokens_per_s / by_level[("in-process", top)].tokens_per_s
    ratio_alone = by_level[("grpc", top)].tokens_per_s / alone.tokens_per_s
    # each round's pair ran back to back: their spread shows how far the machine's noise reaches
    round_ratios = [
        round(g / i, 3)
        for g, i in zip(
            by_level[("grpc", top)].round_tokens_per_s,
            by_level[("in-process", top)].round_tokens_per_s,
            strict=True,
        )
    ]
    print(f"gRPC / in-process throughput at concurrency {top}: {ratio:.2f} (goal >= {RATIO_GOAL})")
    print(f"  round by round: {', '.join(f'{r:.2f}' for r in round_ratios)}")
    print(f"gRPC / in-process before Ray started, at concurrency {top}: {ratio_alone:.2f}")
    result = {
        "benchmark": "serve_load",
        "quick": args.quick,
        "tier": tier.name,
        "model": tier.model,
        "engine": asdict(tier.to_engine_config()),
        "max_tokens": max_tokens,
        "stream_interval": tier.stream_interval,
        "stream_items_per_step": tier.stream_items_per_step,
        "rounds": rounds,
        "tier_replicas": tier.replicas,
        "engine_process": tier.runs_engine_process,
        "niceness": {
            "driver": os.nice(0),
            "ray_workers": int(os.environ.get("RAY_worker_niceness", "15")),
        },
        "torch_threads": {
            "in_process": torch.get_num_threads(),
            "tier": tier.torch_threads or "Ray default (OMP_NUM_THREADS)",
        },
        "prompt_tokens": "uniform 32..128 random ids, fixed seed per level",
        "requests_per_level": {c: rounds * len(reqs) for c, reqs in levels},
        "levels": rows,
        # the in-process engine alone on the machine (before Ray started): not the target's
        # baseline (that one runs beside the idle Serve application, alternating with gRPC);
        # its rounds run in one block, not alternated, so it is the noisier figure
        "in_process_before_ray": alone.summary(),
        f"grpc_vs_inprocess_before_ray_c{top}": round(ratio_alone, 3),
        f"grpc_vs_inprocess_c{top}_by_round": round_ratios,
        "targets": {
            f"grpc_vs_inprocess_c{top}": {
                "value": round(ratio, 3),
                "goal": RATIO_GOAL,
                "met": ratio >= RATIO_GOAL,
            }
        },
        # options that differ from the deployed defaults: a variant file is not the target's run
        "options": {
            "stream_interval": args.stream_interval,
            "stream_items_per_step": args.stream_items_per_step,
            "tier_torch_threads": args.tier_torch_threads,
            "ray_niceness": args.ray_niceness,
            "tier_replicas": args.tier_replicas,
            "engine_in_replica": args.engine_in_replica or None,
        },
        "machine": machine_summary(load_start),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    variant = "".join(
        f".{label}{value}"
        for label, value in (
            ("interval", args.stream_interval),
            ("items", args.stream_items_per_step),
            ("threads", args.tier_torch_threads),
            ("nice", args.ray_niceness),
            ("replicas", args.tier_replicas),
            ("in-replica", "" if args.engine_in_replica else None),
        )
        if value is not None
    )
    name = f"serve_load{variant}{'.quick' if args.quick else ''}.json"
    (OUT / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
