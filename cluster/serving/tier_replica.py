"""A model tier's replica: one engine behind the gateway channel, no Ray in sight.

The Serve deployment in ``deploy/tier_hosts.py`` only wraps this class. It runs the
engine, in a process of its own (``cluster.engine.engine_process``, where the replica's
own Python threads cannot take its GIL; it reaches sharded experts itself) or in this
one (``cluster.engine.async_engine``, needed by a shard pool's ``ray`` data plane),
checks requests, turns text prompts into ids, and streams ``TierItem``s: events
produced while the caller was busy are sent as one batch, which keeps the per-item
transport cost off the decode loop.

Each streamed item costs CPU in every process it crosses (this replica, the
gateway, the client), whatever it carries, while the engine's
step gets cheaper per token as the batch grows. So under load a stream's tokens
go out in bigger items: see ``stream_interval_for``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import asdict, replace
from pathlib import Path

from cache.kv_store import BlockStore
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.client import MAX_KV_EVENT_BATCHES, EngineCore
from cluster.engine.config import EngineConfig
from cluster.engine.engine_process import EngineProcess
from cluster.engine.kv_events import KVEventBatch
from cluster.engine.launch import EngineKVLaunch, EngineLaunch
from cluster.engine.requests import EngineRequest, TokenEvent
from cluster.engine.streams import EngineStoppedError, RequestFailedError
from cluster.kv_store.client import StoreClient
from cluster.kv_store.relay import LiveStoreFactory, StoreRelay
from cluster.serving.request_trace import RequestTrace, ShardOf
from cluster.serving.tier_messages import (
    TierInfo,
    TierItem,
    TierRejected,
    TierRequest,
    TierStats,
    TierTokens,
)
from cluster.telemetry.setup import get_telemetry
from experts.backend import ExpertBackend, ExpertBackendFactory
from experts.tokenizer import load_tokenizer, max_token_bytes
from router.routing_table import RoutingTable

# a prompt longer than this is tokenized on a worker thread, off the event loop (70 ms for
# 69 kB with the demo tokenizer; a 1 MiB prompt took 1-5 s)
TOKENIZE_INLINE_CHARS = 16_384


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


class TierReplica:
    def __init__(
        self,
        name: str,
        model_dir: str | Path,
        engine_config: EngineConfig,
        device: str = "cpu",
        experts: ExpertBackend | None = None,
        stream_interval: int = 1,
        stream_items_per_step: int = 0,
        engine_process: bool = False,
        max_queue_wait_s: float | None = None,
        expert_factory: ExpertBackendFactory | None = None,
        count_routing: bool = False,
        kv: EngineKVLaunch | None = None,
    ) -> None:
        """``experts``: a live expert backend (in-process engine only); ``expert_factory``: a
        recipe for one, built where the engine runs (in the engine process, which reaches a
        shard pool's experts itself); neither: the checkpoint's own experts.
        ``count_routing``: count routed tokens even without metrics (live re-placement).
        ``kv``: the engine's KV events and cluster store; the store's client is built here
        (an engine process reaches it through this replica's ``StoreRelay``)."""
        if stream_interval < 1:
            raise ValueError(f"stream_interval={stream_interval} must be >= 1")
        if stream_items_per_step < 0:
            raise ValueError(f"stream_items_per_step={stream_items_per_step} must be >= 0")
        self.name = name
        self.max_queue_wait_s = max_queue_wait_s
        self.stream_interval = stream_interval
        self.stream_items_per_step = stream_items_per_step
        self.num_streams = 0  # requests streaming tokens now; touched on the event loop only
        if experts is not None and expert_factory is not None:
            raise ValueError(f"tier {name!r}: give experts or expert_factory, not both")
        if engine_process and experts is not None:  # it holds channels and threads
            raise ValueError(
                f"tier {name!r}: an engine process cannot reach a shard pool's experts through "
                "a live backend; pass expert_factory, which the engine process builds itself"
            )
        self.model_dir = str(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        telemetry = get_telemetry()
        self._relay: StoreRelay | None = None
        self.store: BlockStore | None = None
        if kv is not None and kv.store is not None:
            self.store = kv.store.build()
            if engine_process:  # the child makes no Ray call: it asks this replica
                self._relay = StoreRelay(self.store, kv.config)
                kv = replace(kv, store=self._relay.factory)
            else:
                kv = replace(kv, store=LiveStoreFactory(self.store))
        launch = EngineLaunch(
            self.model_dir,
            engine_config,
            device,
            # the child gets as many torch threads as this process has
            torch_threads=_torch_threads() if engine_process else None,
            count_routing=telemetry.metrics_enabled or count_routing,
            experts=expert_factory,
            kv=kv,
        )
        # one recipe, either transport: the child builds it, or this process does
        self.engine: EngineCore = (
            EngineProcess(launch) if engine_process else AsyncEngine.start(launch, experts)
        )
        self.num_aborted = 0
        # where the experts live (a backend, or a factory's recipe): its routing table names
        # the shard of each (layer, expert) in traces
        self.experts: ExpertBackend | ExpertBackendFactory | None = (
            experts if experts is not None else expert_factory
        )
        # a prompt longer than this many bytes cannot fit the context: refused untokenized
        per_token = max_token_bytes(self.tokenizer) if self.tokenizer is not None else 1
        self.max_prompt_bytes = self.engine.spec.max_position_embeddings * per_token
        telemetry.metrics.add_kv_source(name, self._kv_usage)
        if isinstance(self.store, StoreClient):
            telemetry.metrics.add_store_source(f"{name}-{id(self)}", self._store_usage)
        self._evictions_seen = 0
        # the engine's KV event batches, for whoever routes to this replica (``kv_events``)
        self._kv_events: deque[KVEventBatch] = deque(maxlen=MAX_KV_EVENT_BATCHES)
        # the routed counts also go here (``PlacementReporter.add``) when re-placement is on
        self.on_routed: Callable[[dict[tuple[int, int], int]], None] | None = None

    def _store_usage(self) -> dict[str, tuple[int, int, int]]:
        stats = self.store.stats if isinstance(self.store, StoreClient) else {}
        return {s: (st.num_bytes, st.num_lookups, st.num_hits) for s, st in stats.items()}

    def kv_events(self) -> list[KVEventBatch]:
        """The engine's KV event batches since the last call (a router's feed); after a
        gap in their sequence numbers, ask ``request_kv_snapshot``."""
        self._take_kv_events()
        batches = list(self._kv_events)
        self._kv_events.clear()
        return batches

    def request_kv_snapshot(self) -> None:
        self.engine.request_kv_snapshot()

    def _take_kv_events(self) -> None:
        ages: list[float] = []
        for batch in self.engine.take_kv_events():
            self._kv_events.append(batch)
            ages.extend(batch.eviction_ages)
        get_telemetry().metrics.record_block_ages(self.name, "local", ages)

    def _kv_usage(self) -> tuple[int, int]:
        counters = self.engine.counters()
        return counters.num_blocks_held, counters.num_blocks

    def info(self) -> TierInfo:
        spec = self.engine.spec
        return TierInfo(
            self.name, self.model_dir, spec.family.name, spec.is_moe, spec.max_position_embeddings
        )

    def stats(self) -> TierStats:
        return TierStats(**asdict(self.engine.counters()), num_aborted=self.num_aborted)

    def queue_wait_s(self, request: TierRequest) -> float | None:
        """How long the request waited for this replica, when that is over
        ``max_queue_wait_s`` (wall clocks: the gateway's and this node's); else None."""
        if self.max_queue_wait_s is None or request.sent_at <= 0:
            return None
        waited = time.time() - request.sent_at
        return waited if waited > self.max_queue_wait_s else None

    def _prompt_ids(self, request: TierRequest) -> list[int]:
        if request.token_ids is not None:
            return list(request.token_ids)
        if self.tokenizer is None:
            raise ValueError(
                f"tier {self.name!r} has no tokenizer: send token_ids instead of prompt"
            )
        prompt = request.prompt or ""
        # characters <= bytes: a prompt long in characters is refused without encoding it
        if len(prompt) > self.max_prompt_bytes or len(prompt.encode()) > self.max_prompt_bytes:
            context = self.engine.spec.max_position_embeddings
            raise ValueError(
                f"prompt is over {self.max_prompt_bytes} bytes: more text than tier "
                f"{self.name!r}'s context of {context} tokens can hold; shorten it"
            )
        if len(prompt) <= TOKENIZE_INLINE_CHARS:
            return list(self.tokenizer.encode(prompt).ids)
        # called on a worker thread: encode_batch lets go of the GIL (encode does not), so the
        # event loop keeps streaming other requests' tokens meanwhile
        return list(self.tokenizer.encode_batch([prompt])[0].ids)

    async def generate(self, request: TierRequest) -> AsyncGenerator[TierItem, None]:
        waited = self.queue_wait_s(request)
        if waited is not None:  # shed: answering it now could not be fast any more
            yield TierRejected(
                "resource_exhausted",
                f"tier {self.name!r} is at capacity: the request waited {waited:.3g} s for a "
                f"replica (max_queue_wait_s {self.max_queue_wait_s:g}); retry later",
            )
            return
        try:
            if len(request.prompt or "") > TOKENIZE_INLINE_CHARS:  # off the event loop
                ids = await asyncio.to_thread(self._prompt_ids, request)
            else:
                ids = self._prompt_ids(request)
            engine_request = EngineRequest(
                request.request_id,
                ids,
                request.params,
                request.kv_policy,
                return_routing=request.return_routing,
                attention_first_tokens=request.attention_first_tokens,
                cache_salt=request.cache_salt,
                pin_tokens=request.pin_tokens,
                pin_ttl_s=request.pin_ttl_s,
                resume_ids=request.resume_token_ids,
            )
            self.engine.validate(engine_request)
            _check_vocab(request.resume_token_ids, self.engine.spec.vocab_size)
        except ValueError as err:
            yield TierRejected("invalid_argument", str(err))
            return
        traced = RequestTrace(
            get_telemetry(), self.name, request.request_id, request.traceparent, self._shard_of()
        )
        engine_request = replace(
            engine_request,
            trace_parent=traced.traceparent,
            return_routing=request.return_routing or traced.wants_routing,
        )
        self.num_streams += 1
        finished = False
        error: str | None = "cancelled before the end"
        tokens: list[TokenEvent] = []
        first_index = len(request.resume_token_ids)  # this stream's first token's index
        # each batch holds every token that arrived while this stream's caller was busy
        batches = self.engine.generate_batches(engine_request)
        try:
            async for batch in batches:
                tokens += batch
                finished = tokens[-1].finish_reason is not None
                # the first token goes out at once (time to first token); later ones in
                # items whose size grows with the number of streams (see stream_interval_for)
                first = tokens[0].index == first_index
                if not finished and not first and len(tokens) < self.current_interval():
                    continue
                traced.add(tokens)
                attention = traced.attention() if finished else None
                yield _to_tokens(tokens, request.return_routing, attention, first)
                tokens = []
            error = None
        except EngineStoppedError as err:
            # the engine died or shut down (new requests are refused at once), or failed
            # this request alone
            error = str(err)
            what = (
                "failed this request"
                if isinstance(err, RequestFailedError)
                else "stopped generating"
            )
            yield TierRejected(
                "unavailable",
                f"tier {self.name!r} {what} ({err}); retry",
                # the engine is gone (not this request's own failure): another replica can
                # take the request over
                engine_stopped=not isinstance(err, RequestFailedError),
            )
        except Exception as err:  # refused by the engine itself (ValueError): recorded, raised
            error = str(err)
            raise
        finally:
            await batches.aclose()  # leaving early aborts the request in the engine
            self.num_streams -= 1
            if not finished:
                self.num_aborted += 1
            traced.finish(error)
            self._flush_metrics()

    def current_interval(self) -> int:
        """Tokens per streamed item (after the first) for the streams open now."""
        return stream_interval_for(
            self.num_streams, self.stream_interval, self.stream_items_per_step
        )

    def _shard_of(self) -> ShardOf | None:
        """Which shard holds a (layer, expert), when the experts are remote."""
        table = getattr(self.experts, "table", None)
        if not isinstance(table, RoutingTable):
            return None
        return lambda layer, expert: table.shards_for(layer, expert)[0]

    def _flush_metrics(self) -> None:
        """Engine-wide counters since the last request ended, into the metrics."""
        metrics = get_telemetry().metrics
        routed = self.engine.take_routed_counts()
        metrics.record_routing(self.name, routed)
        if self.on_routed is not None and routed:
            self.on_routed(routed)
        self._take_kv_events()
        evictions = self.engine.counters().num_evictions
        metrics.record_evictions(self.name, evictions - self._evictions_seen)
        self._evictions_seen = evictions

    def shutdown(self) -> None:
        self.engine.shutdown()
        if self._relay is not None:
            self._relay.close()


def stream_interval_for(num_streams: int, minimum: int, items_per_step: int) -> int:
    """Tokens per streamed item after a stream's first, given how many streams are open.

    Every open stream gets a token per engine step, so sending each at once costs
    ``num_streams`` items per step. Grouping them ``ceil(num_streams / items_per_step)``
    at a time keeps it near ``items_per_step`` items per step at any batch size (the
    streams' items are staggered: they started at different steps); ``minimum`` is the
    tier's ``stream_interval``, and ``items_per_step`` 0 turns the adaptation off.
    """
    if items_per_step <= 0:
        return minimum
    return max(minimum, -(-num_streams // items_per_step))


def _to_tokens(
    events: list[TokenEvent],
    with_routing: bool,
    attention: tuple[tuple[float, float], ...] | None = None,
    first: bool = False,
) -> TierTokens:
    """``first``: the batch holds the stream's first token (it carries the queueing time)."""
    last = events[-1]
    first_scheduled = events[0].scheduled_time if first else None
    return TierTokens(
        token_ids=[e.token_id for e in events],
        logprobs=[e.logprob for e in events],
        text="".join(e.text for e in events),
        finish_reason=last.finish_reason,
        num_prompt_tokens=last.num_prompt_tokens,
        num_cached_prompt_tokens=last.num_cached_prompt_tokens,
        num_truncated_tokens=last.num_truncated_tokens,
        routing=tuple(e.routing or () for e in events)
        if with_routing and last.routing is not None
        else None,
        queue_s=None if first_scheduled is None else first_scheduled - events[0].arrival_time,
        attention=attention,
        num_store_cached_tokens=last.num_store_cached_tokens,
        kv_miss=last.kv_miss,
    )


def _check_vocab(token_ids: tuple[int, ...], vocab_size: int) -> None:
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"resume_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
