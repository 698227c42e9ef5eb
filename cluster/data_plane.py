"""The expert data plane: torch.distributed point-to-point channels from a backbone to its shards.

Ray starts and places the shard actors and carries their control calls (load, drop, health);
the per-layer tensors go over ``torch.distributed`` instead, with no Ray task per layer (a
32-token round trip to two shards: ~1.4 ms against ~13 ms for numpy over Ray actor calls,
``bench/data_plane.py``). A *channel* is one calling thread's set of two-rank gloo process
groups, one per shard (rank 0 the backbone, rank 1 the shard). Pairs, not one world, so that
several backbone replicas can share a pool and no shard needs to know the others; a broken
channel (a shard died) is dropped whole and reopened on the next layer.

Per layer and shard, the backbone sends a fixed-size header (op, layer, sizes, dtype, the
dispatching span's trace context) and one packed byte payload (hidden, expert ids, gate
weights), and receives ``[N * H + 1]`` in the hidden dtype: the shard's output and a status
element (0 ok, 1 failed; a failure is followed by its message). A shard serves each channel
on a thread of its own, in a loop, until the backbone sends ``stop`` or goes away (gloo then
reports the closed connection). Gloo moves CPU tensors; on GPU the shard copies to and from
its device, as the Ray path does.

Legend: N tokens sent to one shard, K' (expert, weight) pairs per token on it, H hidden.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("moe_cluster.data_plane")

OP_STOP, OP_COMPUTE = 0, 1
TAG_HEADER, TAG_PAYLOAD, TAG_REPLY, TAG_ERROR_LEN, TAG_ERROR = range(5)
HEADER_LEN = 10  # op, layer, N, H, K', dtype, trace id hi, trace id lo, span id, flags
NO_TRACE = -1  # the flags field of a header without trace context
STATUS_OK, STATUS_FAILED = 0.0, 1.0
IDLE_WAIT = timedelta(days=30)  # how long a shard waits for a live backbone's next layer
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# compute(layer, hidden [N, H], expert_ids [N, K'], weights [N, K'], traceparent) -> [N, H]
Compute = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, str], torch.Tensor]
# asks one shard to serve a channel: (shard id, store host, store port, prefix) -> None
StartPeer = Callable[[str, str, int, str], None]
Group = Any  # a dist.ProcessGroupGloo: torch's stubs omit its send / recv


class DataPlaneError(RuntimeError):
    """A channel broke (timeout, shard gone); the pool opens a fresh one on the next call."""


class ShardComputeError(RuntimeError):
    """The shard received the tokens but its compute failed; the channel stays usable."""


def _group(store: dist.Store, prefix: str, rank: int, host: str, timeout_s: float) -> Group:
    """One side of a two-rank gloo group; blocks until the other side joins."""
    # the options object is private, but the public constructor binds to whatever the host
    # name resolves to, which need not be the Ray node's address
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = timedelta(seconds=timeout_s)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, 2, options)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def encode_trace(traceparent: str) -> list[int]:
    """W3C ``00-<trace id>-<span id>-<flags>`` as four int64s (flags ``NO_TRACE`` if none)."""
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return [0, 0, 0, NO_TRACE]
    trace_id, span_id, flags = parts[1], parts[2], parts[3]
    return [
        _signed(int(trace_id[:16], 16)),
        _signed(int(trace_id[16:], 16)),
        _signed(int(span_id, 16)),
        int(flags, 16),
    ]


def decode_trace(fields: list[int]) -> str:
    hi, lo, span, flags = fields
    if flags == NO_TRACE:
        return ""
    return (
        f"00-{hi & (2**64 - 1):016x}{lo & (2**64 - 1):016x}-{span & (2**64 - 1):016x}-{flags:02x}"
    )


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1).view(torch.uint8)


def pack(
    layer: int,
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    traceparent: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The header ``[HEADER_LEN]`` int64 and the payload bytes for one shard's tokens."""
    n, h = hidden.shape
    k = expert_ids.shape[1]
    header = torch.tensor(
        [OP_COMPUTE, layer, n, h, k, DTYPES.index(hidden.dtype), *encode_trace(traceparent)],
        dtype=torch.int64,
    )
    ids = expert_ids.to(torch.int64)  # [N, K']
    gate = weights.to(torch.float32)  # [N, K']
    return header, torch.cat([_bytes(hidden.cpu()), _bytes(ids.cpu()), _bytes(gate.cpu())])


def unpack(
    header: list[int], payload: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, _, n, h, k, dtype_index = header[:6]
    dtype = DTYPES[dtype_index]
    hidden_bytes = n * h * dtype.itemsize
    ids_bytes = n * k * 8
    hidden = payload[:hidden_bytes].view(dtype).view(n, h)  # [N, H]
    ids = payload[hidden_bytes : hidden_bytes + ids_bytes].view(torch.int64).view(n, k)
    weights = payload[hidden_bytes + ids_bytes :].view(torch.float32).view(n, k)  # [N, K']
    return hidden, ids, weights


def payload_size(header: list[int]) -> int:
    _, _, n, h, k, dtype_index = header[:6]
    return n * h * DTYPES[dtype_index].itemsize + n * k * (8 + 4)


# ----------------------------------------------------------------------------- shard side


def serve_channel(
    compute: Compute,
    store_host: str,
    store_port: int,
    prefix: str,
    bind_host: str,
    timeout_s: float,
    name: str = "",
) -> threading.Thread:
    """Serve one backbone's channel on a daemon thread of this (shard) process."""

    def serve() -> None:
        try:
            store = dist.TCPStore(
                store_host, store_port, is_master=False, timeout=timedelta(seconds=timeout_s)
            )
            group = _group(store, prefix, 1, bind_host, timeout_s)
        except Exception:
            logger.exception("shard %s: could not join data-plane channel %s", name, prefix)
            return
        try:
            _serve_loop(group, compute, name)
        except RuntimeError as err:  # the backbone went away, or closed: nothing left to serve
            logger.info("shard %s: channel %s closed (%s)", name, prefix, str(err).split("\n")[0])

    thread = threading.Thread(target=serve, name=f"data-plane-{prefix}", daemon=True)
    thread.start()
    return thread


def _serve_loop(group: Group, compute: Compute, name: str) -> None:
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    while True:
        group.recv([header], 0, TAG_HEADER).wait(IDLE_WAIT)  # a dead backbone closes it sooner
        fields = header.tolist()
        if fields[0] == OP_STOP:
            return
        payload = torch.empty(payload_size(fields), dtype=torch.uint8)
        group.recv([payload], 0, TAG_PAYLOAD).wait()
        hidden, ids, weights = unpack(fields, payload)
        n, h = hidden.shape
        reply = torch.empty(n * h + 1, dtype=hidden.dtype)  # [N * H + 1]
        message = b""
        try:
            out = compute(fields[1], hidden, ids, weights, decode_trace(fields[6:10]))  # [N, H]
            reply[:-1] = out.reshape(-1)
            reply[-1] = STATUS_OK
        except Exception as err:  # reported to the caller, who raises it with the shard's name
            logger.exception("shard %s: compute failed on layer %d", name, fields[1])
            reply[-1] = STATUS_FAILED
            message = f"{type(err).__name__}: {err}".encode()
        group.send([reply], 0, TAG_REPLY).wait()
        if message:
            group.send([torch.tensor([len(message)], dtype=torch.int64)], 0, TAG_ERROR_LEN).wait()
            group.send(
                [torch.frombuffer(bytearray(message), dtype=torch.uint8)], 0, TAG_ERROR
            ).wait()


# ----------------------------------------------------------------------------- backbone side


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
            self.channel.broken = True
            raise DataPlaneError(
                f"expert shard {self.shard_id!r} gave no answer for layer {self.layer} "
                f"within {self.channel.timeout_s:g}s over the data plane "
                f"({str(err).splitlines()[0]}); the shard may have died or be restarting"
            ) from err
        if float(self.reply[-1]) != STATUS_OK:
            raise ShardComputeError(
                f"expert shard {self.shard_id!r} failed on layer {self.layer}: "
                f"{self.channel.error_message(self.shard_id)}"
            )
        return self.reply[:-1].view(self.shape)


class Channel:
    """One calling thread's two-rank groups, one per shard; not shared between threads."""

    def __init__(self, groups: Mapping[str, Group], store: dist.Store, timeout_s: float):
        self.groups = dict(groups)
        self.store = store  # the rendezvous; kept for the groups' lifetime
        self.timeout_s = timeout_s
        self.broken = False

    @classmethod
    def open(
        cls, shard_ids: list[str], start_peer: StartPeer, host: str, timeout_s: float
    ) -> Channel:
        """Host a rendezvous store, have every shard join, and join each pair's group."""
        store = dist.TCPStore(
            host,
            0,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=timeout_s),
        )
        channel_id = uuid.uuid4().hex[:12]
        prefixes = {sid: f"{channel_id}/{sid}" for sid in shard_ids}
        for sid in shard_ids:
            start_peer(sid, host, store.port, prefixes[sid])
        groups = {}
        for sid in shard_ids:
            try:
                groups[sid] = _group(store, prefixes[sid], 0, host, timeout_s)
            except RuntimeError as err:
                raise DataPlaneError(
                    f"expert shard {sid!r} did not join the data plane within {timeout_s:g}s "
                    f"({str(err).splitlines()[0]})"
                ) from err
        return cls(groups, store, timeout_s)

    def send(
        self,
        shard_id: str,
        layer: int,
        hidden: torch.Tensor,  # [N, H]
        expert_ids: torch.Tensor,  # [N, K']
        weights: torch.Tensor,  # [N, K']
        traceparent: str = "",
    ) -> PendingReply:
        group = self.groups[shard_id]
        header, payload = pack(layer, hidden, expert_ids, weights, traceparent)
        n, h = hidden.shape
        reply = torch.empty(n * h + 1, dtype=hidden.dtype)
        try:  # a connection already known to be closed fails here rather than in wait
            works = [
                group.send([header], 1, TAG_HEADER),
                group.send([payload], 1, TAG_PAYLOAD),
                group.recv([reply], 1, TAG_REPLY),
            ]
        except RuntimeError as err:
            self.broken = True
            raise DataPlaneError(
                f"expert shard {shard_id!r} cannot be reached for layer {layer} over the data "
                f"plane ({str(err).splitlines()[0]}); the shard may have died or be restarting"
            ) from err
        return PendingReply(self, shard_id, layer, (n, h), reply, works, (header, payload))

    def error_message(self, shard_id: str) -> str:
        group = self.groups[shard_id]
        size = torch.empty(1, dtype=torch.int64)
        group.recv([size], 1, TAG_ERROR_LEN).wait()
        message = torch.empty(int(size), dtype=torch.uint8)
        group.recv([message], 1, TAG_ERROR).wait()
        return bytes(message.tolist()).decode(errors="replace")

    def close(self) -> None:
        """Tell every shard to stop serving this channel (best effort)."""
        stop = torch.zeros(HEADER_LEN, dtype=torch.int64)  # op OP_STOP
        for group in self.groups.values():
            if not self.broken:
                try:
                    group.send([stop], 1, TAG_HEADER).wait(timedelta(seconds=5))
                except RuntimeError as err:  # the shard is gone already: nothing to stop
                    logger.debug("data plane: stop not delivered to %s (%s)", group, err)
        self.groups.clear()
