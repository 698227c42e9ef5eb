"""Expert shards as Ray actors, and the one wrapper through which the rest calls them.

``ExpertPool`` owns the handles of a pool's shard actors (``shard_actor.ShardActor``) and
makes their control calls: starting shards on chosen nodes, loading and dropping slots,
health. A layer's compute fan-out goes through the pool's transport, chosen by the
``data_plane`` name from the registry in ``cluster.expert_parallel.transports``
(``torch_dist``: data-plane channels that Ray only opens; ``ray``: an actor call per shard
per layer). Backbones depend on the ``ShardCaller`` Protocol (a pool is one, and so is its
transport); tests can pass a fake, or ``InProcessPool``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from cluster.expert_parallel.shard_actor import ShardActor, ShardActorImpl
from cluster.expert_parallel.transports import PoolTransport, ShardCall, make_transport
from cluster.telemetry.setup import TelemetrySettings

__all__ = ["ExpertPool", "InProcessPool", "ShardActorImpl", "ShardSpec", "Slot"]

Slot = tuple[int, int]  # (layer, expert)


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


class ExpertPool:
    """Handles to a pool's shard actors; every control call for them goes through here.

    Its transport (``transport``) carries the layers; with ``torch_dist`` each calling
    thread gets its own channel, so several backbones (threads or processes) can share one
    pool. ``timeout_s`` bounds how long a layer waits for a shard's answer.
    """

    def __init__(
        self, handles: Mapping[str, Any], data_plane: str = "torch_dist", timeout_s: float = 60.0
    ) -> None:
        self.handles = dict(handles)
        self.data_plane = data_plane
        self.timeout_s = timeout_s
        self.transport: PoolTransport = make_transport(data_plane, self.handles, timeout_s)

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
                # a crashed shard restarts alone (expert-grain), under the same handle
                "max_restarts": -1,
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

    def states(self, timeout_s: float = 5.0) -> dict[str, tuple[str, list[Slot]] | None]:
        """Per shard: (incarnation, slots held), or None when its actor is dead or restarting
        (its node may be gone); a shard slower than ``timeout_s`` is left out (busy is not
        dead). Never raises for a shard's failure."""
        refs = {sid: h.state.remote() for sid, h in self.handles.items()}
        out: dict[str, tuple[str, list[Slot]] | None] = {}
        for sid, ref in refs.items():
            try:
                incarnation, held = ray.get(ref, timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                continue
            except ray.exceptions.RayActorError:
                out[sid] = None
                continue
            out[sid] = (incarnation, [(int(lyr), int(e)) for lyr, e in held])
        return out

    def reconnect(self, shard_id: str, timeout_s: float = 5.0) -> bool:
        """Whether this thread's data plane reaches the shard again (see the transport's)."""
        reconnect = getattr(self.transport, "reconnect", None)
        return bool(reconnect(shard_id, timeout_s)) if reconnect is not None else False

    def load(self, shard_id: str, slots: Sequence[Slot]) -> list[Slot]:
        result: list[Slot] = ray.get(self.handles[shard_id].load.remote(list(slots)))
        return result

    def drop(self, shard_id: str, slots: Sequence[Slot]) -> list[Slot]:
        result: list[Slot] = ray.get(self.handles[shard_id].drop.remote(list(slots)))
        return result

    def send(self, call: ShardCall) -> Any:
        return self.transport.send(call)

    def wait(self, pending: Sequence[Any]) -> list[torch.Tensor]:
        return self.transport.wait(pending)

    def wait_timed(self, pending: Sequence[Any]) -> list[tuple[torch.Tensor, float]]:
        return self.transport.wait_timed(pending)

    def close_channels(self) -> None:
        """Stop every data-plane channel this pool opened (the shards' threads end).

        For shutdown: call it while no layer is in flight on any of them.
        """
        self.transport.close()

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

    def reconnect(self, shard_id: str, timeout_s: float = 5.0) -> bool:
        return shard_id in self.shards

    def send(self, call: ShardCall) -> Any:
        shard = self.shards[call.shard_id]
        return shard.compute(
            call.layer, call.hidden, call.expert_ids, call.weights, call.traceparent
        )

    def wait(self, pending: Sequence[Any]) -> list[torch.Tensor]:
        return list(pending)

    def wait_timed(self, pending: Sequence[Any]) -> list[tuple[torch.Tensor, float]]:
        return [(out, 0.0) for out in pending]  # computed at call time: no wait to measure
