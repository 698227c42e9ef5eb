"""Actor-to-actor data plane for expert dispatch: which Ray path moves a layer's tokens cheapest.

One MoE layer's dispatch + combine, stripped to its transport: a *backbone* actor (standing in
for the Serve replica that runs attention and gating) sends ``N`` tokens to two *shard* actors
in parallel and gets ``[N, H]`` back from each. The payload is what ``ShardActor.compute``
needs: hidden ``[N, H]`` fp32, expert ids ``[N, K]`` int64 and weights ``[N, K]`` fp32. The
shards do no expert maths: they return ``zeros([N, H])`` with column 0 set to ``ids[:, 0]``,
so the backbone checks after each block that the tokens really arrived. ``N`` is 1, 32 and 256,
``H`` = 1024, ``K`` = 2. Every path is timed in the backbone, per layer, with
``time.perf_counter`` (median and p90 over the repetitions, after untimed warm-up ones);
one-time setup (actor start, collective groups) is reported apart. Paths, one actor group each
(backbone + two shards, ``num_cpus=0``, torch on one thread):

- ``plain_torch``: ``ray.get([s.run.remote(hidden, ids, weights) for s in shards])``, what
  ``ExpertPool.compute_async`` / ``wait`` do today. Torch tensors are pickled (a copy each
  way); payloads over 100 KiB go through the object store, smaller ones inline in the task.
- ``plain_torch_put``: ``ray.put`` the payload once and pass the ref to both shards (one
  serialisation for two shards; each shard would pick its own rows by expert id).
- ``plain_numpy`` / ``plain_numpy_put``: the same with numpy arrays, which Ray deserialises
  zero-copy (read-only) straight from the object store, both ways.
- ``zero_copy_torch`` / ``zero_copy_torch_put``: torch tensors with
  ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1`` in the actors' environment (Ray ships tensors as
  numpy uint8 views, zero-copy on read; Ray warns the result must be treated read-only).
- ``rdt_gloo``: Ray Direct Transport (alpha). The backbone creates the group itself
  (``ray.experimental.collective.create_collective_group([backbone, s0, s1],
  backend="torch_gloo")``): the process that submits the tasks owns the refs and must know the
  group, and the driver cannot be a member (members are actor handles). Per layer the backbone
  stages the payload through one of its own ``@ray.method(tensor_transport="gloo")`` methods
  (an RDT object is only made by a task's return; ``ray.put`` takes one-sided transports only),
  passes that ref to both shards' gloo-transport method, and hands their result refs to one of
  its own methods (``ray.get`` of a two-sided RDT object is refused without
  ``_use_object_store=True``). So the backbone needs ``max_concurrency=2`` and each layer costs
  four actor tasks plus a ``__ray_send__`` / ``__ray_recv__`` task pair per hop (four hops),
  and the ``__ray_free__`` tasks when the refs go.
- ``rdt_gloo_outputs``: inputs as plain task arguments, only the outputs over RDT.
- ``dist_gloo_p2p``: ``torch.distributed`` (gloo) inside the actors, ranks backbone = 0 and
  shards 1, 2 (``init_process_group`` on a TCP store at 127.0.0.1, free port). The shards sit
  in a receive loop: per layer the backbone sends each shard a one-int64 header (``N``, the
  split size) and one packed fp32 buffer ``[N, H + K + 2K]`` (hidden, weights, ids viewed as
  fp32), ``isend`` to both, then ``irecv`` both ``[N, H]`` results. No Ray call per layer.
- ``dist_gloo_all_to_all``: the same exchange as three ``all_to_all_single`` collectives over
  the world (split sizes, payload, results; zero-size splits where a rank has nothing).
- ``rdt_nccl`` / ``dist_nccl``: not timed; the NCCL group (RDT) and process group
  (``torch.distributed``) are attempted once so the JSON records how they fail on a CPU build.
- ``driver_plain_torch``: ``plain_torch`` timed from the driver (the vantage of
  bench/dispatch.py), for reference.

Also the round trip of an empty method (1 actor, 2 in parallel), from the driver and from the
backbone. Paths alternate in rounds (each round: every token count, every path, a block of
repetitions) so that the machine's drifting load falls on all of them alike.

What the figures say on this machine (2 CPUs, shared; Ray workers run at niceness 15, so the
figures move with other load; see ``quiet_checks`` in the JSON): ``dist_gloo_p2p`` is the only
path near the 1 ms goal, an order of magnitude under ``plain_torch``, because no Ray task runs
per layer. ``all_to_all_single`` costs a few times p2p on gloo (three collectives, each
synchronising every rank). Among the Ray-call paths numpy with ``ray.put`` is cheapest (about
2x ``plain_torch``): a torch tensor pickles through ``torch.save`` per storage (a fraction of a
millisecond per tensor here, see ``pickle_round_trip_ms``) while numpy is a pickle-5 buffer;
that alone is a cheap win for ``ExpertPool`` without any alpha API. Ray Direct Transport over
gloo is about 2x *slower* than plain calls on CPU: it adds Ray tasks per layer instead of
removing them; its gain is for large GPU tensors over NCCL, where it skips the device-host
copies and the object store.

Adopting the fastest path in ``ExpertPool`` (``torch.distributed``): each backbone replica and
its shards form a process group once (rank 0 = backbone; a TCP store or the Ray internal KV for
rendezvous; on GPU the NCCL backend with each shard on its own device, since NCCL refuses two
ranks on one GPU). The shard actor runs its receive loop on a dedicated thread (or a threaded
actor) instead of serving ``compute`` calls, so Ray is the control plane only (start, health,
placement, teardown). ``compute_async`` becomes ``isend`` of header + packed rows per shard and
``irecv`` of the results, ``wait`` waits on the requests; the split sizes either travel as a
header (as here) or as a first ``all_to_all_single``. On GPU, ``all_to_all_single`` over NCCL
does the whole exchange in one collective per direction, the usual expert-parallel layout.
Caveats: a process group is static (a shard restart or re-placement means tearing the group
down on every member and rebuilding it); several backbone replicas sharing shards need one group
(or sub-group) per replica and a shard thread per group, or a shared all-to-all; a missed
message blocks both sides until the gloo / NCCL timeout, so failures need the Ray control plane
to abort; gloo sends are blocking TCP and take CPU from the shard. Ray Direct Transport and
``ray.experimental.collective`` are alpha APIs (Ray 2.60) and, two-sided (gloo, NCCL), only move
tensors between actor *tasks*: each layer still pays Ray task submissions, which is where the
time goes here. Zero-copy options leave read-only buffers: combine must not write into them.

Run: ``.venv/bin/python bench/data_plane.py`` (about 2 minutes on 2 idle cores; it waits up to
20 s at the start and 3 s before each block group for other work to quiet down) or ``--quick``
(smoke). Writes ``bench/results/data_plane.json`` (quick: ``data_plane.quick.json``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pickle
import platform
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

# run as `python bench/data_plane.py`, the script's folder is on the path, not the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import load_average, wait_for_quiet

# Legend: N tokens sent to a shard, H hidden size, K experts per token, W packed row width.
HIDDEN = 1024
TOP_K = 2
NUM_EXPERTS = 8
PACKED_WIDTH = HIDDEN + TOP_K + 2 * TOP_K  # hidden | weights | ids as fp32 pairs
GOAL_MS = 1.0  # round trip per layer at 32 tokens, at most
CALL_TIMEOUT_S = 120.0
DIST_TIMEOUT = datetime.timedelta(seconds=60)
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "data_plane.json"
QUICK_OUT = REPO_ROOT / "bench" / "results" / "data_plane.quick.json"
ZERO_COPY_ENV = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}
DIST_ENV = {"GLOO_SOCKET_IFNAME": "lo"}

Payload = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden [N, H], ids [N, K], w [N, K]

PATHS: dict[str, tuple[str, str]] = {  # name: (actor group, description)
    "plain_torch": ("plain", "actor calls, torch tensors as arguments (today's ExpertPool)"),
    "plain_torch_put": ("plain", "ray.put once, the ref to both shards, torch"),
    "plain_numpy": ("plain", "actor calls, numpy arrays (zero-copy reads)"),
    "plain_numpy_put": ("plain", "ray.put once, the ref to both shards, numpy"),
    "zero_copy_torch": ("zero_copy", "actor calls, RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1"),
    "zero_copy_torch_put": ("zero_copy", "ray.put once + RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1"),
    "rdt_gloo": ("rdt", "Ray Direct Transport gloo, inputs and outputs"),
    "rdt_gloo_outputs": ("rdt", "plain inputs, outputs over Ray Direct Transport gloo"),
    "dist_gloo_p2p": ("dist", "torch.distributed gloo isend/irecv, shards in a recv loop"),
    "dist_gloo_all_to_all": ("dist", "torch.distributed gloo all_to_all_single x3"),
    "driver_plain_torch": ("plain", "plain_torch timed from the driver, for reference"),
}
BASELINE = "plain_torch"


# ----------------------------------------------------------------------------- tensors


def make_payload(num_tokens: int, seed: int = 0) -> Payload:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen)  # [N, H]
    ids = torch.randint(0, NUM_EXPERTS, (num_tokens, TOP_K), generator=gen)  # [N, K]
    weights = torch.softmax(torch.randn(num_tokens, TOP_K, generator=gen), dim=-1)  # [N, K]
    return hidden, ids, weights


def stub_output(num_tokens: int, ids: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(num_tokens, HIDDEN)  # [N, H]
    out[:, 0] = ids[:, 0]
    return out


def stub_output_np(num_tokens: int, ids: np.ndarray) -> np.ndarray:
    out = np.zeros((num_tokens, HIDDEN), dtype=np.float32)  # [N, H]
    out[:, 0] = ids[:, 0]
    return out


def pack(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.cat([hidden, weights, ids.view(torch.float32)], dim=1)  # [N, W]


def unpack(buf: torch.Tensor) -> Payload:
    ids = buf[:, HIDDEN + TOP_K :].contiguous().view(torch.int64)  # [N, K]
    return buf[:, :HIDDEN], ids, buf[:, HIDDEN : HIDDEN + TOP_K]


def check_outputs(outs: Sequence[Any], ids: torch.Tensor) -> None:
    for out in outs:
        t = torch.as_tensor(np.asarray(out)) if isinstance(out, np.ndarray) else out
        assert tuple(t.shape) == (ids.shape[0], HIDDEN), f"bad output shape {tuple(t.shape)}"
        assert torch.equal(t[:, 0], ids[:, 0].float()), "tokens did not arrive intact"


@dataclass(frozen=True)
class BlockSpec:
    """One timed block: ``warmup`` untimed calls, then up to ``reps`` timed ones, stopping
    early (after ``min_reps``) once ``budget_s`` is spent, so slow paths do not hog the run."""

    reps: int
    warmup: int
    budget_s: float = float("inf")
    min_reps: int = 1


def time_layers(layer: Callable[[], Sequence[Any]], spec: BlockSpec) -> list[float]:
    """Milliseconds per call of ``layer``."""
    for _ in range(spec.warmup):
        layer()
    samples: list[float] = []
    deadline = time.perf_counter() + spec.budget_s
    for _ in range(spec.reps):
        t0 = time.perf_counter()
        layer()
        t1 = time.perf_counter()
        samples.append((t1 - t0) * 1e3)
        if t1 > deadline and len(samples) >= spec.min_reps:
            break
    return samples


def ping_all(actors: Sequence[Any]) -> list[None]:
    return ray.get([a.ping.remote() for a in actors], timeout=CALL_TIMEOUT_S)


# ----------------------------------------------------------------------------- shard actors


class StubShard:
    """Receives a layer's tokens and returns an [N, H] result without expert maths."""

    def __init__(self) -> None:
        torch.set_num_threads(1)

    def ping(self) -> None:
        return None

    def run_torch(self, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return stub_output(hidden.shape[0], ids)

    def run_torch_packed(self, payload: Payload) -> torch.Tensor:
        return self.run_torch(*payload)

    def run_numpy(self, hidden: np.ndarray, ids: np.ndarray, w: np.ndarray) -> np.ndarray:
        return stub_output_np(hidden.shape[0], ids)

    def run_numpy_packed(self, payload: tuple[np.ndarray, ...]) -> np.ndarray:
        return self.run_numpy(*payload)


class RdtShard(StubShard):
    @ray.method(tensor_transport="gloo")
    def run_rdt(self, staged: list[torch.Tensor]) -> torch.Tensor:
        hidden, ids, _ = staged
        return stub_output(hidden.shape[0], ids)

    @ray.method(tensor_transport="gloo")
    def run_rdt_plain_in(
        self, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        return stub_output(hidden.shape[0], ids)


class DistShard(StubShard):
    def init_dist(self, port: int, rank: int, world_size: int) -> float:
        t0 = time.perf_counter()
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=DIST_TIMEOUT,
        )
        return time.perf_counter() - t0

    def serve(self, mode: str) -> int:
        """Answer layers from rank 0 until it sends a negative split size; returns the count."""
        served = 0
        world = dist.get_world_size()
        while True:
            if mode == "p2p":
                header = torch.empty(1, dtype=torch.int64)
                dist.recv(header, src=0)
                n = int(header[0])
                if n < 0:
                    return served
                buf = torch.empty(n, PACKED_WIDTH)  # [N, W]
                dist.recv(buf, src=0)
                _, ids, _ = unpack(buf)
                dist.send(stub_output(n, ids), dst=0)
            else:
                counts = torch.empty(world, dtype=torch.int64)
                dist.all_to_all_single(counts, torch.zeros(world, dtype=torch.int64))
                n = int(counts[0])
                if n < 0:
                    return served
                buf = torch.empty(n, PACKED_WIDTH)  # [N, W]
                nothing = [0] * world
                dist.all_to_all_single(
                    buf, torch.empty(0, PACKED_WIDTH), [n] + [0] * (world - 1), nothing
                )
                _, ids, _ = unpack(buf)
                dist.all_to_all_single(
                    torch.empty(0, HIDDEN), stub_output(n, ids), nothing, [n] + [0] * (world - 1)
                )
            served += 1


# ----------------------------------------------------------------------------- backbone actors


class Backbone:
    """Times one layer's send-to-both-shards-and-get-back, as the serving replica would."""

    def __init__(self, shards: list[Any]) -> None:
        torch.set_num_threads(1)
        self.shards = shards

    def ping(self) -> None:
        return None

    def empty_calls(self, num_actors: int, spec: BlockSpec) -> list[float]:
        return time_layers(functools.partial(ping_all, self.shards[:num_actors]), spec)

    def layer_fn(self, path: str, payload: Payload) -> Callable[[], Sequence[Any]]:
        hidden, ids, w = payload
        shards = self.shards
        if path in ("plain_torch", "zero_copy_torch"):
            return lambda: ray.get([s.run_torch.remote(hidden, ids, w) for s in shards])
        if path in ("plain_torch_put", "zero_copy_torch_put"):

            def put_torch() -> Sequence[Any]:
                ref = ray.put(payload)
                return ray.get([s.run_torch_packed.remote(ref) for s in shards])

            return put_torch
        if path == "plain_numpy":

            def numpy_args() -> Sequence[Any]:
                h, i, ww = hidden.numpy(), ids.numpy(), w.numpy()
                outs = ray.get([s.run_numpy.remote(h, i, ww) for s in shards])
                return [torch.from_numpy(o) for o in outs]

            return numpy_args
        if path == "plain_numpy_put":

            def numpy_put() -> Sequence[Any]:
                ref = ray.put((hidden.numpy(), ids.numpy(), w.numpy()))
                outs = ray.get([s.run_numpy_packed.remote(ref) for s in shards])
                return [torch.from_numpy(o) for o in outs]

            return numpy_put
        raise ValueError(f"path {path!r} is not served by {type(self).__name__}")

    def time_path(self, path: str, num_tokens: int, spec: BlockSpec) -> list[float]:
        payload = make_payload(num_tokens, seed=num_tokens)
        layer = self.layer_fn(path, payload)
        samples = time_layers(layer, spec)
        check_outputs(layer(), payload[1])
        return samples


class RdtBackbone(Backbone):
    def __init__(self, shards: list[Any]) -> None:
        super().__init__(shards)
        self._staged: list[torch.Tensor] = []
        self._collected: list[torch.Tensor] = []

    def setup_group(self) -> float:
        from ray.experimental.collective import create_collective_group

        t0 = time.perf_counter()
        me = ray.get_runtime_context().current_actor
        create_collective_group([me, *self.shards], backend="torch_gloo")
        return time.perf_counter() - t0

    @ray.method(tensor_transport="gloo")
    def stage(self) -> list[torch.Tensor]:
        return self._staged

    def collect(self, *outs: torch.Tensor) -> None:
        self._collected = list(outs)

    def layer_fn(self, path: str, payload: Payload) -> Callable[[], Sequence[Any]]:
        me = ray.get_runtime_context().current_actor
        shards = self.shards

        def finish(out_refs: list[Any]) -> Sequence[Any]:
            ray.get(me.collect.remote(*out_refs), timeout=CALL_TIMEOUT_S)
            return self._collected

        if path == "rdt_gloo":

            def rdt_both() -> Sequence[Any]:
                self._staged = list(payload)
                staged = me.stage.remote()
                return finish([s.run_rdt.remote(staged) for s in shards])

            return rdt_both
        if path == "rdt_gloo_outputs":
            return lambda: finish([s.run_rdt_plain_in.remote(*payload) for s in shards])
        return super().layer_fn(path, payload)


class DistBackbone(DistShard):
    def layer_fn(self, path: str, payload: Payload) -> Callable[[], Sequence[Any]]:
        world = dist.get_world_size()
        n = payload[0].shape[0]
        if path == "dist_gloo_p2p":
            header = torch.tensor([n], dtype=torch.int64)

            def p2p() -> Sequence[Any]:
                buf = pack(*payload)  # [N, W]
                sends = [dist.isend(header, r) for r in range(1, world)]
                sends += [dist.isend(buf, r) for r in range(1, world)]
                outs = [torch.empty(n, HIDDEN) for _ in range(1, world)]  # [N, H] each
                recvs = [dist.irecv(o, r) for r, o in enumerate(outs, start=1)]
                for req in sends + recvs:
                    assert req is not None  # None only for ranks outside the group
                    req.wait()
                return outs

            return p2p
        if path == "dist_gloo_all_to_all":
            to_shards = [0] + [n] * (world - 1)
            nothing = [0] * world
            counts = torch.tensor(to_shards, dtype=torch.int64)

            def all_to_all() -> Sequence[Any]:
                dist.all_to_all_single(torch.empty(world, dtype=torch.int64), counts)
                buf = pack(*payload).repeat(world - 1, 1)  # [(world-1) N, W]
                dist.all_to_all_single(torch.empty(0, PACKED_WIDTH), buf, nothing, to_shards)
                outs = torch.empty((world - 1) * n, HIDDEN)  # [(world-1) N, H]
                dist.all_to_all_single(outs, torch.empty(0, HIDDEN), to_shards, nothing)
                return list(outs.split(n))

            return all_to_all
        raise ValueError(f"path {path!r} is not served by {type(self).__name__}")

    def time_path(self, path: str, num_tokens: int, spec: BlockSpec) -> list[float]:
        payload = make_payload(num_tokens, seed=num_tokens)
        layer = self.layer_fn(path, payload)
        try:
            samples = time_layers(layer, spec)
            check_outputs(layer(), payload[1])
        finally:
            self.stop(path)
        return samples

    def stop(self, path: str) -> None:
        world = dist.get_world_size()
        if path == "dist_gloo_p2p":
            for r in range(1, world):
                dist.send(torch.tensor([-1], dtype=torch.int64), r)
        else:
            stop = torch.tensor([0] + [-1] * (world - 1), dtype=torch.int64)
            dist.all_to_all_single(torch.empty(world, dtype=torch.int64), stop)


# ----------------------------------------------------------------------------- driver side


@dataclass(frozen=True)
class BenchConfig:
    quick: bool
    token_counts: tuple[int, ...]
    reps_per_round: tuple[int, ...]  # per token count, at most
    rounds: int
    warmup: int
    block_budget_s: float  # a block stops early (after min_reps) once this is spent
    min_reps: int
    empty_reps: int
    start_wait_s: float  # before starting Ray, wait this long at most for a quiet machine
    quiet_wait_s: float  # the same before each (round, token count)
    quiet_threshold: float  # share of all CPUs others may use


def make_config(args: argparse.Namespace) -> BenchConfig:
    if args.quick:
        return BenchConfig(True, (1, 32, 256), (10, 10, 5), 1, 2, 1.0, 5, 20, 5, 2, 0.25)
    return BenchConfig(False, (1, 32, 256), (60, 60, 25), 4, 5, 0.6, 12, 300, 20, 3, 0.25)


def say(msg: str) -> None:
    print(f"[data_plane] {msg}", file=sys.stderr, flush=True)


def error_text(exc: BaseException) -> str:
    """The exception's type and last line, with the versions it was seen on."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    return (
        f"{type(exc).__name__}: {last}"[:600]
        + f" (ray {ray.__version__}, torch {torch.__version__})"
    )


def stats(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {
        "median_ms": round(statistics.median(ordered), 4),
        "p90_ms": round(p90, 4),
        "min_ms": round(ordered[0], 4),
        "reps": len(ordered),
    }


def quiet_facts(max_wait_s: float, threshold: float) -> dict[str, float]:
    """``bench.machine.wait_for_quiet`` for this run (Ray workers run at niceness 15, so a
    busy process at normal priority starves the actors), as JSON."""
    busy, waited = wait_for_quiet(max_wait_s, threshold, interval_s=0.3)
    return {"others_cpu_busy": round(busy, 3), "waited_s": round(waited, 1)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Group:
    """One backbone + two shards; ``error`` set when starting it failed."""

    backbone: Any = None
    shards: tuple[Any, ...] = ()
    setup_s: dict[str, float] | None = None
    error: str | None = None


def launch_group(name: str) -> Group:
    """Create the group's actors without waiting for them (groups start side by side)."""
    env: dict[str, str] = {}
    shard_cls: type = StubShard
    backbone_cls: type = Backbone
    backbone_opts: dict[str, Any] = {}
    if name == "zero_copy":
        env = ZERO_COPY_ENV
    elif name == "rdt":
        shard_cls, backbone_cls = RdtShard, RdtBackbone
        backbone_opts = {"max_concurrency": 2}  # its own stage/collect tasks run beside it
    elif name == "dist":
        shard_cls, backbone_cls, env = DistShard, DistBackbone, DIST_ENV
    opts: dict[str, Any] = {"num_cpus": 0, "runtime_env": {"env_vars": env} if env else None}
    try:
        shards: tuple[Any, ...] = tuple(ray.remote(**opts)(shard_cls).remote() for _ in range(2))
        bb_args = () if name == "dist" else (list(shards),)
        backbone: Any = ray.remote(**opts, **backbone_opts)(backbone_cls).remote(*bb_args)
    except Exception as exc:  # recorded: a path that does not work is a result here
        return Group(error=error_text(exc))
    return Group(backbone, shards, {})


def finish_group(name: str, group: Group, t_launch: float) -> None:
    """Wait for the actors, then build the group's collective (timed apart)."""
    if group.error:
        return
    assert group.setup_s is not None
    try:
        ping_all((group.backbone, *group.shards))
        group.setup_s["actors_ready_s"] = round(time.perf_counter() - t_launch, 3)
        if name == "rdt":
            secs = ray.get(group.backbone.setup_group.remote(), timeout=CALL_TIMEOUT_S)
            group.setup_s["create_collective_group_s"] = round(secs, 3)
        elif name == "dist":
            port = free_port()
            t0 = time.perf_counter()
            members = (group.backbone, *group.shards)
            refs = [a.init_dist.remote(port, r, len(members)) for r, a in enumerate(members)]
            ray.get(refs, timeout=CALL_TIMEOUT_S)
            group.setup_s["init_process_group_s"] = round(time.perf_counter() - t0, 3)
    except Exception as exc:  # recorded: a path that does not work is a result here
        group.error = error_text(exc)
        say(f"group {name} failed: {group.error}\n{traceback.format_exc()}")


def time_from_driver(group: Group, num_tokens: int, spec: BlockSpec) -> list[float]:
    hidden, ids, w = make_payload(num_tokens, seed=num_tokens)

    def layer() -> Sequence[Any]:
        return ray.get([s.run_torch.remote(hidden, ids, w) for s in group.shards])

    samples = time_layers(layer, spec)
    check_outputs(layer(), ids)
    return samples


def run_block(path: str, group: Group, num_tokens: int, spec: BlockSpec) -> list[float]:
    if path == "driver_plain_torch":
        return time_from_driver(group, num_tokens, spec)
    serving = []
    if path.startswith("dist_"):
        mode = "p2p" if path == "dist_gloo_p2p" else "all_to_all"
        serving = [s.serve.remote(mode) for s in group.shards]
    samples: list[float] = ray.get(
        group.backbone.time_path.remote(path, num_tokens, spec), timeout=CALL_TIMEOUT_S
    )
    ray.get(serving, timeout=CALL_TIMEOUT_S)
    return samples


def pickle_round_trip(obj: object) -> list[object]:
    return [pickle.loads(pickle.dumps(obj))]


def measure_pickling(token_counts: Sequence[int], reps: int) -> dict[str, dict[str, float]]:
    """pickle.dumps + loads of one payload in the driver, torch vs numpy (what every plain
    actor call pays on each side, before any Ray work)."""
    out: dict[str, dict[str, float]] = {}
    for n in token_counts:
        payload = make_payload(n, seed=n)
        arrays = tuple(t.numpy() for t in payload)
        for kind, obj in (("torch", payload), ("numpy", arrays)):
            spec = BlockSpec(reps, 3)
            samples = time_layers(functools.partial(pickle_round_trip, obj), spec)
            out[f"{kind}_{n}_tokens"] = stats(samples)
    return out


def measure_empty_calls(cfg: BenchConfig, group: Group) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for k in (1, 2):
        name = f"{k}_actor" + ("s" if k > 1 else "")
        spec = BlockSpec(cfg.empty_reps, cfg.warmup)
        ping = functools.partial(ping_all, group.shards[:k])
        out[f"driver_{name}"] = stats(time_layers(ping, spec))
        inside = group.backbone.empty_calls.remote(k, spec)
        out[f"backbone_{name}"] = stats(ray.get(inside, timeout=CALL_TIMEOUT_S))
    return out


def try_nccl(rdt_shards: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Attempt the NCCL variants of paths 3 and 4, to record how they fail on this build."""
    out: dict[str, dict[str, Any]] = {}
    attempts: dict[str, tuple[str, Callable[[], object]]] = {
        "rdt_nccl": (
            "create_collective_group(two shard actors, backend='nccl') for "
            "@ray.method(tensor_transport='nccl')",
            lambda: create_nccl_group(rdt_shards),
        ),
        "dist_nccl": (
            "torch.distributed.init_process_group('nccl', store=HashStore(), rank=0, world_size=1)",
            init_nccl_process_group,
        ),
    }
    for path, (description, attempt) in attempts.items():
        entry: dict[str, Any] = {"description": description, "actor_group": None, "by_tokens": {}}
        try:
            attempt()
        except Exception as exc:  # recorded: a path that does not work is a result here
            entry.update(status="failed", error=error_text(exc))
        else:
            entry.update(status="not_measured", error="NCCL is available here; not timed")
        out[path] = entry
    return out


def create_nccl_group(actors: Sequence[Any]) -> None:
    from ray.experimental.collective import create_collective_group, destroy_collective_group

    if not actors:
        raise RuntimeError("no actors to form a group (the rdt group did not start)")
    destroy_collective_group(create_collective_group(list(actors), backend="nccl"))


def init_nccl_process_group() -> None:
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    dist.destroy_process_group()


def run_all(cfg: BenchConfig) -> dict[str, Any]:
    say("starting actors")
    t_launch = time.perf_counter()
    groups = {name: launch_group(name) for name in ("plain", "zero_copy", "rdt", "dist")}
    for name, group in groups.items():
        finish_group(name, group, t_launch)
    empty = measure_empty_calls(cfg, groups["plain"]) if not groups["plain"].error else {}
    pickling = measure_pickling(cfg.token_counts, 100 if cfg.quick else 300)
    samples: dict[str, dict[int, list[float]]] = {p: {} for p in PATHS}
    errors: dict[str, str] = {
        p: f"group setup failed: {groups[g].error}"
        for p, (g, _) in PATHS.items()
        if groups[g].error
    }
    quiet: list[dict[str, float]] = []
    for rnd in range(cfg.rounds):
        say(f"round {rnd + 1}/{cfg.rounds}")
        for n, reps in zip(cfg.token_counts, cfg.reps_per_round, strict=True):
            quiet.append(quiet_facts(cfg.quiet_wait_s, cfg.quiet_threshold))
            for path, (group_name, _) in PATHS.items():
                if path in errors:
                    continue
                try:
                    spec = BlockSpec(reps, cfg.warmup, cfg.block_budget_s, cfg.min_reps)
                    block = run_block(path, groups[group_name], n, spec)
                except Exception as exc:  # recorded: a path that does not work is a result here
                    errors[path] = error_text(exc)
                    say(f"{path} failed at {n} tokens: {errors[path]}\n{traceback.format_exc()}")
                    continue
                samples[path].setdefault(n, []).extend(block)
    paths: dict[str, Any] = {}
    for path, (group_name, description) in PATHS.items():
        entry: dict[str, Any] = {"description": description, "actor_group": group_name}
        if path in errors:
            entry.update(status="failed", error=errors[path])
        else:
            entry["status"] = "ok"
        entry["by_tokens"] = {str(n): stats(s) for n, s in samples[path].items() if s}
        paths[path] = entry
    paths.update(try_nccl(groups["rdt"].shards))
    setup = {name: g.setup_s or {} for name, g in groups.items()}
    busy = sorted(q["others_cpu_busy"] for q in quiet)
    return {
        "paths": paths,
        "empty_call_ms": empty,
        "pickle_round_trip_ms": pickling,
        "setup_s": setup,
        "quiet_checks": quiet,
        "others_cpu_busy_before_blocks": {
            "median": busy[len(busy) // 2] if busy else None,
            "max": busy[-1] if busy else None,
        },
    }


def median_at(entry: dict[str, Any], num_tokens: int) -> float | None:
    row = entry["by_tokens"].get(str(num_tokens))
    return None if row is None or entry["status"] != "ok" else float(row["median_ms"])


def format_table(result: dict[str, Any], token_counts: Sequence[int]) -> str:
    paths = result["paths"]
    head = f"{'path':<22}" + "".join(f"{f'{n} tok med / p90 ms':>24}" for n in token_counts)
    lines = [head + f"{'x plain @32':>13}", "-" * (len(head) + 13)]
    base = median_at(paths[BASELINE], 32)
    for path, entry in paths.items():
        if entry["status"] != "ok":
            lines.append(f"{path:<22}  {entry['status'].upper()}: {entry['error']}")
            continue
        cells = ""
        for n in token_counts:
            row = entry["by_tokens"].get(str(n))
            text = f"{row['median_ms']:.3f} / {row['p90_ms']:.3f}" if row else "-"
            cells += f"{text:>24}"
        m32 = median_at(entry, 32)
        ratio = f"{base / m32:.2f}x" if base and m32 else "-"
        lines.append(f"{path:<22}{cells}{ratio:>13}")
    lines.append("")
    for name, row in result["empty_call_ms"].items():
        lines.append(f"empty call {name:<20} {row['median_ms']:.3f} / {row['p90_ms']:.3f} ms")
    for name, row in result["pickle_round_trip_ms"].items():
        lines.append(f"pickle round trip {name:<17} {row['median_ms']:.3f} ms (driver)")
    busy = result["others_cpu_busy_before_blocks"]
    lines.append(f"CPU share in use before blocks (Ray's own idle processes included): {busy}")
    lines.append("setup (actors_ready_s: all groups launched together, timed from launch):")
    for name, setup in result["setup_s"].items():
        lines.append(f"setup {name:<10} " + ", ".join(f"{k} {v:.2f}s" for k, v in setup.items()))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few repetitions")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"default {DEFAULT_OUT} (quick: {QUICK_OUT.name})"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    out: Path = args.out or (QUICK_OUT if cfg.quick else DEFAULT_OUT)
    started = time.perf_counter()
    load_before = load_average()
    start_quiet = quiet_facts(cfg.start_wait_s, cfg.quiet_threshold)
    say(f"others' CPU use {start_quiet['others_cpu_busy']:.2f} after {start_quiet['waited_s']}s")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_all(cfg)
    finally:
        ray.shutdown()
    table = format_table(result, cfg.token_counts)
    print(table)
    ok32 = {p: m for p, e in result["paths"].items() if (m := median_at(e, 32)) is not None}
    best = min(ok32, key=lambda p: ok32[p]) if ok32 else None
    base = ok32.get(BASELINE)
    report = {
        "benchmark": "data_plane",
        "description": "actor-to-actor round trip of one MoE layer's tokens (backbone actor -> "
        "2 shard actors in parallel -> [N, 1024] back from each), per Ray / torch transport",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python bench/data_plane.py" + (" --quick" if cfg.quick else ""),
        "targets": {
            "best_round_trip_ms_32_tokens": {
                "value": ok32[best] if best else None,
                "goal": GOAL_MS,
                "met": bool(best and ok32[best] <= GOAL_MS),
                "path": best,
            }
        },
        "best_path_32_tokens": best,
        "speedup_vs_plain_torch_32_tokens": {
            p: round(base / m, 3) for p, m in ok32.items() if base
        },
        "versions": {
            "ray": ray.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "config": {
            **asdict(cfg),
            "hidden": HIDDEN,
            "top_k": TOP_K,
            "payload": "hidden [N, 1024] fp32 + ids [N, 2] int64 + weights [N, 2] fp32 to each "
            "of 2 shards; [N, 1024] fp32 back from each",
            "shard_work": "none: zeros([N, H]) with column 0 = ids[:, 0] (checked by the caller)",
            "timed_in": "the backbone actor (all but driver_plain_torch), per layer, "
            "time.perf_counter; setup excluded",
            "statistic": "median and p90 over rounds x reps_per_round, after warmup per block",
            "ray_init": "ray.init(address='local', num_cpus=2, include_dashboard=False, "
            "log_to_driver=False); actors num_cpus=0, torch 1 thread",
        },
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_1m_before": round(load_before, 2),
            "quiet_at_start": start_quiet,
            "load_1m_after": round(load_average(), 2),
            "wall_s": round(time.perf_counter() - started, 1),
        },
        **result,
        "not_measured": [
            "NCCL timings (CPU-only build; the attempts are under paths.rdt_nccl / dist_nccl)",
            "a real expert matmul in the shard (the stub returns zeros)",
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {out} in {report['machine']['wall_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
