"""The torch.distributed data plane without Ray: shards are threads of this process."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from cluster import data_plane as dp

HOST = "127.0.0.1"
TIMEOUT_S = 20.0


def fake_compute(
    layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, traceparent: str
) -> torch.Tensor:
    """Depends on every input, so a mixed-up payload shows in the output."""
    if layer == 99:
        raise KeyError("no expert for layer 99")
    seen.append(traceparent)
    return hidden * 2 + (ids * weights.to(hidden.dtype)).sum(1, keepdim=True).to(hidden.dtype)


seen: list[str] = []


class Peers:
    def __init__(self) -> None:
        self.threads: dict[str, threading.Thread] = {}

    def start(self, shard_id: str, host: str, port: int, prefix: str) -> None:
        self.threads[shard_id] = dp.serve_channel(
            fake_compute, host, port, prefix, HOST, TIMEOUT_S, shard_id
        )


@pytest.fixture
def channel() -> Iterator[tuple[dp.Channel, Peers]]:
    peers = Peers()
    chan = dp.Channel.open(["a", "b"], peers.start, HOST, TIMEOUT_S)
    yield chan, peers
    chan.close()


def _inputs(n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, 64, generator=gen).to(dtype)  # [N, H]
    ids = torch.randint(-1, 8, (n, 2), generator=gen)  # [N, K'] with padding
    weights = torch.rand(n, 2, generator=gen)  # [N, K']
    return hidden, ids, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 32, 0])
def test_round_trip_to_two_shards(
    channel: tuple[dp.Channel, Peers], num_tokens: int, dtype: torch.dtype
) -> None:
    chan, _ = channel
    hidden, ids, weights = _inputs(num_tokens, dtype)
    a_in, b_in = (hidden, ids, weights), tuple(x.flip(0) for x in (hidden, ids, weights))
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
    assert dp.decode_trace(dp.encode_trace("not a traceparent")) == ""


def test_a_failed_compute_is_reported_and_the_channel_stays_usable(
    channel: tuple[dp.Channel, Peers],
) -> None:
    chan, _ = channel
    with pytest.raises(dp.ShardComputeError, match=r"shard 'b' failed on layer 99: KeyError"):
        chan.send("b", 99, *_inputs(4)).result()
    assert not chan.broken
    hidden, ids, weights = _inputs(5)
    assert torch.equal(
        chan.send("b", 1, hidden, ids, weights).result(), fake_compute(1, hidden, ids, weights, "")
    )


def test_close_ends_the_shard_threads(channel: tuple[dp.Channel, Peers]) -> None:
    chan, peers = channel
    chan.send("a", 0, *_inputs(1)).result()
    chan.close()
    for thread in peers.threads.values():
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_a_silent_shard_breaks_the_channel_with_a_clear_error() -> None:
    def start_silent(shard_id: str, host: str, port: int, prefix: str) -> None:
        def join_and_never_answer() -> None:
            store = torch.distributed.TCPStore(host, port, is_master=False)
            group = dp._group(store, prefix, 1, HOST, TIMEOUT_S)
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
