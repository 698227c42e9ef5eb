"""The cluster's OpenTelemetry metric instruments, behind one small recording API.

Every attribute set is bounded by the deployment, never by traffic: tier names, model names,
finish reasons, MoE layer and expert indices, shard indices. Request ids, sessions and text
belong on spans, not here, so a Prometheus scrape stays small however long the cluster runs.
Built on a no-op meter when metrics are off, every method is then a cheap no-op.

Hot paths record plain data instead (``record_dispatch_layer``: one deque append per MoE layer):
a ``SpanBatcher`` of this object's own turns it into measurements on its thread, and every
collection drains what is still queued before it reads, so a scrape or a ``force_flush`` sees
each layer recorded before it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.trace import ReadableSpan

from cluster.telemetry.span_batch import SpanBatcher

logger = logging.getLogger(__name__)

# Bucket boundaries advised by the OpenTelemetry GenAI semantic conventions (seconds).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
# A shard call is one MoE layer's expert work for a batch: sub-millisecond to a second.
DISPATCH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# How long a KV block stayed cached before eviction: a fraction of a second under pressure,
# hours for a pinned system prompt.
BLOCK_AGE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
# Shadow divergence is 1 - token agreement, in [0, 1].
DIVERGENCE_BUCKETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)

# name -> (unit, description, bucket boundaries) of each histogram
HISTOGRAMS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "gen_ai.server.time_to_first_token": (
        "s",
        "Time to generate the first token of a request",
        TTFT_BUCKETS,
    ),
    "gen_ai.server.time_per_output_token": (
        "s",
        "Mean time per output token after the first, per request",
        TPOT_BUCKETS,
    ),
    "gen_ai.server.request.duration": (
        "s",
        "End-to-end request duration",
        REQUEST_DURATION_BUCKETS,
    ),
    "moe.shard.dispatch.duration": ("s", "Duration of one expert-shard call", DISPATCH_BUCKETS),
    "moe.kv.block_age_at_eviction": (
        "s",
        "Seconds a KV block had been cached when it was evicted (moe.kv.where: local, with "
        "moe.tier, or store, with moe.kv_store.shard)",
        BLOCK_AGE_BUCKETS,
    ),
    "moe.shadow.divergence": (
        "1",
        "Divergence of a shadow tier from the primary (1 - token agreement)",
        DIVERGENCE_BUCKETS,
    ),
}
# name -> (unit, description) of each counter; the attributes each takes are in its record_*
COUNTERS: dict[str, tuple[str, str]] = {
    "moe.routed_tokens": ("{token}", "Tokens routed to each MoE expert"),
    "moe.kv.prefix_lookup_tokens": ("{token}", "Prompt tokens looked up in the prefix cache"),
    "moe.kv.prefix_hit_tokens": (
        "{token}",
        "Prompt tokens served from the prefix cache (hit rate = hit / lookup)",
    ),
    "moe.kv.evicted_blocks": ("{block}", "KV blocks evicted"),
    "moe.kv.store_hit_tokens": (
        "{token}",
        "Prompt tokens whose K/V came from the cluster KV store (part of prefix_hit_tokens)",
    ),
    "moe.kv.misses": (
        "{request}",
        "Requests that computed some full prompt block, by moe.kv.miss_reason",
    ),
    "moe.kv.truncated_tokens": ("{token}", "Context tokens dropped by KV window policies"),
    "moe.escalations": ("{request}", "Requests escalated between tiers"),
    "moe.resubmissions": ("{request}", "Requests resubmitted after their replica was lost"),
}

KvSource = Callable[[], tuple[int, int]]  # () -> (blocks in use, blocks total)
# () -> per store shard: (bytes held, lookups, hits) as its client last saw them
StoreSource = Callable[[], Mapping[str, tuple[int, int, int]]]


class Metrics:
    """Records request latency, expert routing, shard dispatch, KV cache and tier-policy metrics.

    Latency histograms follow the GenAI semantic conventions (``gen_ai.server.*``, seconds,
    ``gen_ai.request.model``) with ``moe.tier`` added; the rest are ``moe.*`` instruments.
    """

    def __init__(self, meter: Meter) -> None:
        histograms = {
            name: meter.create_histogram(
                name, unit=u, description=d, explicit_bucket_boundaries_advisory=buckets
            )
            for name, (u, d, buckets) in HISTOGRAMS.items()
        }
        self._ttft = histograms["gen_ai.server.time_to_first_token"]
        self._tpot = histograms["gen_ai.server.time_per_output_token"]
        self._duration = histograms["gen_ai.server.request.duration"]
        self._dispatch = histograms["moe.shard.dispatch.duration"]
        self._divergence = histograms["moe.shadow.divergence"]
        self._block_age = histograms["moe.kv.block_age_at_eviction"]
        counters = {
            name: meter.create_counter(name, unit=u, description=d)
            for name, (u, d) in COUNTERS.items()
        }
        self._routed = counters["moe.routed_tokens"]
        self._prefix_lookup = counters["moe.kv.prefix_lookup_tokens"]
        self._prefix_hit = counters["moe.kv.prefix_hit_tokens"]
        self._evicted = counters["moe.kv.evicted_blocks"]
        self._truncated = counters["moe.kv.truncated_tokens"]
        self._escalations = counters["moe.escalations"]
        self._resubmissions = counters["moe.resubmissions"]
        self._store_hit = counters["moe.kv.store_hit_tokens"]
        self._misses = counters["moe.kv.misses"]
        self._store_sources: dict[str, StoreSource] = {}
        self._kv_sources: dict[str, KvSource] = {}
        self._kv_lock = threading.Lock()
        self._later = SpanBatcher(())  # hot-path records, made measurements on its thread
        meter.create_observable_gauge(
            "moe.kv.blocks_in_use",
            callbacks=[self._observe_blocks_in_use],
            unit="{block}",
            description="KV cache blocks holding sequences",
        )
        meter.create_observable_gauge(
            "moe.kv_store.bytes",
            callbacks=[self._observe_store_bytes],
            unit="By",
            description="Bytes of KV blocks a cluster KV store shard holds (moe.kv_store.shard)",
        )
        meter.create_observable_gauge(
            "moe.kv_store.hit_ratio",
            callbacks=[self._observe_store_hits],
            unit="1",
            description="Share of the keys looked up in a store shard that it held, since start",
        )
        meter.create_observable_gauge(
            "moe.kv.blocks_total",
            callbacks=[self._observe_blocks_total],
            unit="{block}",
            description="KV cache blocks in the pool",
        )

    def record_request(
        self,
        tier: str,
        model: str,
        ttft_s: float | None,
        tpot_s: float | None,
        duration_s: float,
        finish_reason: str,
    ) -> None:
        """``ttft_s`` is None when no token came out, ``tpot_s`` when fewer than two did."""
        attrs = {"gen_ai.request.model": model, "moe.tier": tier}
        if ttft_s is not None:
            self._ttft.record(ttft_s, attrs)
        if tpot_s is not None:
            self._tpot.record(tpot_s, attrs)
        self._duration.record(duration_s, {**attrs, "moe.finish_reason": finish_reason})

    def record_routing(self, tier: str, counts: Mapping[tuple[int, int], int]) -> None:
        """``counts`` maps (MoE layer, expert) to the tokens routed there since the last call."""
        for (layer, expert), n in counts.items():
            if n > 0:
                self._routed.add(n, {"moe.tier": tier, "moe.layer": layer, "moe.expert": expert})

    def record_dispatch(self, tier: str, shard: str, seconds: float) -> None:
        self._dispatch.record(seconds, {"moe.tier": tier, "moe.shard": shard})

    def record_dispatch_layer(
        self, tier: str, shards: Sequence[str], seconds: Sequence[float]
    ) -> None:
        """One MoE layer's shard round trips (``seconds[i]`` for ``shards[i]``), for the engine's
        thread: queued as plain data and recorded like ``record_dispatch`` off that thread."""
        self._later.record(self._record_dispatches, tier, tuple(shards), tuple(seconds))

    def _record_dispatches(
        self, tier: str, shards: tuple[str, ...], seconds: tuple[float, ...]
    ) -> Sequence[ReadableSpan]:
        for shard, s in zip(shards, seconds, strict=True):
            self._dispatch.record(s, {"moe.tier": tier, "moe.shard": shard})
        return ()  # a measurement, no span

    def flush(self) -> None:
        """Record every queued hot-path measurement now, on the calling thread."""
        self._later.flush()

    def record_prefix(self, tier: str, looked_up: int, hit: int) -> None:
        attrs = {"moe.tier": tier}
        if looked_up > 0:
            self._prefix_lookup.add(looked_up, attrs)
        if hit > 0:
            self._prefix_hit.add(hit, attrs)

    def record_kv_request(self, tier: str, store_tokens: int, miss_reason: str) -> None:
        """One finished request's tokens from the store and, if it computed a full prompt
        block, why (a bounded set of reasons: ``cluster.engine.engine_kv.MISS_*``)."""
        if store_tokens > 0:
            self._store_hit.add(store_tokens, {"moe.tier": tier})
        if miss_reason:
            self._misses.add(1, {"moe.tier": tier, "moe.kv.miss_reason": miss_reason})

    def record_block_ages(
        self, tier: str, where: str, ages: Sequence[float], shard: str = ""
    ) -> None:
        """Ages at eviction of blocks evicted from a replica's cache (by tier) or a store shard
        (by ``shard``: the store serves every tier, so ``tier`` is "" there)."""
        attrs = {"moe.kv.where": where}
        attrs |= {"moe.kv_store.shard": shard} if shard else {"moe.tier": tier}
        for age in ages:
            self._block_age.record(age, attrs)

    def add_store_source(self, name: str, source: StoreSource) -> None:
        """Observe store shards' bytes and hit ratio at each collection (one source per
        client; shards seen by several are reported once, from the last source read)."""
        with self._kv_lock:
            self._store_sources[name] = source

    def remove_store_source(self, name: str) -> None:
        with self._kv_lock:
            self._store_sources.pop(name, None)

    def record_evictions(self, tier: str, n: int) -> None:
        if n > 0:
            self._evicted.add(n, {"moe.tier": tier})

    def record_truncation(self, tier: str, n: int) -> None:
        if n > 0:
            self._truncated.add(n, {"moe.tier": tier})

    def record_escalation(self, from_tier: str, to_tier: str) -> None:
        self._escalations.add(1, {"moe.from_tier": from_tier, "moe.to_tier": to_tier})

    def record_resubmission(self, tier: str) -> None:
        self._resubmissions.add(1, {"moe.tier": tier})

    def record_shadow_divergence(self, tier: str, value: float) -> None:
        self._divergence.record(value, {"moe.tier": tier})

    def add_kv_source(self, tier: str, source: KvSource) -> None:
        """Observe a tier's KV pool at each collection; a later source for the tier replaces it.

        Gauges are pulled rather than pushed so an idle replica still reports its pool.
        """
        with self._kv_lock:
            self._kv_sources[tier] = source

    def remove_kv_source(self, tier: str) -> None:
        with self._kv_lock:
            self._kv_sources.pop(tier, None)

    # A collection calls these callbacks before it reads the synchronous instruments (the
    # SDK's order, held by test_telemetry), so draining the queue here puts every layer
    # recorded before a collection into it; recording from a callback takes no lock it holds.
    def _observe_blocks_in_use(self, options: CallbackOptions) -> Iterable[Observation]:
        self.flush()
        return [Observation(used, {"moe.tier": tier}) for tier, (used, _) in self._kv_sample()]

    def _observe_blocks_total(self, options: CallbackOptions) -> Iterable[Observation]:
        self.flush()
        return [Observation(total, {"moe.tier": tier}) for tier, (_, total) in self._kv_sample()]

    def _observe_store_bytes(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(b, {"moe.kv_store.shard": s}) for s, (b, _, _) in self._store()]

    def _observe_store_hits(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(hits / lookups if lookups else 0.0, {"moe.kv_store.shard": s})
            for s, (_, lookups, hits) in self._store()
        ]

    def _store(self) -> list[tuple[str, tuple[int, int, int]]]:
        with self._kv_lock:
            sources = list(self._store_sources.items())
        shards: dict[str, tuple[int, int, int]] = {}
        for name, source in sources:
            try:
                shards.update(source())
            except Exception as err:  # foreign code: one bad source skips only itself
                logger.warning("KV store metrics source %r failed: %r", name, err)
        return sorted(shards.items())

    def _kv_sample(self) -> list[tuple[str, tuple[int, int]]]:
        with self._kv_lock:
            sources = list(self._kv_sources.items())
        samples = []
        for tier, source in sources:
            try:
                samples.append((tier, source()))
            except Exception as err:  # a source is foreign code; one bad tier skips only itself
                logger.warning("KV metrics source for tier %r failed: %r", tier, err)
        return samples
