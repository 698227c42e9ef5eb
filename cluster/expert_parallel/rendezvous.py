"""A data-plane channel's rendezvous, hosted by the backbone's process: the store, the
tickets, and the shards' sides started through Ray (``host_rendezvous``).

Exposure. Everything listens on the node's cluster address (the one Ray uses), never on all
interfaces: the backbone's rendezvous ``TCPStore`` serves a socket bound here (torch's own
binds ``::``) and both gloo devices bind that address. Neither the store nor gloo
authenticates anyone, so each channel has a key: 32 random bytes the backbone draws and hands
to each shard in a ``ChannelTicket``, through the Ray control call that opens the channel. The
store keys sit under a 128-bit random channel id. Once a pair is up, and before any token
moves, each side proves it holds the key (``wire.greet_shard`` / ``wire.answer_backbone``): the
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
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection, Mapping

import torch.distributed as dist

from cluster.expert_parallel import shm_link
from cluster.expert_parallel.wire import KEY_LEN, ChannelTicket, bind_store

# asks one shard to serve a channel
StartPeer = Callable[[str, ChannelTicket], None]
Tickets = Mapping[str, ChannelTicket]  # shard id -> its ticket, for one channel


def tolerant(start_peer: StartPeer, failed: dict[str, str]) -> StartPeer:
    """``start_peer`` that records a shard it cannot ask (its actor is dead or restarting: the
    Ray call fails at once) in ``failed`` instead of raising; ``host_rendezvous`` then leaves
    that shard's ticket out, and the channel goes on without its pair."""

    def start(shard_id: str, ticket: ChannelTicket) -> None:
        try:
            start_peer(shard_id, ticket)
        except Exception as err:  # recorded: the pair is lost from the start
            failed[shard_id] = f"{type(err).__name__}: {str(err).splitlines()[0]}"

    return start


def host_rendezvous(
    shard_ids: list[str],
    start_peer: StartPeer,
    host: str,
    timeout_s: float,
    same_node: Collection[str] = (),
) -> tuple[dist.TCPStore | None, dict[str, ChannelTicket]]:
    """Host one channel's rendezvous store on ``host`` and start every shard's side of it.

    Each shard gets its ticket (store address, its pair's prefix under a fresh 128-bit channel
    id, the channel's fresh key) through ``start_peer``, a Ray control call. The store must
    stay alive until the backbone's side has joined (``Channel.join``); the shards then wait
    for that side for up to the ``timeout_s`` that ``start_peer`` gave them. Shards in
    ``same_node`` (on this node) get shared-memory pairs instead (``shm_link``), where the
    platform has them; the store is hosted only when some pair uses gloo (else ``None``).
    """
    shm = {sid for sid in shard_ids if sid in same_node and shm_link.AVAILABLE}
    store = bind_store(host, timeout_s) if set(shard_ids) - shm else None
    port = store.port if store is not None else 0
    channel_id, key = secrets.token_hex(16), secrets.token_bytes(KEY_LEN)
    tickets = {
        sid: ChannelTicket(host, port, f"{channel_id}/{sid}", key, sid in shm) for sid in shard_ids
    }
    for sid in shard_ids:
        start_peer(sid, tickets[sid])
    return store, tickets
