"""Driving an engine to the end in the engine's tests: the synchronous engine stepped by
hand, and a request's stream collected from either transport."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cluster.engine.client import EngineCore
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, TokenEvent
from experts.sampling_params import SamplingParams


def run_to_end(
    engine: LLMEngine, requests: Sequence[EngineRequest], max_steps: int = 10_000
) -> dict[str, list[TokenEvent]]:
    """Add every request and step until none is unfinished (a livelock fails, not hangs);
    each request's events. No block may be left held."""
    for request in requests:
        engine.add_request(request)
    events: dict[str, list[TokenEvent]] = {r.request_id: [] for r in requests}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for event in engine.step():
            events[event.request_id].append(event)
    assert not engine.has_unfinished(), f"unfinished after {max_steps} steps"
    assert engine.blocks.num_held == 0, "blocks leaked"
    return events


def random_request(rid: str, n: int = 12, length: int = 20) -> EngineRequest:
    """``length`` prompt ids drawn from [3, 256) (seeded by the id's length), ``n`` tokens."""
    prompt = torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(len(rid)))
    return EngineRequest(rid, prompt.tolist(), SamplingParams(max_tokens=n, ignore_eos=True))


async def collect(engine: EngineCore, request: EngineRequest) -> list[TokenEvent]:
    return [event async for event in engine.generate(request)]
