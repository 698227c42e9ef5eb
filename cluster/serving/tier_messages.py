"""Messages on the gateway -> tier-replica channel (one module per channel).

A tier replica streams back either one ``TierRejected``, or ``TierTokens``
batches until one carries a finish reason (the first batch, with the first token,
is the acceptance: a separate item would cost one more Ray streaming item per
request in the replica and the gateway).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cache.kv_policy import KVPolicy
from cluster.engine.counters import EngineCounters
from experts.sampling_params import SamplingParams


@dataclass(frozen=True)
class TierRequest:
    request_id: str
    params: SamplingParams
    prompt: str | None = None
    token_ids: tuple[int, ...] | None = None
    kv_policy: KVPolicy = field(default_factory=KVPolicy)
    session_id: str = ""
    return_routing: bool = False
    traceparent: str = ""  # W3C context of the gateway's request span ("" : not traced)
    attention_first_tokens: int = 0  # attention diagnostics over the first N tokens; 0 = off
    # the tenant's prefix-cache salt, set by the gateway from the caller's identity (a hash of
    # the API key, never the key): requests share cached blocks only with the same salt
    cache_salt: str = ""
    # keep the prompt's first pin_tokens tokens cached for pin_ttl_s (EngineRequest's pins)
    pin_tokens: int = 0
    pin_ttl_s: float = 0.0
    # the gateway's wall clock (time.time()) when it sent this call: the replica can tell
    # how long it waited in the tier's queue (0: unknown)
    sent_at: float = 0.0
    # a resubmission after a replica was lost mid-stream: the tokens the client already got.
    # They are generated output (max_tokens and stop tokens count them, the text goes on
    # after theirs, usage counts them as completion), and the stream resumes at the next one;
    # params.seed is the original's, so sampling continues as it would have
    resume_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class TierRejected:
    """The replica refused the request; ``code`` names the gRPC status to return.
    ``engine_stopped``: the replica's engine is gone (died or shut down), so the request
    may be resubmitted to another replica; never set for a refusal of the request itself."""

    code: str  # "invalid_argument" | "resource_exhausted" | "unavailable"
    message: str
    engine_stopped: bool = False


@dataclass(frozen=True)
class TierTokens:
    """Tokens generated since the last batch, with the request's usage so far."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_prompt_tokens: int
    num_truncated_tokens: int
    # per token, when asked: ((layer, (expert, ...)), ...) at the position that produced it
    routing: tuple[tuple[tuple[int, tuple[int, ...]], ...], ...] | None = None
    queue_s: float | None = None  # on the batch with the first token: time spent queued
    # on the last batch, when asked: per layer (entropy, mass on the first N tokens), averaged
    # over the positions that produced the output tokens
    attention: tuple[tuple[float, float], ...] | None = None
    # of num_cached_prompt_tokens, those fetched from the cluster KV store; and why some full
    # prompt block was computed ("": none was; see cluster.engine.engine_kv MISS_*)
    num_store_cached_tokens: int = 0
    kv_miss: str = ""


TierItem = TierRejected | TierTokens


def is_last(item: TierItem) -> bool:
    """Whether the replica sends nothing after this item (a refusal, or the finishing tokens)."""
    return isinstance(item, TierRejected) or (
        isinstance(item, TierTokens) and item.finish_reason is not None
    )


@dataclass(frozen=True)
class TierInfo:
    name: str
    model: str
    family: str
    moe: bool
    max_context: int


@dataclass(frozen=True)
class TierStats(EngineCounters):
    """The replica's engine counters, the requests it saw aborted, and how many times its
    engine process joined fresh pairs to restarted expert shards."""

    num_aborted: int
    num_shards_rejoined: int = 0
