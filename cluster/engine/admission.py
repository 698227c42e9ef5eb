"""Admission checks: is a request valid for an engine of this model, block size and pool?

No engine is needed, so a tier replica checks before it sends (torch-free).
"""

from __future__ import annotations

from cache.kv_policy import KVPolicy, window_position_limit
from cluster.engine.requests import MAX_ATTENTION_FIRST_TOKENS, EngineRequest
from cluster.engine.scheduler import check_fits
from experts.spec import ModelSpec


def validate_request(
    request: EngineRequest, spec: ModelSpec, block_size: int, num_blocks: int
) -> None:
    """Raise ``ValueError`` saying what is wrong with a request for an engine of this model,
    block size and pool (no engine needed: a tier replica checks before it sends)."""
    prompt, params, policy = request.prompt_ids, request.params, request.kv_policy
    if not prompt:
        raise ValueError("prompt is empty: give at least one token")
    first = request.attention_first_tokens
    if not 0 <= first <= MAX_ATTENTION_FIRST_TOKENS:
        raise ValueError(
            f"attention_first_tokens={first} must be in [0, {MAX_ATTENTION_FIRST_TOKENS}] "
            "(0: no attention diagnostics)"
        )
    if policy.is_window and spec.has_sliding_layers:
        raise ValueError(
            f"kv_policy 'window' is not supported for {spec.family.name}: its sliding-window "
            f"layers (sliding_window={spec.sliding_window}) attend by position, which "
            "evictions would break; use kv_policy 'full'"
        )
    if policy.is_window:
        _check_window(len(prompt), params.max_tokens, policy, spec.max_position_embeddings)
        least = policy.min_window(block_size)
        if policy.window < least:
            raise ValueError(
                f"window={policy.window} is too small for sinks={policy.sinks} and "
                f"{len(policy.anchors)} anchor span(s) with block size "
                f"{block_size}: allowed >= {least}"
            )
    elif len(prompt) + params.max_tokens > spec.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = "
            f"{len(prompt) + params.max_tokens} exceeds the model's context of "
            f"{spec.max_position_embeddings} tokens; shorten the prompt or max_tokens, "
            "or use kv_policy 'window'"
        )
    bad = [t for t in prompt if not 0 <= t < spec.vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {spec.vocab_size})")
    groups = len(spec.kv_group_windows)  # sliding layers' blocks are a KV group of their own
    check_fits(
        request.request_id, len(prompt), params.max_tokens, policy, block_size, num_blocks, groups
    )


def _check_window(num_prompt: int, max_tokens: int, policy: KVPolicy, context: int) -> None:
    """A windowed request against the model's context (see ``cache.kv_policy``): the
    prompt, window, sinks and anchors fit the context; generation may run on past it,
    to at most ``window_position_limit(context)`` positions."""
    if policy.window > context:
        raise ValueError(
            f"window={policy.window} exceeds the model's context of {context} tokens: "
            f"allowed <= {context}"
        )
    if policy.sinks > context:
        raise ValueError(
            f"sinks={policy.sinks} exceeds the model's context of {context} tokens: "
            f"allowed <= {context}"
        )
    for start, end in policy.anchors:
        if end > context:
            raise ValueError(
                f"anchor span [{start}, {end}) ends past the model's context of {context} "
                f"tokens: anchors must end <= {context}"
            )
    if num_prompt > context:
        raise ValueError(
            f"prompt ({num_prompt} tokens) exceeds the model's context of {context} tokens: "
            "even with kv_policy 'window' the prompt must fit the context (generation may "
            "run past it)"
        )
    limit = window_position_limit(context)
    if num_prompt + max_tokens > limit:
        raise ValueError(
            f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) = "
            f"{num_prompt + max_tokens} exceeds {limit} positions, the most a windowed "
            f"sequence may reach on this model (context {context}); shorten max_tokens"
        )
