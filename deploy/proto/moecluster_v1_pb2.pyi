from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Span(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class KVPolicy(_message.Message):
    __slots__ = ("kind", "window", "sinks", "anchors")
    KIND_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    SINKS_FIELD_NUMBER: _ClassVar[int]
    ANCHORS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    window: int
    sinks: int
    anchors: _containers.RepeatedCompositeFieldContainer[Span]
    def __init__(self, kind: _Optional[str] = ..., window: _Optional[int] = ..., sinks: _Optional[int] = ..., anchors: _Optional[_Iterable[_Union[Span, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "token_ids", "tier", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "session_id", "kv_policy", "retrieval_confidence", "return_routing", "stop_token_ids", "attention_first_tokens", "pin_tokens", "pin_ttl_s")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KV_POLICY_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    RETURN_ROUTING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIRST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PIN_TTL_S_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tier: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    session_id: str
    kv_policy: KVPolicy
    retrieval_confidence: float
    return_routing: bool
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    attention_first_tokens: int
    pin_tokens: int
    pin_ttl_s: float
    def __init__(self, prompt: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., tier: _Optional[str] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., session_id: _Optional[str] = ..., kv_policy: _Optional[_Union[KVPolicy, _Mapping]] = ..., retrieval_confidence: _Optional[float] = ..., return_routing: _Optional[bool] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., attention_first_tokens: _Optional[int] = ..., pin_tokens: _Optional[int] = ..., pin_ttl_s: _Optional[float] = ...) -> None: ...

class LayerAttention(_message.Message):
    __slots__ = ("layer", "entropy", "first_tokens_mass")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKENS_MASS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    entropy: float
    first_tokens_mass: float
    def __init__(self, layer: _Optional[int] = ..., entropy: _Optional[float] = ..., first_tokens_mass: _Optional[float] = ...) -> None: ...

class LayerRouting(_message.Message):
    __slots__ = ("layer", "experts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenRouting(_message.Message):
    __slots__ = ("index", "layers")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    index: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerRouting]
    def __init__(self, index: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerRouting, _Mapping]]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "truncated_tokens", "store_cached_tokens", "local_cached_tokens", "kv_miss_reasons")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STORE_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_MISS_REASONS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    truncated_tokens: int
    store_cached_tokens: int
    local_cached_tokens: int
    kv_miss_reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., truncated_tokens: _Optional[int] = ..., store_cached_tokens: _Optional[int] = ..., local_cached_tokens: _Optional[int] = ..., kv_miss_reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class TierInfo(_message.Message):
    __slots__ = ("name", "model", "reason", "confidence", "escalated")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    reason: str
    confidence: float
    escalated: bool
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., reason: _Optional[str] = ..., confidence: _Optional[float] = ..., escalated: _Optional[bool] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "routing", "usage", "tier", "request_id", "trace_id", "attention")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: str
    routing: _containers.RepeatedCompositeFieldContainer[TokenRouting]
    usage: Usage
    tier: TierInfo
    request_id: str
    trace_id: str
    attention: _containers.RepeatedCompositeFieldContainer[LayerAttention]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., routing: _Optional[_Iterable[_Union[TokenRouting, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., tier: _Optional[_Union[TierInfo, _Mapping]] = ..., request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., attention: _Optional[_Iterable[_Union[LayerAttention, _Mapping]]] = ...) -> None: ...

class ListTiersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Tier(_message.Message):
    __slots__ = ("name", "model", "family", "moe", "replicas", "state", "role")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MOE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    family: str
    moe: bool
    replicas: int
    state: str
    role: str
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., family: _Optional[str] = ..., moe: _Optional[bool] = ..., replicas: _Optional[int] = ..., state: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class ListTiersResponse(_message.Message):
    __slots__ = ("tiers",)
    TIERS_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[Tier]
    def __init__(self, tiers: _Optional[_Iterable[_Union[Tier, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("serving", "detail")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    detail: str
    def __init__(self, serving: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...
