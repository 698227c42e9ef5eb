"""Recipes for a store client, and the relay that lets an engine process reach the store.

An engine is built where it runs, from a picklable recipe (``EngineLaunch``), so the store
travels as a ``StoreFactory``: ``RayStoreFactory`` (shard actor handles: usable where Ray is,
an in-process engine in a Ray worker) or ``RelayStoreFactory`` (an engine process).

An engine process makes no Ray calls (it has no Ray worker). Its replica, a Ray worker, runs a
``StoreRelay``: a listener on a Unix socket in a private directory (mode 0700; nothing listens
on the network), with ``multiprocessing.connection``'s HMAC challenge on a fresh 32-byte key
that only the launch message carries. The child's ``RelayStore`` opens one connection per
thread (the fetch thread, the publisher) and sends::

    ("get", keys, timeout_s)  -> FetchResult   (the relay asks the shards through Ray)
    ("put", keys, blocks, pin_ttl_s) -> True   (after the shards took them, or put_timeout_s)

A reply not read within the timeout leaves the connection out of step: it is closed (a fresh
one opens next time) and the fetch is a miss. Blocks cross the socket pickled (one copy each
way), then the object store as with an in-process engine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, Protocol

import numpy as np

from cache.block_key import BlockKey
from cache.kv_store import MAX_KEYS_PER_CALL, BlockStore, FetchResult, check_keys
from cluster.kv_store.client import StoreClient, wait_puts
from cluster.kv_store.config import KVStoreConfig

_REPLY_GRACE_S = 0.1  # beyond the store's own timeout, for the relay's answer to arrive


class StoreFactory(Protocol):
    """A picklable recipe for a store client, built where the engine runs."""

    def build(self) -> BlockStore: ...


@dataclass(frozen=True)
class RayStoreFactory:
    """A ``StoreClient`` over shard actors (the caller must be a Ray worker or driver)."""

    handles: tuple[tuple[str, Any], ...]  # (shard id, actor handle)
    config: KVStoreConfig

    def build(self) -> StoreClient:
        from cluster.kv_store.shard_actor import RayShardCalls

        handles = dict(self.handles)
        c = self.config
        calls = RayShardCalls(handles)
        client = StoreClient(calls, list(handles), c.replication, c.virtual_nodes, c.retry_down_s)
        if c.membership_interval_s > 0:  # shards follow nodes that join or leave
            from cluster.kv_store.membership import ShardMembership

            client.membership = ShardMembership(client, calls, c)
        return client


@dataclass(frozen=True)
class LiveStoreFactory:
    """An already-built store in this process (in-process engines in tests and benchmarks)."""

    store: BlockStore

    def build(self) -> BlockStore:
        return self.store


@dataclass(frozen=True)
class RelayStoreFactory:
    """A ``RelayStore`` to the replica's relay; the key crosses only the launch socket."""

    address: str
    authkey: bytes
    put_timeout_s: float

    def build(self) -> RelayStore:
        return RelayStore(self.address, self.authkey, self.put_timeout_s)


class StoreRelay:
    """In the replica: serves an engine process's store calls through its own client."""

    def __init__(self, store: BlockStore, config: KVStoreConfig) -> None:
        self.store = store
        self.config = config
        self._dir = tempfile.mkdtemp(prefix="kv-relay-")  # mode 0700
        self.address = os.path.join(self._dir, "relay.sock")
        self._authkey = secrets.token_bytes(32)
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self._authkey)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="kv-relay", daemon=True)
        self._thread.start()

    @property
    def factory(self) -> RelayStoreFactory:
        return RelayStoreFactory(self.address, self._authkey, self.config.put_timeout_s)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except (OSError, AuthenticationError):  # closed, or a peer without the key
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    return
                try:
                    answer: FetchResult | bool | None = self._answer(message)
                except ValueError:  # a malformed call: refused (the child counts a miss)
                    answer = None
                conn.send(answer)

    def _answer(self, message: tuple[Any, ...]) -> FetchResult | bool:
        op = message[0]
        if op == "get":
            _, keys, timeout_s = message
            check_keys(keys)
            return self.store.get_many(keys, min(float(timeout_s), self.config.fetch_timeout_s))
        if op == "put":
            _, keys, blocks, pin_ttl_s = message
            check_keys(keys)
            return wait_puts(
                self.store.put_many(keys, blocks, pin_ttl_s), self.config.put_timeout_s
            )
        raise ValueError("unknown store relay operation")

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class RelayStore:
    """``BlockStore`` in an engine process, through its replica's ``StoreRelay``."""

    def __init__(self, address: str, authkey: bytes, put_timeout_s: float) -> None:
        self.address = address
        self._authkey = authkey
        self.put_timeout_s = put_timeout_s
        self._local = threading.local()

    def _conn(self) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = Client(self.address, family="AF_UNIX", authkey=self._authkey)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def _call(self, message: tuple[Any, ...], timeout_s: float) -> Any:
        try:
            conn = self._conn()
            conn.send(message)
            if conn.poll(timeout_s + _REPLY_GRACE_S):
                return conn.recv()
        except (OSError, EOFError):
            pass
        self._drop()  # late or broken: the next call opens a fresh connection
        return None

    def get_many(self, keys: Sequence[BlockKey], timeout_s: float) -> FetchResult:
        reply = self._call(("get", list(keys)[:MAX_KEYS_PER_CALL], timeout_s), timeout_s)
        return reply if isinstance(reply, FetchResult) else FetchResult(failed_shards=("relay",))

    def put_many(
        self, keys: Sequence[BlockKey], blocks: Sequence[np.ndarray], pin_ttl_s: float = 0.0
    ) -> list[Future[int]]:
        done: Future[int] = Future()
        ok = self._call(("put", list(keys), list(blocks), pin_ttl_s), self.put_timeout_s)
        if ok is True:
            done.set_result(len(keys))
        else:
            done.set_exception(ConnectionError("the store relay did not take the blocks"))
        return [done]
