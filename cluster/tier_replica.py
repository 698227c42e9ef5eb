"""A model tier's replica: one engine behind the gateway channel, no Ray in sight.

The Serve deployment in ``deploy/app.py`` only wraps this class. It loads the
checkpoint, runs an ``AsyncEngine``, turns text prompts into ids, and streams
``TierItem``s: events produced while the caller was busy are sent as one
batch, which keeps the per-item transport cost off the decode loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path

from cluster.async_engine import AsyncEngine
from cluster.engine import EngineConfig, EngineRequest, LLMEngine, TokenEvent
from cluster.tier_messages import (
    TierAccepted,
    TierInfo,
    TierItem,
    TierRejected,
    TierRequest,
    TierStats,
    TierTokens,
)
from experts.backend import ExpertBackend
from experts.model import MoEModel
from experts.tokenizer import load_tokenizer


class TierReplica:
    def __init__(
        self,
        name: str,
        model_dir: str | Path,
        engine_config: EngineConfig,
        device: str = "cpu",
        experts: ExpertBackend | None = None,
    ) -> None:
        self.name = name
        self.model_dir = str(model_dir)
        model = MoEModel.from_checkpoint(model_dir, device=device, experts=experts)
        self.tokenizer = load_tokenizer(model_dir)
        self.engine = LLMEngine(model, engine_config, self.tokenizer)
        self.async_engine = AsyncEngine(self.engine)
        self.num_aborted = 0

    def info(self) -> TierInfo:
        spec = self.engine.model.spec
        return TierInfo(
            self.name, self.model_dir, spec.family.name, spec.is_moe, spec.max_position_embeddings
        )

    def stats(self) -> TierStats:
        engine = self.engine
        return TierStats(
            num_running=len(engine.scheduler.running),
            num_waiting=len(engine.scheduler.waiting),
            num_blocks=engine.blocks.num_blocks,
            num_blocks_held=engine.blocks.num_held,
            num_prompt_tokens_computed=engine.num_prompt_tokens_computed,
            num_steps=engine.num_steps,
            num_preemptions=engine.scheduler.num_preemptions,
            num_aborted=self.num_aborted,
        )

    def _prompt_ids(self, request: TierRequest) -> list[int]:
        if request.token_ids is not None:
            return list(request.token_ids)
        if self.tokenizer is None:
            raise ValueError(
                f"tier {self.name!r} has no tokenizer: send token_ids instead of prompt"
            )
        return list(self.tokenizer.encode(request.prompt or "").ids)

    async def generate(self, request: TierRequest) -> AsyncGenerator[TierItem, None]:
        try:
            ids = self._prompt_ids(request)
            engine_request = EngineRequest(
                request.request_id,
                ids,
                request.params,
                request.kv_policy,
                return_routing=request.return_routing,
            )
            self.engine.validate(engine_request)
        except ValueError as err:
            yield TierRejected("invalid_argument", str(err))
            return
        yield TierAccepted(len(ids))
        events: asyncio.Queue[TokenEvent | BaseException | None] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(engine_request, events))
        finished = False
        try:
            while not finished:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                tokens = [e for e in batch if isinstance(e, TokenEvent)]
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                if tokens:
                    finished = tokens[-1].finish_reason is not None
                    yield _to_tokens(tokens)
        finally:
            if not finished:
                self.num_aborted += 1
            pump.cancel()

    async def _pump(
        self, request: EngineRequest, events: asyncio.Queue[TokenEvent | BaseException | None]
    ) -> None:
        try:
            async for event in self.async_engine.generate(request):
                events.put_nowait(event)
        except ValueError as err:  # refused by the scheduler (e.g. too big for the pool)
            events.put_nowait(err)

    def shutdown(self) -> None:
        self.async_engine.shutdown()


def _to_tokens(events: list[TokenEvent]) -> TierTokens:
    last = events[-1]
    return TierTokens(
        token_ids=[e.token_id for e in events],
        logprobs=[e.logprob for e in events],
        text="".join(e.text for e in events),
        finish_reason=last.finish_reason,
        num_prompt_tokens=last.num_prompt_tokens,
        num_cached_prompt_tokens=last.num_cached_prompt_tokens,
        num_truncated_tokens=last.num_truncated_tokens,
        routing=tuple(e.routing or () for e in events) if last.routing is not None else None,
    )
