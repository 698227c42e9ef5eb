"""Part 1 of bench/dispatch.py: one MoE layer through the product's remote expert backend.

Every remote figure is ``RemoteExperts.forward`` itself, over an ``ExpertPool`` of the
product's shard actors (``ShardActorImpl``) or of two subclasses: one that times
``compute_tensors`` (what every data plane calls) inside the actor, one that computes
nothing (zeros of the input's shape, so the same split, payloads, data plane and combine
with no expert compute). The phase
breakdown comes from a ``ShardCaller`` wrapper that stamps the backend's own calls
(send, wait) on their way to the pool: split = forward start to the first send, submit =
the sends, wait = the wait, combine = the rest; wire = submit + wait - the slowest
shard's in-actor compute. The same clock around the no-op shards' pool (``noop_timed``,
a backend of its own so that the ``noop`` figure carries no clock) splits the no-op round
trip the same way (``noop_breakdown``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from bench.harness import median, percentile, say, wait_for_quiet
from cluster.expert_parallel.expert_pool import ExpertPool, ShardActorImpl, ShardSpec
from cluster.expert_parallel.remote_experts import RemoteExperts
from cluster.expert_parallel.transports import ShardCall, ShardCaller
from cluster.expert_parallel.wire import PayloadLimits
from experts.backend import ColocatedExperts
from experts.checkpoint import CheckpointReader
from experts.gate import route
from router.routing_table import round_robin

SHARD_IDS = ("s0", "s1")
LAYER = 0  # the one MoE layer of the layer checkpoint
# The one-layer checkpoint: a Mixtral-style MoE layer at hidden 1024.
LAYER_MODEL: dict[str, int] = {
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden [T, H], ids [T, K], w [T, K]
BACKENDS = (
    "colocated",
    "remote",
    "noop",
    "noop_gloo",
    "remote_ray",
    "noop_ray",
    "timed",
    "noop_timed",
)
CLOCKED = {"timed": "timed", "noop_timed": "noop"}  # backend -> the pool its PhaseClock wraps


class TimedShardImpl(ShardActorImpl):
    """The product's shard actor, also timing ``compute`` inside the actor."""

    def __init__(self, model_dir: str, device: str, slots: Sequence[tuple[int, int]]) -> None:
        super().__init__(model_dir, device, slots)
        self.compute_s: list[float] = []

    def compute_tensors(
        self, layer: int, hidden: Any, expert_ids: Any, weights: Any, tp: str = ""
    ) -> torch.Tensor:
        start = time.perf_counter()
        out = super().compute_tensors(layer, hidden, expert_ids, weights, tp)
        self.compute_s.append(time.perf_counter() - start)
        return out

    def take_compute_s(self) -> list[float]:
        taken, self.compute_s = self.compute_s, []
        return taken


class NoopShardImpl(ShardActorImpl):
    """The product's shard actor with no experts: it answers zeros of the input's shape."""

    def __init__(self, shard_id: str) -> None:  # no ExpertShard: nothing to load
        torch.set_num_threads(1)
        self.device, self.shard_id = "cpu", shard_id
        self.limits = PayloadLimits(LAYER_MODEL["hidden_size"], LAYER_MODEL["num_local_experts"])

    def ping(self) -> None:
        return None

    def niceness(self) -> int:
        return os.nice(0)

    def compute_tensors(
        self, layer: int, hidden: Any, expert_ids: Any, weights: Any, tp: str = ""
    ) -> torch.Tensor:
        return torch.zeros_like(hidden)


@dataclass
class PhaseClock:
    """A ``ShardCaller`` around a pool that stamps when the backend sends and waits."""

    pool: ExpertPool
    stamps: dict[str, float] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    payload_bytes: int = 0

    def start(self) -> None:
        self.stamps, self.shards, self.payload_bytes = {"start": time.perf_counter()}, [], 0

    def send(self, call: ShardCall) -> Any:
        self.stamps.setdefault("first_send", time.perf_counter())
        pending = self.pool.send(call)
        self.stamps["sent"] = time.perf_counter()
        self.shards.append(call.shard_id)
        sent = (call.hidden, call.expert_ids, call.weights)
        self.payload_bytes += sum(t.numel() * t.element_size() for t in sent)
        return pending

    def _done(self, outputs: list[torch.Tensor]) -> None:
        self.stamps["waited"] = time.perf_counter()
        self.payload_bytes += sum(o.numel() * o.element_size() for o in outputs)

    def wait(self, pending: Sequence[Any]) -> list[torch.Tensor]:
        self.stamps["wait"] = time.perf_counter()
        outputs = self.pool.wait(pending)
        self._done(outputs)
        return outputs

    def wait_timed(self, pending: Sequence[Any]) -> list[tuple[torch.Tensor, float]]:
        self.stamps["wait"] = time.perf_counter()
        timed = self.pool.wait_timed(pending)
        self._done([out for out, _ in timed])
        return timed

    def phases(self, end: float) -> dict[str, float]:
        s = self.stamps
        return {
            "split": s["first_send"] - s["start"],
            "submit": s["sent"] - s["first_send"],
            "wait": s["waited"] - s["wait"],
            "combine": end - s["waited"],
            "total": end - s["start"],
        }


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {
        "median_ms": round(median(ms), 4),
        "p90_ms": round(percentile(ms, 90), 4),
        "mean_ms": round(sum(ms) / len(ms), 4),
    }


def make_inputs(num_tokens: int, count: int, seed: int) -> list[Triple]:
    """``count`` fixed-seed (hidden, expert ids, weights) triples, routed by a random gate."""
    hidden_size = LAYER_MODEL["hidden_size"]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + num_tokens)
    gate = torch.randn(LAYER_MODEL["num_local_experts"], hidden_size, generator=gen)
    triples = []
    for _ in range(count):
        hidden = torch.randn(num_tokens, hidden_size, generator=gen)  # [T, H]
        ids, weights = route(hidden, gate, LAYER_MODEL["num_experts_per_tok"], True)
        triples.append((hidden, ids, weights))
    return triples


def start_actors(actor: Any, args: Callable[[str], tuple[Any, ...]]) -> dict[str, Any]:
    """One ``actor`` per shard id (``num_cpus=0``), once every one is up."""
    handles = {sid: actor.options(num_cpus=0).remote(*args(sid)) for sid in SHARD_IDS}
    ray.get([h.node_id.remote() for h in handles.values()])
    return handles


class LayerBench:
    """Part 1's backends over one routing table (even experts on s0, odd on s1)."""

    def __init__(self, model_dir: Path) -> None:
        reader = CheckpointReader(model_dir)
        spec = reader.spec
        table = round_robin(spec.moe_layers, spec.num_experts, list(SHARD_IDS))
        specs = [ShardSpec(sid, tuple(table.experts_on(sid))) for sid in SHARD_IDS]
        pool = ExpertPool.start(str(model_dir), specs)
        noop = start_actors(ray.remote(NoopShardImpl), lambda sid: (sid,))
        self.timed = start_actors(
            ray.remote(TimedShardImpl), lambda sid: (str(model_dir), "cpu", table.experts_on(sid))
        )
        self.pools = {
            "remote": pool,  # the default torch_dist data plane: shared memory on one node
            "noop": ExpertPool(noop),
            "noop_gloo": ExpertPool(noop, "gloo"),  # the same, gloo pairs as across nodes
            "remote_ray": ExpertPool(pool.handles, "ray"),  # the same actors, Ray calls
            "noop_ray": ExpertPool(noop, "ray"),
            "timed": ExpertPool(self.timed),
        }
        self.clocks = {name: PhaseClock(self.pools[pool]) for name, pool in CLOCKED.items()}
        colocated = ColocatedExperts.from_checkpoint(reader)
        self.backends: dict[str, Callable[[Triple], torch.Tensor]] = {
            "colocated": lambda x: colocated.forward(LAYER, *x)
        }
        callers: dict[str, ShardCaller] = {**self.pools, **self.clocks}
        for name, caller in callers.items():
            remote = RemoteExperts(caller, table)
            self.backends[name] = lambda x, f=remote.forward: f(LAYER, *x)  # type: ignore[misc]
        self.niceness = {sid: ray.get(h.niceness.remote()) for sid, h in noop.items()}

    def empty_calls(self, reps: int) -> list[float]:
        """Round trips of an argument-less call to both no-op actors at once (the fixed cost)."""
        handles = list(self.pools["noop"].handles.values())
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            ray.get([h.ping.remote() for h in handles])
            times.append(time.perf_counter() - start)
        return times

    def close(self) -> None:
        handles = {id(h): h for p in self.pools.values() for h in p.handles.values()}
        for p in self.pools.values():
            p.close_channels()
        for handle in handles.values():
            ray.kill(handle)


def measure(bench: LayerBench, args: Any, num_tokens: int, reps: int) -> dict[str, Any]:
    """``reps`` timed repetitions (after ``args.warmup``), every backend once per repetition
    on the same input, the order rotating; medians, the phases of the timed and the clocked
    no-op backends, the outputs' largest difference from colocated."""
    inputs = make_inputs(num_tokens, args.layer_inputs, args.seed)
    runs: dict[str, list[float]] = {name: [] for name in BACKENDS}
    phases: dict[str, list[dict[str, float]]] = {name: [] for name in CLOCKED}
    shards_called: list[list[str]] = []
    payload: list[int] = []
    max_diff = 0.0
    quiet = wait_for_quiet(args)
    with torch.inference_mode():
        for rep in range(args.warmup + reps):
            x = inputs[rep % len(inputs)]
            shift = rep % len(BACKENDS)
            outs: dict[str, torch.Tensor] = {}
            for name in BACKENDS[shift:] + BACKENDS[:shift]:
                clock = bench.clocks.get(name)
                if clock is not None:
                    clock.start()
                start = time.perf_counter()
                outs[name] = bench.backends[name](x)
                end = time.perf_counter()
                if clock is not None:
                    phases[name].append(clock.phases(end))
                if name == "timed":
                    shards_called.append(list(bench.clocks["timed"].shards))
                    payload.append(bench.clocks["timed"].payload_bytes)
                if rep >= args.warmup:
                    runs[name].append(end - start)
            for name in ("remote", "remote_ray", "timed"):
                max_diff = max(max_diff, (outs[name] - outs["colocated"]).abs().max().item())
    in_actor = {sid: ray.get(h.take_compute_s.remote()) for sid, h in bench.timed.items()}
    slowest = [max(in_actor[sid].pop(0) for sid in called) for called in shards_called]
    assert not any(in_actor.values()), "unmatched in-actor compute times"
    kept = phases["timed"][args.warmup :]
    wire = [p["submit"] + p["wait"] - c for p, c in zip(kept, slowest[args.warmup :], strict=True)]
    breakdown = {key: summary_ms([p[key] for p in kept]) for key in kept[0]}
    noop_kept = phases["noop_timed"][args.warmup :]
    noop_breakdown = {key: summary_ms([p[key] for p in noop_kept]) for key in noop_kept[0]}
    breakdown["shard_compute_slowest_in_actor"] = summary_ms(slowest[args.warmup :])
    breakdown["wire"] = summary_ms(wire)
    overhead = (median(runs["remote"]) - median(runs["colocated"])) * 1e3
    say(
        f"layer T={num_tokens}: colocated {median(runs['colocated']) * 1e3:.2f} ms, remote "
        f"{median(runs['remote']) * 1e3:.2f} ms, no-op {median(runs['noop']) * 1e3:.2f} ms"
    )
    return {
        "num_tokens": num_tokens,
        "timed_repetitions": reps,
        **{name: summary_ms(runs[name]) for name in BACKENDS if name not in CLOCKED},
        "overhead_ms_median": round(overhead, 4),
        "timed_breakdown": breakdown,
        "noop_breakdown": noop_breakdown,
        "mean_payload_kib": round(sum(payload[args.warmup :]) / len(kept) / 1024, 1),
        "max_abs_diff_vs_colocated": max_diff,
        **quiet,
    }
