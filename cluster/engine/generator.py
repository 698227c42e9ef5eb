"""Batch generation in-process: every prompt through one engine, concurrently.

Used by ``moe-cluster generate`` and the tests. The KV pool is sized so the
whole batch fits when that is cheap, and capped by the engine's memory budget
otherwise (the scheduler then queues and preempts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cache.block_allocator import blocks_for
from cache.kv_policy import KVPolicy
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine, kv_bytes_per_block
from cluster.engine.requests import EngineRequest
from experts.model import MoEModel
from experts.sampling_params import SamplingParams


class GenerationError(RuntimeError):
    """A request of the batch failed in the engine (the message says which and why)."""


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)  # generated ids only
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"
    num_cached_prompt_tokens: int = 0


TokenCallback = Callable[[int, int], None]  # (request index, token id)


def generate(
    model: MoEModel,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    block_size: int = 16,
    on_token: TokenCallback | None = None,
    kv_policies: Sequence[KVPolicy] | None = None,
) -> list[GenerationResult]:
    """Generate for every prompt together; each gets exactly the tokens it would get alone.

    Bad input raises ``ValueError`` before anything runs. A request the engine fails on its
    own (an expert with no live replica, a row that cannot be sampled) raises
    ``GenerationError`` with its reason, and the batch stops: a result is never cut short
    silently.
    """
    assert len(prompts) == len(params), f"{len(prompts)} prompts vs {len(params)} params"
    policies = list(kv_policies) if kv_policies is not None else [KVPolicy()] * len(prompts)
    groups = len(model.spec.kv_group_windows)  # each KV group holds up to every block
    need = [
        blocks_for(len(pr) + p.max_tokens, block_size) * groups
        for pr, p in zip(prompts, params, strict=True)
    ]
    budget = EngineConfig(block_size=block_size).resolve_num_blocks(
        kv_bytes_per_block(model, block_size)
    )
    num_blocks = max(max(need, default=1), min(sum(need), budget))
    engine = LLMEngine(model, EngineConfig(block_size=block_size, num_blocks=num_blocks))
    requests = [
        EngineRequest(str(i), list(prompt), p, policy)
        for i, (prompt, p, policy) in enumerate(zip(prompts, params, policies, strict=True))
    ]
    for request in requests:  # validate them all before running any
        engine.validate(request)
    for request in requests:
        engine.add_request(request)
    results = [GenerationResult() for _ in prompts]
    while engine.has_unfinished():
        events = engine.step()
        if engine.failures:
            failure = engine.failures[0]
            engine.abort_all()
            raise GenerationError(f"request {failure.request_id} failed: {failure.reason}")
        for event in events:
            index = int(event.request_id)
            res = results[index]
            res.token_ids.append(event.token_id)
            res.logprobs.append(event.logprob)
            res.finish_reason = event.finish_reason
            res.num_cached_prompt_tokens = event.num_cached_prompt_tokens
            if on_token is not None:
                on_token(index, event.token_id)
    assert engine.blocks.num_held == 0, "blocks leaked"
    return results
