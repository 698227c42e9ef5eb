"""The torch.distributed data plane without Ray: shards are threads of this process."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from cluster.expert_parallel import data_plane as dp
from cluster.expert_parallel import wire
from tests import listening_sockets

HOST = "127.0.0.1"
TIMEOUT_S = 20.0
LIMITS = dp.PayloadLimits(hidden_size=64, max_pairs=8, max_tokens=64)


def fake_compute(
    layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, traceparent: str
) -> torch.Tensor:
    """Depends on every input, so a mixed-up payload shows in the output."""
    if layer == 99:
        raise KeyError("no expert for layer 99")
    if layer == 98:
        raise ValueError("x" * 1_000_000)
    seen.append(traceparent)
    return hidden * 2 + (ids * weights.to(hidden.dtype)).sum(1, keepdim=True).to(hidden.dtype)


seen: list[str] = []


class Peers:
    def __init__(self, key: bytes | None = None) -> None:
        self.threads: dict[str, threading.Thread] = {}
        self.key = key  # None: the key the backbone handed over; else a wrong one

    def start(self, shard_id: str, ticket: dp.ChannelTicket) -> None:
        if self.key is not None:
            ticket = dataclasses.replace(ticket, key=self.key)
        self.threads[shard_id] = dp.serve_channel(
            fake_compute, ticket, HOST, TIMEOUT_S, LIMITS, shard_id
        )


@pytest.fixture
def channel() -> Iterator[tuple[dp.Channel, Peers]]:
    peers = Peers()
    chan = dp.Channel.open(["a", "b"], peers.start, HOST, TIMEOUT_S)
    yield chan, peers
    chan.close()


def _inputs(
    n: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, 64, generator=gen).to(dtype)  # [N, H]
    ids = torch.randint(-1, 8, (n, 2), generator=gen)  # [N, K'] with padding
    weights = torch.rand(n, 2, generator=gen)  # [N, K']
    return hidden, ids, weights


def _serves(chan: dp.Channel, shard_id: str) -> bool:
    hidden, ids, weights = _inputs(5)
    out = chan.send(shard_id, 1, hidden, ids, weights).result()
    return torch.equal(out, fake_compute(1, hidden, ids, weights, ""))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 32, 0])
def test_round_trip_to_two_shards(
    channel: tuple[dp.Channel, Peers], num_tokens: int, dtype: torch.dtype
) -> None:
    check_round_trip(channel[0], num_tokens, dtype)


def check_round_trip(chan: dp.Channel, num_tokens: int, dtype: torch.dtype) -> None:
    """Shards a and b answer exactly, each for its own inputs, sent before either waits."""
    hidden, ids, weights = _inputs(num_tokens, dtype)
    a_in, b_in = (hidden, ids, weights), (hidden.flip(0), ids.flip(0), weights.flip(0))
    pending = [chan.send("a", 3, *a_in), chan.send("b", 3, *b_in)]
    out_a, out_b = (reply.result() for reply in pending)
    assert out_a.dtype == dtype and out_a.shape == hidden.shape
    assert torch.equal(out_a, fake_compute(3, *a_in, ""))
    assert torch.equal(out_b, fake_compute(3, *b_in, ""))


def test_trace_context_travels_with_the_tokens(channel: tuple[dp.Channel, Peers]) -> None:
    chan, _ = channel
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-f7ad6b7169203331-01"
    seen.clear()
    chan.send("a", 0, *_inputs(2), traceparent=traceparent).result()
    chan.send("a", 0, *_inputs(2)).result()
    assert seen == [traceparent, ""]
    assert wire.decode_trace(wire.encode_trace("not a traceparent")) == ""


def test_a_failed_compute_is_reported_and_the_channel_stays_usable(
    channel: tuple[dp.Channel, Peers],
) -> None:
    chan, _ = channel
    with pytest.raises(dp.ShardComputeError, match=r"shard 'b' failed on layer 99: KeyError"):
        chan.send("b", 99, *_inputs(4)).result()
    assert not chan.broken
    assert _serves(chan, "b")


def test_a_long_failure_message_is_cut_to_the_limit(channel: tuple[dp.Channel, Peers]) -> None:
    chan, _ = channel
    with pytest.raises(dp.ShardComputeError, match=r"ValueError: xxx") as err:
        chan.send("a", 98, *_inputs(2)).result()
    assert len(str(err.value)) < wire.MAX_ERROR_BYTES + 100
    assert not chan.broken and _serves(chan, "a")


def test_close_ends_the_shard_threads(channel: tuple[dp.Channel, Peers]) -> None:
    chan, peers = channel
    chan.send("a", 0, *_inputs(1)).result()
    chan.close()
    for thread in peers.threads.values():
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_a_silent_shard_breaks_the_channel_with_a_clear_error() -> None:
    def start_silent(shard_id: str, ticket: dp.ChannelTicket) -> None:
        def join_and_never_answer() -> None:
            store = wire.dist.TCPStore(ticket.store_host, ticket.store_port, is_master=False)
            group = wire.pair_group(store, ticket.prefix, 1, HOST, TIMEOUT_S)
            wire.answer_backbone(group, ticket.key, ticket.prefix, LIMITS, TIMEOUT_S)
            done.wait(30)
            del group

        threading.Thread(target=join_and_never_answer, daemon=True).start()

    done = threading.Event()
    chan = dp.Channel.open(["mute"], start_silent, HOST, TIMEOUT_S)
    chan.timeout_s = 0.5  # joining may take a while on a busy machine; the answer may not
    try:
        with pytest.raises(
            dp.DataPlaneError, match=r"'mute' gave no answer for layer 2 within 0.5s"
        ):
            chan.send("mute", 2, *_inputs(3)).result()
        assert chan.broken
    finally:
        done.set()
        chan.close()


# --- exposure: where it listens, who may join ---------------------------------------------------


@pytest.mark.skipif(not listening_sockets.available(), reason="needs Linux /proc")
def test_the_data_plane_listens_on_the_node_address_only() -> None:
    before = listening_sockets.listening()
    chan = dp.Channel.open(["a", "b"], Peers().start, HOST, TIMEOUT_S)
    try:
        opened = listening_sockets.listening() - before
        assert isinstance(chan.store, wire.dist.TCPStore)
        assert (HOST, chan.store.port) in opened  # the rendezvous store
        assert len(opened) >= 3  # and the gloo devices of the backbone and both shards
        assert all(ipaddress.ip_address(address).is_loopback for address, _ in opened), opened
        assert _serves(chan, "a")
    finally:
        chan.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_wildcard_host_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match=rf"host '{host}' is every interface"):
        wire.bind_store(host, TIMEOUT_S)


def test_a_shard_without_the_channel_key_is_refused() -> None:
    seen.clear()
    peers = Peers(key=b"k" * wire.KEY_LEN)
    with pytest.raises(
        dp.DataPlaneError, match=r"shard 'a' failed the data-plane handshake .*key is wrong"
    ):
        dp.Channel.open(["a"], peers.start, HOST, TIMEOUT_S)
    peers.threads["a"].join(timeout=TIMEOUT_S)  # the backbone went away without its proof
    assert not peers.threads["a"].is_alive() and seen == []


def _raw_backbone() -> tuple[Any, dp.ChannelTicket, threading.Thread, Any]:
    """A shard serving a channel whose backbone side the test drives by hand."""
    store = wire.bind_store(HOST, TIMEOUT_S)
    ticket = dp.ChannelTicket(HOST, store.port, "raw/c", b"s" * wire.KEY_LEN)
    thread = dp.serve_channel(fake_compute, ticket, HOST, TIMEOUT_S, LIMITS, "c")
    return store, ticket, thread, wire.pair_group(store, ticket.prefix, 0, HOST, TIMEOUT_S)


def test_a_backbone_without_the_channel_key_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen.clear()
    wait = wire.timedelta(seconds=TIMEOUT_S)
    with caplog.at_level(logging.INFO, logger="moe_cluster.data_plane"):
        store, ticket, thread, group = _raw_backbone()
        wire.send_bytes(group, b"n" * wire.NONCE_LEN, 1, wait)
        wire.recv_bytes(group, wire.NONCE_LEN + wire.LIMITS.size + wire.MAC_LEN, 1, wait)
        wire.send_bytes(group, b"forged proof".ljust(wire.MAC_LEN), 1, wait)
        thread.join(timeout=TIMEOUT_S)
    assert not thread.is_alive() and seen == []
    assert "shard c: refused data-plane channel raw/c: the backbone's proof" in caplog.text
    assert ticket.key.hex() not in caplog.text and "sss" not in repr(ticket)
    del group, store


def test_an_oversized_header_is_refused_before_allocating(
    channel: tuple[dp.Channel, Peers],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chan, _ = channel
    allocated: list[Any] = []
    real_empty = torch.empty

    def spy_empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        allocated.append(args[0] if len(args) == 1 else args)
        return real_empty(*args, **kwargs)

    with caplog.at_level(logging.INFO, logger="moe_cluster.data_plane"):
        store, ticket, thread, group = _raw_backbone()
        assert wire.greet_shard(group, ticket.key, ticket.prefix, TIMEOUT_S) == LIMITS
        monkeypatch.setattr(torch, "empty", spy_empty)
        huge = torch.tensor([wire.OP_COMPUTE, 0, 2**40, 64, 2, 0, 0, 0, 0, wire.NO_TRACE])
        group.send([huge], 1, wire.TAG_HEADER).wait()
        thread.join(timeout=TIMEOUT_S)
        monkeypatch.undo()
    assert not thread.is_alive()
    assert "closed data-plane channel raw/c: 1099511627776 tokens is outside 0..64" in caplog.text
    assert all(not isinstance(size, int) or size < 2**20 for size in allocated), allocated
    assert _serves(chan, "a") and _serves(chan, "b")  # the other channels serve on
    again = dp.Channel.open(["c"], Peers().start, HOST, TIMEOUT_S)
    try:
        assert _serves(again, "c")
    finally:
        again.close()
    del group, store


def test_the_backbone_checks_the_shard_limits_before_sending(
    channel: tuple[dp.Channel, Peers],
) -> None:
    chan, _ = channel
    assert chan.limits == {"a": LIMITS, "b": LIMITS}
    with pytest.raises(dp.PayloadRefused, match=r"shard 'a' refuses .* 65 tokens is outside 0..64"):
        chan.send("a", 0, *_inputs(65))
    hidden, ids, weights = _inputs(3)
    with pytest.raises(dp.PayloadRefused, match=r"hidden size 32 is not the model's 64"):
        chan.send("b", 0, hidden[:, :32], ids, weights)
    assert not chan.broken and _serves(chan, "a") and _serves(chan, "b")


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((wire.OP_COMPUTE, 65, 64, 2, 0), r"65 tokens is outside 0..64 per dispatch"),
        ((wire.OP_COMPUTE, -1, 64, 2, 0), r"-1 tokens is outside"),
        ((wire.OP_COMPUTE, 4, 2**20, 2, 0), r"hidden size 1048576 is not the model's 64"),
        ((wire.OP_COMPUTE, 4, 64, 9, 0), r"9 pairs per token is outside 0..8"),
        ((wire.OP_COMPUTE, 4, 64, 2, 7), r"dtype index 7 is not one of 0..3"),
        ((7, 4, 64, 2, 0), r"unknown op 7"),
    ],
)
def test_payload_limits_name_the_broken_limit(sizes: tuple[int, ...], message: str) -> None:
    with pytest.raises(dp.PayloadRefused, match=message):
        LIMITS.check(*sizes)
    LIMITS.check(wire.OP_COMPUTE, 64, 64, 8, 3)  # every limit reached, none broken
    assert LIMITS.max_payload_bytes == 64 * (64 * 8 + 8 * 12)
