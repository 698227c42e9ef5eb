"""Routing tables, dispatch plans, and sharded expert compute against the colocated backend."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from cache.kv_pool import KVPool
from cluster.engine.generator import generate
from experts.attention import AttentionBatch, SequenceChunk
from experts.backend import ColocatedExperts
from experts.checkpoint import CheckpointReader
from experts.dispatch_tensors import combine, gather_shard_inputs, split_by_shard
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from experts.shard import ExpertShard
from experts.weights import load_backbone
from router.dispatch import DispatchPlan, ShardWork, plan_dispatch
from router.routing_table import RoutingTable, round_robin
from tests.checkpoints import build_family_checkpoint

LAYERS = (0, 1, 2)
NUM_EXPERTS = 8


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint("mixtral", tmp_path_factory.mktemp("dispatch") / "m", seed=5)


# -- routing table ---------------------------------------------------------------------------


def test_table_is_canonical_and_private() -> None:
    placement = {(0, 1): ("b", "a"), (0, 0): ("a",), (0, 2): ()}
    table = RoutingTable(3, placement)
    placement[(0, 0)] = ("z",)
    assert table.shards_for(0, 1) == ("a", "b") and table.shards_for(0, 0) == ("a",)
    assert table.shards_for(0, 2) == () and (0, 2) not in table.placement
    assert table.shards == ("a", "b")
    assert table.experts_on("a") == [(0, 0), (0, 1)] and table.experts_on("b") == [(0, 1)]
    assert table == RoutingTable(3, {(0, 0): ("a",), (0, 1): ("a", "b")})
    with pytest.raises(ValueError, match="lists a shard twice"):
        RoutingTable(0, {(0, 0): ("a", "a")})


def test_with_changes_bumps_the_version_and_keeps_the_old_table() -> None:
    old = round_robin(LAYERS, NUM_EXPERTS, ["a", "b"], version=4)
    new = old.with_changes(add=[(1, 0, "b")], remove=[(2, 3, "b")])
    assert new.version == 5 and old.version == 4
    assert new.shards_for(1, 0) == ("a", "b") and new.shards_for(2, 3) == ()
    assert old.shards_for(1, 0) == ("a",) and old.shards_for(2, 3) == ("b",)
    with pytest.raises(ValueError, match=r"its replicas in table v4 are \('a',\)"):
        old.with_changes(remove=[(1, 0, "b")])
    with pytest.raises(ValueError, match="already holds"):
        old.with_changes(add=[(1, 0, "a")])


def test_validate_lists_missing_and_foreign_slots() -> None:
    table = round_robin(LAYERS, NUM_EXPERTS, ["a", "b"])
    table.validate(LAYERS, NUM_EXPERTS)
    broken = table.with_changes(remove=[(0, 3, "b"), (2, 6, "a"), (2, 7, "b")])
    with pytest.raises(ValueError, match=r"no shard holds layer 0: experts \[3\]; "):
        broken.validate(LAYERS, NUM_EXPERTS)
    with pytest.raises(ValueError, match=r"layer 2: experts \[6, 7\]"):
        broken.validate(LAYERS, NUM_EXPERTS)
    with pytest.raises(ValueError, match=r"outside the model.*layer 1: experts \[0, 1"):
        table.validate((0, 2), NUM_EXPERTS)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 8, 11])
def test_round_robin_is_even(num_shards: int) -> None:
    shards = [f"s{i}" for i in range(num_shards)]
    table = round_robin(LAYERS, NUM_EXPERTS, shards)
    table.validate(LAYERS, NUM_EXPERTS)
    for layer in LAYERS:
        counts = [sum(1 for lyr, _ in table.experts_on(s) if lyr == layer) for s in shards]
        assert max(counts) - min(counts) <= 1 and sum(counts) == NUM_EXPERTS
    assert table.shards_for(1, 5) == (shards[5 % num_shards],)


def test_round_robin_refuses_bad_shard_lists() -> None:
    with pytest.raises(ValueError, match="at least one shard"):
        round_robin(LAYERS, NUM_EXPERTS, [])
    with pytest.raises(ValueError, match="unique"):
        round_robin(LAYERS, NUM_EXPERTS, ["a", "a"])


# -- dispatch plans --------------------------------------------------------------------------


def _random_ids(num_tokens: int, k: int, rng: random.Random) -> list[list[int]]:
    return [rng.sample(range(NUM_EXPERTS), k) for _ in range(num_tokens)]


def _check_plan(plan: DispatchPlan, ids: list[list[int]], table: RoutingTable) -> None:
    """Every (token, k) pair exactly once, on a shard holding its expert; rows sorted."""
    seen: Counter[tuple[int, int]] = Counter()
    for shard, work in plan.per_shard.items():
        assert work.token_index == sorted(set(work.token_index)) and work.pairs
        assert len(work.pairs) == len(work.token_index)
        for t, row in zip(work.token_index, work.pairs, strict=True):
            assert row and [k for k, _ in row] == sorted(k for k, _ in row)
            for k, e in row:
                assert ids[t][k] == e and shard in table.shards_for(plan.layer, e)
                seen[(t, k)] += 1
    assert seen == Counter((t, k) for t, row in enumerate(ids) for k in range(len(row)))
    assert list(plan.per_shard) == sorted(plan.per_shard)


@pytest.mark.parametrize("seed", range(6))
def test_plans_cover_every_pair_once_with_one_call_per_shard(seed: int) -> None:
    rng = random.Random(seed)
    shards = [f"s{i}" for i in range(rng.randint(1, 4))]
    table = round_robin(LAYERS, NUM_EXPERTS, shards)
    extra = [(1, e, s) for e in rng.sample(range(NUM_EXPERTS), 3) for s in shards]
    table = table.with_changes(add=[r for r in extra if r[2] not in table.shards_for(1, r[1])])
    ids = _random_ids(rng.randint(1, 40), rng.randint(1, 3), rng)
    plan = plan_dispatch(1, ids, table)
    _check_plan(plan, ids, table)
    assert plan == plan_dispatch(1, ids, table)  # deterministic
    assert sum(plan.loads.values()) == sum(len(r) for r in ids)
    assert plan.fan_out == [
        len({s for s, w in plan.per_shard.items() if t in w.token_index}) for t in range(len(ids))
    ]
    # balanced: a shard given a replicated pair ends at most one pair above any other replica
    loads = Counter(plan.loads)
    for shard, work in plan.per_shard.items():
        for e in {e for row in work.pairs for _, e in row}:
            assert all(loads[shard] <= loads[r] + 1 for r in table.shards_for(1, e))


def test_replicas_share_a_hot_expert_evenly() -> None:
    table = RoutingTable(0, {(0, 0): ("a", "b", "c"), (0, 1): ("a",)})
    plan = plan_dispatch(0, [[0]] * 10, table)
    assert plan.loads == {"a": 4, "b": 3, "c": 3}
    # background load on "a" from an unreplicated expert is counted first
    plan = plan_dispatch(0, [[0, 1]] * 6, RoutingTable(0, {(0, 0): ("a", "b"), (0, 1): ("a",)}))
    assert plan.loads == {"a": 6, "b": 6} and plan.per_shard["b"].token_index == list(range(6))


def test_ties_prefer_a_shard_the_token_already_visits() -> None:
    table = RoutingTable(0, {(0, 0): ("a", "b"), (0, 1): ("b",), (0, 2): ("a",)})
    plan = plan_dispatch(0, [[1, 0], [2, 0]], table)
    # token 0: a and b tie at 1 pair, b is already visited; token 1: a is lighter (1 vs 2)
    assert plan.per_shard == {
        "a": ShardWork([1], [[(0, 2), (1, 0)]]),
        "b": ShardWork([0], [[(0, 1), (1, 0)]]),
    }
    assert plan.fan_out == [1, 1] and plan.loads == {"a": 2, "b": 2}


def test_ties_prefer_a_replica_on_this_node_but_load_comes_first() -> None:
    table = RoutingTable(0, {(0, 0): ("a", "b")})
    # one pair: a and b tie at 0; b is on the caller's node
    assert plan_dispatch(0, [[0]], table, near={"b"}).loads == {"b": 1}
    # many pairs: still split by load (never all to the near replica), near first on ties
    plan = plan_dispatch(0, [[0]] * 7, table, near={"b"})
    assert plan.loads == {"a": 3, "b": 4}
    assert plan.per_shard["b"].token_index == [0, 2, 4, 6]
    # nothing near: the old order (first replica in shard-id order on ties)
    assert plan_dispatch(0, [[0]], table).loads == {"a": 1}


def test_an_unplaced_expert_is_refused() -> None:
    table = RoutingTable(7, {(0, 0): ("a",)})
    with pytest.raises(
        LookupError, match=r"\(layer 0, expert 3\) has no shard in routing table v7"
    ):
        plan_dispatch(0, [[0, 3]], table)


# -- tensors: gather, compute on shards, combine ---------------------------------------------


def _sharded_forward(
    shards: dict[str, ExpertShard],
    table: RoutingTable,
    layer: int,
    hidden: torch.Tensor,  # [T, H]
    ids: torch.Tensor,  # [T, K]
    weights: torch.Tensor,  # [T, K]
    plans: list[DispatchPlan] | None = None,
) -> torch.Tensor:  # [T, H]
    """Plan, gather each shard's rows, compute them there (one call per shard), combine."""
    plan = plan_dispatch(layer, ids.tolist(), table)
    if plans is not None:
        plans.append(plan)
    partials = []
    for shard_id, work in plan.per_shard.items():
        inputs = gather_shard_inputs(work.token_index, work.pairs, hidden, weights)
        partials.append((work.token_index, shards[shard_id].compute(layer, *inputs)))
    return combine(hidden.shape[0], hidden.shape[1], partials, hidden.dtype, hidden.device)


def _shards_for(path: Path, table: RoutingTable) -> dict[str, ExpertShard]:
    return {s: ExpertShard(path, slots=table.experts_on(s)) for s in table.shards}


def _layer_inputs(
    num_tokens: int, k: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [T, H], [T, K], [T, K]
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, 64, generator=gen)
    ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:k] for _ in range(num_tokens)])
    weights = torch.softmax(torch.randn(num_tokens, k, generator=gen), dim=-1)
    return hidden, ids, weights


def _assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6) -> None:
    """Max error within ``rel`` of the output's magnitude.

    An element-wise rtol would be meaningless: outputs are sums of signed terms, and where
    they cancel to near zero a one-ulp change in a term is a large relative change.
    """
    error = (got - expected).abs().max().item()
    assert error <= rel * expected.abs().max().item(), (error, expected.abs().max().item())


@pytest.fixture(scope="module")
def colocated(path: Path) -> ColocatedExperts:
    return ColocatedExperts.from_checkpoint(CheckpointReader(path))


def test_exact_when_each_tokens_experts_share_a_shard(
    path: Path, colocated: ColocatedExperts
) -> None:
    table = round_robin(LAYERS, NUM_EXPERTS, ["even", "odd"])  # e % 2
    hidden, ids, weights = _layer_inputs(29, 3, seed=0)
    ids = ids % 4 * 2 + torch.arange(29)[:, None] % 2  # per row: all even or all odd, distinct
    got = _sharded_forward(_shards_for(path, table), table, 1, hidden, ids, weights)
    assert torch.equal(got, colocated.forward(1, hidden, ids, weights))


def test_split_tokens_are_exact_for_two_experts_and_close_for_three(
    path: Path, colocated: ColocatedExperts
) -> None:
    """Partial sums reassociate the colocated sum: harmless for two terms (a + b = b + a),
    a few ulps for three ((a + c) + b vs (a + b) + c)."""
    table = round_robin(LAYERS, NUM_EXPERTS, ["s0", "s1", "s2"])
    shards = _shards_for(path, table)
    hidden, ids, weights = _layer_inputs(31, 2, seed=1)
    got = _sharded_forward(shards, table, 2, hidden, ids, weights)
    assert torch.equal(got, colocated.forward(2, hidden, ids, weights))
    hidden, ids, weights = _layer_inputs(31, 3, seed=2)
    got = _sharded_forward(shards, table, 2, hidden, ids, weights)
    _assert_close_to_scale(got, colocated.forward(2, hidden, ids, weights))


@pytest.mark.parametrize("num_shards", [2, 3])
def test_whole_tensor_split_matches_the_plan_bit_for_bit(path: Path, num_shards: int) -> None:
    """``split_by_shard`` (one replica per expert) sends each shard the plan's rows, and the
    shards' partial sums come out identical to the plan path's."""
    table = round_robin(LAYERS, NUM_EXPERTS, [f"s{i}" for i in range(num_shards)])
    shards = _shards_for(path, table)
    hidden, ids, weights = _layer_inputs(37, 3, seed=4)
    ids[0] = torch.tensor([0, 0 + num_shards, 0 + 2 * num_shards])  # a token on one shard only
    owner = torch.tensor([e % num_shards for e in range(NUM_EXPERTS)])
    parts = split_by_shard(owner[ids], num_shards, hidden, ids, weights).parts()
    plan = plan_dispatch(1, ids.tolist(), table)
    assert [f"s{s}" for s, *_ in parts] == list(plan.per_shard)
    partials = []
    for (shard_id, work), (_, rows, *inputs) in zip(plan.per_shard.items(), parts, strict=True):
        assert rows.tolist() == work.token_index
        out = shards[shard_id].compute(1, *inputs)
        planned = gather_shard_inputs(work.token_index, work.pairs, hidden, weights)
        assert torch.equal(out, shards[shard_id].compute(1, *planned))
        partials.append((rows, out))
    expected = _sharded_forward(shards, table, 1, hidden, ids, weights)
    assert torch.equal(combine(37, hidden.shape[1], partials), expected)


def test_replicated_experts_match_within_tolerance(path: Path, colocated: ColocatedExperts) -> None:
    """A replicated expert runs on smaller token groups, and CPU GEMMs of another row count
    may round differently (seen here: a few ulps), so equality is not expected."""
    table = round_robin(LAYERS, NUM_EXPERTS, ["s0", "s1"]).with_changes(
        add=[(0, 2, "s1"), (0, 5, "s0")]
    )
    hidden, ids, weights = _layer_inputs(40, 2, seed=3)
    plans: list[DispatchPlan] = []
    got = _sharded_forward(_shards_for(path, table), table, 0, hidden, ids, weights, plans)
    _assert_close_to_scale(got, colocated.forward(0, hidden, ids, weights))
    used = {(s, e) for s, w in plans[0].per_shard.items() for row in w.pairs for _, e in row}
    assert {("s0", 2), ("s1", 2), ("s0", 5), ("s1", 5)} <= used  # both replicas served


# -- end to end: a whole model on sharded experts -------------------------------------------


class ShardedExperts:
    """An ExpertBackend over in-process ExpertShards: plan, gather, compute, combine."""

    def __init__(self, table: RoutingTable, shards: dict[str, ExpertShard]) -> None:
        self.table = table
        self.shards = shards
        self.plans: list[DispatchPlan] = []

    def forward(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        return _sharded_forward(
            self.shards, self.table, layer, hidden, expert_ids, weights, self.plans
        )


def _prefill_logits(model: MoEModel, prompts: list[list[int]]) -> torch.Tensor:  # [T, V]
    spec = model.spec
    pool = KVPool(spec.num_layers, 16, 16, spec.num_kv_heads, spec.head_dim)
    free = list(range(16))
    chunks = [
        SequenceChunk([free.pop() for _ in range(-(-len(p) // 16))], 0, len(p), 0) for p in prompts
    ]
    batch = AttentionBatch.build(chunks, 16, model.device)
    with torch.inference_mode():
        return model.logits(
            model.forward(torch.tensor([t for p in prompts for t in p]), batch, pool)
        )


@pytest.mark.parametrize("num_shards", [2, 3])
def test_model_on_sharded_experts_matches_colocated(path: Path, num_shards: int) -> None:
    reference = MoEModel.from_checkpoint(path)
    table = round_robin(
        reference.spec.moe_layers, NUM_EXPERTS, [f"s{i}" for i in range(num_shards)]
    )
    # expert 2, the most routed-to in these prompts, gets a replica on every shard
    hot = [(layer, 2, s) for layer in LAYERS for s in table.shards if s != f"s{2 % num_shards}"]
    table = table.with_changes(add=hot)
    table.validate(reference.spec.moe_layers, NUM_EXPERTS)
    backend = ShardedExperts(table, _shards_for(path, table))
    model = MoEModel(reference.spec, load_backbone(CheckpointReader(path)), backend)
    gen = torch.Generator().manual_seed(num_shards)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (21, 9, 34)]
    torch.testing.assert_close(
        _prefill_logits(model, prompts), _prefill_logits(reference, prompts), atol=1e-5, rtol=0
    )
    assert [p.layer for p in backend.plans] == list(LAYERS)  # one plan per layer
    assert all(list(p.per_shard) == list(table.shards) for p in backend.plans)  # one call each
    served = {
        (p.layer, s, e)
        for p in backend.plans
        for s, w in p.per_shard.items()
        for row in w.pairs
        for _, e in row
    }
    assert len({s for _, s, e in served if e == 2}) > 1  # its replicas share its tokens
    params = [SamplingParams(max_tokens=16, ignore_eos=True)] * len(prompts)
    ours = generate(model, prompts, params)
    expected = generate(reference, prompts, params)
    assert [r.token_ids for r in ours] == [r.token_ids for r in expected]
