"""What goes into an engine and what comes out: requests, token events, failures.

Torch-free: these cross the engine process's socket and the tier replica's channel, and the
gateway (which never imports torch) reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cache.kv_policy import KVPolicy
from experts.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    kv_policy: KVPolicy = field(default_factory=KVPolicy)
    return_routing: bool = False  # per-token experts on each TokenEvent
    trace_parent: str = ""  # W3C traceparent: expert-shard work in its steps joins this trace
    attention_first_tokens: int = 0  # N > 0: attention diagnostics on each TokenEvent
    # the tenant's prefix-cache salt: only requests with the same salt share cached blocks
    cache_salt: str = ""
    # keep the K/V of the prompt's first ``pin_tokens`` tokens (whole blocks) cached for
    # ``pin_ttl_s`` seconds: evicted after unpinned blocks, here and in the cluster store
    # (soft: at most kv_store.max_pinned_share of a cache is pinned); 0: no pin
    pin_tokens: int = 0
    pin_ttl_s: float = 0.0
    # tokens this request already generated elsewhere (a replica lost mid-stream): they are
    # its first output tokens, not prompt. max_tokens and stop tokens count them, the
    # detokenizer has seen them, sampling draws token k as the original would have, and
    # events go on from index len(resume_ids); their K/V is computed (or fetched) like a prompt's
    resume_ids: Sequence[int] = ()

    def __post_init__(self) -> None:
        if len(self.resume_ids) >= self.params.max_tokens:
            raise ValueError(
                f"resume_ids holds {len(self.resume_ids)} tokens: a resumed request has fewer "
                f"than max_tokens={self.params.max_tokens} (it would have finished)"
            )
        if not 0 <= self.pin_tokens <= MAX_PIN_TOKENS:
            raise ValueError(f"pin_tokens={self.pin_tokens} is out of range: [0, {MAX_PIN_TOKENS}]")
        if not 0.0 <= self.pin_ttl_s <= MAX_PIN_TTL_S:
            raise ValueError(f"pin_ttl_s={self.pin_ttl_s} is out of range: [0, {MAX_PIN_TTL_S:g}]")
        if len(self.cache_salt) > MAX_CACHE_SALT_CHARS:
            raise ValueError(
                f"cache_salt of {len(self.cache_salt)} characters is too long: "
                f"allowed <= {MAX_CACHE_SALT_CHARS}"
            )


MAX_ATTENTION_FIRST_TOKENS = 1_000_000
MAX_CACHE_SALT_CHARS = 128
MAX_PIN_TOKENS = 1 << 20
MAX_PIN_TTL_S = 86_400.0


Routing = tuple[tuple[int, tuple[int, ...]], ...]  # per MoE layer: (layer, chosen experts)
# per layer, in model order: (attention entropy in nats, attention mass on the first N tokens),
# averaged over query heads
AttentionStats = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request, with the request's usage so far."""

    request_id: str
    token_id: int
    index: int  # position among the generated tokens
    logprob: float
    text: str  # detokenised delta ("" without a tokenizer)
    finish_reason: str | None  # "stop" | "length" on the last token
    num_prompt_tokens: int
    num_cached_prompt_tokens: int
    num_truncated_tokens: int  # tokens evicted by a window policy
    arrival_time: float
    time: float
    routing: Routing | None = None  # the gate's choices at the position that produced it
    scheduled_time: float | None = None  # when the request was first scheduled (end of queue)
    attention: AttentionStats | None = None  # at the position that produced it, when asked
    num_store_cached_tokens: int = 0  # of the cached prompt tokens, those fetched from the store
    kv_miss: str = ""  # why some prompt block was computed ("": none was; see engine_kv)


@dataclass(frozen=True)
class RequestFailure:
    """A request the engine stopped on its own (its row could not be sampled); its blocks
    are freed, and the rest of its batch went on as if it had not been there."""

    request_id: str
    reason: str
