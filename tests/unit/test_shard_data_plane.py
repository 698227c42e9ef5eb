"""A real shard actor body (no Ray started) serving a data-plane channel: key, limits, answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.expert_parallel import data_plane as dp
from cluster.expert_parallel import wire
from cluster.expert_parallel.expert_pool import ShardActorImpl
from experts.checkpoint import CheckpointReader
from router.routing_table import round_robin
from tests.checkpoints import build_family_checkpoint

TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint("mixtral", tmp_path_factory.mktemp("shard_dp") / "m", seed=4)


def test_a_shard_announces_its_model_limits_and_serves(path: Path) -> None:
    spec = CheckpointReader(path).spec
    table = round_robin(spec.moe_layers, spec.num_experts, ["s0"])
    shard = ShardActorImpl(str(path), "cpu", table.experts_on("s0"), "s0")
    chan = dp.Channel.open(
        ["s0"], lambda _, ticket: shard.open_channel(ticket, TIMEOUT_S), "127.0.0.1", TIMEOUT_S
    )
    try:
        assert chan.limits["s0"] == dp.PayloadLimits(spec.hidden_size, spec.num_experts)
        layer = spec.moe_layers[0]
        hidden = torch.randn(3, spec.hidden_size)  # [N, H]
        ids = torch.tensor([[0, 1], [2, -1], [3, 0]])  # [N, K']
        weights = torch.full((3, 2), 0.5)  # [N, K']
        got = chan.send("s0", layer, hidden, ids, weights).result()
        assert torch.equal(got, shard.shard.compute(layer, hidden, ids, weights))
        too_many = torch.zeros(wire.MAX_TOKENS_PER_DISPATCH + 1, spec.hidden_size)
        with pytest.raises(dp.PayloadRefused, match=r"65537 tokens is outside 0..65536"):
            chan.send(
                "s0",
                layer,
                too_many,
                ids[:1].expand(len(too_many), 2),
                weights[:1].expand(len(too_many), 2),
            )
        assert not chan.broken
    finally:
        chan.close()
