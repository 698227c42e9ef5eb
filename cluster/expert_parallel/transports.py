"""The expert pool's transports: how a layer's tokens reach the shards and their answers return.

Every transport is a ``ShardCaller``: ``send`` one ``ShardCall`` per shard (without waiting),
then ``wait`` for the answers in call order (``wait_timed`` also says when each was ready). A
pool's transport is chosen by name from ``TRANSPORTS`` (``make_transport``), the names being
the config's ``experts.data_plane`` values:

``torch_dist`` (``TorchDistTransport``, the default): data-plane channels
(``cluster.expert_parallel.data_plane``), one per calling thread, opened on its first layer
and reopened after a failure. Ray only opens them: each shard gets its ticket and key through
the ``open_channel`` actor call. A shard on the caller's Ray node gets a shared-memory pair
(``shm_link``), the others gloo; ``gloo`` is the same with gloo for every pair.

``ray`` (``RayCallTransport``): one actor call per shard per layer, numpy arrays on the wire.
It needs a Ray worker on every layer, so it cannot serve an engine process.

Failures. ``wait`` reads every answer of a layer before it raises, and raises ``ShardsFailed``
holding the answers that came and naming the shards that failed (a closed socket or connection,
a dead actor: at once, never the layer timeout), so the caller can recompute only the failed
shards' share elsewhere. ``reconnect`` (where a transport can) tries to reach a shard again:
for channels, it joins a fresh pair to it (a restarted actor), leaving the other pairs alone.

Transports and ``ExpertPool`` make every Ray call for shard actors. Legend: N tokens sent to
one shard, K' (expert, weight) pairs per token on it, H hidden.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import ray
import torch

from cluster.expert_parallel.data_plane import (
    Channel,
    ChannelTicket,
    DataPlaneError,
    ShardComputeError,
    StartPeer,
)
from cluster.expert_parallel.shard_actor import from_wire, to_wire

# (shard id, ticket, seconds the shard waits for the backbone): start a shard's side
OpenOnShard = Callable[[str, ChannelTicket, float], None]


@dataclass(frozen=True)
class ShardCall:
    """One shard's share of one MoE layer: its tokens, their experts and their gate weights."""

    shard_id: str
    layer: int
    hidden: torch.Tensor  # [N, H]
    expert_ids: torch.Tensor  # [N, K'] (-1 = padding)
    weights: torch.Tensor  # [N, K']
    traceparent: str = ""  # the dispatching span, when the request is traced


class ShardsFailed(DataPlaneError, ShardComputeError):
    """Some shards of a layer failed; ``answers`` holds the others' (None where failed), in
    call order, and ``failed`` each failed call's index and error."""

    def __init__(
        self, answers: list[tuple[torch.Tensor, float] | None], failed: dict[int, Exception]
    ) -> None:
        super().__init__("; ".join(str(err) for err in failed.values()))
        self.answers = answers
        self.failed = failed


def _raise_failed(
    answers: list[tuple[torch.Tensor, float] | None], failed: dict[int, Exception]
) -> list[tuple[torch.Tensor, float]]:
    if failed:
        raise ShardsFailed(answers, failed)
    return [a for a in answers if a is not None]


class ShardCaller(Protocol):
    """What the remote expert backend needs: send a layer's calls, then wait for the answers."""

    def send(self, call: ShardCall) -> Any:
        """Start the call and return a handle for ``wait``; raise if it cannot be sent."""
        ...

    def wait(self, pending: Sequence[Any]) -> list[torch.Tensor]:
        """The answers ([N, H] each, in host memory) in call order; raise naming a failed shard."""
        ...

    def wait_timed(self, pending: Sequence[Any]) -> list[tuple[torch.Tensor, float]]:
        """As ``wait``, each answer with the seconds until it was ready (from now)."""
        ...


class PoolTransport(ShardCaller, Protocol):
    """A ``ShardCaller`` that a pool owns, and closes when it shuts down."""

    def close(self) -> None: ...


class ChannelCalls:
    """A ``ShardCaller`` over a data-plane channel; subclasses say which channel serves a call."""

    def channel(self) -> Channel:
        raise NotImplementedError

    def send(self, call: ShardCall) -> Any:
        return self.channel().send(
            call.shard_id, call.layer, call.hidden, call.expert_ids, call.weights, call.traceparent
        )

    def wait(self, pending: Sequence[Any]) -> list[torch.Tensor]:
        return [out for out, _ in self.wait_timed(pending)]

    def wait_timed(self, pending: Sequence[Any]) -> list[tuple[torch.Tensor, float]]:
        """The answers in order (a later shard is often ready already).

        Every answer is read before a failure is raised (``ShardsFailed``): left unread, one
        would be taken for that shard's answer to the next layer. A shard whose compute failed
        (``ShardComputeError``) keeps its pair; one that died (``DataPlaneError``) loses only
        its own pair, the others keep serving.
        """
        start = time.perf_counter()
        timed: list[tuple[torch.Tensor, float] | None] = []
        failed: dict[int, Exception] = {}
        for i, reply in enumerate(pending):
            try:
                out = reply.result()
            except (ShardComputeError, DataPlaneError) as err:
                failed[i] = err
                timed.append(None)
                continue
            timed.append((out, time.perf_counter() - start))
        try:
            return _raise_failed(timed, failed)
        finally:  # no cycle through this frame: it holds the replies' segment views
            del failed


class TorchDistTransport(ChannelCalls):
    """Data-plane channels, one per calling thread, so several backbones can share a pool.

    A thread's channel opens on its first layer and again after it broke (a shard died or
    restarted): the failed layer raises, the next one reconnects. ``open_on_shard``, ``host``
    and ``locate`` default to the ``open_channel`` actor call, this node's cluster address and
    the shards whose actors run on this Ray node (asked at every opening: a restarted shard
    may have moved); tests give their own to run shards as threads without Ray. With
    ``same_node_shm=False`` every pair uses gloo.
    """

    def __init__(
        self,
        handles: Mapping[str, Any],
        timeout_s: float,
        open_on_shard: OpenOnShard | None = None,
        host: Callable[[], str] | None = None,
        locate: Callable[[], Collection[str]] | None = None,
        same_node_shm: bool = True,
    ) -> None:
        self.handles = dict(handles)
        self.timeout_s = timeout_s  # how long a layer may wait for a shard's answer
        self._open_on_shard = open_on_shard or self._open_over_ray
        self.host = host or ray.util.get_node_ip_address  # where this side listens
        self._locate = locate or self._same_node_over_ray
        self.same_node_shm = same_node_shm
        self._local = threading.local()
        self._channels: list[Channel] = []
        self._lock = threading.Lock()

    def _open_over_ray(self, shard_id: str, ticket: ChannelTicket, wait_s: float) -> None:
        ray.get(self.handles[shard_id].open_channel.remote(ticket, wait_s))

    def _same_node_over_ray(self) -> set[str]:
        here = ray.get_runtime_context().get_node_id()
        refs = {sid: handle.node_id.remote() for sid, handle in self.handles.items()}
        near = set()
        for sid, ref in refs.items():
            try:
                if ray.get(ref, timeout=self.timeout_s) == here:
                    near.add(sid)
            except ray.exceptions.RayError:  # dead or restarting: its pair is lost anyway
                continue
        return near

    def locate(self) -> Collection[str]:
        """The shards to reach over shared memory: those on this node (none if disabled)."""
        return self._locate() if self.same_node_shm else ()

    def same_node(self) -> Collection[str]:
        """The shards on this node, whatever the data plane (the dispatcher prefers them)."""
        return self._locate()

    def start_peer(self, wait_s: float) -> StartPeer:
        """Starts one shard's side of a channel (returns at once); the shard then waits up to
        ``wait_s`` for the backbone to join, and as long for each later message part."""
        return lambda shard_id, ticket: self._open_on_shard(shard_id, ticket, wait_s)

    def channel(self) -> Channel:
        """This thread's channel, opened (or reopened after a failure) on demand."""
        channel: Channel | None = getattr(self._local, "channel", None)
        if channel is not None and not channel.unusable:  # lost pairs: see ``reconnect``
            return channel
        if channel is not None:
            self._forget(channel)
        channel = Channel.open(
            list(self.handles),
            self.start_peer(self.timeout_s),
            self.host(),
            self.timeout_s,
            self.locate(),
        )
        self._local.channel = channel
        with self._lock:
            self._channels.append(channel)
        return channel

    def reconnect(self, shard_id: str, timeout_s: float = 5.0) -> bool:
        """Whether this thread's channel reaches ``shard_id``, joining a fresh pair to it if
        its pair was lost (a restarted shard); False while its actor does not answer within
        ``timeout_s`` (dead, or still restarting)."""
        channel = self.channel()
        if shard_id in channel.groups or shard_id in channel.links:
            return True
        try:
            if self._open_on_shard == self._open_over_ray:  # Ray actors: ask it first, briefly
                node = ray.get(self.handles[shard_id].node_id.remote(), timeout=timeout_s)
                here = ray.get_runtime_context().get_node_id()
                near: Collection[str] = {shard_id} if node == here and self.same_node_shm else ()
            else:
                near = self.locate()
            fresh = Channel.open(
                [shard_id], self.start_peer(self.timeout_s), self.host(), self.timeout_s, near
            )
        except (DataPlaneError, ray.exceptions.RayError) as err:
            channel.lost[shard_id] = str(err).splitlines()[0]
            return False
        channel.adopt(fresh)
        return True

    def _forget(self, channel: Channel) -> None:
        channel.close()
        with self._lock:
            if channel in self._channels:
                self._channels.remove(channel)

    def close(self) -> None:
        """Stop every channel opened here (the shards' threads end); no layer may be in flight."""
        with self._lock:
            channels, self._channels = self._channels, []
        for channel in channels:
            channel.close()
        self._local = threading.local()


class RayCallTransport:
    """One shard actor call per shard and layer, tensors as numpy arrays (see ``to_wire``)."""

    def __init__(self, handles: Mapping[str, Any], timeout_s: float) -> None:
        self.handles = dict(handles)
        self.timeout_s = timeout_s

    def send(self, call: ShardCall) -> tuple[str, Any]:
        inputs = (call.hidden, call.expert_ids, call.weights)
        args = [call.layer, *(to_wire(x.cpu()) for x in inputs)]
        if call.traceparent:
            args.append(call.traceparent)
        return call.shard_id, self.handles[call.shard_id].compute.remote(*args)

    def wait(self, pending: Sequence[Any]) -> list[torch.Tensor]:
        return [out for out, _ in self.wait_timed(pending)]

    def wait_timed(self, pending: Sequence[Any]) -> list[tuple[torch.Tensor, float]]:
        """The answers in order; a dead actor's call fails as soon as Ray knows it died."""
        start = time.perf_counter()
        shard_of = {ref: shard_id for shard_id, ref in pending}
        ready_at: dict[Any, float] = {}
        left = list(shard_of)
        while left:
            ready, left = ray.wait(left, num_returns=1, timeout=self.timeout_s)
            if not ready:
                break  # the rest are late: each fails with its own _get timeout below
            ready_at[ready[0]] = time.perf_counter() - start
        answers: list[tuple[torch.Tensor, float] | None] = []
        failed: dict[int, Exception] = {}
        for i, (sid, ref) in enumerate(pending):
            try:
                out = from_wire(self._get(sid, ref, 0.0 if ref not in ready_at else None))
            except (DataPlaneError, ray.exceptions.RayTaskError) as err:
                failed[i] = err
                answers.append(None)
                continue
            answers.append((out, ready_at.get(ref, time.perf_counter() - start)))
        return _raise_failed(answers, failed)

    def reconnect(self, shard_id: str, timeout_s: float = 5.0) -> bool:
        """Whether the shard's actor answers (a restarted one does once it has loaded)."""
        try:
            ray.get(self.handles[shard_id].node_id.remote(), timeout=timeout_s)
        except ray.exceptions.RayError:
            return False
        return True

    def _get(self, shard_id: str, ref: Any, timeout_s: float | None = None) -> Any:
        try:
            return ray.get(ref, timeout=self.timeout_s if timeout_s is None else timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            raise self._no_answer(shard_id) from err
        except ray.exceptions.RayActorError as err:
            raise DataPlaneError(
                f"expert shard {shard_id!r} died before answering over Ray actor calls "
                f"({str(err).splitlines()[0]}); it may be restarting"
            ) from err

    def _no_answer(self, shard_id: str) -> DataPlaneError:
        return DataPlaneError(
            f"expert shard {shard_id!r} gave no answer within {self.timeout_s:g}s over Ray "
            "actor calls; the shard may be stuck or overloaded"
        )

    def close(self) -> None:
        pass  # nothing stays open between calls


# (shard actor handles by shard id, a layer's timeout in seconds) -> a transport
TransportFactory = Callable[[Mapping[str, Any], float], PoolTransport]
TRANSPORTS: dict[str, TransportFactory] = {
    "torch_dist": TorchDistTransport,
    "gloo": lambda handles, timeout_s: TorchDistTransport(handles, timeout_s, same_node_shm=False),
    "ray": RayCallTransport,
}


def make_transport(name: str, handles: Mapping[str, Any], timeout_s: float) -> PoolTransport:
    """The transport registered as ``name``; an unknown name fails listing the known ones."""
    factory = TRANSPORTS.get(name)
    if factory is None:
        raise ValueError(f"unknown data plane {name!r}; known: {', '.join(sorted(TRANSPORTS))}")
    return factory(handles, timeout_s)
