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
element (0 ok, 1 failed; a failure is followed by its message, at most ``MAX_ERROR_BYTES``).
A shard serves each channel on a thread of its own, in a loop, until the backbone sends
``stop`` or goes away (gloo then reports the closed connection). Gloo moves CPU tensors; on
GPU the shard copies to and from its device, as the Ray path does.

Exposure. Everything listens on the node's cluster address (the one Ray uses), never on all
interfaces: the backbone's rendezvous ``TCPStore`` serves a socket bound here (torch's own
binds ``::``) and both gloo devices bind that address. Neither the store nor gloo
authenticates anyone, so each channel has a key: 32 random bytes the backbone draws and hands
to each shard in a ``ChannelTicket``, through the Ray control call that opens the channel. The
store keys sit under a 128-bit random channel id. Once a pair is up, and before any token
moves, each side proves it holds the key (``_greet_shard`` / ``_answer_backbone``): the
backbone sends a nonce; the shard answers with its nonce, its ``PayloadLimits`` and
HMAC-SHA256(key, "shard", prefix, both nonces, limits); the backbone answers with
HMAC-SHA256(key, "backbone", prefix, both nonces). A side that gets a wrong proof closes.

What that stops: a stranger who reaches the store or a gloo port (the ports are ephemeral but
findable by a scan) cannot find a rendezvous key, and one that wins the race for a pair gets
no hidden state from the backbone and no compute from the shard. What it does not stop: the
key is only as safe as Ray's control plane (anyone who can call the shard actors can open a
channel, or run code in them); after the handshake the bytes are neither encrypted nor signed,
so an attacker on the path can read and alter hidden states; and anyone can still connect,
hold sockets and slow the rendezvous (denial of service). Run nodes on a private network or
an encrypted overlay (WireGuard, IPsec), as Ray itself asks.

Sizes. A shard checks every header against its ``PayloadLimits`` (the model's hidden size,
pairs per token up to its number of experts, ``MAX_TOKENS_PER_DISPATCH`` tokens) before it
allocates anything, and closes a channel whose header breaks them: the payload was never
received, so the stream is out of step, and its peer misbehaves. The limits travel in the
handshake, so the backbone checks them before sending: an honest caller gets
``PayloadRefused`` naming the limit and keeps its channel.

Legend: N tokens sent to one shard, K' (expert, weight) pairs per token on it, H hidden.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("moe_cluster.data_plane")

OP_STOP, OP_COMPUTE = 0, 1
TAG_HEADER, TAG_PAYLOAD, TAG_REPLY, TAG_ERROR_LEN, TAG_ERROR, TAG_HELLO = range(6)
HEADER_LEN = 10  # op, layer, N, H, K', dtype, trace id hi, trace id lo, span id, flags
NO_TRACE = -1  # the flags field of a header without trace context
STATUS_OK, STATUS_FAILED = 0.0, 1.0
IDLE_WAIT = timedelta(days=30)  # how long a shard waits for a live backbone's next layer
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_TOKENS_PER_DISPATCH = 65536  # N per shard and layer: above any sane max_num_batched_tokens
MAX_ERROR_BYTES = 16384  # a shard's failure message is cut to this
KEY_LEN = NONCE_LEN = MAC_LEN = 32
LIMITS = struct.Struct("<3q")  # hidden size, max pairs, max tokens

# compute(layer, hidden [N, H], expert_ids [N, K'], weights [N, K'], traceparent) -> [N, H]
Compute = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, str], torch.Tensor]
Group = Any  # a dist.ProcessGroupGloo: torch's stubs omit its send / recv


class DataPlaneError(RuntimeError):
    """A channel broke (timeout, shard gone); the pool opens a fresh one on the next call."""


class HandshakeError(DataPlaneError):
    """The other side of a pair did not prove that it holds the channel key."""


class ShardComputeError(RuntimeError):
    """The shard received the tokens but its compute failed; the channel stays usable."""


class PayloadRefused(ValueError):
    """A header declares sizes beyond the shard's ``PayloadLimits`` (or no known op / dtype)."""


@dataclass(frozen=True)
class ChannelTicket:
    """What a shard needs to join one backbone's channel; it travels only by Ray control call."""

    store_host: str
    store_port: int
    prefix: str  # the pair's store keys: "<128-bit random channel id>/<shard id>"
    key: bytes = field(repr=False)  # the channel's secret: never logged, never on the data plane


# asks one shard to serve a channel
StartPeer = Callable[[str, ChannelTicket], None]


@dataclass(frozen=True)
class PayloadLimits:
    """The most one header may ask a shard to allocate; checked before any allocation."""

    hidden_size: int  # H of the shard's model: every header must carry exactly this
    max_pairs: int  # K' per token: at most the model's number of experts
    max_tokens: int = MAX_TOKENS_PER_DISPATCH

    def __post_init__(self) -> None:
        for name in ("hidden_size", "max_pairs", "max_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PayloadLimits.{name}={getattr(self, name)} must be > 0")

    @property
    def max_payload_bytes(self) -> int:
        return self.max_tokens * (self.hidden_size * 8 + self.max_pairs * (8 + 4))

    def check(self, op: int, n: int, h: int, k: int, dtype_index: int) -> None:
        """Raise ``PayloadRefused`` naming the broken limit."""
        if op != OP_COMPUTE:
            raise PayloadRefused(f"unknown op {op} in a header")
        if not 0 <= dtype_index < len(DTYPES):
            raise PayloadRefused(f"dtype index {dtype_index} is not one of 0..{len(DTYPES) - 1}")
        if h != self.hidden_size:
            raise PayloadRefused(f"hidden size {h} is not the model's {self.hidden_size}")
        if not 0 <= n <= self.max_tokens:
            raise PayloadRefused(f"{n} tokens is outside 0..{self.max_tokens} per dispatch")
        if not 0 <= k <= self.max_pairs:
            raise PayloadRefused(f"{k} pairs per token is outside 0..{self.max_pairs}")

    def pack(self) -> bytes:
        return LIMITS.pack(self.hidden_size, self.max_pairs, self.max_tokens)


def _group(store: dist.Store, prefix: str, rank: int, host: str, timeout_s: float) -> Group:
    """One side of a two-rank gloo group; blocks until the other side joins."""
    # the options object is private, but the public constructor binds to whatever the host
    # name resolves to, which need not be the Ray node's address
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = timedelta(seconds=timeout_s)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, 2, options)


def bind_store(host: str, timeout_s: float) -> dist.TCPStore:
    """A rendezvous store listening on ``host`` only, on a free port (``.port``)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    if ipaddress.ip_address(str(address[0]).split("%")[0]).is_unspecified:
        raise ValueError(
            f"data plane host {host!r} is every interface; give this node's cluster address"
        )
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(address)
        sock.listen(128)
        port = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    return dist.TCPStore(
        host,
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout_s),
        master_listen_fd=sock.detach(),  # the store owns (and closes) the socket from here
    )


# ----------------------------------------------------------------------------- handshake


def _mac(key: bytes, role: bytes, prefix: str, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join((role, prefix.encode(), *parts)), hashlib.sha256).digest()


def _send_bytes(group: Group, data: bytes, peer: int, wait: timedelta) -> None:
    group.send([torch.frombuffer(bytearray(data), dtype=torch.uint8)], peer, TAG_HELLO).wait(wait)


def _recv_bytes(group: Group, size: int, peer: int, wait: timedelta) -> bytes:
    buffer = torch.empty(size, dtype=torch.uint8)
    group.recv([buffer], peer, TAG_HELLO).wait(wait)
    return buffer.numpy().tobytes()


def _greet_shard(group: Group, key: bytes, prefix: str, timeout_s: float) -> PayloadLimits:
    """The backbone's half of the handshake: check the shard's proof, give ours, learn limits."""
    wait = timedelta(seconds=timeout_s)
    nonce = secrets.token_bytes(NONCE_LEN)
    _send_bytes(group, nonce, 1, wait)
    reply = _recv_bytes(group, NONCE_LEN + LIMITS.size + MAC_LEN, 1, wait)
    theirs, limits, proof = reply[:NONCE_LEN], reply[NONCE_LEN:-MAC_LEN], reply[-MAC_LEN:]
    if not hmac.compare_digest(proof, _mac(key, b"shard", prefix, nonce, theirs, limits)):
        raise HandshakeError("its proof of the channel key is wrong")
    _send_bytes(group, _mac(key, b"backbone", prefix, nonce, theirs), 1, wait)
    return PayloadLimits(*LIMITS.unpack(limits))


def _answer_backbone(
    group: Group, key: bytes, prefix: str, limits: PayloadLimits, timeout_s: float
) -> None:
    """The shard's half of the handshake; raises ``HandshakeError`` on a wrong proof."""
    wait = timedelta(seconds=timeout_s)
    theirs = _recv_bytes(group, NONCE_LEN, 0, wait)
    nonce, packed = secrets.token_bytes(NONCE_LEN), limits.pack()
    proof = _mac(key, b"shard", prefix, theirs, nonce, packed)
    _send_bytes(group, nonce + packed + proof, 0, wait)
    if not hmac.compare_digest(
        _recv_bytes(group, MAC_LEN, 0, wait), _mac(key, b"backbone", prefix, theirs, nonce)
    ):
        raise HandshakeError("the backbone's proof of the channel key is wrong")


# ----------------------------------------------------------------------------- wire format


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
    ticket: ChannelTicket,
    bind_host: str,
    timeout_s: float,
    limits: PayloadLimits,
    name: str = "",
) -> threading.Thread:
    """Serve one backbone's channel on a daemon thread of this (shard) process."""
    prefix = ticket.prefix

    def serve() -> None:
        try:
            store = dist.TCPStore(
                ticket.store_host,
                ticket.store_port,
                is_master=False,
                timeout=timedelta(seconds=timeout_s),
            )
            group = _group(store, prefix, 1, bind_host, timeout_s)
        except Exception:
            logger.exception("shard %s: could not join data-plane channel %s", name, prefix)
            return
        try:
            _answer_backbone(group, ticket.key, prefix, limits, timeout_s)
            _serve_loop(group, compute, limits, name)
        except HandshakeError as err:
            logger.warning("shard %s: refused data-plane channel %s: %s", name, prefix, err)
        except PayloadRefused as err:  # nothing was allocated; the stream is out of step
            logger.error("shard %s: closed data-plane channel %s: %s", name, prefix, err)
        except RuntimeError as err:  # the backbone went away, or closed: nothing left to serve
            logger.info("shard %s: channel %s closed (%s)", name, prefix, str(err).split("\n")[0])

    thread = threading.Thread(target=serve, name=f"data-plane-{prefix}", daemon=True)
    thread.start()
    return thread


def _serve_loop(group: Group, compute: Compute, limits: PayloadLimits, name: str) -> None:
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    while True:
        group.recv([header], 0, TAG_HEADER).wait(IDLE_WAIT)  # a dead backbone closes it sooner
        fields = header.tolist()
        if fields[0] == OP_STOP:
            return
        op, _, n, h, k, dtype_index = fields[:6]
        limits.check(op, n, h, k, dtype_index)  # before anything is allocated for it
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
            message = f"{type(err).__name__}: {err}".encode()[:MAX_ERROR_BYTES]
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

    def __init__(
        self,
        groups: Mapping[str, Group],
        store: dist.Store,
        timeout_s: float,
        limits: Mapping[str, PayloadLimits],
    ):
        self.groups = dict(groups)
        self.store = store  # the rendezvous; kept for the groups' lifetime
        self.timeout_s = timeout_s
        self.limits = dict(limits)  # what each shard accepts, from its handshake
        self.broken = False

    @classmethod
    def open(
        cls, shard_ids: list[str], start_peer: StartPeer, host: str, timeout_s: float
    ) -> Channel:
        """Host a rendezvous store on ``host``, have every shard join, and check each pair."""
        store = bind_store(host, timeout_s)
        channel_id, key = secrets.token_hex(16), secrets.token_bytes(KEY_LEN)
        tickets = {
            sid: ChannelTicket(host, store.port, f"{channel_id}/{sid}", key) for sid in shard_ids
        }
        for sid in shard_ids:
            start_peer(sid, tickets[sid])
        groups, limits = {}, {}
        for sid in shard_ids:
            prefix = tickets[sid].prefix
            try:
                groups[sid] = _group(store, prefix, 0, host, timeout_s)
            except RuntimeError as err:
                raise DataPlaneError(
                    f"expert shard {sid!r} did not join the data plane within {timeout_s:g}s "
                    f"({str(err).splitlines()[0]})"
                ) from err
            try:
                limits[sid] = _greet_shard(groups[sid], key, prefix, timeout_s)
            except RuntimeError as err:  # HandshakeError, or gloo's timeout / closed pair
                raise DataPlaneError(
                    f"expert shard {sid!r} failed the data-plane handshake "
                    f"({str(err).splitlines()[0]}); channel refused"
                ) from err
        return cls(groups, store, timeout_s, limits)

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
        n, h = hidden.shape
        try:  # the shard would close the channel on such a header: fail here, keep it
            dtype_index = DTYPES.index(hidden.dtype)
            self.limits[shard_id].check(OP_COMPUTE, n, h, expert_ids.shape[1], dtype_index)
        except ValueError as err:  # PayloadRefused, or a dtype the wire does not carry
            raise PayloadRefused(
                f"expert shard {shard_id!r} refuses layer {layer} of {n} tokens: {err}"
            ) from err
        header, payload = pack(layer, hidden, expert_ids, weights, traceparent)
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
        if not 0 <= int(size) <= MAX_ERROR_BYTES:
            self.broken = True  # its message is still on the way: the stream is out of step
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
            if not self.broken:
                try:
                    group.send([stop], 1, TAG_HEADER).wait(timedelta(seconds=5))
                except RuntimeError as err:  # the shard is gone already: nothing to stop
                    logger.debug("data plane: stop not delivered to %s (%s)", group, err)
        self.groups.clear()
