"""The shard's side of data-plane channels: join a backbone's pair and serve its layers.

The protocol and its failure rules are written down in ``cluster.expert_parallel.data_plane``
(gloo pairs) and ``cluster.expert_parallel.shm_link`` (same-node pairs). Each channel is served
on a daemon thread of the shard's process, in a loop, until the backbone sends ``stop`` or goes
away.

Legend: N tokens sent to one shard, K' (expert, weight) pairs per token on it, H hidden.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from cluster.expert_parallel import shm_link, wire
from cluster.expert_parallel.wire import (
    HEADER_LEN,
    IDLE_WAIT,
    MAX_ERROR_BYTES,
    OP_STOP,
    STATUS_FAILED,
    STATUS_OK,
    ChannelTicket,
    Group,
    HandshakeError,
    PayloadLimits,
    PayloadRefused,
    answer_backbone,
    decode_trace,
    pair_group,
    payload_size,
    unpack,
)

logger = logging.getLogger("moe_cluster.data_plane")

# compute(layer, hidden [N, H], expert_ids [N, K'], weights [N, K'], traceparent) -> [N, H]
Compute = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, str], torch.Tensor]


def serve_channel(
    compute: Compute,
    ticket: ChannelTicket,
    bind_host: str,
    timeout_s: float,
    limits: PayloadLimits,
    name: str = "",
) -> threading.Thread:
    """Serve one backbone's channel on a daemon thread of this (shard) process.

    A same-node ticket's socket is bound before this returns (``shm_link``); a gloo pair joins
    the rendezvous on the thread.
    """
    prefix = ticket.prefix
    if ticket.same_node:
        args = (shm_link.listen(ticket), compute, ticket, timeout_s, limits, name)
        thread = threading.Thread(target=_serve_shm, args=args, name=f"shm-{prefix}", daemon=True)
        thread.start()
        return thread

    def serve() -> None:
        try:
            store = dist.TCPStore(
                ticket.store_host,
                ticket.store_port,
                is_master=False,
                timeout=timedelta(seconds=timeout_s),
            )
            group = pair_group(store, prefix, 1, bind_host, timeout_s)
        except Exception:
            logger.exception("shard %s: could not join data-plane channel %s", name, prefix)
            return
        try:
            answer_backbone(group, ticket.key, prefix, limits, timeout_s)
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


def _serve_shm(
    listener: socket.socket,
    compute: Compute,
    ticket: ChannelTicket,
    timeout_s: float,
    limits: PayloadLimits,
    name: str,
) -> None:
    try:
        shm_link.serve(listener, compute, ticket, limits, timeout_s, name)
    except HandshakeError as err:
        logger.warning("shard %s: refused data-plane channel %s: %s", name, ticket.prefix, err)
    except PayloadRefused as err:  # the segment was not read
        logger.error("shard %s: closed data-plane channel %s: %s", name, ticket.prefix, err)
    except OSError as err:  # no backbone came, or it went away: nothing left to serve
        logger.info("shard %s: channel %s closed (%s)", name, ticket.prefix, err)


def _serve_loop(group: Group, compute: Compute, limits: PayloadLimits, name: str) -> None:
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    while True:
        group.recv([header], 0, wire.TAG_HEADER).wait(IDLE_WAIT)  # a dead backbone closes it sooner
        fields = header.tolist()
        if fields[0] == OP_STOP:
            return
        op, _, n, h, k, dtype_index = fields[:6]
        limits.check(op, n, h, k, dtype_index)  # before anything is allocated for it
        payload = torch.empty(payload_size(fields), dtype=torch.uint8)
        group.recv([payload], 0, wire.TAG_PAYLOAD).wait()
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
        group.send([reply], 0, wire.TAG_REPLY).wait()
        if message:
            size = torch.tensor([len(message)], dtype=torch.int64)
            group.send([size], 0, wire.TAG_ERROR_LEN).wait()
            group.send(
                [torch.frombuffer(bytearray(message), dtype=torch.uint8)], 0, wire.TAG_ERROR
            ).wait()
