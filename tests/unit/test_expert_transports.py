"""The expert pool's transports and the engine process's remote experts, without Ray.

Shards here are real shard actor bodies (``ShardActorImpl``) or fake computes serving their
data-plane channels on threads of this process; the engine process is a real child process
that joins those channels itself.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
import torch

from cluster.engine.config import EngineConfig
from cluster.engine.engine_process import EngineProcess
from cluster.engine.generator import generate
from cluster.engine.launch import EngineLaunch
from cluster.engine.requests import EngineRequest
from cluster.engine.streams import EngineStoppedError
from cluster.expert_parallel import wire
from cluster.expert_parallel.data_plane import ChannelTicket, DataPlaneError
from cluster.expert_parallel.engine_experts import (
    JoinedChannel,
    arrange_engine_experts,
)
from cluster.expert_parallel.expert_pool import ExpertPool, ShardActorImpl
from cluster.expert_parallel.transports import (
    TRANSPORTS,
    RayCallTransport,
    ShardCall,
    TorchDistTransport,
    make_transport,
)
from deploy.expert_config import ExpertsSettings
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from router.routing_table import RoutingTable, round_robin
from tests.checkpoints import build_family_checkpoint

HOST = "127.0.0.1"
TIMEOUT_S = 20.0
SHARDS = ["s0", "s1"]
NEW = 8


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint("mixtral", tmp_path_factory.mktemp("transports") / "m", seed=7)


@pytest.fixture(scope="module")
def table(path: Path) -> RoutingTable:
    spec = MoEModel.from_checkpoint(path).spec
    return round_robin(spec.moe_layers, spec.num_experts, SHARDS)


@pytest.fixture(scope="module")
def shards(path: Path, table: RoutingTable) -> dict[str, ShardActorImpl]:
    return {sid: ShardActorImpl(str(path), "cpu", table.experts_on(sid), sid) for sid in SHARDS}


def _transport(shards: dict[str, ShardActorImpl]) -> TorchDistTransport:
    """A torch_dist transport whose shards serve on threads here: no Ray call."""

    def open_on_shard(shard_id: str, ticket: ChannelTicket, wait_s: float) -> None:
        shards[shard_id].open_channel(ticket, wait_s)

    # s0 shares this node (shared memory), s1 does not (gloo): both kinds in every test
    return TorchDistTransport(
        dict.fromkeys(shards), TIMEOUT_S, open_on_shard, lambda: HOST, lambda: {"s0"}
    )


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (17, 5, 30)]


def _greedy(model: MoEModel) -> list[list[int]]:
    params = [SamplingParams(max_tokens=NEW, ignore_eos=True)] * 3
    return [r.token_ids for r in generate(model, _prompts(), params)]


@pytest.fixture(scope="module")
def expected(path: Path) -> list[list[int]]:
    return _greedy(MoEModel.from_checkpoint(path))


# --- the registry ------------------------------------------------------------------------------


def test_an_unknown_data_plane_fails_listing_the_known_ones() -> None:
    known = "known: gloo, ray, torch_dist"
    with pytest.raises(ValueError, match=rf"unknown data plane 'nccl'; {known}"):
        make_transport("nccl", {}, 1.0)
    with pytest.raises(ValueError, match=rf"unknown data plane 'x'; {known}"):
        ExpertPool({}, data_plane="x")


def test_the_registry_serves_every_data_plane_the_config_allows() -> None:
    allowed = get_args(ExpertsSettings.model_fields["data_plane"].annotation)
    assert sorted(allowed) == sorted(TRANSPORTS)
    assert isinstance(make_transport("ray", {}, 1.0), RayCallTransport)
    assert isinstance(ExpertPool({}).transport, TorchDistTransport)  # the default
    gloo = make_transport("gloo", {}, 1.0)
    assert isinstance(gloo, TorchDistTransport) and gloo.locate() == ()


# --- torch_dist without Ray --------------------------------------------------------------------


def test_each_thread_gets_its_channel_and_a_broken_one_is_reopened(
    shards: dict[str, ShardActorImpl], table: RoutingTable
) -> None:
    transport = _transport(shards)
    layer = table.experts_on("s0")[0][0]
    ids, weights = torch.tensor([[0], [2], [-1]]), torch.ones(3, 1)
    hidden_size = shards["s0"].limits.hidden_size
    call = ShardCall("s0", layer, torch.randn(3, hidden_size), ids, weights)
    try:
        first = transport.channel()
        assert set(first.links) == {"s0"} and set(first.groups) == {"s1"}
        (out,) = transport.wait([transport.send(call)])
        assert torch.equal(out, shards["s0"].shard.compute(layer, call.hidden, ids, weights))
        other: list[Any] = []
        thread = threading.Thread(target=lambda: other.append(transport.channel()))
        thread.start()
        thread.join(timeout=60)
        assert other and other[0] is not first
        first.broken = True  # as after a dead shard: the next layer reconnects
        (again, seconds), *_ = transport.wait_timed([transport.send(call)])
        assert transport.channel() is not first and torch.equal(again, out) and seconds >= 0
    finally:
        transport.close()


# --- the engine process's remote experts -------------------------------------------------------


def test_the_factory_pickles_and_refuses_a_ray_transport(
    shards: dict[str, ShardActorImpl], table: RoutingTable
) -> None:
    with pytest.raises(ValueError, match=r"tier 't': .* torch_dist data plane only"):
        arrange_engine_experts(RayCallTransport({}, 1.0), table, "t")
    transport = _transport(shards)
    arranged = arrange_engine_experts(transport, table, "t", join_timeout_s=TIMEOUT_S)
    factory = pickle.loads(pickle.dumps(arranged.factory))
    assert factory == arranged.factory and factory.table == table
    assert "key=" not in repr(factory)  # the channel key never shows in a repr
    factory.build()._pool.close()  # let the shards' threads end


def test_a_model_over_the_factorys_experts_gives_the_colocated_tokens(
    path: Path, shards: dict[str, ShardActorImpl], table: RoutingTable, expected: list[list[int]]
) -> None:
    arranged = arrange_engine_experts(_transport(shards), table, "t", join_timeout_s=TIMEOUT_S)
    backend = arranged.factory.build()
    try:
        assert _greedy(MoEModel.from_checkpoint(path, experts=backend)) == expected
        assert backend.num_shard_calls > 0
    finally:
        backend._pool.close()  # type: ignore[attr-defined]


def test_a_joined_channel_that_broke_is_not_reopened() -> None:
    class Broken:
        unusable = True

    zeros = torch.zeros(1, 1)
    with pytest.raises(DataPlaneError, match=r"engine process cannot reopen it"):
        JoinedChannel(Broken()).send(ShardCall("s0", 0, zeros, zeros, zeros))  # type: ignore[arg-type]


def _tokens(engine: EngineProcess, n: int = NEW) -> list[list[int]]:
    async def one(i: int, prompt: list[int]) -> list[int]:
        params = SamplingParams(max_tokens=n, ignore_eos=True)
        request = EngineRequest(f"r{i}", prompt, params)
        return [event.token_id async for event in engine.generate(request)]

    async def every() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(_prompts()))))

    return asyncio.run(every())


@pytest.fixture
def engine_over_shards(
    path: Path, shards: dict[str, ShardActorImpl], table: RoutingTable
) -> Iterator[EngineProcess]:
    arranged = arrange_engine_experts(_transport(shards), table, "t", join_timeout_s=TIMEOUT_S)
    launch = EngineLaunch(str(path), EngineConfig(num_blocks=64), experts=arranged.factory)
    engine = EngineProcess(launch)
    yield engine
    engine.shutdown()
    del arranged  # the rendezvous store, kept until the child is gone


def test_an_engine_process_reaches_the_shards_itself(
    engine_over_shards: EngineProcess, expected: list[list[int]]
) -> None:
    assert _tokens(engine_over_shards) == expected
    assert _tokens(engine_over_shards) == expected  # the channel stays up between requests


def test_a_shard_that_goes_away_stops_the_engine_with_its_name(
    path: Path, table: RoutingTable
) -> None:
    """A shard that answers the handshake and then closes: the first layer fails, no hang."""
    spec = MoEModel.from_checkpoint(path).spec
    limits = wire.PayloadLimits(spec.hidden_size, spec.num_experts)

    def vanishing_shard(shard_id: str, ticket: ChannelTicket, wait_s: float) -> None:
        def join_then_leave() -> None:
            store = wire.dist.TCPStore(ticket.store_host, ticket.store_port, is_master=False)
            group = wire.pair_group(store, ticket.prefix, 1, HOST, wait_s)
            wire.answer_backbone(group, ticket.key, ticket.prefix, limits, wait_s)
            del group, store  # gone: its end of the pair closes

        threading.Thread(target=join_then_leave, daemon=True).start()

    transport = TorchDistTransport(dict.fromkeys(SHARDS), 5.0, vanishing_shard, lambda: HOST, set)
    arranged = arrange_engine_experts(transport, table, "t", join_timeout_s=TIMEOUT_S)
    launch = EngineLaunch(str(path), EngineConfig(num_blocks=64), experts=arranged.factory)
    engine = EngineProcess(launch)
    try:
        with pytest.raises(
            EngineStoppedError,
            match=r"(DataPlaneError|ExpertUnavailableError).*expert shard 's[01]'",
        ):
            _tokens(engine)
        assert not engine.is_alive()
    finally:
        engine.shutdown()
