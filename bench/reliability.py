"""Reliability: open-loop traffic through the gRPC front door while one part of the cluster
is killed (SIGKILL) or a node removed; what became of every request, and how long recovery took.

A local 3-node Ray cluster (``ray.cluster_utils.Cluster``: a head with 2 CPUs, worker nodes
``a`` and ``b`` with 1 each) runs the project's Serve application on the ``tiny`` demo model:

- tier ``strong``: 2 backbone replicas (engines in child processes), experts in 2 shards (one
  on each worker node), every expert on both (``experts.replication: 2``), live re-placement
  on (thresholds that re-plan on any uneven load, room for more replicas of hot experts);
- tier ``plain``: 1 backbone replica, experts in 2 shards (a, b), one copy of each, no
  re-placement; an expert with no live copy waits ``experts.unavailable_wait_s`` (10 s, under
  the deadline) for its shard's restart, then the request fails with UNAVAILABLE;
- the cluster KV store (a shard per node, replication 2, prefix-aware routing);
- the gateway, serving gRPC itself on 127.0.0.1 and a free port, its request limit the
  requests' deadline.

An unfaulted pass first records every workload request's tokens (greedy and seeded
sampling, prompts sharing 2-block prefixes). Then each scenario, in sequence on the same
cluster: Poisson arrivals at ``--rate`` for ``--before`` seconds, the fault, ``--during``
seconds more, every request waited out, the replacement waited for, and the tiers probed
until they answer right again (or the bound passes: the row says so). Requests are sorted
into completed / failed (a status with a message) / wrong (a token differs from the
reference) / lost (no answer by the deadline + margin); see ``bench.reliability_outcomes``.
Columns ``p99 before`` / ``p99 fault``: latency of the completed requests that ended before
the fault / that were open at it or sent after it. ``replaced``: seconds from the kill to the
replacement process (a restarted actor, a new Serve replica; ``-``: none came within the
bound, or none is expected: a removed node). ``ok again``: seconds from the kill to the first
request after which every request completed (by probes after the traffic when the traffic
ended failing: an upper bound).

Targets (issue 18): wrong = 0 and lost = 0 in every scenario; completed = sent for the
replicated shard, the store shard and the backbone. Writes ``bench/results/reliability.json``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    demo_checkpoint,
    model_label,
    parser,
    quick_or,
    say,
    wait_for_quiet,
    write_results,
)
from bench.reliability_outcomes import (
    Spec,
    classify,
    format_table,
    poisson_arrivals,
    replicated_share,
    scenario_row,
    targets,
    workload,
)
from bench.reliability_scenarios import (
    Context,
    Scenario,
    Target,
    controller_table,
    expert_state,
    inject,
    scenarios,
)
from bench.reliability_traffic import run_traffic, wait_until_serving

APP = "reliability"
STRONG, PLAIN = "strong", "plain"
MARGIN_S = 10.0  # the client waits this long past the deadline before calling a request lost
REPLICATION_WAIT_S = 45.0  # for the first re-plan to replicate experts, at most
REDEPLOY_TIMEOUT_S = 150.0
UNREPLICATED_WAIT_S = 10.0
MIN_IN_FLIGHT = 3  # the fault waits (3 s at most) for this many open streams: mid-stream


def parse_args(argv: list[str] | None = None) -> Any:
    p = parser("reliability", __doc__)
    p.add_argument("--rate", type=float, default=None, help="requests per second (default 2)")
    p.add_argument("--before", type=float, default=None, help="seconds before the fault (6)")
    p.add_argument("--during", type=float, default=None, help="seconds after the fault (12)")
    p.add_argument("--deadline", type=float, default=20.0, help="per request, seconds")
    p.add_argument("--recover", type=float, default=None, help="recovery bound, seconds (40)")
    p.add_argument("--budget", type=float, default=None, help="stop starting scenarios (510)")
    p.add_argument("--only", nargs="*", default=None, help="run only these scenarios")
    return p.parse_args(argv)


def make_config(model: Path, port: int, deadline_s: float) -> Any:
    from deploy.config import parse_config

    replan = {
        "enabled": True,
        "report_interval_s": 0.5,
        "window_s": 2.0,
        "min_tokens": 1,
        "imbalance_threshold": 1.0,
        "margin": 0.0,
        "min_interval_s": 3.0,
        "extra_slots": 1.0,
        "copy_bandwidth_bytes_per_s": 1e12,
        "ack_timeout_s": 30.0,
    }
    on_workers = [{"node_a": 0.01}, {"node_b": 0.01}]
    sharded = {"placement": "sharded", "num_shards": 2, "shard_resources": on_workers}
    engine = {"block_size": 16, "num_blocks": 256}
    tiers = [
        {
            "name": STRONG,
            "model": str(model),
            "replicas": 2,
            "num_cpus": 0,
            "engine": engine,
            "experts": {**sharded, "replication": 2, "replan": replan},
        },
        {
            "name": PLAIN,
            "model": str(model),
            "replicas": 1,
            "num_cpus": 0,
            "engine": engine,
            "engine_process": False,  # one process fewer on two cores
            # an expert with no live copy: wait this long for its shard's restart, then
            # UNAVAILABLE (under the deadline, so a wait never becomes DEADLINE_EXCEEDED)
            "experts": {**sharded, "unavailable_wait_s": UNREPLICATED_WAIT_S},
        },
    ]
    kv_store = {"enabled": True, "replication": 2, "capacity_bytes": 64 << 20}
    return parse_config(
        {
            "tiers": tiers,
            "policy": {"default_tier": STRONG, "cascade": {"enabled": False}},
            "auth": {"api_keys": [], "api_keys_env": None},
            "kv_store": kv_store,
            "grpc": {"port": port, "request_timeout_s": deadline_s},
        },
        model,
    )


def describe(config: Any) -> dict[str, Any]:
    """The settings a row depends on: per tier and for the store."""
    tiers = {
        t.name: {
            "backbone_replicas": t.replicas,
            "engine_process": t.runs_engine_process,
            "num_shards": t.experts.num_shards,
            "replication": t.experts.replication,
            "replan": t.experts.replan.enabled,
            "extra_slots": t.experts.replan.extra_slots if t.experts.replan.enabled else None,
            "unavailable_wait_s": t.experts.unavailable_wait_s,
        }
        for t in config.tiers
    }
    store = config.kv_store
    return {
        "nodes": "head (2 CPUs) + worker nodes a, b (1 CPU each)",
        "tiers": tiers,
        "kv_store": {"shards": "one per node", "replication": store.replication},
        "gateway_replicas": config.grpc.gateway_replicas,
        "request_timeout_s": config.grpc.request_timeout_s,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_cluster() -> tuple[Any, dict[str, Any]]:
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    workers = {
        label: cluster.add_node(num_cpus=1, resources={f"node_{label}": 1}) for label in "ab"
    }
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    return cluster, workers


def deploy(config: Any, timeout_s: float | None = None) -> float | None:
    """Run the application; the seconds it took to be ready (None: not within ``timeout_s``,
    e.g. a placement group no node can hold any more)."""
    from ray import serve

    from deploy.app import build_app

    start = time.monotonic()
    ready = threading.Event()

    def run() -> None:
        serve.run(build_app(config), name=APP, route_prefix=None)
        ready.set()

    if timeout_s is None:
        run()
    else:
        threading.Thread(target=run, daemon=True).start()
        if not ready.wait(timeout_s):
            return None
    return round(time.monotonic() - start, 1)


def references(address: str, specs: list[Spec], timeout_s: float) -> dict[int, list[int]]:
    """Each spec's tokens from an unfaulted pass (one try more for a request that fails)."""
    refs: dict[int, list[int]] = {}
    for _attempt in range(2):
        todo = [s for s in specs if s.index not in refs]
        arrivals = [0.25 * k for k in range(len(todo))]
        outcomes, _, _ = run_traffic(address, STRONG, todo, arrivals, timeout_s)
        for o in outcomes:
            if o.code == "OK" and len(o.tokens) == specs[o.spec].max_tokens:
                refs[o.spec] = o.tokens
    missing = [s.index for s in specs if s.index not in refs]
    assert not missing, f"the unfaulted pass did not complete requests {missing}"
    return refs


def wait_for_replication(address: str, specs: list[Spec], timeout_s: float) -> dict[str, Any]:
    """Warm traffic until the controller's table has replicated some of ``strong``'s experts
    (or ``timeout_s`` passes); what the table looked like."""
    start = time.monotonic()
    seen: dict[str, Any] = {}
    while time.monotonic() - start < timeout_s:
        run_traffic(address, STRONG, specs[:8], [0.2 * k for k in range(8)], 30.0)
        table = controller_table(STRONG)
        if table is None:
            continue
        share = replicated_share(table[1])
        seen = {
            "table_version": table[0],
            "replicated": {s: f"{a}/{b}" for s, (a, b) in share.items()},
        }
        if any(a > 0 for a, _ in share.values()):  # the planner replicates hot experts only
            break
    seen["waited_s"] = round(time.monotonic() - start, 1)
    return seen


def run_scenario(
    args: Any,
    ctx: Context,
    scenario: Scenario,
    address: str,
    specs: list[Spec],
    refs: dict[int, list[int]],
    offset: int,
) -> dict[str, Any]:
    """Traffic, the fault in its middle, replacement and recovery; the scenario's row."""
    prepared = scenario.prepare(ctx)
    if isinstance(prepared, str):
        return {"scenario": scenario.name, "not_run": prepared}
    target: Target = prepared
    say(f"{scenario.name}: {target.describe} at t={args.before:.0f} s ({scenario.tier})")
    rotated = specs[offset:] + specs[:offset]
    duration = args.before + args.during
    arrivals = poisson_arrivals(args.rate, duration, seed=offset + 7)
    timeout_s = args.deadline + MARGIN_S
    watch: dict[str, Any] = {}

    def fault() -> None:
        inject(ctx, target)
        killed = watch["killed"] = time.monotonic()

        def watcher() -> None:  # from the kill on, beside the traffic
            seconds = scenario.replaced(ctx, target, args.recover)
            watch["s"] = None if seconds is None else round(time.monotonic() - killed, 2)

        watch["thread"] = threading.Thread(target=watcher, daemon=True)
        watch["thread"].start()

    outcomes, fault_at, in_flight = run_traffic(
        address, scenario.tier, rotated, arrivals, timeout_s, args.before, fault, MIN_IN_FLIGHT
    )
    assert fault_at is not None
    if "thread" in watch:
        watch["thread"].join(max(0.0, watch["killed"] + args.recover + 5 - time.monotonic()))
    row = scenario_row(scenario.name, outcomes, refs, fault_at, duration, target.facts)
    row["target"] = target.describe
    if scenario.name in ("shard_killed_replicated", "worker_node_removed"):
        row["experts_after"] = expert_state(ctx)
    row["replacement_s"] = watch.get("s")
    row["recovered_s"] = row["requests_ok_again_s"]
    if row["recovered_s"] is None:  # not within the traffic: probe until it answers right
        waited = wait_until_serving(
            address, [scenario.tier], specs[0], refs[0], args.recover, args.deadline
        )
        if waited is not None:  # an upper bound: probes go one after another
            row["recovered_s"] = round(time.monotonic() - watch["killed"], 2)
            row["recovered_by"] = "probe"
        else:
            row["note"] = f"not serving right {args.recover:.0f} s after the traffic"
    row["fault_at_s"] = round(fault_at, 2)
    row["streams_open_at_fault"] = in_flight
    row["classes_by_send_time"] = [
        [round(o.sent_at, 2), classify(o, refs[o.spec]), o.code] for o in outcomes
    ]
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    args.rate = quick_or(args, args.rate, 1.0, 2.0)
    args.before = quick_or(args, args.before, 4.0, 6.0)
    args.during = quick_or(args, args.during, 8.0, 12.0)
    args.recover = quick_or(args, args.recover, 30.0, 40.0)
    args.budget = quick_or(args, args.budget, 300.0, 510.0)
    model = demo_checkpoint("tiny")
    max_tokens = 16 if args.quick else 32
    specs = workload(12 if args.quick else 24, max_tokens=max_tokens, seed=18)
    import ray
    from ray import serve

    cluster, workers = start_cluster()
    port = free_port()
    address = f"127.0.0.1:{port}"
    ctx = Context(APP, cluster, workers, STRONG, PLAIN)
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    broken = ""
    report["machine_before"] = wait_for_quiet(args)
    try:
        serve.start(proxy_location="Disabled")
        config = make_config(model, port, args.deadline)
        report["cluster"] = describe(config)
        report["deploy_s"] = deploy(config)
        say(f"deployed in {report['deploy_s']} s; unfaulted pass")
        refs = references(address, specs, args.deadline + MARGIN_S)
        report["replication_before_faults"] = wait_for_replication(
            address, specs, REPLICATION_WAIT_S if not args.quick else 20.0
        )
        report["experts_before_faults"] = expert_state(ctx)
        say(f"replication: {report['replication_before_faults']}")
        chosen = [s for s in scenarios(ctx) if not args.only or s.name in args.only]
        for k, scenario in enumerate(chosen):
            if time.perf_counter() - started > args.budget:
                rows.append({"scenario": scenario.name, "not_run": "the run's time budget"})
                continue
            row = run_scenario(args, ctx, scenario, address, specs, refs, offset=3 * k)
            rows.append(row)
            say(f"{scenario.name}: {row}")
            if row.get("not_run") or k == len(chosen) - 1:
                continue
            settled = wait_until_serving(
                address, [STRONG], specs[0], refs[0], args.recover, args.deadline
            )
            if settled is None:
                say(f"{STRONG} not serving after {scenario.name}: redeploying the application")
                row["note"] = (row.get("note", "") + "; application redeployed after").lstrip("; ")
                serve.delete(APP)
                again = deploy(make_config(model, port, args.deadline), REDEPLOY_TIMEOUT_S)
                report.setdefault("redeploys", []).append(
                    {"after": scenario.name, "deploy_s": again}
                )
                if again is None:
                    broken = f"the application did not come back after {scenario.name}"
                    break
        for scenario in chosen[len(rows) :]:
            rows.append({"scenario": scenario.name, "not_run": broken})
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    print(format_table(rows))
    report.update(
        {
            "model": model_label(model),
            "rate_per_s": args.rate,
            "before_s": args.before,
            "during_s": args.during,
            "deadline_s": args.deadline,
            "margin_s": MARGIN_S,
            "recover_bound_s": args.recover,
            "workload": {"requests": len(specs), "max_tokens": max_tokens, "greedy_share": 0.5},
            "scenarios": rows,
        }
    )
    write_results(args, report, targets(rows), started=started)


if __name__ == "__main__":
    main()
