"""An expert with no live replica ends only the requests whose tokens chose it: the engine
drops their chunks from the step, runs the rest again, and goes on serving. Without Ray: the
experts are in-process shards behind ``RemoteExperts``, one shard dead for good."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.engine.generator import GenerationError, generate
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.missing_experts import chunks_of_rows
from cluster.engine.requests import EngineRequest
from cluster.engine.scheduler import ScheduledChunk, SchedulerOutput
from cluster.expert_parallel.data_plane import DataPlaneError
from cluster.expert_parallel.expert_pool import InProcessPool
from cluster.expert_parallel.remote_experts import RemoteExperts
from cluster.expert_parallel.transports import ShardCall
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from router.dispatch import ExpertUnavailableError
from router.routing_table import RoutingTable
from tests.checkpoints import BuildCheckpoint

Slot = tuple[int, int]
NEW = 4


class _DeadShard(InProcessPool):
    """In-process shards, of which ``dead`` never answers again (its process is gone)."""

    dead: frozenset[str] = frozenset()

    def reconnect(self, shard_id: str, timeout_s: float = 5.0) -> bool:
        return shard_id not in self.dead

    def send(self, call: ShardCall) -> Any:
        if call.shard_id in self.dead:
            raise DataPlaneError(f"expert shard {call.shard_id!r} closed its socket")
        return super().send(call)


@pytest.fixture(scope="module")
def path(shared_checkpoint: BuildCheckpoint) -> Path:
    return shared_checkpoint("mixtral", seed=5)


@pytest.fixture(scope="module")
def colocated(path: Path) -> MoEModel:
    return MoEModel.from_checkpoint(path)


def _run(engine: LLMEngine, prompts: dict[str, Sequence[int]]) -> tuple[dict, dict]:
    """Every request to its end: tokens per request id, and failure reasons per id."""
    for rid, prompt in prompts.items():
        params = SamplingParams(max_tokens=NEW, ignore_eos=True)
        engine.add_request(EngineRequest(rid, list(prompt), params))
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    failed: dict[str, str] = {}
    while engine.has_unfinished():
        for event in engine.step():
            tokens[event.request_id].append(event.token_id)
        failed.update({f.request_id: f.reason for f in engine.failures})
    return tokens, failed


def _used(model: MoEModel, prompt: Sequence[int]) -> set[Slot]:
    """The (layer, expert) slots a request's tokens route to, run alone."""
    engine = LLMEngine(model)
    engine.runner.count_routing = True
    _run(engine, {"probe": prompt})
    return set(engine.runner.take_routed_counts())


def _prompts(colocated: MoEModel) -> tuple[list[int], list[int], Slot]:
    """A request that chooses some slot and one that never does (searched, seeded)."""
    gen = torch.Generator().manual_seed(11)
    short = [5, 17, 200]
    unused = {(lyr, e) for lyr in colocated.spec.moe_layers for e in range(8)}
    unused -= _used(colocated, short)
    assert unused, "the short request touches every expert: pick a shorter one"
    for _ in range(20):
        long = torch.randint(3, 256, (30,), generator=gen).tolist()
        hit = sorted(unused & _used(colocated, long))
        if hit:
            return long, short, hit[0]
    raise AssertionError("no prompt chooses an expert the short one never does")


def _engine(path: Path, colocated: MoEModel, missing: Slot) -> LLMEngine:
    """Every expert on s0 but ``missing``, alone on s1, which is dead; no wait for it."""
    spec = colocated.spec
    placement = {(lyr, e): ("s0",) for lyr in spec.moe_layers for e in range(spec.num_experts)}
    placement[missing] = ("s1",)
    table = RoutingTable(1, placement)
    slots = {s: table.experts_on(s) for s in ("s0", "s1")}
    pool = _DeadShard(InProcessPool.start(str(path), slots).shards)
    pool.dead = frozenset({"s1"})
    experts = RemoteExperts(pool, table, unavailable_wait_s=0.0)
    return LLMEngine(MoEModel.from_checkpoint(path, experts=experts))


def test_only_the_request_that_chose_a_missing_expert_fails(
    path: Path, colocated: MoEModel
) -> None:
    long, short, missing = _prompts(colocated)
    expected, _ = _run(LLMEngine(colocated), {"short": short, "other": short[::-1]})
    engine = _engine(path, colocated, missing)
    tokens, failed = _run(engine, {"long": long, "short": short, "other": short[::-1]})
    other_chose_it = missing in _used(colocated, short[::-1])
    assert sorted(failed) == (["long", "other"] if other_chose_it else ["long"])
    assert f"[{missing}] (layer, expert) have no live replica" in failed["long"]
    assert "experts.unavailable_wait_s" in failed["long"]
    assert tokens["short"] == expected["short"]
    if not other_chose_it:
        assert tokens["other"] == expected["other"]
    # the engine goes on: later requests that need nothing from s1 are served
    again, failed = _run(engine, {"short-2": short})
    assert again["short-2"] == expected["short"] and not failed
    # and one that needs it alone fails alone, every step of it dropped
    again, failed = _run(engine, {"long-2": long})
    assert list(failed) == ["long-2"] and not engine.has_unfinished()


def test_token_rows_map_to_their_chunks() -> None:
    class _Seq:  # only the chunk sizes matter
        pass

    chunks = [ScheduledChunk(_Seq(), n) for n in (3, 1, 5, 1)]  # type: ignore[arg-type]
    plan = SchedulerOutput(chunks=chunks)
    assert chunks_of_rows(plan, (0, 2)) == {0}
    assert chunks_of_rows(plan, (3, 9)) == {1, 3}
    assert chunks_of_rows(plan, (4, 8, 5)) == {2}
    assert chunks_of_rows(plan, (10,)) == set()  # outside the step: nothing to drop


def test_the_error_keeps_its_rows_across_processes() -> None:
    err = ExpertUnavailableError("experts [(1, 2)] ...", [(1, 2)], (0, 3), 5)
    back = pickle.loads(pickle.dumps(err))
    assert (back.missing, back.token_rows, back.num_tokens) == (((1, 2),), (0, 3), 5)
    assert str(back) == str(err)


def test_batch_generation_raises_a_failed_request_instead_of_cutting_it_short(
    path: Path, colocated: MoEModel
) -> None:
    long, short, missing = _prompts(colocated)
    model = _engine(path, colocated, missing).model
    params = [SamplingParams(max_tokens=NEW, ignore_eos=True)] * 2
    with pytest.raises(GenerationError, match=r"request 0 failed: .*have no live replica"):
        generate(model, [long, short], params)
