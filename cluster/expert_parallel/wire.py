"""The data plane's wire: its constants, errors, tickets, payload limits, key handshake and framing.

The protocol itself (what travels, in which order, and what a failure means) is written down
in ``cluster.expert_parallel.data_plane``; this module holds its pieces that both sides share.

Legend: N tokens sent to one shard, K' (expert, weight) pairs per token on it, H hidden.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import secrets
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

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

Group = Any  # a dist.ProcessGroupGloo: torch's stubs omit its send / recv


class DataPlaneError(RuntimeError):
    """A channel broke (timeout, shard gone); a pool opens a fresh one on the next call."""


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
    same_node: bool = False  # the pair runs over shared memory (``shm_link``), not gloo


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


def pair_group(store: dist.Store, prefix: str, rank: int, host: str, timeout_s: float) -> Group:
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


class ByteLink(Protocol):
    """Whole messages both ways: a gloo pair (``GlooBytes``) or a same-node socket."""

    def send(self, data: bytes) -> None: ...

    def recv(self, size: int) -> bytes: ...


@dataclass(frozen=True)
class GlooBytes:
    group: Group
    peer: int
    wait: timedelta

    def send(self, data: bytes) -> None:
        send_bytes(self.group, data, self.peer, self.wait)

    def recv(self, size: int) -> bytes:
        return recv_bytes(self.group, size, self.peer, self.wait)


def send_bytes(group: Group, data: bytes, peer: int, wait: timedelta) -> None:
    group.send([torch.frombuffer(bytearray(data), dtype=torch.uint8)], peer, TAG_HELLO).wait(wait)


def recv_bytes(group: Group, size: int, peer: int, wait: timedelta) -> bytes:
    buffer = torch.empty(size, dtype=torch.uint8)
    group.recv([buffer], peer, TAG_HELLO).wait(wait)
    return buffer.numpy().tobytes()


def greet(link: ByteLink, key: bytes, prefix: str) -> PayloadLimits:
    """The backbone's half of the handshake: check the shard's proof, give ours, learn limits."""
    nonce = secrets.token_bytes(NONCE_LEN)
    link.send(nonce)
    reply = link.recv(NONCE_LEN + LIMITS.size + MAC_LEN)
    theirs, limits, proof = reply[:NONCE_LEN], reply[NONCE_LEN:-MAC_LEN], reply[-MAC_LEN:]
    if not hmac.compare_digest(proof, _mac(key, b"shard", prefix, nonce, theirs, limits)):
        raise HandshakeError("its proof of the channel key is wrong")
    link.send(_mac(key, b"backbone", prefix, nonce, theirs))
    return PayloadLimits(*LIMITS.unpack(limits))


def answer(link: ByteLink, key: bytes, prefix: str, limits: PayloadLimits) -> None:
    """The shard's half of the handshake; raises ``HandshakeError`` on a wrong proof."""
    theirs = link.recv(NONCE_LEN)
    nonce, packed = secrets.token_bytes(NONCE_LEN), limits.pack()
    link.send(nonce + packed + _mac(key, b"shard", prefix, theirs, nonce, packed))
    if not hmac.compare_digest(link.recv(MAC_LEN), _mac(key, b"backbone", prefix, theirs, nonce)):
        raise HandshakeError("the backbone's proof of the channel key is wrong")


def greet_shard(group: Group, key: bytes, prefix: str, timeout_s: float) -> PayloadLimits:
    """``greet`` over a gloo pair (the backbone is rank 0)."""
    return greet(GlooBytes(group, 1, timedelta(seconds=timeout_s)), key, prefix)


def answer_backbone(
    group: Group, key: bytes, prefix: str, limits: PayloadLimits, timeout_s: float
) -> None:
    """``answer`` over a gloo pair (the shard is rank 1)."""
    answer(GlooBytes(group, 0, timedelta(seconds=timeout_s)), key, prefix, limits)


# ----------------------------------------------------------------------------- wire format


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@functools.lru_cache(maxsize=256)
def encode_trace(traceparent: str) -> tuple[int, int, int, int]:
    """W3C ``00-<trace id>-<span id>-<flags>`` as four int64s (flags ``NO_TRACE`` if none).

    Cached: a layer sends the same traceparent to each of its shards.
    """
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return (0, 0, 0, NO_TRACE)
    trace_id, span_id, flags = parts[1], parts[2], parts[3]
    return (
        _signed(int(trace_id[:16], 16)),
        _signed(int(trace_id[16:], 16)),
        _signed(int(span_id, 16)),
        int(flags, 16),
    )


def decode_trace(fields: Sequence[int]) -> str:
    hi, lo, span, flags = fields
    if flags == NO_TRACE:
        return ""
    return (
        f"00-{hi & (2**64 - 1):016x}{lo & (2**64 - 1):016x}-{span & (2**64 - 1):016x}-{flags:02x}"
    )


def pack(
    layer: int,
    hidden: torch.Tensor,  # [N, H] on any device
    expert_ids: torch.Tensor,  # [N, K']
    weights: torch.Tensor,  # [N, K']
    traceparent: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # [HEADER_LEN] int64, [payload_size] uint8
    """The header and the payload bytes for one shard's tokens.

    Each input is copied once, straight into its place in the payload (to host memory from
    any device, converting ids to int64 and weights to fp32): no per-tensor host copy and
    no concatenation.
    """
    n, h = hidden.shape
    k = expert_ids.shape[1]
    fields = [OP_COMPUTE, layer, n, h, k, DTYPES.index(hidden.dtype), *encode_trace(traceparent)]
    payload = torch.empty(payload_size(fields), dtype=torch.uint8)
    for into, x in zip(unpack(fields, payload), (hidden, expert_ids, weights), strict=True):
        into.copy_(x)
    return torch.tensor(fields, dtype=torch.int64), payload


def unpack(
    header: Sequence[int], payload: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [N, H], [N, K'] int64, [N, K'] fp32
    """Views of a payload's hidden rows, expert ids and weights (the layout ``pack`` writes)."""
    _, _, n, h, k, dtype_index = header[:6]
    dtype = DTYPES[dtype_index]
    hidden_bytes = n * h * dtype.itemsize
    ids_bytes = n * k * 8
    hidden = payload[:hidden_bytes].view(dtype).view(n, h)  # [N, H]
    ids = payload[hidden_bytes : hidden_bytes + ids_bytes].view(torch.int64).view(n, k)
    weights = payload[hidden_bytes + ids_bytes :].view(torch.float32).view(n, k)  # [N, K']
    return hidden, ids, weights


def payload_size(header: Sequence[int]) -> int:
    _, _, n, h, k, dtype_index = header[:6]
    return n * h * DTYPES[dtype_index].itemsize + n * k * (8 + 4)
