"""The expert data plane: torch.distributed point-to-point channels from a backbone to its shards.

Ray starts and places the shard actors and carries their control calls (load, drop, health); the
per-layer tensors go over ``torch.distributed`` instead, with no Ray task per layer (a 32-token
round trip to two no-op shards, backbone split and combine included: 4.0 ms over gloo pairs and
1.3 ms over same-node shared memory, against 12.4 ms for numpy over Ray actor calls; medians of
``bench/dispatch.py`` on a busy 2-core machine, load 5-7). A *channel* is
one calling thread's set of two-rank gloo process groups, one per shard (rank 0 the backbone,
rank 1 the shard). Pairs, not one world, so that several backbone replicas can share a pool and
no shard needs to know the others. A pair whose shard died (a closed socket or connection, a
silent peer) is dropped alone (``Channel.lose``): the other pairs keep serving, so the caller
can recompute the lost shard's share on other replicas in the same layer; a caller that can make
Ray calls joins a fresh pair to the restarted shard later (``Channel.adopt``).

Opening a channel has two halves (``Channel.open`` does both): the backbone's process hosts the
rendezvous store and hands every shard its ticket through Ray (``host_rendezvous``), and the
backbone's side joins each pair and checks it (``Channel.join``). They may run in different
processes on one node: a tier replica (a Ray worker) hosts the store and starts the shards'
sides, and its engine process, which makes no Ray call, joins with the tickets it was handed
(``cluster.expert_parallel.engine_experts``). The engine process cannot reopen a pair itself:
its replica hands it fresh pairs to a restarted shard (``JoinShards``).

Same node. A shard on the backbone's own Ray node (``host_rendezvous``'s ``same_node``, which
``TorchDistTransport.locate`` fills from the actors' node ids) gets a shared-memory pair instead
of gloo: tensors in a segment both map, a Unix socket as doorbell and as the sign of a dead
peer (``cluster.expert_parallel.shm_link`` writes down its protocol). The same ticket, key
handshake, limits, errors and timeouts apply; only the bytes take another road.

Per layer and shard, the backbone sends a fixed-size header (op, layer, sizes, dtype, the
dispatching span's trace context) and one packed byte payload (hidden, expert ids, gate
weights), and receives ``[N * H + 1]`` in the hidden dtype: the shard's output and a status
element (0 ok, 1 failed; a failure is followed by its message, at most ``MAX_ERROR_BYTES``).
A shard serves each channel on a thread of its own, in a loop, until the backbone sends
``stop`` or goes away (gloo then reports the closed connection). Gloo moves CPU tensors; on
GPU the shard copies to and from its device, as the Ray path does.

Exposure: everything listens on the node's cluster address, and each channel has a key that
both sides prove before any token moves (``rendezvous`` says what that stops and what not).

Sizes. A shard checks every header against its ``PayloadLimits`` (the model's hidden size,
pairs per token up to its number of experts, ``MAX_TOKENS_PER_DISPATCH`` tokens) before it
allocates anything, and closes a channel whose header breaks them: the payload was never
received, so the stream is out of step, and its peer misbehaves. The limits travel in the
handshake, so the backbone checks them before sending: an honest caller gets
``PayloadRefused`` naming the limit and keeps its channel.

Legend: N tokens sent to one shard, K' (expert, weight) pairs per token on it, H hidden.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cluster.expert_parallel import shm_link
from cluster.expert_parallel.channel_server import serve_channel
from cluster.expert_parallel.rendezvous import StartPeer, Tickets, host_rendezvous, tolerant
from cluster.expert_parallel.wire import (
    DTYPES,
    HEADER_LEN,
    MAX_ERROR_BYTES,
    OP_COMPUTE,
    STATUS_OK,
    TAG_ERROR,
    TAG_ERROR_LEN,
    TAG_HEADER,
    TAG_PAYLOAD,
    TAG_REPLY,
    ChannelTicket,
    DataPlaneError,
    Group,
    HandshakeError,
    PayloadLimits,
    PayloadRefused,
    ShardComputeError,
    greet_shard,
    pack,
    pair_group,
)

__all__ = [  # the wire's names that callers of the data plane use, importable from here too
    "Channel",
    "ChannelTicket",
    "DataPlaneError",
    "PayloadLimits",
    "PayloadRefused",
    "PendingReply",
    "ShardComputeError",
    "StartPeer",
    "Tickets",
    "host_rendezvous",
    "serve_channel",
    "tolerant",
]

logger = logging.getLogger("moe_cluster.data_plane")


# ----------------------------------------------------------------------------- backbone side


def _connect_shm(shard_id: str, ticket: ChannelTicket, timeout_s: float) -> shm_link.ShmLink:
    try:
        return shm_link.ShmLink.connect(ticket, shard_id, timeout_s)
    except (OSError, HandshakeError) as err:
        raise DataPlaneError(
            f"expert shard {shard_id!r} did not join the data plane over shared memory, or "
            f"failed its handshake ({type(err).__name__}: {err}); channel refused"
        ) from err


@dataclass
class PendingShm:
    """One shard's answer for one layer, in flight over a same-node pair."""

    channel: Channel
    reply: shm_link.ShmReply
    shard_id: str = ""

    def result(self) -> torch.Tensor:  # [N, H]
        try:
            return self.reply.result(self.channel.timeout_s)
        except DataPlaneError as err:
            self.channel.lose(self.shard_id, str(err))
            raise


@dataclass
class PendingReply:
    """One shard's answer for one layer, in flight."""

    channel: Channel
    shard_id: str
    layer: int
    shape: tuple[int, int]
    reply: torch.Tensor  # [N * H + 1]
    works: list[dist.Work]
    keep: tuple[torch.Tensor, ...]  # the sent buffers, alive until the sends complete

    def result(self) -> torch.Tensor:  # [N, H]
        timeout = timedelta(seconds=self.channel.timeout_s)
        try:
            for work in self.works:
                work.wait(timeout)
        except RuntimeError as err:
            cause = str(err).splitlines()[0]
            self.channel.lose(self.shard_id, cause)
            what = (  # a closed or reset connection fails at once: the process is gone
                f"gave no answer for layer {self.layer} within {self.channel.timeout_s:g}s"
                if "timed out" in cause.lower() or "timeout" in cause.lower()
                else f"lost its connection on layer {self.layer}"
            )
            raise DataPlaneError(
                f"expert shard {self.shard_id!r} {what} over the data plane ({cause}); the "
                "shard may have died or be restarting"
            ) from err
        if float(self.reply[-1]) != STATUS_OK:
            raise ShardComputeError(
                f"expert shard {self.shard_id!r} failed on layer {self.layer}: "
                f"{self.channel.error_message(self.shard_id)}"
            )
        return self.reply[:-1].view(self.shape)


class Channel:
    """One calling thread's pairs, one per shard (gloo groups, and same-node shared-memory
    links); not shared between threads.

    ``lost`` names the pairs dropped after their shard failed (shard id -> why); ``broken``
    says some pair was lost or the whole channel is unusable (``unusable``: its owner must
    open a fresh one).
    """

    def __init__(
        self,
        groups: Mapping[str, Group],
        store: dist.Store | None,
        timeout_s: float,
        limits: Mapping[str, PayloadLimits],
        links: Mapping[str, shm_link.ShmLink] | None = None,
    ):
        self.groups = dict(groups)
        self.links = dict(links or {})  # same-node pairs
        self.store = store  # the rendezvous; kept for the groups' lifetime
        self.timeout_s = timeout_s
        self.limits = dict(limits)  # what each shard accepts, from its handshake
        self.lost: dict[str, str] = {}  # pairs dropped after their shard failed: why
        self.unusable = False
        self._stores: list[dist.Store] = []  # rendezvous of adopted pairs

    @property
    def broken(self) -> bool:
        return self.unusable or bool(self.lost)

    @broken.setter
    def broken(self, value: bool) -> None:
        self.unusable = value

    def lose(self, shard_id: str, reason: str) -> None:
        """Drop one shard's pair (its shard died or its stream is out of step); the others
        keep serving. Sends to it fail at once until a fresh pair is adopted."""
        self.lost[shard_id] = reason
        self.groups.pop(shard_id, None)  # its gloo connection closes with the group
        link = self.links.pop(shard_id, None)
        if link is not None:
            link.close(stop=False)

    def adopt(self, other: Channel) -> None:
        """Take over ``other``'s pairs (fresh ones to restarted shards), replacing lost ones."""
        for sid in [*other.groups, *other.links]:
            self.lost.pop(sid, None)
        self.groups.update(other.groups)
        self.links.update(other.links)
        self.limits.update(other.limits)
        if other.store is not None:
            self._stores.append(other.store)
        other.groups, other.links = {}, {}

    @classmethod
    def open(
        cls,
        shard_ids: list[str],
        start_peer: StartPeer,
        host: str,
        timeout_s: float,
        same_node: Collection[str] = (),
    ) -> Channel:
        """Host a rendezvous store on ``host``, have every shard join, and check each pair.

        A shard that cannot be asked to join (its actor is dead or restarting: the Ray call
        fails at once) is left out, named in ``lost``; no shard at all is an error.
        """
        failed: dict[str, str] = {}
        store, tickets = host_rendezvous(
            shard_ids, tolerant(start_peer, failed), host, timeout_s, same_node
        )
        if len(failed) == len(shard_ids):
            raise DataPlaneError(f"no expert shard could be asked to join the data plane: {failed}")
        started = {sid: ticket for sid, ticket in tickets.items() if sid not in failed}
        channel = cls.join(started, host, timeout_s, store)
        channel.lost.update(failed)
        return channel

    @classmethod
    def join(
        cls, tickets: Tickets, host: str, timeout_s: float, store: dist.Store | None = None
    ) -> Channel:
        """The backbone's side of every pair in ``tickets``, checked by the key handshake.

        ``store`` is the rendezvous when this process hosts it; without it, the store that the
        tickets name is reached as a client (an engine process, whose replica hosts it).
        ``host`` is where this side's gloo devices listen: the node's cluster address.
        """
        over_gloo = [t for t in tickets.values() if not t.same_node]
        if store is None and over_gloo:
            store = dist.TCPStore(
                over_gloo[0].store_host,
                over_gloo[0].store_port,
                is_master=False,
                timeout=timedelta(seconds=timeout_s),
            )
        groups, limits, links = {}, {}, {}
        for sid, ticket in tickets.items():
            if ticket.same_node:
                links[sid] = _connect_shm(sid, ticket, timeout_s)
                limits[sid] = links[sid].limits
                continue
            assert store is not None
            try:
                groups[sid] = pair_group(store, ticket.prefix, 0, host, timeout_s)
            except RuntimeError as err:
                raise DataPlaneError(
                    f"expert shard {sid!r} did not join the data plane within {timeout_s:g}s "
                    f"({str(err).splitlines()[0]})"
                ) from err
            try:
                limits[sid] = greet_shard(groups[sid], ticket.key, ticket.prefix, timeout_s)
            except RuntimeError as err:  # HandshakeError, or gloo's timeout / closed pair
                raise DataPlaneError(
                    f"expert shard {sid!r} failed the data-plane handshake "
                    f"({str(err).splitlines()[0]}); channel refused"
                ) from err
        return cls(groups, store, timeout_s, limits, links)

    def send(
        self,
        shard_id: str,
        layer: int,
        hidden: torch.Tensor,  # [N, H]
        expert_ids: torch.Tensor,  # [N, K']
        weights: torch.Tensor,  # [N, K']
        traceparent: str = "",
    ) -> PendingReply | PendingShm:
        n, h = hidden.shape
        if shard_id not in self.groups and shard_id not in self.links:
            why = self.lost.get(shard_id, "it never joined")
            raise DataPlaneError(
                f"expert shard {shard_id!r} is not connected on this channel (its pair was "
                f"dropped: {why}); it may have died or be restarting"
            )
        try:  # the shard would close the channel on such a header: fail here, keep it
            dtype_index = DTYPES.index(hidden.dtype)
            self.limits[shard_id].check(OP_COMPUTE, n, h, expert_ids.shape[1], dtype_index)
        except ValueError as err:  # PayloadRefused, or a dtype the wire does not carry
            raise PayloadRefused(
                f"expert shard {shard_id!r} refuses layer {layer} of {n} tokens: {err}"
            ) from err
        if shard_id in self.links:
            try:
                sent = self.links[shard_id].send(layer, hidden, expert_ids, weights, traceparent)
            except OSError as err:
                self.lose(shard_id, str(err))
                raise DataPlaneError(
                    f"expert shard {shard_id!r} cannot be reached for layer {layer} over shared "
                    f"memory ({err}); the shard may have died or be restarting"
                ) from err
            return PendingShm(self, sent, shard_id)
        group = self.groups[shard_id]
        header, payload = pack(layer, hidden, expert_ids, weights, traceparent)
        reply = torch.empty(n * h + 1, dtype=hidden.dtype)
        try:  # a connection already known to be closed fails here rather than in wait
            works = [
                group.send([header], 1, TAG_HEADER),
                group.send([payload], 1, TAG_PAYLOAD),
                group.recv([reply], 1, TAG_REPLY),
            ]
        except RuntimeError as err:
            self.lose(shard_id, str(err).splitlines()[0])
            raise DataPlaneError(
                f"expert shard {shard_id!r} cannot be reached for layer {layer} over the data "
                f"plane ({str(err).splitlines()[0]}); the shard may have died or be restarting"
            ) from err
        return PendingReply(self, shard_id, layer, (n, h), reply, works, (header, payload))

    def error_message(self, shard_id: str) -> str:
        group = self.groups[shard_id]
        size = torch.empty(1, dtype=torch.int64)
        group.recv([size], 1, TAG_ERROR_LEN).wait()
        if not 0 <= int(size) <= MAX_ERROR_BYTES:
            # its message is still on the way: this pair's stream is out of step
            self.lose(shard_id, f"a {int(size)}-byte error message")
            raise DataPlaneError(
                f"expert shard {shard_id!r} announced a {int(size)}-byte error message "
                f"(at most {MAX_ERROR_BYTES}); channel dropped"
            )
        message = torch.empty(int(size), dtype=torch.uint8)
        group.recv([message], 1, TAG_ERROR).wait()
        return bytes(message.tolist()).decode(errors="replace")

    def close(self) -> None:
        """Tell every shard to stop serving this channel (best effort)."""
        stop = torch.zeros(HEADER_LEN, dtype=torch.int64)  # op OP_STOP
        for group in self.groups.values():
            if not self.unusable:  # lost pairs are out of ``groups`` already
                try:
                    group.send([stop], 1, TAG_HEADER).wait(timedelta(seconds=5))
                except RuntimeError as err:  # the shard is gone already: nothing to stop
                    logger.debug("data plane: stop not delivered to %s (%s)", group, err)
        for link in self.links.values():
            link.close(stop=not self.unusable)
        self.groups.clear()
        self.links.clear()
