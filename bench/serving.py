"""Closed-loop clients for the serving benches: the in-process engine, and gRPC to a Serve app.

Both take ``C`` clients on one asyncio event loop, each sending its next request when the
last one ends, and add what they saw to a :class:`LevelResult`. :func:`run_levels` runs
several such modes over the same workload, alternating which goes first each round, so the
machine's background load falls on all of them alike.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.harness import FIRST_ORDINARY_ID, percentiles, say


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
    """One mode at one concurrency, pooled over its rounds (each round's rate kept too)."""

    mode: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    output_tokens: int = 0
    chunks: int = 0  # streamed items the clients received (gRPC only)
    samples: list[Sample] = field(default_factory=list, repr=False)
    round_tokens_per_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict[str, Any]:
        tpot = [t for s in self.samples if (t := s.tpot) is not None]
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "wall_s": round(self.wall_s, 3),
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": round(self.tokens_per_s, 2),
            "tokens_per_chunk": round(self.output_tokens / self.chunks, 2) if self.chunks else None,
            "ttft_s": percentiles([s.ttft for s in self.samples]),
            "tpot_s": percentiles(tpot),
            "e2e_s": percentiles([s.e2e for s in self.samples]),
            "rounds_tokens_per_s": [round(r, 1) for r in self.round_tokens_per_s],
        }


def workload(count: int, max_tokens: int, seed: int) -> list[Request]:
    """Fixed-seed prompts of 32..128 random ids."""
    rng = random.Random(seed)
    return [
        Request(
            tuple(rng.randrange(FIRST_ORDINARY_ID, 2048) for _ in range(rng.randint(32, 128))),
            max_tokens,
        )
        for _ in range(count)
    ]


class Mode(Protocol):
    def level(self, concurrency: int, requests: list[Request], result: LevelResult) -> None: ...


def _closed_loop(concurrency: int, requests: list[Request], result: LevelResult, one: Any) -> None:
    """``concurrency`` clients taking the next request from ``requests`` until none is left."""

    async def run() -> None:
        todo = list(reversed(requests))

        async def client() -> None:
            while todo:
                await one(todo.pop(), result)

        await asyncio.gather(*(client() for _ in range(concurrency)))

    start = time.perf_counter()
    asyncio.run(run())
    result.wall_s += time.perf_counter() - start
    result.requests += len(requests)


class InProcess:
    """``AsyncEngine`` in this process, built as a tier replica builds it (with the
    checkpoint's tokenizer, so it streams text deltas too)."""

    def __init__(self, model_dir: Path, engine_config: Any) -> None:
        from cluster.engine.async_engine import AsyncEngine
        from cluster.engine.llm_engine import LLMEngine
        from experts.model import MoEModel
        from experts.tokenizer import load_tokenizer

        model = MoEModel.from_checkpoint(model_dir)
        self.engine = AsyncEngine(LLMEngine(model, engine_config, load_tokenizer(model_dir)))
        self.counter = iter(range(10**9))

    async def _one(self, req: Request, result: LevelResult) -> None:
        from cluster.engine.requests import EngineRequest
        from experts.sampling_params import SamplingParams

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

    def level(self, concurrency: int, requests: list[Request], result: LevelResult) -> None:
        _closed_loop(concurrency, requests, result, self._one)

    def close(self) -> None:
        self.engine.shutdown()


class ServeApp:
    """The Serve application on a fresh local Ray instance, its gateway serving gRPC itself.

    Ray starts its workers at niceness 15; this process (clients, in-process engine) runs at
    0, which on a shared machine lets other load preempt the serving path only. So the
    workers run at this process's niceness unless ``RAY_worker_niceness`` says otherwise.
    """

    def __init__(self, config: Any, name: str = "bench") -> None:
        import ray
        from ray import serve

        from deploy.app import build_app

        os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
        cpus = os.cpu_count() or 2
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        serve.start(proxy_location="Disabled")
        serve.run(build_app(config.serving_on(port)), name=name, route_prefix=None)
        self.name = name
        self.address = f"127.0.0.1:{port}"

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


class Grpc:
    """``grpc.aio`` clients streaming ``Generate`` with ``tier`` named (no cascade)."""

    def __init__(self, address: str, tier: str) -> None:
        self.address, self.tier = address, tier

    async def _one(self, stub: Any, req: Request, result: LevelResult) -> None:
        import grpc

        from deploy.proto import moecluster_v1_pb2 as pb

        message = pb.GenerateRequest(
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
        except grpc.RpcError:
            result.errors += 1
            return
        result.samples.append(Sample(first, time.perf_counter() - start, tokens))
        result.output_tokens += tokens
        result.chunks += chunks

    def level(self, concurrency: int, requests: list[Request], result: LevelResult) -> None:
        import grpc

        from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc

        async def run() -> None:
            async with grpc.aio.insecure_channel(self.address) as channel:
                stub = pb_grpc.MoEClusterStub(channel)
                await asyncio.gather(
                    *(self._client(stub, todo, result) for _ in range(concurrency))
                )

        todo = list(reversed(requests))
        start = time.perf_counter()
        asyncio.run(run())
        result.wall_s += time.perf_counter() - start
        result.requests += len(requests)

    async def _client(self, stub: Any, todo: list[Request], result: LevelResult) -> None:
        while todo:
            await self._one(stub, todo.pop(), result)


def run_levels(
    modes: Mapping[str, Mode], levels: Sequence[tuple[int, list[Request]]], rounds: int
) -> dict[str, list[LevelResult]]:
    """Each level ``rounds`` times; each round every mode once, the order rotating."""
    warm = workload(2, 4, seed=99)
    for name, mode in modes.items():
        mode.level(2, warm, LevelResult(name, 2))
    results: dict[str, list[LevelResult]] = {name: [] for name in modes}
    names = list(modes)
    for concurrency, requests in levels:
        level = {name: LevelResult(name, concurrency) for name in names}
        for i in range(rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                result = level[name]
                tokens, wall = result.output_tokens, result.wall_s
                modes[name].level(concurrency, requests, result)
                rate = (result.output_tokens - tokens) / (result.wall_s - wall)
                result.round_tokens_per_s.append(rate)
                say(f"c{concurrency} round {i + 1} {name}: {rate:.1f} tok/s")
        for name in names:
            results[name].append(level[name])
    return results


def format_levels(rows: Sequence[dict[str, Any]]) -> str:
    """The table of :meth:`LevelResult.summary` rows."""
    width = max(len(r["mode"]) for r in rows) + 2
    header = f"{'mode':<{width}}{'conc':>5}{'tok/s':>9}{'ttft p50/p99 s':>17}"
    lines = [header + f"{'tpot p50/p99 s':>17}{'e2e p50/p99 s':>17}{'tok/chunk':>10}{'errors':>8}"]
    for row in rows:
        ttft, tpot, e2e = row["ttft_s"], row["tpot_s"], row["e2e_s"]
        lines.append(
            f"{row['mode']:<{width}}{row['concurrency']:>5}{row['output_tokens_per_s']:>9.1f}"
            f"{ttft['p50'] or 0:>8.3f}/{ttft['p99'] or 0:<8.3f}{tpot['p50'] or 0:>8.3f}/"
            f"{tpot['p99'] or 0:<8.3f}{e2e['p50'] or 0:>8.3f}/{e2e['p99'] or 0:<8.3f}"
            f"{row['tokens_per_chunk'] or 0:>10.2f}{row['errors']:>8}"
        )
    return "\n".join(lines)
