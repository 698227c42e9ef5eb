"""A minimal in-process generation loop: prefill a static batch, then decode it to the end.

Continuous batching replaces this in the engine; this loop is the simplest
correct use of the model runner, the block allocator and the samplers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cache.block_allocator import BlockAllocator, blocks_for
from cache.kv_pool import KVPool
from cluster.model_runner import ModelRunner, StepInput
from experts.model import MoEModel
from experts.sampling import Sampler, SamplingParams, sample_batch


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)  # generated ids only
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"


TokenCallback = Callable[[int, int], None]  # (request index, token id)


def validate_prompt(model: MoEModel, prompt: Sequence[int], params: SamplingParams) -> None:
    """Raise ``ValueError`` saying what is wrong with a prompt for this model."""
    spec = model.spec
    if not prompt:
        raise ValueError("prompt is empty: give at least one token")
    bad = [t for t in prompt if not 0 <= t < spec.vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {spec.vocab_size})")
    total = len(prompt) + params.max_tokens
    if total > spec.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
            f"the model's context of {spec.max_position_embeddings} tokens"
        )


def generate(
    model: MoEModel,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    block_size: int = 16,
    on_token: TokenCallback | None = None,
) -> list[GenerationResult]:
    """Generate for every prompt together; each gets exactly the tokens it would get alone."""
    assert len(prompts) == len(params), f"{len(prompts)} prompts vs {len(params)} params"
    for prompt, p in zip(prompts, params, strict=True):
        validate_prompt(model, prompt, p)
    spec = model.spec
    need = [
        blocks_for(len(pr) + p.max_tokens, block_size)
        for pr, p in zip(prompts, params, strict=True)
    ]
    allocator = BlockAllocator(sum(need))
    tables = [allocator.allocate(n) for n in need]
    pool = KVPool(
        spec.num_layers,
        sum(need),
        block_size,
        spec.num_kv_heads,
        spec.head_dim,
        model.dtype,
        model.device,
    )
    runner = ModelRunner(model, pool)
    samplers = [Sampler(p) for p in params]
    results = [GenerationResult() for _ in prompts]
    lengths = [len(p) for p in prompts]
    pending = [StepInput(list(pr), tables[i], 0, 0) for i, pr in enumerate(prompts)]
    active = list(range(len(prompts)))
    while active:
        logits = runner.run(pending)
        tokens, logprobs = sample_batch(logits, [samplers[i] for i in active])
        still, pending = [], []
        for i, token, logprob in zip(active, tokens, logprobs, strict=True):
            res = results[i]
            res.token_ids.append(token)
            res.logprobs.append(logprob)
            if on_token is not None:
                on_token(i, token)
            res.finish_reason = _finish_reason(spec.eos_token_ids, params[i], res.token_ids)
            if res.finish_reason is None:
                still.append(i)
                pending.append(StepInput([token], tables[i], lengths[i], lengths[i]))
                lengths[i] += 1
        active = still
    for table in tables:
        allocator.free(table)
    assert allocator.num_free == allocator.num_blocks, "blocks leaked"
    return results


def _finish_reason(
    eos_ids: Sequence[int], params: SamplingParams, generated: Sequence[int]
) -> str | None:
    last = generated[-1]
    if last in params.stop_token_ids or (not params.ignore_eos and last in eos_ids):
        return "stop"
    if len(generated) >= params.max_tokens:
        return "length"
    return None
