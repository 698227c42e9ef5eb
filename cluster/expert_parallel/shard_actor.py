"""The expert shard actor: an ``experts.shard.ExpertShard`` in a Ray actor of its own.

One per GPU in production (``num_gpus`` from config; 0 on CPU). Ray calls load and drop
slots, report health, open data-plane channels (``open_channel``) and, on the ``ray`` data
plane, compute a layer's tokens; on the ``torch_dist`` data plane the tokens come over the
channels instead, each served on a thread of its own. Only ``cluster.expert_parallel``'s pool
and transports call it.

Legend: N tokens sent to this shard, K' (expert, weight) pairs per token on it, H hidden.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

from cluster.expert_parallel.data_plane import ChannelTicket, PayloadLimits, serve_channel
from cluster.telemetry.dispatch_spans import ShardSpan
from cluster.telemetry.setup import TelemetrySettings, get_telemetry, setup_telemetry

Slot = tuple[int, int]  # (layer, expert)


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
        # a fresh one per start: a restarted actor (same name and handle) is told apart by it
        self.incarnation = uuid.uuid4().hex
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

    def state(self) -> tuple[str, list[Slot]]:
        """This start's incarnation and the slots held (the controller's health probe)."""
        return self.incarnation, list(self.shard.slots)

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
        compute, limits = self.compute_tensors, self.limits
        serve_channel(compute, ticket, bind_host, timeout_s, limits, self.shard_id)

    def compute(
        self,
        layer: int,
        hidden: torch.Tensor | np.ndarray,  # [N, H]
        expert_ids: torch.Tensor | np.ndarray,  # [N, K'] (-1 = padding)
        weights: torch.Tensor | np.ndarray,  # [N, K']
        traceparent: str = "",  # the dispatching span, when the request is traced
    ) -> torch.Tensor | np.ndarray:  # [N, H], numpy when the inputs came as numpy
        """A layer's tokens by Ray actor call (the ``ray`` data plane) or in-process."""
        as_numpy = isinstance(hidden, np.ndarray)  # the pool's wire format; tensors in-process
        hidden_t, ids_t, weights_t = (from_wire(x) for x in (hidden, expert_ids, weights))
        out = self.compute_tensors(layer, hidden_t, ids_t, weights_t, traceparent)
        return to_wire(out) if as_numpy else out

    def compute_tensors(
        self,
        layer: int,
        hidden: torch.Tensor,  # [N, H] in host memory, or on this shard's device
        expert_ids: torch.Tensor,  # [N, K'] (-1 = padding)
        weights: torch.Tensor,  # [N, K']
        traceparent: str = "",
    ) -> torch.Tensor:  # [N, H] in host memory
        """A layer's tokens from a data-plane channel (or from ``compute``).

        When the call came traced, its ``moe.expert_shard`` span is two clocks here and is
        built off this thread (``ShardSpan``).
        """
        telemetry = get_telemetry()
        span = ShardSpan.start(telemetry, traceparent, self.shard_id, layer, hidden.shape[0])
        error = ""
        try:
            with torch.inference_mode():
                out = self.shard.compute(layer, hidden.to(self.device), expert_ids, weights)
            return out.cpu()
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
            raise
        finally:
            if span is not None:
                span.end(telemetry, error)


ShardActor = ray.remote(ShardActorImpl)

# Tensors cross actor calls as numpy arrays: numpy pickles ~15x faster than torch tensors (which
# go through torch.save) and deserializes zero-copy from the object store; measured 19.0 ->
# 12.7 ms for a 32-token round trip to two shards (a retired prototype bench). Such arrays are
# read-only views of the store, and nothing here writes into them.
_NUMPY_DTYPES = {torch.float32, torch.float16, torch.float64, torch.int64, torch.int32}
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def to_wire(x: Any) -> Any:
    """A CPU tensor as numpy for the call (other dtypes, e.g. bfloat16, stay tensors)."""
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES:
        return x.numpy()
    return x


def from_wire(x: Any) -> torch.Tensor:
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x
