"""The whole-tensor token split of remote dispatch against the code it replaced, without Ray.

``split_by_shard`` replaced a per-shard loop of boolean masks (``_per_shard_masks`` below, the
old ``split_by_owner`` kept verbatim as the reference) and, for layers with replicated experts,
the plan's pair-by-pair gather (``gather_shard_inputs``). On random routings (empty shards,
tokens on one or several shards, replicas, no tokens at all) each shard must get the same rows
and the same pairs, and ``RemoteExperts`` the same layer output, bit for bit.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.expert_parallel.remote_experts import RemoteExperts
from cluster.expert_parallel.transports import ShardCall
from experts.dispatch_tensors import combine, gather_shard_inputs, split_by_shard
from experts.shard import PAD_EXPERT, ExpertShard
from router.dispatch import plan_dispatch
from router.routing_table import RoutingTable, round_robin
from tests.checkpoints import build_family_checkpoint

NUM_EXPERTS = 8
LAYER = 1
Parts = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None]


def _per_shard_masks(
    owner: torch.Tensor,  # [E] long
    num_shards: int,
    hidden: torch.Tensor,  # [T, H]
    expert_ids: torch.Tensor,  # [T, K] long
    weights: torch.Tensor,  # [T, K] fp32
) -> Parts:
    """The split this module replaced (``split_by_owner``), kept as the reference."""
    shard_of_pair = owner[expert_ids]  # [T, K]
    out: Parts = []
    for s in range(num_shards):
        mine = shard_of_pair == s  # [T, K]
        rows = mine.any(dim=1).nonzero().squeeze(1)  # [N]
        if rows.numel() == 0:
            out.append(None)
            continue
        mine = mine[rows]  # [N, K]
        ids = expert_ids[rows].masked_fill(~mine, PAD_EXPERT)  # [N, K]
        shard_weights = weights[rows].masked_fill(~mine, 0.0)  # [N, K]
        out.append((rows, hidden[rows], ids, shard_weights))
    return out


def _routing(
    num_tokens: int, k: int, gen: torch.Generator, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [T, H], [T, K], [T, K]
    hidden = torch.randn(num_tokens, 64, generator=gen).to(dtype)
    rows = [torch.randperm(NUM_EXPERTS, generator=gen)[:k] for _ in range(num_tokens)]
    ids = torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)  # [T, K]
    weights = torch.softmax(torch.randn(num_tokens, k, generator=gen), dim=-1)
    return hidden, ids, weights


@pytest.mark.parametrize("seed", range(24))
def test_the_split_equals_the_per_shard_masks_on_random_routings(seed: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_shards = rng.randint(1, 6)  # up to 6 shards for 8 experts: some often own nothing
    num_tokens = rng.choice([0, 1, 2, 7, 32, 65])
    dtype = rng.choice([torch.float32, torch.bfloat16])
    hidden, ids, weights = _routing(num_tokens, rng.randint(1, 4), gen, dtype)
    owner = torch.tensor([rng.randrange(num_shards) for _ in range(NUM_EXPERTS)])
    split = split_by_shard(owner[ids], num_shards, hidden, ids, weights)
    reference = _per_shard_masks(owner, num_shards, hidden, ids, weights)
    assert split.counts == [0 if part is None else len(part[0]) for part in reference]
    got = {s: rest for s, *rest in split.parts()}
    assert sorted(got) == [s for s, part in enumerate(reference) if part is not None]
    for s, part in enumerate(reference):
        if part is not None:
            for ours, theirs in zip(got[s], part, strict=True):
                assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    shards_per_token = [len({int(owner[e]) for e in row}) for row in ids.tolist()]
    assert split.fan_out.tolist() == shards_per_token


def test_a_shard_without_pairs_gets_no_rows_and_no_call() -> None:
    hidden, ids, weights = _routing(5, 2, torch.Generator().manual_seed(0))
    owner = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2])  # shard 1 holds nothing
    split = split_by_shard(owner[ids], 3, hidden, ids, weights)
    assert split.counts[1] == 0 and 1 not in [s for s, *_ in split.parts()]
    assert split.touched.shape == (3, 5) and not split.touched[1].any()


# -- the remote backend's split, with replicas, against the plan's gather ----------------------


def _replicated_table(rng: random.Random) -> RoutingTable:
    shards = [f"s{i}" for i in range(rng.randint(1, 4))]
    table = round_robin((0, LAYER), NUM_EXPERTS, shards)
    extra = [
        (LAYER, e, s) for e in rng.sample(range(NUM_EXPERTS), rng.randint(0, 4)) for s in shards
    ]
    return table.with_changes(add=[r for r in extra if r[2] not in table.shards_for(LAYER, r[1])])


def _pairs(ids: torch.Tensor, weights: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Each row's (expert, weight) pairs without padding, in k order."""
    return [
        [(e, w) for e, w in zip(row_ids, row_w, strict=True) if e != PAD_EXPERT]
        for row_ids, row_w in zip(ids.tolist(), weights.tolist(), strict=True)
    ]


@pytest.mark.parametrize("seed", range(16))
def test_each_shard_gets_the_plans_rows_and_pairs(seed: int) -> None:
    rng = random.Random(seed)
    table = _replicated_table(rng)
    hidden, ids, weights = _routing(rng.choice([0, 1, 9, 40]), rng.randint(1, 3), torch.Generator())
    shard_ids, split = RemoteExperts(_NoCalls(), table).split(table, LAYER, hidden, ids, weights)
    assert shard_ids == sorted(table.shards)
    plan = plan_dispatch(LAYER, ids.tolist(), table)
    parts = split.parts()
    assert [shard_ids[s] for s, *_ in parts] == list(plan.per_shard)
    for (_, rows, h, shard_ids_k, w), work in zip(parts, plan.per_shard.values(), strict=True):
        assert rows.tolist() == work.token_index
        ref_h, ref_ids, ref_w = gather_shard_inputs(work.token_index, work.pairs, hidden, weights)
        assert torch.equal(h, ref_h)
        assert _pairs(shard_ids_k, w) == _pairs(ref_ids, ref_w)
    assert split.fan_out.tolist() == plan.fan_out


def test_an_expert_the_table_does_not_place_is_named() -> None:
    table = RoutingTable(4, {(LAYER, e): (f"s{e % 2}",) for e in range(6)})  # 6 and 7 unplaced
    hidden, ids, weights = _routing(3, 2, torch.Generator().manual_seed(1))
    ids = ids % 6  # placed experts only: the owner table's path
    ids[1] = torch.tensor([0, 7])
    backend = RemoteExperts(_NoCalls(), table)
    with pytest.raises(
        LookupError, match=r"\(layer 1, expert 7\) has no shard in routing table v4"
    ):
        backend.split(table, LAYER, hidden, ids, weights)
    ids[1] = torch.tensor([0, 5])
    shard_ids, split = backend.split(table, LAYER, hidden, ids, weights)  # the fast path again
    assert shard_ids == ["s0", "s1"] and sum(split.counts) == int(split.fan_out.sum())


# -- the remote backend end to end, against plan + gather + combine ----------------------------


class _NoCalls:
    """A ``ShardCaller`` for tests that only split."""

    def send(self, call: ShardCall) -> Any:
        raise AssertionError("no call expected")

    def wait(self, pending: Sequence[Any]) -> list[torch.Tensor]:
        raise AssertionError("no call expected")

    def wait_timed(self, pending: Sequence[Any]) -> list[tuple[torch.Tensor, float]]:
        raise AssertionError("no call expected")


class _LocalShards:
    """A ``ShardCaller`` computing on in-process ``ExpertShard``s at send time."""

    def __init__(self, shards: dict[str, ExpertShard]) -> None:
        self.shards = shards
        self.calls: list[str] = []

    def send(self, call: ShardCall) -> Any:
        self.calls.append(call.shard_id)
        shard = self.shards[call.shard_id]
        return shard.compute(call.layer, call.hidden, call.expert_ids, call.weights)

    def wait(self, pending: Sequence[Any]) -> list[torch.Tensor]:
        return list(pending)

    def wait_timed(self, pending: Sequence[Any]) -> list[tuple[torch.Tensor, float]]:
        return [(out, 0.0) for out in pending]


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint("mixtral", tmp_path_factory.mktemp("split") / "m", seed=5)


@pytest.mark.parametrize("seed", range(4))
def test_remote_experts_give_the_plan_paths_output_bit_for_bit(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    table = _replicated_table(rng)
    shards = {s: ExpertShard(path, slots=table.experts_on(s)) for s in table.shards}
    pool = _LocalShards(shards)
    backend = RemoteExperts(pool, table)
    hidden, ids, weights = _routing(rng.choice([1, 13, 40]), 3, torch.Generator().manual_seed(seed))
    got = backend.forward(LAYER, hidden, ids, weights)
    plan = plan_dispatch(LAYER, ids.tolist(), table)
    partials = []
    for shard_id, work in plan.per_shard.items():
        inputs = gather_shard_inputs(work.token_index, work.pairs, hidden, weights)
        partials.append((work.token_index, shards[shard_id].compute(LAYER, *inputs)))
    expected = combine(hidden.shape[0], hidden.shape[1], partials, hidden.dtype, hidden.device)
    assert torch.equal(got, expected)
    assert pool.calls == list(plan.per_shard) and backend.num_shard_calls == len(plan.per_shard)
    assert backend.last_fan_out == plan.fan_out


class _ThreadsSeen(_LocalShards):
    """Records the torch threads each call was sent with; fails the wait when asked."""

    def __init__(self, shards: dict[str, ExpertShard], fail: bool = False) -> None:
        super().__init__(shards)
        self.threads: list[int] = []
        self.fail = fail

    def send(self, call: ShardCall) -> Any:
        self.threads.append(torch.get_num_threads())
        return super().send(call)

    def wait(self, pending: Sequence[Any]) -> list[torch.Tensor]:
        if self.fail:
            raise RuntimeError("shard gone")
        return super().wait(pending)


def test_dispatch_runs_on_one_thread_and_gives_the_callers_back(path: Path) -> None:
    """Small gathers and copies must not fork torch's OpenMP team (see ``forward``)."""
    table = round_robin((0, LAYER), NUM_EXPERTS, ["s0", "s1"])
    shards = {s: ExpertShard(path, slots=table.experts_on(s)) for s in table.shards}
    hidden, ids, weights = _routing(8, 2, torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for fail in (False, True):
            pool = _ThreadsSeen(shards, fail)
            backend = RemoteExperts(pool, table)
            if fail:
                with pytest.raises(RuntimeError, match="shard gone"):
                    backend.forward(LAYER, hidden, ids, weights)
            else:
                backend.forward(LAYER, hidden, ids, weights)
            assert pool.threads and set(pool.threads) == {1}
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
