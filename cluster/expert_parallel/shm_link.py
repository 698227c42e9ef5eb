"""Same-node pairs of the data plane: tensors in shared memory, a Unix socket as the doorbell.

When a backbone and a shard run on one node (same Ray node id), their pair of a channel skips
gloo and TCP. The shard listens on an abstract Unix socket (``SOCK_SEQPACKET``: every message
arrives whole) whose name is an HMAC of the pair's prefix under the channel key, bound before
``open_channel`` returns. The backbone connects, checks the peer's uid (``SO_PEERCRED``), and
both run the same key handshake as over gloo (``wire.greet`` / ``wire.answer``), over the socket.

Memory. The backbone creates the segment with ``memfd_create`` (no name in ``/dev/shm``: nothing
to guess, list or unlink) and hands its descriptor to the shard over the authenticated socket
(``SCM_RIGHTS``), announced by an ``OP_SEGMENT`` header carrying its size, and sealed so that
neither side can shrink it under the other's reads. A segment holds one layer's request
(hidden, expert ids, gate weights, each 64-byte aligned) then its reply ([N, H] in the hidden
dtype); it is kept between layers and replaced by a larger one (powers of two, at least
``MIN_SEGMENT``) when a layer needs more. It is freed when both sides have closed
it: on ``close``, when either process dies, or on the next segment. The shard checks every
header against its ``PayloadLimits`` and the segment's real size before it touches the memory.

Per layer: the backbone copies each of its tensors once, straight into its place in the segment
(from any device: an explicit copy to host memory; nothing is packed first), sends the 10-int64
header, and waits for a status message (``STATUS``: 0 ok, 1 failed, followed by the message);
the shard reads its inputs in place and writes its answer into the reply area. Both sides keep
the views of each layer shape they have seen in the current segment (a shape's sizes are
checked against the limits once, when its views are made; the op on every header), so a layer
costs a few copies and two small socket messages, with no allocation but the answer's copy.
Each wait is bounded by the layer timeout; a dead shard closes its socket, so the wait ends at
once with ``DataPlaneError`` naming it, never a hang.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import hmac
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cluster.expert_parallel.wire import (
    DTYPES,
    HEADER_LEN,
    MAX_ERROR_BYTES,
    OP_COMPUTE,
    OP_STOP,
    ChannelTicket,
    DataPlaneError,
    HandshakeError,
    PayloadLimits,
    PayloadRefused,
    ShardComputeError,
    answer,
    decode_trace,
    encode_trace,
    greet,
)

logger = logging.getLogger("moe_cluster.data_plane")

AVAILABLE = hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")  # Linux
OP_SEGMENT = 2  # a header whose third field is the size of the segment sent with it
HEADER = struct.Struct(f"<{HEADER_LEN}q")
STATUS = struct.Struct("<qq")  # 0 ok / 1 failed, bytes of the message that follows
STATUS_OK_MESSAGE = STATUS.pack(0, 0)
MIN_SEGMENT = 1 << 20
ALIGN = 64
MAX_LAYOUTS = 256  # per segment and side: (N, K', dtype) shapes whose views are kept

# compute(layer, hidden [N, H], expert_ids [N, K'], weights [N, K'], traceparent) -> [N, H]
Compute = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, str], torch.Tensor]


def address(ticket: ChannelTicket) -> bytes:
    """The pair's abstract socket name: reveals nothing of the prefix or the key."""
    digest = hmac.new(ticket.key, ticket.prefix.encode(), hashlib.sha256).hexdigest()[:32]
    return b"\0moe-data-plane/" + digest.encode()


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


@dataclass(frozen=True)
class Layout:
    """Byte offsets of one layer's parts in a segment."""

    n: int
    h: int
    k: int
    dtype: torch.dtype

    @property
    def ids_at(self) -> int:
        return _aligned(self.n * self.h * self.dtype.itemsize)

    @property
    def weights_at(self) -> int:
        return self.ids_at + _aligned(self.n * self.k * 8)

    @property
    def reply_at(self) -> int:
        return self.weights_at + _aligned(self.n * self.k * 4)

    @property
    def end(self) -> int:
        return self.reply_at + self.n * self.h * self.dtype.itemsize

    def views(self, segment: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """hidden [N, H], ids [N, K'], weights [N, K'] and reply [N, H], in ``segment``."""
        n, h, k, size = self.n, self.h, self.k, self.n * self.h * self.dtype.itemsize
        return (
            segment[:size].view(self.dtype).view(n, h),
            segment[self.ids_at : self.ids_at + n * k * 8].view(torch.int64).view(n, k),
            segment[self.weights_at : self.weights_at + n * k * 4].view(torch.float32).view(n, k),
            segment[self.reply_at : self.end].view(self.dtype).view(n, h),
        )


@dataclass(frozen=True)
class SocketBytes:
    """The handshake's messages over a ``SOCK_SEQPACKET`` socket."""

    sock: socket.socket

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def recv(self, size: int) -> bytes:
        data = self.sock.recv(size)
        if len(data) != size:
            raise HandshakeError(f"the peer closed or sent {len(data)} bytes, not {size}")
        return data


def _map(fd: int) -> torch.Tensor:
    """Map a segment the peer sent, sealed against shrinking (which would fault our reads)."""
    try:
        if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            raise PayloadRefused("a segment that is not sealed against shrinking")
        size = os.fstat(fd).st_size
        if size <= 0:
            raise PayloadRefused("an empty segment")
        return torch.frombuffer(mmap.mmap(fd, size), dtype=torch.uint8)
    finally:
        os.close(fd)  # the mapping keeps the memory


# ----------------------------------------------------------------------------- shard side


def listen(ticket: ChannelTicket) -> socket.socket:
    """Bind the pair's socket now, so the backbone can connect once ``open_channel`` returned."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.bind(address(ticket))
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


def serve(
    listener: socket.socket,
    compute: Compute,
    ticket: ChannelTicket,
    limits: PayloadLimits,
    timeout_s: float,
    name: str,
) -> None:
    """Accept the backbone (one connection), check its key, serve its layers until it leaves."""
    try:
        listener.settimeout(timeout_s)
        sock, _ = listener.accept()
    finally:
        listener.close()
    with sock:
        sock.settimeout(timeout_s)
        answer(SocketBytes(sock), ticket.key, ticket.prefix, limits)
        sock.settimeout(None)  # a live backbone's next layer may be far off; a dead one closes
        _serve_loop(sock, compute, limits, name)


def _serve_loop(sock: socket.socket, compute: Compute, limits: PayloadLimits, name: str) -> None:
    segment = torch.empty(0, dtype=torch.uint8)
    views: dict[tuple[int, int, int, int], tuple[torch.Tensor, ...]] = {}  # this segment's
    ancillary = socket.CMSG_LEN(struct.calcsize("i"))  # room for one descriptor
    while True:
        message, ancdata, flags, _ = sock.recvmsg(HEADER.size, ancillary)
        fds = _descriptors(ancdata)
        if not message:
            return  # the backbone went away
        if len(message) != HEADER.size or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            raise PayloadRefused(f"a {len(message)}-byte header (expected {HEADER.size})")
        fields = HEADER.unpack(message)
        if fields[0] == OP_SEGMENT and len(fds) == 1:
            segment, views = _map(fds[0]), {}
            continue
        for fd in fds:
            os.close(fd)
        if fields[0] == OP_STOP:
            return
        op, layer, n, h, k, dtype_index = fields[:6]
        shape = (n, h, k, dtype_index)
        parts = views.get(shape)
        if parts is None:
            limits.check(op, n, h, k, dtype_index)  # before the segment is read
            layout = Layout(n, h, k, DTYPES[dtype_index])
            if layout.end > segment.numel():
                raise PayloadRefused(
                    f"layer {layer} needs {layout.end} bytes of a {segment.numel()}"
                )
            if len(views) >= MAX_LAYOUTS:
                views.clear()
            parts = views[shape] = layout.views(segment)
        elif op != OP_COMPUTE:  # the sizes passed the check when cached: only the op is new
            limits.check(op, n, h, k, dtype_index)
        hidden, ids, weights, reply = parts
        try:
            out = compute(layer, hidden, ids, weights, decode_trace(fields[6:10]))  # [N, H]
            reply.copy_(out.reshape(n, h))
            sock.send(STATUS_OK_MESSAGE)
        except Exception as err:  # reported to the caller, who raises it with the shard's name
            logger.exception("shard %s: compute failed on layer %d", name, layer)
            text = f"{type(err).__name__}: {err}".encode()[:MAX_ERROR_BYTES]
            sock.send(STATUS.pack(1, len(text)) + text)


def _descriptors(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The file descriptors passed with a message (``SCM_RIGHTS``)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return list(fds)


# ----------------------------------------------------------------------------- backbone side


class ShmLink:
    """The backbone's side of one same-node pair; used by one thread at a time."""

    def __init__(self, sock: socket.socket, shard_id: str, limits: PayloadLimits) -> None:
        self.sock = sock
        self.shard_id = shard_id
        self.limits = limits
        self.segment = torch.empty(0, dtype=torch.uint8)
        # (N, H, K', dtype) -> the views of a layer of that shape in this segment
        self._views: dict[tuple[int, int, int, torch.dtype], tuple[torch.Tensor, ...]] = {}

    @classmethod
    def connect(cls, ticket: ChannelTicket, shard_id: str, timeout_s: float) -> ShmLink:
        """Reach the shard's socket, check it runs as our user, and run the key handshake."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(timeout_s)
            sock.connect(address(ticket))
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            uid = struct.unpack("3i", creds)[1]
            if uid != os.getuid():
                raise HandshakeError(f"its socket belongs to uid {uid}, not ours ({os.getuid()})")
            limits = greet(SocketBytes(sock), ticket.key, ticket.prefix)
        except BaseException:
            sock.close()
            raise
        return cls(sock, shard_id, limits)

    def _room(self, size: int) -> None:
        """Give the shard a larger segment when this layer does not fit."""
        if size <= self.segment.numel():
            return
        capacity = max(MIN_SEGMENT, 1 << (size - 1).bit_length())
        fd = os.memfd_create("moe-data-plane", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, capacity)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            segment = torch.frombuffer(mmap.mmap(fd, capacity), dtype=torch.uint8)
            announce = HEADER.pack(OP_SEGMENT, 0, capacity, *[0] * (HEADER_LEN - 3))
            socket.send_fds(self.sock, [announce], [fd])
            self.segment, self._views = segment, {}  # only once the shard has it too
        finally:
            os.close(fd)

    def views(
        self, n: int, h: int, k: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, ...]:  # hidden [N, H], ids [N, K'], weights [N, K'], reply [N, H]
        """Where a layer of this shape goes in the segment (grown first when it does not fit).

        Kept per shape: a decode step's layers, and the next steps', reuse them.
        """
        key = (n, h, k, dtype)
        views = self._views.get(key)
        if views is None:
            layout = Layout(n, h, k, dtype)
            self._room(layout.end)
            if len(self._views) >= MAX_LAYOUTS:
                self._views.clear()
            views = self._views[key] = layout.views(self.segment)
        return views

    def send(
        self,
        layer: int,
        hidden: torch.Tensor,  # [N, H]
        expert_ids: torch.Tensor,  # [N, K']
        weights: torch.Tensor,  # [N, K']
        traceparent: str,
    ) -> ShmReply:
        """Write the layer into the segment and ring; raises ``OSError`` if the shard is gone.

        Each input is copied once, straight into its place in the segment (to host memory
        from any device): nothing is packed first.
        """
        n, h = hidden.shape
        k = expert_ids.shape[1]
        into_hidden, into_ids, into_weights, reply = self.views(n, h, k, hidden.dtype)
        into_hidden.copy_(hidden)
        into_ids.copy_(expert_ids)
        into_weights.copy_(weights)
        header = HEADER.pack(
            OP_COMPUTE, layer, n, h, k, DTYPES.index(hidden.dtype), *encode_trace(traceparent)
        )
        self.sock.send(header)
        return ShmReply(self, layer, reply)

    def close(self, stop: bool) -> None:
        """Close the socket (the shard's loop ends) and release this side's segment."""
        if stop:
            try:
                self.sock.send(HEADER.pack(*[OP_STOP] * HEADER_LEN))
            except OSError as err:  # the shard is gone already: nothing to stop
                logger.debug("data plane: stop not delivered to %s (%s)", self.shard_id, err)
        self.sock.close()
        self.segment, self._views = torch.empty(0, dtype=torch.uint8), {}


@dataclass
class ShmReply:
    """One shard's answer for one layer, in flight over a same-node pair."""

    link: ShmLink
    layer: int
    reply: torch.Tensor  # [N, H], a view of the segment

    def result(self, timeout_s: float) -> torch.Tensor:  # [N, H], a copy in host memory
        sock = self.link.sock
        try:
            if sock.gettimeout() != timeout_s:
                sock.settimeout(timeout_s)
            message = sock.recv(STATUS.size + MAX_ERROR_BYTES)
        except TimeoutError as err:
            raise DataPlaneError(
                f"expert shard {self.link.shard_id!r} gave no answer for layer {self.layer} "
                f"within {timeout_s:g}s over shared memory; the shard may be stuck, or have died"
            ) from err
        except OSError as err:  # a reset connection: the shard's process is gone
            raise DataPlaneError(f"{self._gone()} ({type(err).__name__})") from err
        if message == STATUS_OK_MESSAGE:
            return self.reply.clone()
        if len(message) < STATUS.size:
            raise DataPlaneError(self._gone())
        status, _ = STATUS.unpack(message[: STATUS.size])
        if status != 0:
            raise ShardComputeError(
                f"expert shard {self.link.shard_id!r} failed on layer {self.layer}: "
                f"{message[STATUS.size :].decode(errors='replace')}"
            )
        return self.reply.clone()

    def _gone(self) -> str:
        return (
            f"expert shard {self.link.shard_id!r} closed its data-plane socket before answering "
            f"layer {self.layer}: the shard died or is restarting"
        )
