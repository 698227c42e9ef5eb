"""Same-node data-plane pairs (shared memory + a Unix socket doorbell), without Ray."""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from cluster.expert_parallel import data_plane as dp
from cluster.expert_parallel import shm_link, wire
from cluster.expert_parallel.transports import ChannelCalls, ShardCall
from tests.unit.test_data_plane import LIMITS, Peers, _inputs, check_round_trip, fake_compute

pytestmark = pytest.mark.skipif(not shm_link.AVAILABLE, reason="needs Linux memfd")
HOST = "127.0.0.1"
TIMEOUT_S = 20.0


def _open(shards: list[str], start: dp.StartPeer) -> dp.Channel:
    return dp.Channel.open(shards, start, HOST, TIMEOUT_S, same_node=shards)


@pytest.fixture
def channel() -> Iterator[tuple[dp.Channel, Peers]]:
    peers = Peers()
    chan = _open(["a", "b"], peers.start)
    yield chan, peers
    chan.close()


def _memfds() -> int:
    """This process's memory-mapped shared-memory segments."""
    with open("/proc/self/maps") as maps:
        return sum("memfd:moe-data-plane" in line for line in maps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 33, 0, 64])
def test_round_trip_is_exact(
    channel: tuple[dp.Channel, Peers], num_tokens: int, dtype: torch.dtype
) -> None:
    chan, _ = channel
    assert chan.store is None and set(chan.links) == {"a", "b"} and not chan.groups
    for n in (3, num_tokens):
        check_round_trip(chan, n, dtype)
    assert chan.limits == {"a": LIMITS, "b": LIMITS}


def test_a_layer_too_large_for_the_segment_gets_a_larger_one() -> None:
    big = dp.PayloadLimits(hidden_size=64, max_pairs=8, max_tokens=20000)

    def start(shard_id: str, ticket: dp.ChannelTicket) -> None:
        dp.serve_channel(fake_compute, ticket, HOST, TIMEOUT_S, big, shard_id)

    chan = _open(["g"], start)
    try:
        for n in (2, 9000, 3, 20000):  # 4.8 MB, then 10.7 MB: two larger segments
            hidden, ids, weights = _inputs(n)
            got = chan.send("g", 1, hidden, ids, weights).result()
            assert torch.equal(got, fake_compute(1, hidden, ids, weights, ""))
        assert chan.links["g"].segment.numel() == 16 << 20
    finally:
        chan.close()


def test_limits_trace_and_failures_as_over_gloo(channel: tuple[dp.Channel, Peers]) -> None:
    chan, _ = channel
    with pytest.raises(dp.PayloadRefused, match=r"shard 'a' refuses .* 65 tokens is outside 0..64"):
        chan.send("a", 0, *_inputs(65))
    with pytest.raises(dp.ShardComputeError, match=r"shard 'b' failed on layer 99: KeyError"):
        chan.send("b", 99, *_inputs(4)).result()
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-f7ad6b7169203331-01"
    from tests.unit import test_data_plane

    test_data_plane.seen.clear()
    chan.send("a", 0, *_inputs(2), traceparent=traceparent).result()
    assert test_data_plane.seen == [traceparent] and not chan.broken


class _OneChannel(ChannelCalls):
    def __init__(self, chan: dp.Channel) -> None:
        self.chan = chan

    def channel(self) -> dp.Channel:
        return self.chan


@pytest.mark.parametrize("same_node", [["a", "b"], ["a"]])
def test_a_failed_compute_leaves_the_other_answers_read(same_node: list[str]) -> None:
    """Left unread, shard b's answer to the failed layer would pass for its next one."""
    chan = dp.Channel.open(["a", "b"], Peers().start, HOST, TIMEOUT_S, same_node=same_node)
    calls = _OneChannel(chan)
    try:
        for layer in (99, 3):  # shard a fails layer 99; both answer layer 3
            for size in (5, 6):
                sent = {sid: _inputs(size + i) for i, sid in enumerate(("a", "b"))}
                pending = [calls.send(ShardCall(sid, layer, *x)) for sid, x in sent.items()]
                if layer == 99:
                    with pytest.raises(dp.ShardComputeError, match=r"shard 'a' failed on layer 99"):
                        calls.wait(pending)
                    continue
                for sid, out in zip(sent, calls.wait(pending), strict=True):
                    assert torch.equal(out, fake_compute(layer, *sent[sid], ""))
        assert not chan.broken
    finally:
        chan.close()


def test_a_known_shape_with_an_unknown_op_still_closes_the_pair(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The shard keeps each shape's views once checked; the op is checked on every header."""
    ticket = dp.ChannelTicket(HOST, 0, "raw/e", b"s" * wire.KEY_LEN, same_node=True)
    with caplog.at_level(logging.INFO, logger="moe_cluster.data_plane"):
        thread = dp.serve_channel(fake_compute, ticket, HOST, TIMEOUT_S, LIMITS, "e")
        link = shm_link.ShmLink.connect(ticket, "e", TIMEOUT_S)
        hidden, ids, weights = _inputs(8)
        for _ in range(2):
            got = link.send(3, hidden, ids, weights, "").result(TIMEOUT_S)
            assert torch.equal(got, fake_compute(3, hidden, ids, weights, ""))
        link.sock.send(shm_link.HEADER.pack(7, 3, 8, 64, 2, 0, 0, 0, 0, wire.NO_TRACE))
        thread.join(timeout=TIMEOUT_S)
    assert not thread.is_alive() and "unknown op 7" in caplog.text
    link.close(stop=False)


def test_a_mixed_channel_uses_gloo_for_other_nodes() -> None:
    peers = Peers()
    chan = dp.Channel.open(["a", "b"], peers.start, HOST, TIMEOUT_S, same_node=["a"])
    try:
        assert set(chan.links) == {"a"} and set(chan.groups) == {"b"} and chan.store is not None
        hidden, ids, weights = _inputs(7)
        for sid in ("a", "b"):
            got = chan.send(sid, 1, hidden, ids, weights).result()
            assert torch.equal(got, fake_compute(1, hidden, ids, weights, ""))
    finally:
        chan.close()


def test_a_silent_shard_times_out_naming_it() -> None:
    done = threading.Event()

    def start_silent(shard_id: str, ticket: dp.ChannelTicket) -> None:
        listener = shm_link.listen(ticket)

        def answer_and_never_serve() -> None:
            sock, _ = listener.accept()
            shm_link.answer(shm_link.SocketBytes(sock), ticket.key, ticket.prefix, LIMITS)
            done.wait(30)
            sock.close()

        threading.Thread(target=answer_and_never_serve, daemon=True).start()

    chan = _open(["mute"], start_silent)
    chan.timeout_s = 0.5
    try:
        start = time.monotonic()
        with pytest.raises(
            dp.DataPlaneError, match=r"'mute' gave no answer for layer 2 within 0.5s"
        ):
            chan.send("mute", 2, *_inputs(3)).result()
        assert chan.broken and time.monotonic() - start < 5
    finally:
        done.set()
        chan.close()


def _serve_in_child(ticket: dp.ChannelTicket, ready: object) -> None:
    def slow(layer: int, hidden: torch.Tensor, *rest: object) -> torch.Tensor:
        ready.set()  # type: ignore[attr-defined]
        time.sleep(60)
        return hidden

    dp.serve_channel(slow, ticket, HOST, TIMEOUT_S, LIMITS, "dying").join()


def test_a_shard_process_that_dies_fails_the_layer_at_once_and_frees_the_segment() -> None:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    children: list[multiprocessing.process.BaseProcess] = []

    def start_in_child(shard_id: str, ticket: dp.ChannelTicket) -> None:
        child = context.Process(target=_serve_in_child, args=(ticket, ready), daemon=True)
        child.start()
        children.append(child)
        deadline = time.monotonic() + 60  # the child binds its socket after importing torch
        while time.monotonic() < deadline and not _bound(ticket):
            time.sleep(0.05)

    before = _memfds()
    chan = _open(["dying"], start_in_child)
    pending = chan.send("dying", 4, *_inputs(8))
    assert ready.wait(60)
    os.kill(children[0].pid or 0, 9)
    start = time.monotonic()
    with pytest.raises(dp.DataPlaneError, match=r"shard 'dying' closed its data-plane socket"):
        pending.result()
    assert time.monotonic() - start < 5 and chan.broken  # well before the 20 s layer timeout
    chan.close()
    del pending
    gc.collect()
    assert _memfds() == before
    assert not [n for n in os.listdir("/dev/shm") if "moe" in n]  # nothing was ever named


def _bound(ticket: dp.ChannelTicket) -> bool:
    with open("/proc/net/unix") as table:
        return shm_link.address(ticket)[1:].decode() in table.read()


def test_close_ends_the_shard_threads_and_frees_every_segment() -> None:
    before = _memfds()
    peers = Peers()
    chan = _open(["a", "b"], peers.start)
    chan.send("a", 0, *_inputs(9)).result()
    assert _memfds() > before
    chan.close()
    for thread in peers.threads.values():
        thread.join(timeout=10)
        assert not thread.is_alive()
    gc.collect()
    assert _memfds() == before


def test_a_shard_without_the_key_is_refused() -> None:
    """The socket's name needs the key; one that took it anyhow fails the handshake."""
    with pytest.raises(dp.DataPlaneError, match=r"'a' did not join .* Connection refused"):
        _open(["a"], Peers(key=b"k" * wire.KEY_LEN).start)
    threads: list[threading.Thread] = []

    def squat(shard_id: str, ticket: dp.ChannelTicket) -> None:
        listener, wrong = shm_link.listen(ticket), dataclasses.replace(ticket, key=b"k" * 32)

        def serve() -> None:
            with pytest.raises(wire.HandshakeError, match=r"peer closed"):  # on its proof
                shm_link.serve(listener, fake_compute, wrong, LIMITS, TIMEOUT_S, shard_id)

        threads.append(threading.Thread(target=serve, daemon=True))
        threads[0].start()

    with pytest.raises(dp.DataPlaneError, match=r"'a' did not join .* handshake .*key is wrong"):
        _open(["a"], squat)
    threads[0].join(timeout=TIMEOUT_S)
    assert not threads[0].is_alive()


def test_an_oversized_header_closes_the_pair_before_touching_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ticket = dp.ChannelTicket(HOST, 0, "raw/c", b"s" * wire.KEY_LEN, same_node=True)
    with caplog.at_level(logging.INFO, logger="moe_cluster.data_plane"):
        thread = dp.serve_channel(fake_compute, ticket, HOST, TIMEOUT_S, LIMITS, "c")
        link = shm_link.ShmLink.connect(ticket, "c", TIMEOUT_S)
        huge = [wire.OP_COMPUTE, 0, 2**40, 64, 2, 0, 0, 0, 0, wire.NO_TRACE]
        link.sock.send(shm_link.HEADER.pack(*huge))
        thread.join(timeout=TIMEOUT_S)
        assert not thread.is_alive()
        assert "channel raw/c: 1099511627776 tokens is outside 0..64" in caplog.text
        link.close(stop=False)
        fits = [wire.OP_COMPUTE, 0, 8, 64, 2, 0, 0, 0, 0, wire.NO_TRACE]  # but no segment yet
        thread = dp.serve_channel(fake_compute, ticket, HOST, TIMEOUT_S, LIMITS, "c")
        link = shm_link.ShmLink.connect(ticket, "c", TIMEOUT_S)
        link.sock.send(shm_link.HEADER.pack(*fits))
        thread.join(timeout=TIMEOUT_S)
    assert not thread.is_alive() and "layer 0 needs 4288 bytes of a 0" in caplog.text
    link.close(stop=False)


def test_a_peer_of_another_user_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.socket.getsockopt

    def other_uid(self: socket.socket, *args: int) -> object:
        if args[:2] == (socket.SOL_SOCKET, socket.SO_PEERCRED):
            return (1).to_bytes(4, "little") + (os.getuid() + 1).to_bytes(4, "little") + bytes(4)
        return real(self, *args)

    monkeypatch.setattr(socket.socket, "getsockopt", other_uid)
    with pytest.raises(dp.DataPlaneError, match=r"'a' did not join .* belongs to uid"):
        _open(["a"], Peers().start)


def test_a_segment_that_could_shrink_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """A peer could truncate an unsealed segment under the shard's reads (a fault, not an error)."""
    ticket = dp.ChannelTicket(HOST, 0, "raw/d", b"s" * wire.KEY_LEN, same_node=True)
    with caplog.at_level(logging.INFO, logger="moe_cluster.data_plane"):
        thread = dp.serve_channel(fake_compute, ticket, HOST, TIMEOUT_S, LIMITS, "d")
        link = shm_link.ShmLink.connect(ticket, "d", TIMEOUT_S)
        fd = os.memfd_create("unsealed")
        os.ftruncate(fd, 1 << 20)
        announce = shm_link.HEADER.pack(shm_link.OP_SEGMENT, 0, 1 << 20, *[0] * 7)
        socket.send_fds(link.sock, [announce], [fd])
        os.close(fd)
        thread.join(timeout=TIMEOUT_S)
    assert not thread.is_alive() and "not sealed against shrinking" in caplog.text
    link.close(stop=False)
