"""Tracing overhead: request throughput with telemetry fully on vs off, same run.

What runs: the gateway (``deploy.gateway.Gateway``) and a real tier replica in this
process, on the ``tiny`` demo checkpoint (Mixtral family, 8 experts top-2), its experts
behind the remote-expert backend with two in-process shards (``InProcessPool``), so
every span the cluster makes is made here too: the request root span, tier decision,
replica spans, ``moe.expert_dispatch`` spans (per MoE layer call of a traced step, up
to the default ``dispatch_spans`` per request) each with a ``moe.expert_shard`` span
per shard call. ``--experts colocated`` drops the shard spans (the common deployment).

"On" is: sample ratio 1, per-token events (256 per request at most), spans exported
by a batch processor to a JSON-lines file, metrics recorded (in-memory reader,
collected once per round the way a scraper would). The dispatch spans and a request's
queue / prefill / decode spans with their token events are recorded as plain data and
built on the span batcher's thread (``cluster.telemetry.span_batch``), inside the round.
"Off" is telemetry not set up: every instrument is a no-op. The same fixed-seed
workload (requests submitted at once, mixed prompt lengths, greedy, fixed output
lengths) runs in alternating rounds, off/on then on/off, so machine noise hits both;
throughput is output tokens over the round's wall time. The target is the median over
rounds of on / off, each round's pair run back to back. Writes
``bench/results/tracing_overhead.json``.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from bench import harness
from cluster.engine.config import EngineConfig
from cluster.expert_parallel.expert_pool import InProcessPool
from cluster.expert_parallel.remote_experts import RemoteExperts
from cluster.serving.tier_client import InProcessTierClient
from cluster.serving.tier_replica import TierReplica
from cluster.telemetry.settings import TelemetrySettings
from cluster.telemetry.setup import reset_telemetry, setup_telemetry
from cluster.telemetry.trace_file import read_spans
from deploy.config import parse_config
from deploy.gateway import Gateway
from deploy.proto import moecluster_v1_pb2 as pb
from experts.checkpoint import CheckpointReader
from router.routing_table import round_robin

RATIO_GOAL = 0.95
TOKEN_EVENTS = 256


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: int


@dataclass
class Round:
    mode: str
    wall_s: float
    output_tokens: int
    spans: int = 0

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s


def make_workload(requests: int, max_tokens: int, seed: int, vocab: int) -> Workload:
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(harness.FIRST_ORDINARY_ID, vocab) for _ in range(rng.randint(16, 128))]
        for _ in range(requests)
    ]
    return Workload(prompts, max_tokens)


def build_gateway(model_dir: Path, experts: str) -> tuple[Gateway, TierReplica]:
    remote = None
    if experts == "sharded":
        spec = CheckpointReader(model_dir).spec
        table = round_robin(spec.moe_layers, spec.num_experts, ["s0", "s1"])
        pool = InProcessPool.start(str(model_dir), {s: table.experts_on(s) for s in table.shards})
        remote = RemoteExperts(pool, table, "strong")
    engine = EngineConfig(num_blocks=1024, max_num_seqs=64, max_num_batched_tokens=512)
    replica = TierReplica("strong", model_dir, engine, experts=remote)
    config = parse_config(
        {
            "tiers": [{"name": "strong", "model": str(model_dir)}],
            "policy": {"default_tier": "strong", "cascade": {"enabled": False}},
            "auth": {"api_keys": [], "api_keys_env": None},
        },
        base_dir=model_dir.parent,
    )
    return Gateway(config, InProcessTierClient({"strong": replica})), replica


async def run_round(gateway: Gateway, workload: Workload, tag: str) -> tuple[float, int]:
    async def one(i: int, prompt: list[int]) -> int:
        request = pb.GenerateRequest(
            token_ids=prompt, max_tokens=workload.max_tokens, ignore_eos=True, tier="strong"
        )
        # a client-sent traceparent, as a traced caller would send
        trace = f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-01"
        metadata = {"request_id": f"{tag}-{i}", "traceparent": trace}
        return sum([len(c.token_ids) async for c in gateway.generate(request, metadata)])

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(workload.prompts)))
    return time.perf_counter() - start, sum(counts)


def measure(
    mode: str, model_dir: Path, experts: str, workload: Workload, tag: str, spans_path: Path
) -> Round:
    """One round in a fresh replica, so every round starts from the same (empty) KV cache."""
    reader = None
    if mode == "on":
        settings = TelemetrySettings(
            traces_exporter="file",
            file_path=str(spans_path),
            sample_ratio=1.0,
            token_events=TOKEN_EVENTS,
        )
        reader = InMemoryMetricReader()
        setup_telemetry(settings, role="bench", metric_reader=reader)
    gateway, replica = build_gateway(model_dir, experts)
    try:
        wall, tokens = asyncio.run(run_round(gateway, workload, tag))
    finally:
        replica.shutdown()
        if reader is not None:
            reader.get_metrics_data()  # one scrape's worth of collection
        reset_telemetry()  # flushes the batch processor
    spans = sum(1 for _ in read_spans(spans_path)) if mode == "on" else 0
    return Round(mode, wall, tokens, spans)


def main(argv: Sequence[str] | None = None) -> None:
    p = harness.parser("tracing_overhead", __doc__)
    p.add_argument("--experts", choices=["sharded", "colocated"], default="sharded")
    p.add_argument("--rounds", type=int, default=None, help="rounds per mode (default 5)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    requests, max_tokens = (8, 16) if args.quick else (32, 128)
    rounds = harness.quick_or(args, args.rounds, 1, 5)
    model_dir = harness.demo_checkpoint("tiny")
    vocab = CheckpointReader(model_dir).spec.vocab_size
    workload = make_workload(requests, max_tokens, seed=0, vocab=vocab)
    harness.say(
        f"{requests} requests at once, prompts 16-128 tokens, {max_tokens} output tokens each; "
        f"experts {args.experts}; {rounds} round(s) per mode"
    )
    measure("off", model_dir, args.experts, workload, "warm", Path(os.devnull))  # warm-up
    results: list[Round] = []
    quiet = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            quiet.append(harness.wait_for_quiet(args))
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                spans_path = Path(tmp) / f"spans-{r}-{mode}.jsonl"
                result = measure(mode, model_dir, args.experts, workload, f"{mode}{r}", spans_path)
                results.append(result)
                harness.say(
                    f"round {r + 1} {mode:>3}: {result.tok_s:6.1f} tok/s, wall "
                    f"{result.wall_s:.1f}s, {result.spans} spans exported"
                )
    by_mode = {m: [x for x in results if x.mode == m] for m in ("off", "on")}
    ratios = [on.tok_s / off.tok_s for on, off in zip(by_mode["on"], by_mode["off"], strict=True)]
    print("mode | median tok/s | rounds (tok/s)                | spans/round")
    for mode, mine in by_mode.items():
        rates = ", ".join(f"{x.tok_s:.1f}" for x in mine)
        middle = harness.median([x.tok_s for x in mine])
        print(f"{mode:>4} | {middle:12.1f} | {rates:29} | {mine[0].spans}")
    print(f"tracing on / off by round: {', '.join(f'{x:.3f}' for x in ratios)}")
    report = {
        "config": {
            "model": harness.model_label(model_dir),
            "experts": args.experts,
            "requests": requests,
            "max_tokens": max_tokens,
            "rounds_per_mode": rounds,
            "on": "sample ratio 1, token_events 256, JSON-lines file exporter (batch), metrics",
            "off": "telemetry not set up (no-op tracer and meter)",
            "throughput": "output tokens / wall seconds of a round; the target is the median "
            "over rounds of on / off, each round's pair run back to back",
        },
        "ratio_by_round": [round(x, 4) for x in ratios],
        "rounds": [
            {
                "mode": x.mode,
                "wall_s": round(x.wall_s, 3),
                "output_tokens": x.output_tokens,
                "tok_s": round(x.tok_s, 2),
                "spans": x.spans,
            }
            for x in results
        ],
        "machine_before_each_round": quiet,
    }
    targets = {
        "tracing_on_vs_off_throughput": harness.target(
            harness.median(ratios), RATIO_GOAL, at_least=True
        )
    }
    variant = "" if args.experts == "sharded" else ".colocated"
    harness.write_results(args, report, targets, variant, started)


if __name__ == "__main__":
    main()
