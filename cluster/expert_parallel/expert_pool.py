"""Expert shards as Ray actors, and the one wrapper through which the rest calls them.

``ShardActor`` hosts an ``experts.shard.ExpertShard`` in its own process (one
per GPU in production, ``num_gpus`` from config; 0 on CPU). ``ExpertPool`` owns
the actor handles of a pool and makes every Ray call for this actor type:
starting shards on chosen nodes, loading and dropping slots, health, and the
per-layer compute fan-out. That fan-out takes one of two data planes:
``torch_dist`` (the default): ``torch.distributed`` point-to-point channels
(``cluster.expert_parallel.data_plane``), Ray only opening them: each channel's ticket and key reach
the shards through the ``open_channel`` actor call, never over the data plane itself;
``ray``: one actor call per shard per layer, numpy arrays on the wire. Backbones (tier
replicas) depend on the ``ShardCaller`` Protocol; tests can pass a fake.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import ray
import torch

from cluster.expert_parallel.data_plane import Channel, ChannelTicket, PayloadLimits, serve_channel
from cluster.telemetry.settings import TelemetrySettings
from cluster.telemetry.setup import (
    context_from_traceparent,
    get_telemetry,
    setup_telemetry,
)

Slot = tuple[int, int]  # (layer, expert)
DataPlane = Literal["torch_dist", "ray"]
DATA_PLANES: tuple[DataPlane, ...] = ("torch_dist", "ray")


@dataclass(frozen=True)
class ShardSpec:
    """Where and with what one shard starts."""

    shard_id: str
    slots: tuple[Slot, ...]
    num_gpus: float = 0.0
    num_cpus: float = 0.0
    device: str = "cpu"
    node_id: str | None = None  # pin to this Ray node (None: let Ray place it)
    resources: tuple[tuple[str, float], ...] = ()  # e.g. (("expert_node_a", 0.01),)
    placement_group: Any = None  # start in this group's bundle ``bundle_index``
    bundle_index: int = -1
    telemetry: TelemetrySettings | None = None  # set up tracing/metrics in the actor


class ShardActorImpl:
    """The actor body: an ExpertShard plus the node it runs on."""

    def __init__(
        self,
        model_dir: str,
        device: str,
        slots: Sequence[Slot],
        shard_id: str = "",
        telemetry: TelemetrySettings | None = None,
    ) -> None:
        from experts.shard import ExpertShard

        torch.set_num_threads(1)  # many shards share a CPU node; one GPU each in production
        self.shard = ExpertShard(model_dir, device=device, slots=slots)
        self.device = device
        self.shard_id = shard_id
        spec = self.shard.reader.spec  # what a data-plane header may ask of this shard
        self.limits = PayloadLimits(spec.hidden_size, max(spec.num_experts, 1))
        if telemetry is not None:  # its own process: its own providers, same exporters
            setup_telemetry(telemetry, role="expert_shard", attributes={"moe.shard": shard_id})

    def node_id(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def slots(self) -> list[Slot]:
        return list(self.shard.slots)

    # load, drop and compute may run at once: Ray calls on the actor's thread, data-plane
    # channels on threads of their own; ExpertShard is safe for that
    def load(self, slots: Sequence[Slot]) -> list[Slot]:
        self.shard.load(slots)
        return list(self.shard.slots)

    def drop(self, slots: Sequence[Slot]) -> list[Slot]:
        self.shard.drop(slots)
        return list(self.shard.slots)

    def open_channel(self, ticket: ChannelTicket, timeout_s: float) -> None:
        """Serve a backbone's data-plane channel on a thread of this actor (returns at once).

        The ticket (with the channel's key) comes only through this Ray call.
        """
        bind_host = ray.util.get_node_ip_address()  # this node's cluster address, not 0.0.0.0
        serve_channel(
            self._compute_tensors, ticket, bind_host, timeout_s, self.limits, self.shard_id
        )

    def _compute_tensors(
        self,
        layer: int,
        hidden: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        traceparent: str,
    ) -> torch.Tensor:
        out = self.compute(layer, hidden, expert_ids, weights, traceparent)
        assert isinstance(out, torch.Tensor)
        return out

    def compute(
        self,
        layer: int,
        hidden: torch.Tensor | np.ndarray,  # [N, H]
        expert_ids: torch.Tensor | np.ndarray,  # [N, K'] (-1 = padding)
        weights: torch.Tensor | np.ndarray,  # [N, K']
        traceparent: str = "",  # the dispatching span, when the request is traced
    ) -> torch.Tensor | np.ndarray:  # [N, H], numpy when the inputs came as numpy
        parent = context_from_traceparent(traceparent) if traceparent else None
        telemetry = get_telemetry()
        span = None
        if parent is not None and telemetry.tracing:
            span = telemetry.tracer.start_span(
                f"moe.expert_shard {self.shard_id}",
                context=parent,
                attributes={
                    "moe.shard": self.shard_id,
                    "moe.layer": layer,
                    "moe.shard.tokens": int(hidden.shape[0]),
                },
            )
        as_numpy = isinstance(hidden, np.ndarray)  # the pool's wire format; tensors in-process
        hidden_t, ids_t, weights_t = (_tensor(x) for x in (hidden, expert_ids, weights))
        with torch.inference_mode():
            out = self.shard.compute(layer, hidden_t.to(self.device), ids_t, weights_t)
        out = out.cpu()
        if span is not None:
            span.end()
        return _wire(out) if as_numpy else out


ShardActor = ray.remote(ShardActorImpl)

# Tensors cross actor calls as numpy arrays: numpy pickles ~15x faster than torch tensors (which
# go through torch.save) and deserializes zero-copy from the object store; measured 19.0 ->
# 12.7 ms for a 32-token round trip to two shards (bench/data_plane.py). Such arrays are
# read-only views of the store, and nothing here writes into them.
_NUMPY_DTYPES = {torch.float32, torch.float16, torch.float64, torch.int64, torch.int32}
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _wire(x: Any) -> Any:
    """A CPU tensor as numpy for the call (other dtypes, e.g. bfloat16, stay tensors)."""
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES:
        return x.numpy()
    return x


def _tensor(x: Any) -> torch.Tensor:
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


class ShardCaller(Protocol):
    """What the remote expert backend needs from a pool."""

    def compute_async(
        self,
        shard_id: str,
        layer: int,
        hidden: Any,
        expert_ids: Any,
        weights: Any,
        traceparent: str = "",
    ) -> Any: ...

    def wait(self, pending: Sequence[Any]) -> list[torch.Tensor]: ...

    def wait_timed(self, pending: Sequence[Any]) -> list[tuple[torch.Tensor, float]]: ...


class ExpertPool:
    """Handles to a pool's shard actors; every Ray call for them goes through here.

    With the ``torch_dist`` data plane each calling thread gets its own channel
    (``cluster.expert_parallel.data_plane.Channel``), opened on its first layer and reopened after a
    failure, so several backbones (threads or processes) can share one pool.
    """

    def __init__(
        self,
        handles: Mapping[str, Any],
        data_plane: DataPlane = "torch_dist",
        timeout_s: float = 60.0,
    ) -> None:
        if data_plane not in DATA_PLANES:
            raise ValueError(f"unknown data plane {data_plane!r}; known: {', '.join(DATA_PLANES)}")
        self.handles = dict(handles)
        self.data_plane = data_plane
        self.timeout_s = timeout_s  # how long a layer may wait for a shard's answer
        self._local = threading.local()
        self._channels: list[Channel] = []
        self._channels_lock = threading.Lock()

    @classmethod
    def start(cls, model_dir: str, specs: Iterable[ShardSpec]) -> ExpertPool:
        """Start one actor per spec, pinned to its node when asked; wait until loaded."""
        from ray.util.scheduling_strategies import (
            NodeAffinitySchedulingStrategy,
            PlacementGroupSchedulingStrategy,
        )

        handles = {}
        for spec in specs:
            options: dict[str, Any] = {
                "num_cpus": spec.num_cpus,
                "num_gpus": spec.num_gpus,
                "name": None,
                "max_restarts": 1,
            }
            if spec.resources:
                options["resources"] = dict(spec.resources)
            if spec.placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    spec.placement_group, placement_group_bundle_index=spec.bundle_index
                )
            elif spec.node_id is not None:
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                    spec.node_id, soft=False
                )
            handles[spec.shard_id] = ShardActor.options(**options).remote(
                model_dir, spec.device, list(spec.slots), spec.shard_id, spec.telemetry
            )
        pool = cls(handles)
        pool.node_ids()  # waits for every shard to finish loading; raises if one failed
        return pool

    def node_ids(self) -> dict[str, str]:
        refs = {sid: h.node_id.remote() for sid, h in self.handles.items()}
        return {sid: ray.get(ref) for sid, ref in refs.items()}

    def slots(self) -> dict[str, list[Slot]]:
        refs = {sid: h.slots.remote() for sid, h in self.handles.items()}
        return {sid: ray.get(ref) for sid, ref in refs.items()}

    def load(self, shard_id: str, slots: Sequence[Slot]) -> list[Slot]:
        result: list[Slot] = ray.get(self.handles[shard_id].load.remote(list(slots)))
        return result

    def drop(self, shard_id: str, slots: Sequence[Slot]) -> list[Slot]:
        result: list[Slot] = ray.get(self.handles[shard_id].drop.remote(list(slots)))
        return result

    def compute_async(
        self,
        shard_id: str,
        layer: int,
        hidden: Any,
        expert_ids: Any,
        weights: Any,
        traceparent: str = "",
    ) -> Any:
        if self.data_plane == "torch_dist":
            return self._channel().send(shard_id, layer, hidden, expert_ids, weights, traceparent)
        handle = self.handles[shard_id]
        args = [layer, *(_wire(x.cpu()) for x in (hidden, expert_ids, weights))]
        if traceparent:
            args.append(traceparent)
        return handle.compute.remote(*args)

    def wait(self, pending: Sequence[Any]) -> list[torch.Tensor]:
        if self.data_plane == "torch_dist":
            return [reply.result() for reply in pending]
        return [_tensor(out) for out in ray.get(list(pending))]

    def wait_timed(self, pending: Sequence[Any]) -> list[tuple[torch.Tensor, float]]:
        """Results in call order, each with the seconds until it was ready (from now)."""
        start = time.perf_counter()
        if self.data_plane == "torch_dist":  # in order: a later shard is often ready already
            timed = []
            for reply in pending:
                out = reply.result()
                timed.append((out, time.perf_counter() - start))
            return timed
        ready_at: dict[Any, float] = {}
        left = list(pending)
        while left:
            ready, left = ray.wait(left, num_returns=1)
            ready_at[ready[0]] = time.perf_counter() - start
        values = ray.get(list(pending))
        return [(_tensor(v), ready_at[ref]) for v, ref in zip(values, pending, strict=True)]

    def _channel(self) -> Channel:
        """This thread's data-plane channel, opened (or reopened after a failure) on demand."""
        channel: Channel | None = getattr(self._local, "channel", None)
        if channel is not None and not channel.broken:
            return channel
        if channel is not None:
            self._forget(channel)
        channel = Channel.open(
            list(self.handles), self._start_peer, ray.util.get_node_ip_address(), self.timeout_s
        )
        self._local.channel = channel
        with self._channels_lock:
            self._channels.append(channel)
        return channel

    def _start_peer(self, shard_id: str, ticket: ChannelTicket) -> None:
        ray.get(self.handles[shard_id].open_channel.remote(ticket, self.timeout_s))

    def _forget(self, channel: Channel) -> None:
        channel.close()
        with self._channels_lock:
            if channel in self._channels:
                self._channels.remove(channel)

    def close_channels(self) -> None:
        """Stop every data-plane channel this pool opened (the shards' threads end).

        For shutdown: call it while no layer is in flight on any of them.
        """
        with self._channels_lock:
            channels, self._channels = self._channels, []
        for channel in channels:
            channel.close()
        self._local = threading.local()

    def shutdown(self) -> None:
        self.close_channels()
        for handle in self.handles.values():
            ray.kill(handle)
        self.handles.clear()


class InProcessPool:
    """A ``ShardCaller`` whose shards run in this process, synchronously: no Ray.

    For tests and benchmarks that need the remote-expert code path (dispatch plans,
    trace propagation) without actor calls.
    """

    def __init__(self, shards: Mapping[str, ShardActorImpl]) -> None:
        self.shards = dict(shards)

    @classmethod
    def start(cls, model_dir: str, table_slots: Mapping[str, Sequence[Slot]]) -> InProcessPool:
        return cls(
            {
                sid: ShardActorImpl(model_dir, "cpu", slots, sid)
                for sid, slots in table_slots.items()
            }
        )

    def compute_async(
        self,
        shard_id: str,
        layer: int,
        hidden: Any,
        expert_ids: Any,
        weights: Any,
        traceparent: str = "",
    ) -> Any:
        return self.shards[shard_id].compute(layer, hidden, expert_ids, weights, traceparent)

    def wait(self, pending: Sequence[Any]) -> list[torch.Tensor]:
        return list(pending)

    def wait_timed(self, pending: Sequence[Any]) -> list[tuple[torch.Tensor, float]]:
        return [(out, 0.0) for out in pending]  # computed at call time: no wait to measure
