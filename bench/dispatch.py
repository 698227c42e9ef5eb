"""Remote-expert dispatch: per-MoE-layer dispatch + combine overhead, and its end-to-end cost.

Both parts run in one process, on one local Ray instance (``ray.init(num_cpus=2)``), with the
experts split over two shard actors
(``cluster.expert_parallel.expert_pool.ShardActor`` via ``ExpertPool.start``, ``num_cpus=0``,
experts assigned by ``router.routing_table.round_robin``: even experts on ``s0``, odd ones on
``s1``).

1. **One MoE layer** (Mixtral-style: hidden 1024, 8 experts top-2, intermediate 2048; a one-layer
   random checkpoint written with transformers into a temporary directory). For 1, 32 and 256
   tokens, ``--layer-inputs`` fixed-seed input sets (random hidden states, routed by a random
   gate through ``experts.gate.route``) are cycled through; every repetition runs the same
   input through, in rotating order:

   - ``ColocatedExperts.forward`` (all experts in this process, torch's default threads);
   - ``RemoteExperts.forward`` over the two shard actors (one thread each), on the default
     ``torch_dist`` data plane (``cluster/expert_parallel/data_plane.py``: gloo point-to-point
     channels opened once, no Ray task per layer);
   - ``RemoteExperts.forward`` over two *no-op* actors that return zeros of the right shape at
     once: the same split, payloads and combine, with no expert compute;
   - both of those again over the ``ray`` data plane (one actor call per shard, numpy arrays),
     on the same actors, for comparison;
   - a step-by-step copy of ``RemoteExperts.forward`` (the same ``RemoteExperts.split``,
     ``ExpertPool.compute_async`` / ``wait`` and ``combine`` calls),
     timed phase by phase, against two instrumented shard actors (``ShardActorImpl``
     subclassed to time ``compute`` inside the actor). ``wire`` = submit + wait - the slowest
     shard's in-actor compute: the transport's own share of the critical path.

   Overhead = median(remote) - median(colocated). Medians and p90 over the repetitions (after
   ``--warmup`` untimed ones) are reported. The overhead mixes two things: the data plane
   (split, round trip, combine) and a compute difference (two 1-thread shards in
   parallel vs one 2-thread process); the no-op run and the breakdown separate them.
   Remote and colocated outputs are compared. With two experts per token the partial sums add
   up exactly, so any difference comes from the matmuls themselves: on this CPU build a GEMM
   at 32 rows gives a few-ulp different result with 1 thread (the actors) than with 2 (the
   driver), so ``max_abs_diff`` (not bit identity) is the check there.

2. **End to end**: the ``bench`` demo checkpoint (Mixtral, hidden 512, 8 layers, 16 experts
   top-2; built into ``.demo-models/bench`` if missing) loaded twice in this process, once with
   colocated experts and twice with ``RemoteExperts`` over two shard actors (``torch_dist``
   and ``ray`` data planes, the same actors). The same
   ``--requests`` requests (fixed-seed prompts of 32..64 tokens, greedy, ``ignore_eos``,
   ``--new-tokens`` each) are added to a fresh ``LLMEngine`` at once and stepped to completion.
   One small warm-up per engine, then ``--repeats`` timed runs, interleaved and alternating who
   goes first. Throughput = output tokens / wall seconds of the run, from the **best** repeat
   (medians too). The greedy tokens of the two engines are compared (a sanity flag).

Targets: ``overhead_ms_per_layer_32_tokens`` (goal <= 1.0) and
``remote_vs_colocated_throughput`` (remote / colocated tok/s, goal >= 0.6). The JSON also
holds a ``data_plane`` note: the transport used and the figures in /work/shared/MEASURED.md for
alternatives (Ray Direct Transport, compiled graphs).

The machine is small and shared, and both sides are sensitive to other work in different ways
(torch's 2-thread ops in the driver stall when a core is taken; the shard actors run at Ray's
worker niceness 15). So a full run first waits (up to ``--load-wait`` seconds) for the 1-minute
load average to drop under ``--max-load``, then before each measured phase (each token count,
each engine run) waits up to ``--quiet-wait`` seconds for other processes to use under
``--quiet-threshold`` of the CPUs, and records what it saw.

Run: ``.venv/bin/python bench/dispatch.py`` (full, about 5 minutes on 2 idle cores) or
``--quick`` (smoke). Writes ``bench/results/dispatch.json`` (quick: ``dispatch.quick.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The driver is the backbone here and its shards share its two cores: with OpenMP's default
# active wait, the driver's torch threads spin for a while after every op and take the core a
# shard needs next (an empty two-actor call: ~1.8 ms, ~4.7 ms right after a driver op). A CPU
# backbone with shards on its node should run with passive waits; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import ray
import torch
import transformers

# run as `python bench/dispatch.py`, the script's folder is on the path, not the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import load_average, wait_for_quiet
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest
from cluster.expert_parallel.data_plane import ChannelTicket, PayloadLimits, serve_channel
from cluster.expert_parallel.expert_pool import ExpertPool, ShardActorImpl, ShardSpec
from cluster.expert_parallel.remote_experts import RemoteExperts
from deploy.demo_model import build_demo_model, is_demo_model
from experts.backend import ColocatedExperts
from experts.checkpoint import CheckpointReader
from experts.dispatch_tensors import combine
from experts.gate import route
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from router.routing_table import round_robin

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / ".demo-models" / "bench"
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "dispatch.json"
QUICK_OUT = REPO_ROOT / "bench" / "results" / "dispatch.quick.json"
PRESET = "bench"
SHARD_IDS = ("s0", "s1")
FIRST_ORDINARY_ID = 3  # ids 0..2 are <s>, </s>, <pad> in every demo preset
LAYER = 0  # the one MoE layer of the layer checkpoint
OVERHEAD_GOAL_MS = 1.0  # per MoE layer at 32 tokens, at most
THROUGHPUT_GOAL = 0.6  # remote / colocated output tok/s, at least
MEASURED_MD = "/work/shared/MEASURED.md"

# The one-layer checkpoint of part 1: a Mixtral-style MoE layer at hidden 1024.
LAYER_MODEL: dict[str, int] = {
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 256,
    "max_position_embeddings": 512,
}

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden [T, H], ids [T, K], w [T, K]


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BenchConfig:
    quick: bool
    seed: int
    token_counts: tuple[int, ...]
    layer_reps: tuple[int, ...]  # timed repetitions per token count
    warmup: int
    layer_inputs: int
    requests: int
    prompt_len: tuple[int, int]
    new_tokens: int
    repeats: int
    max_load: float
    load_wait_s: float
    quiet_wait_s: float
    quiet_threshold: float


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer reps and tokens")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument(
        "--out", type=Path, default=None, help=f"default {DEFAULT_OUT} (quick: {QUICK_OUT.name})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token-counts", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument(
        "--layer-reps",
        type=int,
        nargs="+",
        default=None,
        help="timed repetitions per token count, one value or one per count "
        "(default 400 400 80; quick: 30 30 8)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="default 10 (quick: 3)")
    parser.add_argument("--layer-inputs", type=int, default=16, help="input sets per size")
    parser.add_argument("--requests", type=int, default=32, help="concurrent engine requests")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[32, 64], metavar=("MIN", "MAX"))
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 (quick: 16)")
    parser.add_argument("--repeats", type=int, default=None, help="default 2 (quick: 1)")
    parser.add_argument("--max-load", type=float, default=2.0)
    parser.add_argument(
        "--load-wait",
        type=float,
        default=None,
        help="wait up to this many seconds for the 1-min load average to fall under "
        "--max-load before measuring (default 600; quick: 0)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="before each measured phase, wait up to this many seconds for other processes to "
        "leave the CPUs under --quiet-threshold busy (default 20; quick: 0)",
    )
    parser.add_argument("--quiet-threshold", type=float, default=0.25)
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> BenchConfig:
    counts = tuple(args.token_counts)
    default_reps = {1: 30, 32: 30, 256: 8} if args.quick else {1: 400, 32: 400, 256: 80}
    if args.layer_reps is None:
        reps = tuple(default_reps.get(t, 8 if args.quick else 100) for t in counts)
    elif len(args.layer_reps) == 1:
        reps = tuple(args.layer_reps) * len(counts)
    elif len(args.layer_reps) == len(counts):
        reps = tuple(args.layer_reps)
    else:
        raise SystemExit("--layer-reps takes one value or one per --token-counts entry")
    lo, hi = args.prompt_len
    cfg = BenchConfig(
        quick=args.quick,
        seed=args.seed,
        token_counts=counts,
        layer_reps=reps,
        warmup=args.warmup if args.warmup is not None else (3 if args.quick else 10),
        layer_inputs=args.layer_inputs,
        requests=args.requests,
        prompt_len=(lo, hi),
        new_tokens=args.new_tokens if args.new_tokens is not None else (16 if args.quick else 64),
        repeats=args.repeats if args.repeats is not None else (1 if args.quick else 2),
        max_load=args.max_load,
        load_wait_s=args.load_wait if args.load_wait is not None else (0.0 if args.quick else 600),
        quiet_wait_s=args.quiet_wait
        if args.quiet_wait is not None
        else (0.0 if args.quick else 20),
        quiet_threshold=args.quiet_threshold,
    )
    if min(counts) < 1 or min(reps) < 2 or cfg.layer_inputs < 1 or cfg.requests < 1:
        raise SystemExit("token counts, --layer-inputs and --requests >= 1; --layer-reps >= 2")
    if not 1 <= lo <= hi or cfg.new_tokens < 1 or cfg.repeats < 1 or cfg.warmup < 0:
        raise SystemExit("--prompt-len needs 1 <= MIN <= MAX; --new-tokens, --repeats >= 1")
    return cfg


def say(msg: str) -> None:
    print(f"[dispatch] {msg}", flush=True)


# ----------------------------------------------------------------------------- statistics


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]) of a non-empty sample."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {
        "median_ms": round(statistics.median(ms), 4),
        "p90_ms": round(quantile(ms, 0.9), 4),
        "min_ms": round(min(ms), 4),
        "mean_ms": round(statistics.fmean(ms), 4),
    }


@dataclass(frozen=True)
class Quiet:
    """What the machine looked like just before a measured phase."""

    others_cpu_busy: float  # share of all CPUs other processes used, just before
    waited_s: float
    load_1m: float

    def to_json(self) -> dict[str, float]:
        return {
            "others_cpu_busy_before": round(self.others_cpu_busy, 3),
            "quiet_wait_s": round(self.waited_s, 1),
            "load_1m_before": round(self.load_1m, 2),
        }


def wait_until_quiet(cfg: BenchConfig) -> Quiet:
    """``bench.machine.wait_for_quiet`` with this run's limits, and what it saw.

    Torch's 2-thread (OpenMP) ops in this process slow down many times when another process
    takes a core, and the shard actors run at Ray's worker niceness (15), so any other busy
    process skews the comparison; a phase started during a burst measures the burst.
    """
    busy, waited = wait_for_quiet(cfg.quiet_wait_s, cfg.quiet_threshold)
    return Quiet(busy, waited, load_average())


def wait_for_load(max_load: float, max_wait_s: float) -> dict[str, Any]:
    """Wait (polling) until the 1-min load average is under ``max_load`` or time runs out."""
    start = time.perf_counter()
    first = load_average()
    load = first
    while load >= max_load and time.perf_counter() - start < max_wait_s:
        say(f"load average {load:.2f} >= {max_load}; waiting (up to {max_wait_s:.0f}s in all)")
        time.sleep(min(20.0, max(0.0, max_wait_s - (time.perf_counter() - start))))
        load = load_average()
    return {
        "load_1m_at_start": round(first, 2),
        "load_1m_when_measuring_began": round(load, 2),
        "waited_s": round(time.perf_counter() - start, 1),
        "max_load": max_load,
        "below_max_load": load < max_load,
    }


# ----------------------------------------------------------------------------- actors


class TimedShardImpl(ShardActorImpl):
    """The project's shard actor body, also timing ``compute`` inside the actor."""

    def __init__(self, model_dir: str, device: str, slots: Sequence[tuple[int, int]]) -> None:
        super().__init__(model_dir, device, slots)
        self.compute_s: list[float] = []

    def compute(
        self,
        layer: int,
        hidden: torch.Tensor | np.ndarray,
        expert_ids: torch.Tensor | np.ndarray,
        weights: torch.Tensor | np.ndarray,
        traceparent: str = "",
    ) -> torch.Tensor | np.ndarray:
        start = time.perf_counter()
        out = super().compute(layer, hidden, expert_ids, weights, traceparent)
        self.compute_s.append(time.perf_counter() - start)
        return out

    def take_compute_s(self) -> list[float]:
        taken, self.compute_s = self.compute_s, []
        return taken


class NoopShardImpl:
    """A shard that computes nothing: zeros of the input's shape, returned at once."""

    def node_id(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def ping(self) -> None:
        return None

    def niceness(self) -> int:
        return os.nice(0)

    def take(self, *values: Any) -> None:
        return None

    def echo(self, value: Any) -> Any:
        return value

    def compute(
        self,
        layer: int,
        hidden: torch.Tensor | np.ndarray,
        expert_ids: torch.Tensor | np.ndarray,
        weights: torch.Tensor | np.ndarray,
        traceparent: str = "",
    ) -> torch.Tensor | np.ndarray:
        # the same wire format as the real shard (numpy in, numpy out)
        if isinstance(hidden, np.ndarray):
            return np.zeros_like(hidden)
        return torch.zeros_like(hidden)

    def open_channel(self, ticket: ChannelTicket, timeout_s: float) -> None:
        """The real shard's data-plane channel, serving zeros."""

        def zeros(layer: int, hidden: torch.Tensor, *_: Any) -> torch.Tensor:
            return torch.zeros_like(hidden)

        limits = PayloadLimits(LAYER_MODEL["hidden_size"], LAYER_MODEL["num_local_experts"])
        serve_channel(zeros, ticket, ray.util.get_node_ip_address(), timeout_s, limits)


TimedShard = ray.remote(TimedShardImpl)
NoopShard = ray.remote(NoopShardImpl)


def start_pool(actor_cls: Any, args: Callable[[str], tuple[Any, ...]]) -> ExpertPool:
    """An ``ExpertPool`` over our own actor class (``num_cpus=0``), one actor per shard id."""
    handles = {sid: actor_cls.options(num_cpus=0).remote(*args(sid)) for sid in SHARD_IDS}
    pool = ExpertPool(handles)
    pool.node_ids()  # waits until every actor is up
    return pool


# ----------------------------------------------------------------------------- part 1


def build_layer_checkpoint(out_dir: Path, seed: int) -> Path:
    """A seeded random one-layer Mixtral at hidden 1024, written by transformers."""
    make: Callable[..., Any] = transformers.MixtralConfig  # generated kwargs upset mypy
    config = make(
        **LAYER_MODEL,
        dtype="float32",
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(out_dir)
    return out_dir


def make_layer_inputs(num_tokens: int, count: int, seed: int) -> list[Triple]:
    """``count`` fixed-seed (hidden, expert ids, weights) triples of ``num_tokens`` tokens."""
    hidden_size = LAYER_MODEL["hidden_size"]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + num_tokens)
    gate = torch.randn(LAYER_MODEL["num_local_experts"], hidden_size, generator=gen)
    triples = []
    for _ in range(count):
        hidden = torch.randn(num_tokens, hidden_size, generator=gen)  # [T, H]
        ids, weights = route(hidden, gate, LAYER_MODEL["num_experts_per_tok"], True)
        triples.append((hidden, ids, weights))
    return triples


@dataclass
class Breakdown:
    """Per repetition, seconds of each phase of one remote layer (driver side unless noted)."""

    split: list[float] = field(default_factory=list)  # which shard gets what, and gather
    submit: list[float] = field(default_factory=list)
    wait: list[float] = field(default_factory=list)
    combine: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    shards_called: list[list[str]] = field(default_factory=list)
    shard_compute_max: list[float] = field(default_factory=list)  # in-actor, slowest shard
    shard_compute_sum: list[float] = field(default_factory=list)
    payload_bytes: list[int] = field(default_factory=list)  # sent + received, all shards

    def step(self, remote: RemoteExperts, pool: ExpertPool, x: Triple) -> torch.Tensor:
        """``RemoteExperts.forward``, phase by phase, with the same calls in the same order."""
        hidden, expert_ids, weights = x
        t0 = time.perf_counter()
        shards, rows, sends, _ = remote.split(remote.table, LAYER, hidden, expert_ids, weights)
        t2 = time.perf_counter()
        pending = [
            pool.compute_async(shard, LAYER, *sent)
            for shard, sent in zip(shards, sends, strict=True)
        ]
        t3 = time.perf_counter()
        outputs = pool.wait(pending)
        t4 = time.perf_counter()
        out = combine(
            hidden.shape[0],
            hidden.shape[1],
            list(zip(rows, outputs, strict=True)),
            dtype=hidden.dtype,
            device=hidden.device,
        )
        t5 = time.perf_counter()
        self.split.append(t2 - t0)
        self.submit.append(t3 - t2)
        self.wait.append(t4 - t3)
        self.combine.append(t5 - t4)
        self.total.append(t5 - t0)
        self.shards_called.append(shards)
        sent_bytes = sum(t.numel() * t.element_size() for s in sends for t in s)
        self.payload_bytes.append(sent_bytes + sum(o.numel() * o.element_size() for o in outputs))
        return out

    def attach_shard_times(self, per_shard: dict[str, list[float]]) -> None:
        """Match each actor's in-order compute times to the repetitions that called it."""
        queues = {sid: list(times) for sid, times in per_shard.items()}
        for called in self.shards_called:
            times = [queues[sid].pop(0) for sid in called]
            self.shard_compute_max.append(max(times))
            self.shard_compute_sum.append(sum(times))
        assert all(not q for q in queues.values()), "unmatched in-actor compute times"

    def summary(self, skip: int) -> dict[str, Any]:
        def cut(values: list[float]) -> list[float]:
            return values[skip:]

        ray_s = [
            s + w - c
            for s, w, c in zip(
                cut(self.submit), cut(self.wait), cut(self.shard_compute_max), strict=True
            )
        ]
        dispatch_s = [p + c for p, c in zip(cut(self.split), cut(self.combine), strict=True)]
        return {
            "split": summary_ms(cut(self.split)),
            "submit": summary_ms(cut(self.submit)),
            "wait": summary_ms(cut(self.wait)),
            "combine": summary_ms(cut(self.combine)),
            "total": summary_ms(cut(self.total)),
            "shard_compute_slowest_in_actor": summary_ms(cut(self.shard_compute_max)),
            "shard_compute_sum_in_actor": summary_ms(cut(self.shard_compute_sum)),
            "transport_round_trip_excl_compute": summary_ms(ray_s),
            "driver_split_combine": summary_ms(dispatch_s),
            "mean_shards_per_call": round(
                statistics.fmean(len(c) for c in self.shards_called[skip:]), 3
            ),
            "mean_payload_kib_per_layer": round(
                statistics.fmean(self.payload_bytes[skip:]) / 1024, 1
            ),
        }


@dataclass
class LayerResult:
    num_tokens: int
    reps: int
    colocated_s: list[float]
    remote_s: list[float]  # torch_dist data plane (the default)
    noop_s: list[float]
    remote_ray_s: list[float]  # the same actors over the ray data plane
    noop_ray_s: list[float]
    breakdown: dict[str, Any]
    max_abs_diff: float
    exact: bool
    quiet: Quiet
    load_1m_after: float

    @property
    def overhead_ms(self) -> float:
        return (statistics.median(self.remote_s) - statistics.median(self.colocated_s)) * 1e3

    def to_json(self) -> dict[str, Any]:
        return {
            "num_tokens": self.num_tokens,
            "timed_repetitions": self.reps,
            "colocated": summary_ms(self.colocated_s),
            "remote": summary_ms(self.remote_s),
            "remote_noop_shards": summary_ms(self.noop_s),
            "remote_ray_data_plane": summary_ms(self.remote_ray_s),
            "remote_noop_shards_ray_data_plane": summary_ms(self.noop_ray_s),
            "overhead_ms_median": round(self.overhead_ms, 4),
            "remote_breakdown": self.breakdown,
            "max_abs_diff_remote_vs_colocated": self.max_abs_diff,
            "outputs_bit_identical": self.exact,
            "bit_identity_note": "1-thread (actor) and 2-thread (driver) GEMMs can differ by a "
            "few ulps at some row counts (seen at 32 rows), so max_abs_diff is the check",
            **self.quiet.to_json(),
            "load_1m_after": round(self.load_1m_after, 2),
        }


def time_empty_calls(
    pool: ExpertPool, reps: int, before: Callable[[], object] | None = None
) -> list[float]:
    """Round trip of one argument-less call to each no-op actor at once (the fixed cost).

    With ``before``, that is run (untimed) just before each call: a small 2-thread torch op
    leaves the driver's OpenMP worker spinning for a while, on a core the niced actors need.
    """
    handles = list(pool.handles.values())
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        start = time.perf_counter()
        ray.get([h.ping.remote() for h in handles])
        times.append(time.perf_counter() - start)
    return times


def transport_probes(pool: ExpertPool, reps: int) -> dict[str, Any]:
    """Median ms of one call to one no-op actor, by what it carries: the cost of the payload
    format (torch tensors vs the same bytes as numpy arrays) and size (Ray's 100 KiB inline
    limit), apart from any compute."""
    handle = next(iter(pool.handles.values()))

    def median_ms(fn: Callable[[], object]) -> float:
        for _ in range(10):
            fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1e3, 3)

    def call(method: Any, *args: Any) -> Any:
        return ray.get(method.remote(*args))

    hidden_size = LAYER_MODEL["hidden_size"]
    out: dict[str, Any] = {"no_payload": median_ms(functools.partial(call, handle.ping))}
    for rows in (1, 16, 32):
        t = torch.randn(rows, hidden_size)
        arr = t.numpy().copy()
        ids = torch.zeros(rows, 2, dtype=torch.long)
        w = torch.zeros(rows, 2)
        out[f"{rows}x{hidden_size}_fp32_{rows * hidden_size * 4 // 1024}KiB"] = {
            "send_numpy": median_ms(functools.partial(call, handle.take, arr)),
            "send_torch": median_ms(functools.partial(call, handle.take, t)),
            "send_3_torch_like_compute": median_ms(functools.partial(call, handle.take, t, ids, w)),
            "echo_numpy": median_ms(functools.partial(call, handle.echo, arr)),
            "echo_torch": median_ms(functools.partial(call, handle.echo, t)),
        }
    return out


def bench_layer(
    cfg: BenchConfig,
    model_dir: Path,
) -> tuple[list[LayerResult], dict[str, Any]]:
    reader = CheckpointReader(model_dir)
    spec = reader.spec
    table = round_robin(spec.moe_layers, spec.num_experts, list(SHARD_IDS))
    colocated = ColocatedExperts.from_checkpoint(reader)
    t0 = time.perf_counter()
    pool = ExpertPool.start(
        str(model_dir), [ShardSpec(sid, tuple(table.experts_on(sid))) for sid in SHARD_IDS]
    )
    timed_pool = start_pool(TimedShard, lambda sid: (str(model_dir), "cpu", table.experts_on(sid)))
    noop_pool = start_pool(NoopShard, lambda sid: ())
    say(f"layer: 3 pools of {len(SHARD_IDS)} actors up in {time.perf_counter() - t0:.1f}s")
    remote = RemoteExperts(pool, table)
    noop = RemoteExperts(noop_pool, table)
    remote_ray = RemoteExperts(ExpertPool(pool.handles, "ray"), table)  # same actors
    noop_ray = RemoteExperts(ExpertPool(noop_pool.handles, "ray"), table)
    results = []
    try:
        n_empty = 20 + (50 if cfg.quick else 300)
        empty = time_empty_calls(noop_pool, n_empty)[20:]
        gemm_in, gemm_w = torch.randn(32, 1024), torch.randn(2048, 1024)  # ~0.5 ms, 2 threads
        with torch.inference_mode():
            after_op = time_empty_calls(
                noop_pool, n_empty, lambda: torch.nn.functional.linear(gemm_in, gemm_w)
            )[20:]
        niceness = {sid: ray.get(h.niceness.remote()) for sid, h in noop_pool.handles.items()}
        probes = transport_probes(noop_pool, 50 if cfg.quick else 200)
        for num_tokens, reps in zip(cfg.token_counts, cfg.layer_reps, strict=True):
            inputs = make_layer_inputs(num_tokens, cfg.layer_inputs, cfg.seed)
            breakdown = Breakdown()
            runs: dict[str, list[float]] = {
                name: [] for name in ("colocated", "remote", "noop", "remote_ray", "noop_ray")
            }
            calls: dict[str, Callable[[Triple], torch.Tensor]] = {
                "colocated": lambda x: colocated.forward(LAYER, *x),
                "remote": lambda x: remote.forward(LAYER, *x),
                "noop": lambda x: noop.forward(LAYER, *x),
                "remote_ray": lambda x: remote_ray.forward(LAYER, *x),
                "noop_ray": lambda x: noop_ray.forward(LAYER, *x),
                "breakdown": functools.partial(
                    breakdown.step, RemoteExperts(timed_pool, table), timed_pool
                ),
            }
            names = list(calls)
            max_diff, exact = 0.0, True
            quiet = wait_until_quiet(cfg)
            with torch.inference_mode():
                for rep in range(cfg.warmup + reps):
                    x = inputs[rep % len(inputs)]
                    shift = rep % len(names)  # rotate who goes first
                    outs: dict[str, torch.Tensor] = {}
                    for name in names[shift:] + names[:shift]:
                        start = time.perf_counter()
                        outs[name] = calls[name](x)
                        seconds = time.perf_counter() - start
                        if rep >= cfg.warmup and name in runs:
                            runs[name].append(seconds)
                    for name in ("remote", "remote_ray", "breakdown"):
                        diff = (outs[name] - outs["colocated"]).abs().max().item()
                        max_diff = max(max_diff, diff)
                        exact = exact and torch.equal(outs[name], outs["colocated"])
            shard_times = {
                sid: ray.get(h.take_compute_s.remote()) for sid, h in timed_pool.handles.items()
            }
            breakdown.attach_shard_times(shard_times)
            result = LayerResult(
                num_tokens=num_tokens,
                reps=reps,
                colocated_s=runs["colocated"],
                remote_s=runs["remote"],
                noop_s=runs["noop"],
                remote_ray_s=runs["remote_ray"],
                noop_ray_s=runs["noop_ray"],
                breakdown=breakdown.summary(skip=cfg.warmup),
                max_abs_diff=max_diff,
                exact=exact,
                quiet=quiet,
                load_1m_after=load_average(),
            )
            results.append(result)
            b = result.breakdown
            say(
                f"layer T={num_tokens:>3}: colocated "
                f"{summary_ms(result.colocated_s)['median_ms']:.3f} ms, remote "
                f"{summary_ms(result.remote_s)['median_ms']:.3f} ms, no-op remote "
                f"{summary_ms(result.noop_s)['median_ms']:.3f} ms, transport "
                f"{b['transport_round_trip_excl_compute']['median_ms']:.3f} ms; over ray calls "
                f"{summary_ms(result.remote_ray_s)['median_ms']:.3f} ms, no-op "
                f"{summary_ms(result.noop_ray_s)['median_ms']:.3f} ms "
                f"(others' CPU before {quiet.others_cpu_busy:.0%}, load after "
                f"{result.load_1m_after:.2f})"
            )
    finally:
        for p in (pool, timed_pool, noop_pool):
            p.shutdown()
    facts = {
        "model": {**LAYER_MODEL, "family": spec.family.name, "dtype": "float32"},
        "routing_table": "round_robin over ('s0', 's1'): even experts on s0, odd on s1",
        "empty_two_actor_call": summary_ms(empty),
        "empty_two_actor_call_right_after_a_driver_torch_op": summary_ms(after_op),
        "driver_torch_op_before_call": "F.linear([32, 1024], [2048, 1024]) on the driver's "
        "torch threads, untimed, just before each call",
        "actor_niceness": niceness,
        "transport_probes_one_actor_ms": probes,
        "driver_niceness": os.nice(0),
        "torch_threads": {"colocated_driver": torch.get_num_threads(), "each_shard_actor": 1},
    }
    return results, facts


# ----------------------------------------------------------------------------- part 2


def ensure_checkpoint(model_dir: Path) -> Path:
    if is_demo_model(model_dir) and (model_dir / "config.json").is_file():
        say(f"using cached checkpoint {model_dir}")
        return model_dir
    say(f"building the {PRESET!r} demo checkpoint into {model_dir} (once; ~1 GB)")
    return build_demo_model(model_dir, preset=PRESET, progress=lambda m: say(f"  build: {m}"))


def make_prompts(cfg: BenchConfig, vocab_size: int) -> list[list[int]]:
    rng = random.Random(cfg.seed)
    lo, hi = cfg.prompt_len
    return [
        [rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(rng.randint(lo, hi))]
        for _ in range(cfg.requests)
    ]


@dataclass
class EngineRun:
    wall_s: float
    tokens: list[list[int]]
    steps: int
    shard_calls: int
    quiet: Quiet

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s


def run_engine(
    model: MoEModel,
    engine_config: EngineConfig,
    prompts: list[list[int]],
    new_tokens: int,
    quiet: Quiet,
) -> EngineRun:
    """All requests added at t=0 to a fresh engine (no prefix reuse across runs), run to the end."""
    engine = LLMEngine(model, engine_config)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    calls_before = model.experts.num_shard_calls if isinstance(model.experts, RemoteExperts) else 0
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", prompt, params))
        tokens[f"r{i}"] = []
    while engine.has_unfinished():
        for event in engine.step():
            tokens[event.request_id].append(event.token_id)
    wall = time.perf_counter() - start
    calls = model.experts.num_shard_calls if isinstance(model.experts, RemoteExperts) else 0
    out = [tokens[f"r{i}"] for i in range(len(prompts))]
    assert all(len(t) == new_tokens for t in out), [len(t) for t in out]
    return EngineRun(wall, out, engine.num_steps, calls - calls_before, quiet)


def bench_engine(cfg: BenchConfig, model_dir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    colocated = MoEModel.from_checkpoint(model_dir)
    spec = colocated.spec
    table = round_robin(spec.moe_layers, spec.num_experts, list(SHARD_IDS))
    pool = ExpertPool.start(
        str(model_dir), [ShardSpec(sid, tuple(table.experts_on(sid))) for sid in SHARD_IDS]
    )
    try:
        remote = MoEModel.from_checkpoint(model_dir, experts=RemoteExperts(pool, table))
        over_ray = RemoteExperts(ExpertPool(pool.handles, "ray"), table)  # the same shards
        remote_ray = MoEModel.from_checkpoint(model_dir, experts=over_ray)
        say(
            f"engine: both models and {len(SHARD_IDS)} shards up in {time.perf_counter() - t0:.1f}s"
        )
        engine_config = EngineConfig()
        prompts = make_prompts(cfg, spec.vocab_size)
        models = {"colocated": colocated, "remote": remote, "remote_ray": remote_ray}
        runs: dict[str, list[EngineRun]] = {name: [] for name in models}
        for name, model in models.items():
            warm = run_engine(model, engine_config, prompts[:2], 4, Quiet(0.0, 0.0, 0.0))
            say(f"engine {name:>9}: warm-up {warm.wall_s:.2f}s")
        for rep in range(cfg.repeats):
            order = list(models)[rep % len(models) :] + list(models)[: rep % len(models)]
            for name in order:
                quiet = wait_until_quiet(cfg)
                run = run_engine(models[name], engine_config, prompts, cfg.new_tokens, quiet)
                if runs[name]:
                    assert run.tokens == runs[name][0].tokens, f"{name} is not deterministic"
                runs[name].append(run)
                say(
                    f"engine {name:>9}: repeat {rep + 1}/{cfg.repeats} {run.wall_s:.2f}s, "
                    f"{run.tok_s:.1f} tok/s, {run.steps} steps "
                    f"(others' CPU before {quiet.others_cpu_busy:.0%}, waited "
                    f"{quiet.waited_s:.0f}s)"
                )
    finally:
        pool.shutdown()
    same = [
        a == b == c
        for a, b, c in zip(
            runs["colocated"][0].tokens,
            runs["remote"][0].tokens,
            runs["remote_ray"][0].tokens,
            strict=True,
        )
    ]

    def best(name: str) -> EngineRun:
        return min(runs[name], key=lambda r: r.wall_s)

    def median_tok_s(name: str) -> float:
        return statistics.median(r.tok_s for r in runs[name])

    steps = best("remote").steps
    moe_calls = steps * len(spec.moe_layers)
    implied = (best("remote").wall_s - best("colocated").wall_s) / moe_calls * 1e3
    return {
        "model": {
            "preset": PRESET,
            "model_dir": str(model_dir),
            "family": spec.family.name,
            "hidden_size": spec.hidden_size,
            "num_layers": spec.num_layers,
            "moe_layers": len(spec.moe_layers),
            "num_experts": spec.num_experts,
            "experts_per_token": spec.num_experts_per_tok,
            "dtype": str(colocated.dtype),
        },
        "engine_config": asdict(engine_config),
        "workload": {
            "requests": cfg.requests,
            "prompt_len": list(cfg.prompt_len),
            "prompt_tokens": sum(len(p) for p in prompts),
            "new_tokens": cfg.new_tokens,
            "sampling": "greedy, ignore_eos",
            "prompts": "random.Random(seed): uniform length, ids in [3, vocab)",
        },
        **{
            name: {
                "wall_s": [round(r.wall_s, 3) for r in runs[name]],
                "tok_s": [round(r.tok_s, 2) for r in runs[name]],
                "tok_s_best": round(best(name).tok_s, 2),
                "tok_s_median": round(median_tok_s(name), 2),
                "steps": best(name).steps,
                "ray_shard_calls": best(name).shard_calls,
                "machine_before_each": [r.quiet.to_json() for r in runs[name]],
            }
            for name in models
        },
        "ratio_best": best("remote").tok_s / best("colocated").tok_s,
        "ratio_median": median_tok_s("remote") / median_tok_s("colocated"),
        "ratio_best_ray_data_plane": best("remote_ray").tok_s / best("colocated").tok_s,
        "implied_overhead_ms_per_moe_layer_call": round(implied, 3),
        "implied_overhead_rule": "(best remote wall - best colocated wall) / (steps * MoE layers)",
        "tokens_identical": all(same),
        "sequences_identical": sum(same),
    }


# ----------------------------------------------------------------------------- report


def format_tables(layers: Sequence[LayerResult], engine: dict[str, Any]) -> str:
    head = (
        f"{'tokens':>6} | {'coloc med/p90 ms':>17} | {'remote med/p90 ms':>17} | "
        f"{'overhead ms':>11} | {'no-op remote ms':>15} | {'ray: remote':>11} | "
        f"{'ray: no-op':>10} | {'max |diff|':>10}"
    )
    title = (
        "One MoE layer (hidden 1024, 8 experts top-2, 2 shards; torch_dist data plane, ray: calls)"
    )
    lines = [title, head, "-" * len(head)]
    for r in layers:
        c, m, n = summary_ms(r.colocated_s), summary_ms(r.remote_s), summary_ms(r.noop_s)
        lines.append(
            f"{r.num_tokens:>6} | {c['median_ms']:>8.3f}/{c['p90_ms']:<8.3f} | "
            f"{m['median_ms']:>8.3f}/{m['p90_ms']:<8.3f} | {r.overhead_ms:>11.3f} | "
            f"{n['median_ms']:>15.3f} | {summary_ms(r.remote_ray_s)['median_ms']:>11.3f} | "
            f"{summary_ms(r.noop_ray_s)['median_ms']:>10.3f} | {r.max_abs_diff:>10.1e}"
        )
    head = (
        f"{'tokens':>6} | {'split':>6} | {'submit':>6} | {'wait':>7} | "
        f"{'combine':>7} | {'shard compute':>13} | {'wire':>6} | {'KiB':>6}"
    )
    lines += [
        "",
        "Remote layer breakdown, torch_dist (medians, ms; wire = submit + wait - compute)",
        head,
        "-" * len(head),
    ]
    for r in layers:
        b = r.breakdown
        lines.append(
            f"{r.num_tokens:>6} | {b['split']['median_ms']:>6.3f}"
            f" | {b['submit']['median_ms']:>6.3f} | {b['wait']['median_ms']:>7.3f} | "
            f"{b['combine']['median_ms']:>7.3f} | "
            f"{b['shard_compute_slowest_in_actor']['median_ms']:>13.3f} | "
            f"{b['transport_round_trip_excl_compute']['median_ms']:>6.3f} | "
            f"{b['mean_payload_kib_per_layer']:>6.1f}"
        )
    head = f"{'backend':>10} | {'tok/s best':>10} | {'tok/s median':>12} | {'steps':>5}"
    lines += [
        "",
        f"End to end ({engine['workload']['requests']} requests, "
        f"{engine['workload']['new_tokens']} new tokens, bench preset)",
        head,
        "-" * len(head),
    ]
    for name in ("colocated", "remote", "remote_ray"):
        e = engine[name]
        lines.append(
            f"{name:>10} | {e['tok_s_best']:>10.1f} | {e['tok_s_median']:>12.1f} | {e['steps']:>5}"
        )
    lines.append(
        f"remote / colocated: {engine['ratio_best']:.2f} (median {engine['ratio_median']:.2f}; "
        f"over ray calls {engine['ratio_best_ray_data_plane']:.2f}); "
        f"tokens identical: {'yes' if engine['tokens_identical'] else 'NO'}"
    )
    return "\n".join(lines)


def data_plane_note(layers: Sequence[LayerResult], facts: dict[str, Any]) -> dict[str, Any]:
    by_t = {r.num_tokens: r for r in layers}
    empty = facts["empty_two_actor_call"]["median_ms"]
    zero_copy = os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "unset")
    note: dict[str, Any] = {
        "transport": "torch_dist (the default, cluster/expert_parallel/data_plane.py): "
        "per backbone thread, one two-rank gloo process group per shard, opened once "
        "through a Ray call; per MoE layer "
        "RemoteExperts.forward sends each shard touched a 10-int64 header and one packed byte "
        "payload (hidden, ids, weights) with isend and posts an irecv for its [N * H + 1] "
        "reply, all shards before waiting. No Ray task per layer. For comparison the same "
        "actors over the ray data plane: ShardActor.compute.remote(layer, hidden, ids, weights) "
        f"per shard, numpy arrays (RAY_ENABLE_ZERO_COPY_TORCH_TENSORS={zero_copy}).",
        "measured_here_ms": {
            "empty_call_to_two_actors_median": empty,
            **{
                f"noop_remote_layer_{t}_tokens_median": round(statistics.median(r.noop_s) * 1e3, 3)
                for t, r in by_t.items()
            },
            **{
                f"noop_remote_layer_{t}_tokens_median_ray_data_plane": round(
                    statistics.median(r.noop_ray_s) * 1e3, 3
                )
                for t, r in by_t.items()
            },
            **{
                f"transport_round_trip_excl_compute_{t}_tokens_median": r.breakdown[
                    "transport_round_trip_excl_compute"
                ]["median_ms"]
                for t, r in by_t.items()
            },
        },
        "alternatives_from_measured_md": {
            "source": MEASURED_MD,
            "plain_actor_call_round_trip_from_serve_replica_ms": {
                "1x1024": 2.3,
                "32x1024": 4.9,
                "512x1024": 13,
            },
            "serve_deployment_handle_replica_to_replica_ms": {
                "1x1024": 4.8,
                "32x1024": 9.3,
                "512x1024": 24,
            },
            "ray_compiled_graph_one_actor_driver_to_actor_ms": {"32x1024": 0.8, "note": "noisy"},
            "ray_direct_transport_gloo_actor_to_actor_two_calls_ms": {
                "1x1024": 5.8,
                "32x1024": 5.8,
                "512x1024": 16,
            },
        },
    }
    after_op = facts["empty_two_actor_call_right_after_a_driver_torch_op"]["median_ms"]
    probes = facts["transport_probes_one_actor_ms"]
    small = probes["1x1024_fp32_4KiB"]
    big = probes["32x1024_fp32_128KiB"]
    note["measured_here_ms"]["one_call_by_payload"] = probes
    note["measured_here_ms"]["empty_call_to_two_actors_right_after_a_driver_torch_op_median"] = (
        after_op
    )
    if 32 in by_t:
        r32 = by_t[32]
        b = r32.breakdown
        noop32 = statistics.median(r32.noop_s) * 1e3
        coloc32 = statistics.median(r32.colocated_s) * 1e3
        shard32 = b["shard_compute_slowest_in_actor"]["median_ms"]
        driver32 = b["driver_split_combine"]["median_ms"]
        compute_word = (
            "the shards' parallelism hides part of the data-plane cost"
            if shard32 < coloc32
            else "the split adds compute time too"
        )
        noop_ray32 = statistics.median(r32.noop_ray_s) * 1e3
        verdict = (
            "the data plane alone spends the budget"
            if noop32 > OVERHEAD_GOAL_MS
            else "the data plane fits the budget here; the rest of the overhead is compute"
        )
        note["bound"] = (
            f"At 32 tokens the overhead (remote - colocated, torch_dist) is "
            f"{r32.overhead_ms:.2f} ms (median). Driver-side split (plan + gather) + combine take "
            f"{driver32:.2f} ms; the wire (submit + wait beyond the slowest shard's compute) "
            f"{b['transport_round_trip_excl_compute']['median_ms']:.2f} ms "
            f"({b['mean_payload_kib_per_layer']:.0f} KiB moved); a layer with free compute "
            f"(no-op shards) {noop32:.2f} ms over torch_dist against {noop_ray32:.2f} ms over "
            f"Ray calls (an empty call to two actors alone: {empty:.2f} ms, {after_op:.2f} ms "
            "right after a small torch op on the driver; the actors run at niceness "
            f"{sorted(set(facts['actor_niceness'].values()))}). Compute: slowest 1-thread "
            f"shard {shard32:.2f} ms vs 2-thread colocated {coloc32:.2f} ms ({compute_word}). "
            f"Against a {OVERHEAD_GOAL_MS} ms goal: {verdict}. One Ray call by payload: none "
            f"{probes['no_payload']:.2f} ms, 1x1024 numpy {small['send_numpy']:.2f} ms, "
            f"32x1024 numpy {big['send_numpy']:.2f} ms."
        )
    return note


def machine_facts(load: dict[str, Any]) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "ray": ray.__version__,
        "transformers": transformers.__version__,
        "env": {
            name: os.environ.get(name)
            for name in (
                "OMP_NUM_THREADS",
                "OMP_WAIT_POLICY",
                "GOMP_SPINCOUNT",
                "RAY_worker_niceness",
                "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS",
            )
        },
        "torch_parallel": next(
            (ln.strip() for ln in torch.__config__.parallel_info().splitlines() if "OpenMP" in ln),
            "no OpenMP",
        ),
        **load,
        "load_1m_at_end": round(load_average(), 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    out: Path = args.out or (QUICK_OUT if cfg.quick else DEFAULT_OUT)
    started = time.perf_counter()
    model_dir = ensure_checkpoint(args.model_dir)
    load = wait_for_load(cfg.max_load, cfg.load_wait_s)
    say(
        f"load average {load['load_1m_when_measuring_began']:.2f} "
        f"(max {cfg.max_load}, waited {load['waited_s']:.0f}s)"
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="dispatch-layer-") as tmp:
            t0 = time.perf_counter()
            layer_dir = build_layer_checkpoint(Path(tmp) / "layer", cfg.seed)
            say(f"layer checkpoint written in {time.perf_counter() - t0:.1f}s")
            layers, layer_facts = bench_layer(cfg, layer_dir)
        engine = bench_engine(cfg, model_dir)
    finally:
        ray.shutdown()
    print()
    print(format_tables(layers, engine))
    print()
    by_t = {r.num_tokens: r for r in layers}
    targets: dict[str, dict[str, Any]] = {}
    if 32 in by_t:
        value = by_t[32].overhead_ms
        # remote - colocated mixes the data plane with a compute difference (two 1-thread
        # shards in parallel vs one 2-thread process), which can make it negative; a negative
        # figure says nothing about the data plane, so it never counts as met
        targets["overhead_ms_per_layer_32_tokens"] = {
            "value": round(value, 4),
            "goal": OVERHEAD_GOAL_MS,
            "met": 0.0 <= value <= OVERHEAD_GOAL_MS,
        }
        # the data plane alone: the same dispatch, Ray calls and combine with no-op shards
        noop = statistics.median(by_t[32].noop_s) * 1e3
        targets["noop_dispatch_round_trip_ms_32_tokens"] = {
            "value": round(noop, 4),
            "goal": OVERHEAD_GOAL_MS,
            "met": noop <= OVERHEAD_GOAL_MS,
        }
    ratio = engine["ratio_best"]
    targets["remote_vs_colocated_throughput"] = {
        "value": round(ratio, 4),
        "goal": THROUGHPUT_GOAL,
        "met": ratio >= THROUGHPUT_GOAL,
    }
    report = {
        "benchmark": "dispatch",
        "description": "remote expert backend (2 Ray shard actors) vs colocated experts: "
        "per-MoE-layer dispatch + combine overhead, and end-to-end engine tok/s",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "targets": targets,
        "config": {
            **asdict(cfg),
            "ray_init": "ray.init(address='local', num_cpus=2, include_dashboard=False, "
            "log_to_driver=False)",
            "shards": list(SHARD_IDS),
            "shard_actor_num_cpus": 0,
            "layer_statistic": "median and p90 over timed repetitions; overhead = median remote "
            "- median colocated; backends interleaved per repetition, rotating the order",
            "engine_statistic": "best (fastest) of repeats; medians also recorded",
        },
        "machine": machine_facts(load),
        "layer": {**layer_facts, "results": [r.to_json() for r in layers]},
        "end_to_end": engine,
        "data_plane": data_plane_note(layers, layer_facts),
        "tokens_identical": engine["tokens_identical"],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {out} ({report['wall_s']:.0f}s)")
    for name, target in targets.items():
        sign = ">=" if name == "remote_vs_colocated_throughput" else "<="
        status = "met" if target["met"] else "NOT met"
        say(f"target {name}: {target['value']:.3f} (goal {sign} {target['goal']}) {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
