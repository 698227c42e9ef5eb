"""The engine each model-tier replica runs: continuous batching over a paged, prefix-reusing cache.

A step is three parts: the scheduler picks sequences and token counts (and
which cached partial blocks' K/V to copy into newcomers' fresh blocks; the
pool copies them first), the model runner computes them in one forward pass,
and post-processing samples, then the scheduler books the step (registers full
blocks for reuse, applies KV policies, retires finished requests) and the
tokens stream out (a request whose row cannot be sampled fails alone: see
``RequestFailure``). The engine is synchronous and single-threaded; its loop
(``cluster.engine.loop``) steps it on a thread of this process or in a child.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from tokenizers import Tokenizer

from cache.block_key import KeySpace
from cache.block_manager import BlockManager
from cache.kv_pool import KVPool
from cache.kv_store import BlockStore
from cache.prefix_hash import hash_blocks
from cluster.engine.admission import validate_request
from cluster.engine.config import EngineConfig
from cluster.engine.counters import EngineCounters
from cluster.engine.engine_kv import EngineKV, pool_layout
from cluster.engine.missing_experts import run_around_missing_experts
from cluster.engine.model_runner import ModelRunner, StepInput
from cluster.engine.requests import (
    AttentionStats,
    EngineRequest,
    RequestFailure,
    Routing,
    TokenEvent,
)
from cluster.engine.scheduler import (
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    chunk_slots,
    window_inputs,
)
from cluster.engine.sequence import Sequence as Seq
from cluster.kv_store.config import KVStoreConfig
from cluster.telemetry.step_trace import step_trace
from experts.model import MoEModel
from experts.sampling import SampledBatch, Sampler, sample_batch
from experts.tokenizer import IncrementalDetokenizer


def kv_bytes_per_block(model: MoEModel, block_size: int) -> int:
    """Bytes one KV block of ``block_size`` tokens takes for this model (all layers)."""
    spec = model.spec
    planes, heads, dim = spec.kv_cache_shape
    layers = spec.kv_pool_layers  # a block holds one KV group's layers
    return KVPool.bytes_per_block(layers, block_size, heads, dim, model.dtype, planes)


class _Sampled(NamedTuple):
    """A row's sampled token, and the keys its sequence had evicted when it was computed."""

    token: int
    logprob: float
    num_truncated: int


class LLMEngine:
    """One model on one device, stepped by a continuous-batching scheduler over a paged cache.

    ``step`` is the whole contract: the scheduler plans, the model runner computes, and the
    scheduler books the outcome; between them this class only samples, streams and fails
    requests whose rows cannot be sampled. Each request's sampler (its seeded generator)
    lives here, by request id, so the scheduler's sequences stay torch-free.
    """

    def __init__(
        self,
        model: MoEModel,
        config: EngineConfig | None = None,
        tokenizer: Tokenizer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.clock = clock
        spec = model.spec
        num_blocks = self.config.resolve_num_blocks(
            kv_bytes_per_block(model, self.config.block_size)
        )
        planes, heads, dim = spec.kv_cache_shape  # MLA: one latent entry per token
        self.pool = KVPool(
            spec.num_layers,
            num_blocks,
            self.config.block_size,
            heads,
            dim,
            model.dtype,
            model.device,
            planes,
            spec.kv_layer_slots,
        )
        self.blocks = BlockManager(
            num_blocks,
            self.config.block_size,
            self.config.enable_prefix_caching,
            windows=spec.kv_group_windows,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens),
            self.blocks,
            clock,
            spec.eos_token_ids,
        )
        self.runner = ModelRunner(model, self.pool)
        self._seqs: dict[str, Seq] = {}
        self.samplers: dict[str, Sampler] = {}  # request id -> its sampler (seeded generator)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self.num_steps = 0
        self.failures: list[RequestFailure] = []  # requests that failed in the last step
        # KV events and the cluster store (``attach_kv``); None: this engine's cache only
        self.kv: EngineKV | None = None

    def attach_kv(
        self, model_id: str, store: BlockStore | None = None, config: KVStoreConfig | None = None
    ) -> EngineKV:
        """Record KV events (and fetch from / publish to ``store``) under ``model_id``'s keys."""
        assert self.kv is None and not self._seqs, "attach the KV link before any request"
        keyspace = KeySpace(model_id, pool_layout(self.pool, self.config.block_size))
        self.kv = EngineKV(
            self.pool, self.blocks, self.scheduler, keyspace, self.clock, store, config
        )
        return self.kv

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; bad input raises ``ValueError`` saying what is wrong."""
        if request.request_id in self._seqs:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.validate(request)
        seq = Seq(
            request.request_id,
            list(request.prompt_ids),
            request.params,
            request.kv_policy,
            self.clock(),
            request.return_routing,
            request.trace_parent,
            request.attention_first_tokens,
            cache_salt=request.cache_salt,
            output_ids=list(request.resume_ids),  # already generated: output, not prompt
        )
        self.scheduler.check(seq)
        if request.pin_tokens and request.pin_ttl_s > 0:  # soft: evicted last, until then
            count = min(request.pin_tokens, len(seq.prompt_ids)) // self.config.block_size
            hashes = hash_blocks(seq.prompt_ids, self.config.block_size, count, seq.root_hash)
            self.blocks.pin(hashes, self.clock() + request.pin_ttl_s)
        if self.kv is None or not self.kv.admit(seq):  # else it joins once its fetch is done
            self.scheduler.add(seq)
        self._seqs[seq.request_id] = seq
        self.samplers[seq.request_id] = Sampler(request.params)
        if self.tokenizer is not None:
            detok = self._detok[seq.request_id] = IncrementalDetokenizer(self.tokenizer)
            for token in request.resume_ids:  # their text was sent: the next delta follows it
                detok.push(token)

    def abort(self, request_id: str) -> bool:
        """Stop a request at any point and free its blocks; False if it is not here."""
        seq = self.scheduler.abort(request_id)
        if self.kv is not None:
            seq = self.kv.drop(request_id) or seq
        self._forget(request_id)
        return seq is not None

    def abort_all(self) -> None:
        """Stop every request and free its blocks (the engine is shutting down)."""
        for request_id in list(self._seqs):
            self.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or (self.kv is not None and self.kv.has_pending())

    @property
    def num_requests(self) -> int:
        return len(self._seqs)

    @property
    def num_prompt_tokens_computed(self) -> int:
        return self.scheduler.num_prompt_tokens_computed

    def step(self) -> list[TokenEvent]:
        """Schedule, run the model, post-process. Returns the tokens generated this step;
        requests that failed in it alone are finished and listed in ``failures``."""
        self.failures = []
        self.blocks.expire_pins(self.clock())
        if self.kv is not None:
            for seq in self.kv.ready():  # fetched prefixes are in the pool: admit as usual
                self.scheduler.add(seq)
        plan = self.scheduler.schedule()
        if self.kv is not None:
            self.kv.after_schedule(plan)
        if not plan.chunks:
            if self.kv is not None:
                self.kv.idle_wait()  # only fetches are pending
            return []
        # an expert with no live replica ends only the requests whose tokens chose it
        plan, logits, lost = run_around_missing_experts(self._run, plan)  # [B, V]
        events = self._postprocess(plan, logits) if logits is not None else []
        self.failures += [self._fail(chunk, reason) for chunk, reason in lost]
        return events

    def _run(self, plan: SchedulerOutput) -> torch.Tensor:  # [B, V]
        """The plan's slot copies, then one forward pass over its chunks."""
        chunks = plan.chunks
        capture = self.model.spec.is_moe and any(c.seq.return_routing for c in chunks)
        traced = [c.seq.trace_parent for c in chunks if c.seq.trace_parent]
        # a step's shard work is recorded under one traced request, taken in turn
        trace_parent = traced[self.num_steps % len(traced)] if traced else ""
        for copy in plan.copies:  # cached tail K/V into newcomers' blocks, before any write
            self.pool.copy_slots(copy.src_block, copy.dst_block, copy.num_slots)
        inputs = [self._step_input(c) for c in chunks]
        with step_trace(trace_parent):  # shard work of this step joins one traced request
            logits = self.runner.run(inputs, capture_routing=capture)  # [B, V]
        self.num_steps += 1
        return logits

    def _step_input(self, chunk: ScheduledChunk) -> StepInput:
        seq = chunk.seq
        start = seq.num_computed
        ids = seq.ids_between(start, start + chunk.num_tokens)
        first_keys = None
        # probe only the chunk whose last position gives a token (the final prefill chunk)
        if seq.attention_first_tokens and start + chunk.num_tokens == seq.num_tokens:
            num_keys = seq.num_keys + chunk.num_tokens
            size = self.config.block_size
            first_keys = seq.num_keys_before(seq.attention_first_tokens, num_keys, size)
        windows = window_inputs(seq, self.config.block_size)  # sliding groups' own tables
        return StepInput(ids, seq.block_table, seq.num_keys, start, first_keys, windows)

    def _postprocess(self, plan: SchedulerOutput, logits: torch.Tensor) -> list[TokenEvent]:
        """Sample the rows that give a token, let the scheduler book the step, then stream
        the tokens and fail the rows that could not be sampled."""
        chunks = plan.chunks
        # a chunk that reaches the end of its sequence gives a token from its logits
        rows = [r for r, c in enumerate(chunks) if c.seq.num_uncomputed == c.num_tokens]
        samplers = [self.samplers[chunks[r].seq.request_id] for r in rows]
        # each draw depends on (seed, index of the token): a resumed request draws as before
        indices = [len(chunks[r].seq.output_ids) for r in rows]
        sampled = (
            sample_batch(logits[rows], samplers, indices) if rows else SampledBatch([], [], {})
        )
        failed = {rows[i]: reason for i, reason in sampled.failed.items()}
        tokens = {
            # the keys evicted so far are those the token was computed without: its event
            # reports them, not the evictions the scheduler makes after this step
            row: _Sampled(token, logprob, chunks[row].seq.num_dropped)
            for row, token, logprob in zip(rows, sampled.tokens, sampled.logprobs, strict=True)
            if row not in failed
        }
        self.scheduler.update(plan, {row: t.token for row, t in tokens.items()}, failed)
        if self.kv is not None:
            self.kv.after_update()  # events for the blocks named, queued for the store
        events = self._emit_rows(chunks, tokens)
        self.failures = [self._fail(chunks[row], reason) for row, reason in failed.items()]
        return events

    def _emit_rows(
        self, chunks: list[ScheduledChunk], tokens: dict[int, _Sampled]
    ) -> list[TokenEvent]:
        """A token event for each row that gave a token (already booked by the scheduler)."""
        if not tokens:
            return []
        now = self.clock()
        chosen = self._routing_rows()
        events = []
        for row, sampled in tokens.items():
            seq = chunks[row].seq
            routing = chosen[row] if seq.return_routing and chosen is not None else None
            layers = self.runner.attention.get(row) if seq.attention_first_tokens else None
            attention = tuple(layers) if layers is not None else None
            events.append(self._emit(seq, sampled, now, routing, attention))
        return events

    def _fail(self, chunk: ScheduledChunk, reason: str) -> RequestFailure:
        """Finish a request whose row could not be sampled: zero the K/V its chunk wrote this
        step, then free its blocks.

        NaN K/V left in the pool would reach other requests: attention reads pool slot 0 as
        every sequence's key padding, and a masked key's NaN value still turns the output
        NaN (0 * NaN). A NaN token's K/V is NaN, and within the chunk it leaks into earlier
        positions' outputs the same way, so the chunk's first key (maybe slot 0) is too.
        Keys of earlier steps are finite: that step's logits were.
        """
        seq = chunk.seq  # its keys were not counted: it failed
        self.pool.zero_slots(chunk_slots(seq, chunk.num_tokens, self.config.block_size))
        self.scheduler.finish(seq, "error")
        self._forget(seq.request_id)
        return RequestFailure(seq.request_id, f"the engine could not go on with it: {reason}")

    def _routing_rows(self) -> list[Routing] | None:
        """Per step row, the experts each MoE layer chose (one device-to-host copy a step)."""
        chosen = self.runner.routing
        if chosen is None:
            return None
        layers = self.model.spec.moe_layers
        return [
            tuple((layer, tuple(ids)) for layer, ids in zip(layers, row, strict=True))
            for row in chosen.tolist()  # [B][L_moe][K]
        ]

    def _emit(
        self,
        seq: Seq,
        sampled: _Sampled,
        now: float,
        routing: Routing | None = None,
        attention: AttentionStats | None = None,
    ) -> TokenEvent:
        """The event of a token the scheduler just appended (and maybe finished on)."""
        reason = seq.finish_reason
        detok = self._detok.get(seq.request_id)
        text = ""
        if detok is not None:
            text = detok.push(sampled.token) + (detok.flush() if reason is not None else "")
        event = TokenEvent(
            request_id=seq.request_id,
            token_id=sampled.token,
            index=len(seq.output_ids) - 1,
            logprob=sampled.logprob,
            text=text,
            finish_reason=reason,
            num_prompt_tokens=len(seq.prompt_ids),
            # a resumed request's cache hits may reach into its resumed (output) tokens
            num_cached_prompt_tokens=min(seq.num_cached_prompt_tokens, len(seq.prompt_ids)),
            num_truncated_tokens=sampled.num_truncated,
            arrival_time=seq.arrival_time,
            time=now,
            routing=routing,
            scheduled_time=seq.first_scheduled_time,
            attention=attention,
            num_store_cached_tokens=seq.num_store_cached_tokens,
            kv_miss=seq.kv_miss,
        )
        if reason is not None:
            self._forget(seq.request_id)
        return event

    def _forget(self, request_id: str) -> None:
        self._seqs.pop(request_id, None)
        self.samplers.pop(request_id, None)
        self._detok.pop(request_id, None)

    def validate(self, request: EngineRequest) -> None:
        """Raise ``ValueError`` saying what is wrong with a request for this engine."""
        validate_request(request, self.model.spec, self.config.block_size, self.blocks.num_blocks)
        vocab = self.model.spec.vocab_size
        bad = [t for t in request.resume_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"resume_ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def counters(self) -> EngineCounters:
        return EngineCounters(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks=self.blocks.num_blocks,
            num_blocks_held=self.blocks.num_held,
            num_prompt_tokens_computed=self.num_prompt_tokens_computed,
            num_steps=self.num_steps,
            num_preemptions=self.scheduler.num_preemptions,
            num_evictions=self.blocks.num_evictions,
        )
