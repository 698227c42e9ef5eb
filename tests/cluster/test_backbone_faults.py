"""Backbone and gateway faults under concurrent traffic, through the real gRPC front door on a
3-node Ray cluster: SIGKILLs (``cluster.faults``), never a polite shutdown.

- A tier replica's actor killed mid-stream: the gateway resubmits each stream it held to the
  other replica with the tokens already sent, and every client sees the tokens and text of an
  unfaulted run (greedy and seeded sampled), nothing repeated or missing.
- A tier replica's engine process killed mid-stream: the same, through the replica's
  "engine stopped" answer.
- The gateway killed: the streams it held end with UNAVAILABLE and a message (not a hang);
  once Serve has replaced it, new requests are served with the same tokens as before.

Figures (printed, never asserted): seconds from a kill to the next token of the resumed
streams, and from a gateway kill to the first successful request.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from cluster.faults import (
    ActorProcess,
    actors_named,
    kill_actor_process,
    wait_for_replacement,
    wait_until,
)
from cluster.telemetry.trace_file import read_spans
from deploy.app import build_app
from deploy.config import parse_config
from deploy.demo_model import build_demo_model
from deploy.proto import moecluster_v1_pb2 as pb
from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc
from tests.listening_sockets import free_port

APP = "faults"
TIER_PREFIX = f"SERVE_REPLICA::{APP}#tier-strong"
GATEWAY_PREFIX = f"SERVE_REPLICA::{APP}#gateway"
MAX_TOKENS = 480  # long enough (seconds) that every stream is mid-way at the kill
PROMPTS = [[5 + (i * 37 + s * 11) % 400 for i in range(12 + 5 * s)] for s in range(6)]


def _request(index: int) -> pb.GenerateRequest:
    """Three greedy requests and three seeded sampled ones."""
    request = pb.GenerateRequest(token_ids=PROMPTS[index], max_tokens=MAX_TOKENS, ignore_eos=True)
    if index % 2:
        request.temperature = 0.9
        request.top_p = 0.95
        request.seed = 1000 + index
    return request


@dataclass
class Served:
    stub: pb_grpc.MoEClusterStub
    spans: Path


@dataclass
class Outcome:
    """What one client stream saw: its tokens, text, chunk times, and how it ended."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    times: list[float] = field(default_factory=list)
    finish_reason: str = ""
    completion_tokens: int = 0
    error: grpc.RpcError | None = None
    ended_at: float = 0.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model_dir = build_demo_model(tmp_path_factory.mktemp("faults") / "tiny", "tiny")
    out = tmp_path_factory.mktemp("telemetry")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=1, resources={"node_a": 1})
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    port = free_port()
    config = parse_config(
        {
            "tiers": [{"name": "strong", "model": str(model_dir), "replicas": 2, "num_cpus": 0}],
            "policy": {"default_tier": "strong", "cascade": {"enabled": False}},
            "auth": {"api_keys": [], "api_keys_env": None},
            "telemetry": {"traces_exporter": "file", "file_path": str(out / "spans.jsonl")},
            "grpc": {"port": port, "max_resubmissions": 2},
        },
        base_dir=model_dir,
    )
    serve.start(proxy_location="Disabled")  # the gateway serves gRPC itself
    try:
        serve.run(build_app(config), name=APP, route_prefix=None)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield Served(pb_grpc.MoEClusterStub(channel), out / "spans.jsonl")
        channel.close()
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def reference(served: Served) -> list[Outcome]:
    """Each request alone, with no fault."""
    outcomes = [_consume(served.stub, _request(i)) for i in range(len(PROMPTS))]
    assert all(o.error is None and o.finish_reason == "length" for o in outcomes), outcomes
    return outcomes


def _consume(
    stub: pb_grpc.MoEClusterStub,
    request: pb.GenerateRequest,
    timeout_s: float = 120.0,
    outcome: Outcome | None = None,
) -> Outcome:
    """Read one stream to its end into ``outcome`` (filled as chunks come: others watch it)."""
    outcome = Outcome() if outcome is None else outcome
    try:
        for chunk in stub.Generate(request, timeout=timeout_s):
            outcome.times.append(time.monotonic())
            outcome.tokens += chunk.token_ids
            outcome.text += chunk.text
            if chunk.finish_reason:
                outcome.finish_reason = chunk.finish_reason
                outcome.completion_tokens = chunk.usage.completion_tokens
    except grpc.RpcError as err:
        outcome.error = err
    outcome.ended_at = time.monotonic()
    return outcome


def _in_flight(
    stub: pb_grpc.MoEClusterStub, count: int
) -> tuple[list[Outcome], list[threading.Thread]]:
    """``count`` streams started at once on threads, filling their ``Outcome``s."""
    outcomes = [Outcome() for _ in range(count)]

    def run(i: int) -> None:
        _consume(stub, _request(i % len(PROMPTS)), outcome=outcomes[i])

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    return outcomes, threads


def _all_streaming(outcomes: list[Outcome], tokens: int) -> bool:
    return all(len(o.tokens) >= tokens or o.finish_reason or o.error for o in outcomes)


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(timeout=180)
        assert not thread.is_alive(), "a client stream hung"


def _assert_unchanged(outcomes: list[Outcome], reference: list[Outcome]) -> None:
    for i, (got, want) in enumerate(zip(outcomes, reference, strict=True)):
        assert got.error is None, f"stream {i}: {got.error}"
        assert got.tokens == want.tokens, f"stream {i}: tokens differ from the unfaulted run"
        assert got.text == want.text, f"stream {i}: text differs from the unfaulted run"
        assert got.finish_reason == want.finish_reason == "length"
        assert got.completion_tokens == MAX_TOKENS


def _resume_gap(outcomes: list[Outcome], killed_at: float) -> float:
    """The longest wait, over the streams, from the kill to their next token."""
    gaps = [next((t for t in o.times if t > killed_at), o.ended_at) - killed_at for o in outcomes]
    return max(gaps)


def _resubmissions(spans: Path, at_least: int) -> int | None:
    """Resubmission events on the gateway's request spans, once ``at_least`` are exported."""
    if not spans.exists():
        return None
    events = [
        e
        for s in read_spans(spans)
        if s.name.startswith("text_completion")
        for e in s.events
        if e.name == "moe.resubmission"
    ]
    return len(events) if len(events) >= at_least else None


def _fault_under_traffic(
    served: Served, reference: list[Outcome], kill: Callable[[ActorProcess, int], ActorProcess]
) -> float:
    """Six streams in flight; once each has tokens, the busiest tier replica (its engine
    process's CPU time: the one holding streams) is chosen and ``kill(replica, engine pid)``
    SIGKILLed. Every stream matches the reference. Returns the resume gap."""
    outcomes, threads = _in_flight(served.stub, len(PROMPTS))
    wait_until(lambda: _all_streaming(outcomes, 8), 120, "every stream's first tokens")
    replicas = actors_named(TIER_PREFIX)
    engines = {r.pid: _engine_processes(r.pid) for r in replicas}
    assert all(engines.values()), f"a replica without its engine process: {engines}"
    first = {pid: _cpu_ticks(e[0]) for pid, e in engines.items()}
    time.sleep(0.3)
    busy = max(replicas, key=lambda r: _cpu_ticks(engines[r.pid][0]) - first[r.pid])
    victim = kill(busy, engines[busy.pid][0])
    killed_at = time.monotonic()
    kill_actor_process(victim)
    early = [(len(o.tokens), o.finish_reason) for o in outcomes if o.finish_reason or o.error]
    assert not early, f"streams ended before the kill: {early}"
    _join(threads)
    _assert_unchanged(outcomes, reference)
    return _resume_gap(outcomes, killed_at)


def test_a_tier_replica_killed_mid_stream_loses_no_token(
    served: Served, reference: list[Outcome]
) -> None:
    replicas = actors_named(TIER_PREFIX)
    assert len(replicas) == 2, replicas
    before = _resubmissions(served.spans, 0) or 0
    killed: list[ActorProcess] = []

    def the_replica(replica: ActorProcess, engine_pid: int) -> ActorProcess:
        killed.append(replica)
        return replica

    gap = _fault_under_traffic(served, reference, the_replica)
    found = _wait_for_spans(served.spans, before + 1)
    print(
        f"\n[backbone actor kill] resumed streams' next token {gap:.2f} s after the kill; "
        f"{found - before} resubmission(s)"
    )
    wait_for_replacement(killed[0], TIER_PREFIX, timeout_s=120)
    wait_until(lambda: len(actors_named(TIER_PREFIX)) == 2, 120, "two tier replicas")


def test_a_tier_replicas_engine_process_killed_mid_stream_loses_no_token(
    served: Served, reference: list[Outcome]
) -> None:
    assert len(actors_named(TIER_PREFIX)) == 2
    before = _resubmissions(served.spans, 0) or 0
    owners: list[ActorProcess] = []

    def its_engine(replica: ActorProcess, engine_pid: int) -> ActorProcess:
        owners.append(replica)
        return ActorProcess(replica.actor_id, "engine", "EngineProcess", engine_pid, "")

    gap = _fault_under_traffic(served, reference, its_engine)
    victim = owners[0]
    found = _wait_for_spans(served.spans, before + 1)
    print(
        f"\n[engine process kill] resumed streams' next token {gap:.2f} s after the kill; "
        f"{found - before} resubmission(s)"
    )
    wait_until(
        lambda: not _alive(victim.pid),
        120,
        "Serve replacing the replica whose engine died",
    )
    wait_until(lambda: len(actors_named(TIER_PREFIX)) == 2, 120, "two tier replicas")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _cpu_ticks(pid: int) -> int:
    """User plus system CPU time a process has used, in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _engine_processes(parent: int) -> list[int]:
    """The engine processes (``cluster.engine.engine_process``) whose parent is ``parent``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"cluster.engine.engine_process" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:  # the process ended meanwhile
            continue
        if int(ppid) == parent:
            found.append(int(pid))
    return found


def _wait_for_spans(spans: Path, at_least: int) -> int:
    found: list[int] = []

    def exported() -> bool:
        count = _resubmissions(spans, at_least)
        if count is not None:
            found.append(count)
        return count is not None

    wait_until(exported, 60, f"{at_least} resubmission events in the trace file")
    return found[-1]


def test_a_killed_gateway_ends_its_streams_clearly_and_is_replaced(
    served: Served, reference: list[Outcome]
) -> None:
    (gateway,) = actors_named(GATEWAY_PREFIX)
    outcomes, threads = _in_flight(served.stub, 4)
    wait_until(lambda: _all_streaming(outcomes, 4), 120, "every stream's first tokens")
    killed_at = time.monotonic()
    kill_actor_process(gateway)
    _join(threads)
    ended = [o for o in outcomes if o.error is not None]
    assert ended, "no stream was in flight at the kill"
    for outcome in ended:
        assert outcome.error is not None
        assert outcome.error.code() == grpc.StatusCode.UNAVAILABLE, outcome.error
        assert outcome.error.details(), "UNAVAILABLE without a message"
    for outcome in outcomes:  # a stream that finished before the kill is whole
        if outcome.error is None:
            assert outcome.finish_reason == "length"
    ended_after = max(o.ended_at for o in ended) - killed_at
    wait_for_replacement(gateway, GATEWAY_PREFIX, timeout_s=120)
    served_again: list[Outcome] = []

    def serves() -> bool:
        outcome = _consume(served.stub, _request(0), timeout_s=30)
        if outcome.error is None:
            served_again.append(outcome)
        return outcome.error is None

    wait_until(serves, 120, "a request served by the new gateway", poll_s=0.5)
    recovered = time.monotonic() - killed_at
    assert served_again[-1].tokens == reference[0].tokens
    print(
        f"\n[gateway kill] {len(ended)} stream(s) ended UNAVAILABLE "
        f"({ended[0].error.details() if ended[0].error else ''!r}) within {ended_after:.2f} s; "
        f"new requests served {recovered:.1f} s after the kill (pid {os.getpid()})"
    )
