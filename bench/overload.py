"""Overload: open-loop arrivals at 2x one tier's measured capacity, through the gRPC front door.

One tier (the demo ``fast`` model) behind the gateway on a local Ray instance, its admission
bounded by ``max_ongoing_requests`` (what the replica's engine batches), ``max_queued_requests``
(Serve's queue before it; full: RESOURCE_EXHAUSTED) and ``max_queue_wait_s`` (a request that
waited longer for a replica is refused on arrival). The defaults, 4, 4 and 0.1 s, are the
operator's trade: a queue of one batch keeps the batch full through Poisson gaps (throughput),
and the wait budget sheds what would be served late (without it an admitted request takes
about S x (1 + queued/ongoing), S a full batch's service time: 4.4x the unloaded p99 here);
0.1 s is the latency budget left for queueing once a full batch of 4 (1.6-2x one request's
time on 2 cores) is inside 2x. Each round, with fixed-length requests (random prompt ids,
fixed ``max_tokens``, ``ignore_eos``, the tier named), runs in turn:

1. unloaded: one closed-loop client; its p99 end-to-end latency is the baseline;
2. capacity: ``max_ongoing_requests`` closed-loop clients; completed requests/s;
3. overload: seeded Poisson arrivals at 2x that capacity for a bounded time, each request its
   own task with a client deadline; every non-OK status must be RESOURCE_EXHAUSTED;
4. recovery: the tier's stats go idle (no running/waiting request, no KV block held), then an
   unloaded phase like 1, whose p99 is compared with 1's.

Latency targets take the median of the rounds' ratios; no other error, no process died and
idle after must hold in every round. The replica, its engine child and the gateway are found
in /proc: "no out-of-memory" means the same processes at the end, peak RSS (VmHWM) recorded.
Writes ``bench/results/overload.json`` (``--quick``: one short round).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from ray import serve

from bench.harness import (
    FIRST_ORDINARY_ID,
    demo_checkpoint,
    median,
    model_label,
    parser,
    percentiles,
    target,
    wait_for_quiet,
    write_results,
)
from bench.serving import ServeApp
from deploy.config import parse_config
from deploy.proto import moecluster_v1_pb2 as pb
from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc

APP, TIER = "overload", "fast"
PROMPT_TOKENS, MAX_TOKENS = 32, 32
DEADLINE_S = 30.0  # client deadline per request: far above any admitted request's latency
IDLE_WAIT_S = 10.0  # after the last answer, the tier must be idle within this
DEFAULT_QUEUE_WAIT_S = 0.1  # the tier's max_queue_wait_s (see the docstring; 0: not set)
P99_GOAL, RECOVERY_GOAL, LOAD_FACTOR = 2.0, 1.2, 2.0
HEADER = "round cap/s offer/s admit/s refused other p99_unl p99_adm p99_rec idle_s".split()
HEADER += ["MB_rep", "MB_eng", "MB_gw"]  # peak RSS (VmHWM) so far


@dataclass
class Phase:
    """One phase's outcomes: latencies of the OK requests, and every status seen."""

    name: str
    e2e: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0

    @property
    def ok_per_s(self) -> float:
        return self.statuses["OK"] / self.wall_s if self.wall_s else 0.0

    @property
    def p99(self) -> float:
        value = percentiles(self.e2e, (99,))["p99"]
        assert value is not None, f"{self.name}: no request completed"
        return value

    def summary(self) -> dict[str, Any]:
        return {
            "statuses": dict(self.statuses),
            "wall_s": round(self.wall_s, 3),
            "e2e_s": percentiles(self.e2e, (50, 90, 99)),
            "ttft_s": percentiles(self.ttft, (50, 90, 99)),
        }


def stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command name: [1] parent pid, [19] start time."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def find_pid(title: str, parent: int | None = None) -> int:
    """The one process whose command line holds ``title`` (and whose parent is ``parent``)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            ppid = int(stat(entry)[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if title in cmdline and (parent is None or ppid == parent):
            found.append(int(entry))
    assert len(found) == 1, f"expected one process titled {title!r}, found {found}"
    return found[0]


def started_at(pid: int) -> int | None:
    """The process's start time in clock ticks (None: gone): a reused pid gets another."""
    try:
        return int(stat(pid)[19])
    except (OSError, ValueError, IndexError):
        return None


def memory_mb(pid: int) -> dict[str, float]:
    """Resident set now and its peak over the process's life (VmHWM), in MB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {key: round(int(fields[key].split()[0]) / 1024, 1) for key in ("VmRSS", "VmHWM")}


class Load:
    """``grpc.aio`` clients against the front door; prompts are seeded, each one distinct."""

    def __init__(self, address: str, seed: int) -> None:
        self.address, self.rng = address, random.Random(seed)

    async def _one(self, stub: Any, phase: Phase) -> None:
        message = pb.GenerateRequest(
            token_ids=[self.rng.randrange(FIRST_ORDINARY_ID, 2048) for _ in range(PROMPT_TOKENS)],
            tier=TIER,
            max_tokens=MAX_TOKENS,
            ignore_eos=True,
        )
        start, first, tokens = time.perf_counter(), 0.0, 0
        try:
            async for chunk in stub.Generate(message, timeout=DEADLINE_S):
                if not tokens and chunk.token_ids:
                    first = time.perf_counter() - start
                tokens += len(chunk.token_ids)
        except grpc.aio.AioRpcError as err:
            phase.statuses[err.code().name] += 1
            return
        if tokens != MAX_TOKENS:
            phase.statuses[f"OK but {tokens} tokens"] += 1
            return
        phase.statuses["OK"] += 1
        phase.e2e.append(time.perf_counter() - start)
        phase.ttft.append(first)

    def _drive(self, phase: Phase, body: Callable[[Any], Awaitable[None]]) -> Phase:
        async def run() -> None:
            async with grpc.aio.insecure_channel(self.address) as channel:
                await body(pb_grpc.MoEClusterStub(channel))

        start = time.perf_counter()
        asyncio.run(run())
        phase.wall_s = time.perf_counter() - start
        return phase

    def closed(self, name: str, concurrency: int, duration_s: float) -> Phase:
        """``concurrency`` clients, each sending its next request when one ends, for a time."""
        phase, end = Phase(name), time.perf_counter() + duration_s

        async def clients(stub: Any) -> None:
            async def client() -> None:
                while time.perf_counter() < end:
                    await self._one(stub, phase)

            await asyncio.gather(*(client() for _ in range(concurrency)))

        return self._drive(phase, clients)

    def open_loop(self, rate: float, duration_s: float, seed: int) -> Phase:
        """Poisson arrivals at ``rate`` per second for ``duration_s``, whatever the answers."""
        phase, arrivals = Phase("overload"), random.Random(seed)

        async def arrive(stub: Any) -> None:
            tasks, start, due = [], time.perf_counter(), arrivals.expovariate(rate)
            while due < duration_s:
                await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
                tasks.append(asyncio.create_task(self._one(stub, phase)))
                due += arrivals.expovariate(rate)
            await asyncio.gather(*tasks)

        return self._drive(phase, arrive)


def wait_idle(handle: Any) -> tuple[float | None, Any]:
    """Seconds until the tier holds no request and no KV block (None: not within the wait)."""
    start = time.perf_counter()
    while True:
        stats = handle.stats.remote().result()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.num_blocks_held == 0:
            return time.perf_counter() - start, stats
        if time.perf_counter() - start > IDLE_WAIT_S:
            return None, stats
        time.sleep(0.1)


def run_round(load: Load, handle: Any, pids: dict[str, int], args: Any, i: int) -> dict[str, Any]:
    """Unloaded, capacity, overload at 2x that capacity, idle check, recovery: one round."""
    quiet = wait_for_quiet(args)  # not while a neighbour's burst holds the cores
    unloaded_s, capacity_s, overload_s = args.phase_s
    unloaded = load.closed("unloaded", 1, unloaded_s)
    capacity = load.closed("capacity", args.max_ongoing, capacity_s)
    rate = LOAD_FACTOR * capacity.ok_per_s
    overload = load.open_loop(rate, overload_s, seed=args.seed * 1000 + i)
    idle_s, stats = wait_idle(handle)
    recovery = load.closed("recovery", 1, unloaded_s)
    idle_end_s, _ = wait_idle(handle)
    phases = (unloaded, capacity, overload, recovery)
    offered, refused = overload.statuses.total(), overload.statuses["RESOURCE_EXHAUSTED"]
    return {
        "round": i + 1,
        **quiet,
        "capacity_req_per_s": round(capacity.ok_per_s, 3),
        "offered_req_per_s": round(rate, 3),
        "offered": offered,
        "refused_share": round(refused / max(1, offered), 3),
        # any status but OK and RESOURCE_EXHAUSTED, in any phase (with max_queued_requests 1,
        # max_ongoing_requests closed-loop clients were seen refused: see phases' statuses)
        "other_errors": sum(
            p.statuses.total() - p.statuses["OK"] - p.statuses["RESOURCE_EXHAUSTED"] for p in phases
        ),
        "admitted_req_per_s": round(overload.ok_per_s, 3),
        "p99_ratio": round(overload.p99 / unloaded.p99, 3),
        "recovery_ratio": round(recovery.p99 / unloaded.p99, 3),
        "idle_after_s": None if idle_s is None else round(idle_s, 2),
        "idle_at_end": idle_end_s is not None,
        "stats_after_overload": vars(stats),
        "memory_mb": {n: memory_mb(pid) for n, pid in pids.items() if started_at(pid)},
        "phases": {p.name: p.summary() for p in phases},
    }


def targets_of(rounds: list[dict[str, Any]], died: int) -> dict[str, dict[str, Any]]:
    """Latency targets on the median of rounds; errors and idleness must hold in every one."""
    p99 = median([r["p99_ratio"] for r in rounds])
    recovery = median([r["recovery_ratio"] for r in rounds])
    refused = median([r["refused_share"] for r in rounds])
    other = max(r["other_errors"] for r in rounds)
    idle = all(r["idle_after_s"] is not None and r["idle_at_end"] for r in rounds)
    idle_s = max(r["idle_after_s"] for r in rounds) if idle else None
    return {
        "excess_refused_share": {"value": refused, "goal": 0, "direction": ">", "met": refused > 0},
        "errors_not_resource_exhausted": target(other, 0, at_least=False),
        "processes_died": target(died, 0, at_least=False),
        "admitted_p99_vs_unloaded": target(p99, P99_GOAL, at_least=False),
        "recovery_p99_vs_unloaded": target(recovery, RECOVERY_GOAL, at_least=False),
        "idle_after_overload_s": target(idle_s, IDLE_WAIT_S, at_least=False),
    }


def main(argv: list[str] | None = None) -> None:
    p = parser("overload", __doc__)
    p.add_argument("--max-ongoing", type=int, default=4, help="max_ongoing_requests")
    p.add_argument("--max-queued", type=int, default=4, help="max_queued_requests")
    p.add_argument(
        "--max-queue-wait",
        type=float,
        default=DEFAULT_QUEUE_WAIT_S,
        help="max_queue_wait_s (0: off)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    started = time.perf_counter()
    rounds = 1 if args.quick else 3
    args.phase_s = (4, 4, 5) if args.quick else (15, 15, 20)  # unloaded, capacity, overload
    tier: dict[str, Any] = {"name": TIER, "max_ongoing_requests": args.max_ongoing}
    tier["max_queued_requests"] = args.max_queued
    if args.max_queue_wait > 0:
        tier["max_queue_wait_s"] = args.max_queue_wait
    model = demo_checkpoint(TIER)
    policy = {"default_tier": TIER, "cascade": {"enabled": False}}
    auth: dict[str, Any] = {"api_keys": [], "api_keys_env": None}
    tiers = [tier | {"model": str(model)}]
    config = parse_config({"tiers": tiers, "policy": policy, "auth": auth}, model.parent)
    app = ServeApp(config, APP)
    try:
        handle = serve.get_deployment_handle(f"tier-{TIER}", app_name=APP)
        replica = find_pid(f"ServeReplica:{APP}:tier-{TIER}")
        pids = {
            "replica": replica,
            "engine": find_pid("cluster.engine.engine_process", parent=replica),
            "gateway": find_pid(f"ServeReplica:{APP}:gateway"),
        }
        starts = {name: started_at(pid) for name, pid in pids.items()}
        load = Load(app.address, args.seed)
        load.closed("warm-up", args.max_ongoing, 2.0)
        memory_start = {name: memory_mb(pid) for name, pid in pids.items()}
        results: list[dict[str, Any]] = []
        print(" ".join(f"{h:>9}" for h in HEADER), flush=True)
        for i in range(rounds):
            results.append(r := run_round(load, handle, pids, args, i))
            ph, mem = r["phases"], r["memory_mb"]
            cells = [i + 1, r["capacity_req_per_s"], r["offered_req_per_s"]]
            cells += [r["admitted_req_per_s"], r["refused_share"], r["other_errors"]]
            cells += [ph[n]["e2e_s"]["p99"] for n in ("unloaded", "overload", "recovery")]
            cells += [r["idle_after_s"]] + [mem.get(n, {}).get("VmHWM") for n in pids]
            print(" ".join(f"{c!s:>9}" for c in cells), flush=True)
        died = [name for name, pid in pids.items() if started_at(pid) != starts[name]]
    finally:
        app.close()
    report = {
        "rounds": results,
        "processes_died": died,
        "memory_mb_before_rounds": memory_start,
        "config": {
            "tier": tier | {"model": model_label(model), "engine": "defaults"},
            "prompt_tokens": PROMPT_TOKENS,
            "max_tokens": MAX_TOKENS,
            "load_factor": LOAD_FACTOR,
            "phase_s": dict(zip(("unloaded", "capacity", "overload"), args.phase_s, strict=True)),
            "client_deadline_s": DEADLINE_S,
            "seed": args.seed,
            "ray_worker_niceness": int(os.environ["RAY_worker_niceness"]),
        },
    }
    # a bound or seed other than the defaults names its own file: not the targets' run
    options = (
        ("ongoing", args.max_ongoing, 4),
        ("queued", args.max_queued, 4),
        ("wait", args.max_queue_wait, DEFAULT_QUEUE_WAIT_S),
        ("seed", args.seed, 0),
    )
    variant = "".join(f".{label}{value}" for label, value, default in options if value != default)
    write_results(args, report, targets_of(results, len(died)), variant, started)


if __name__ == "__main__":
    main()
