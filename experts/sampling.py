"""Sampling: greedy, temperature, top-k, top-p, with a per-request seeded generator.

Each request owns its ``torch.Generator``, so a seeded request samples the same
tokens whatever else shares its batch. The generator is re-seeded before each draw
from (request seed, index of the generated token) (``draw_seed``), so the draw for
token k depends on nothing drawn before it: a request resumed from token k on another
replica (``EngineRequest.resume_ids``) draws what the original would have.
Log-probabilities are taken from the unmodified distribution (the model's own
confidence, used by the tier policy).

Every accepted parameter value is numerically safe: a temperature below
``GREEDY_TEMPERATURE_FLOOR`` is greedy, and the rest divide logits already shifted so
the largest is 0 (no overflow, no NaN). A row that cannot be sampled (non-finite
logits, or its sampler raised) fails alone: ``sample_batch`` names it and samples
the others as if it were not there.

Legend: B sequences, V vocab.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from experts.sampling_params import SamplingParams

NON_FINITE_LOGITS = "its next-token logits are not finite (NaN or inf)"
_MAX_ERROR_CHARS = 200  # of a sampler's exception text quoted in a row's failure
_EXACT_FP32_INTS = 2**24  # token ids up to this travel exactly as fp32, beside log-probs
_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, index: int) -> int:
    """The generator seed for generated token ``index`` of a request seeded ``seed``.

    Output ``index`` of SplitMix64 started at ``seed``: consecutive indices (and seeds)
    give unrelated 63-bit seeds, so draws are independent across tokens and across
    requests, and each is a pure function of its two inputs.
    """
    x = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


class Sampler:
    """Picks the next token of one request; the draw for each generated token index
    depends only on the seed and that index."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else random.getrandbits(63)
        self._generator: torch.Generator | None = None
        self.num_drawn = 0  # the index a pick without one draws for

    def _gen(self, device: torch.device, index: int) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
        return self._generator.manual_seed(draw_seed(self.seed, index))

    def pick(self, logits: torch.Tensor, index: int | None = None) -> int:
        """Sample from one row of logits [V] (fp32) after temperature, top-k and top-p, for
        generated token ``index`` (default: the one after the last pick's).

        The row must have a finite maximum (``sample_batch`` checks); -inf entries are
        tokens never drawn. Shifting the row so its maximum is 0 before dividing keeps
        every scaled logit in [-inf, 0] with the top token at 0, and top-k and top-p both
        keep the top token, so the softmax below always has a finite, non-zero sum.
        """
        p = self.params
        index = self.num_drawn if index is None else index
        self.num_drawn = index + 1
        if p.greedy:
            return int(torch.argmax(logits).item())
        scaled = (logits - logits.max()) / p.temperature  # [V] <= 0, 0 at the top token
        if p.top_k and p.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if p.top_p < 1.0:  # keep the smallest set of top tokens whose mass reaches top_p
            sorted_logits, order = torch.sort(scaled, descending=True)  # [V]
            sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [V]
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p  # [V] mass before >= p
            drop[0] = False
            scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -torch.inf)
        probs = torch.softmax(scaled, dim=-1)  # [V]
        generator = self._gen(logits.device, index)
        return int(torch.multinomial(probs, 1, generator=generator).item())


@dataclass(frozen=True)
class SampledBatch:
    """Each row's next token and its log-probability; a row in ``failed`` (row -> why it
    could not be sampled) has token -1 and log-probability NaN."""

    tokens: list[int]
    logprobs: list[float]
    failed: dict[int, str]


def sample_batch(
    logits: torch.Tensor,  # [B, V] fp32
    samplers: Sequence[Sampler],
    indices: Sequence[int] | None = None,
) -> SampledBatch:
    """Next token and its log-probability for each row; a row that cannot be sampled fails
    alone (its logits are not finite, or its sampler raised), the others are unaffected.
    ``indices``: per row, the index of the generated token being drawn (the number of
    tokens its request generated before; default: each sampler's own count)."""
    assert logits.shape[0] == len(samplers), f"{logits.shape[0]} rows vs {len(samplers)} samplers"
    assert indices is None or len(indices) == len(samplers), f"{len(indices or ())} indices"
    # max propagates NaN, so a row with NaN, +inf, or nothing but -inf has a non-finite best
    best, tokens = logits.max(dim=-1)  # [B] largest logit, [B] greedy token
    picked_t = torch.where(torch.isfinite(best), tokens, -1)  # [B]
    if all(s.params.greedy for s in samplers):  # the common case: one device-to-host copy
        assert logits.shape[-1] <= _EXACT_FP32_INTS, f"vocab {logits.shape[-1]} too large"
        both = torch.stack([picked_t.float(), _logprobs(logits, tokens).float()]).tolist()
        picked = [int(t) for t in both[0]]
        failed = {row: NON_FINITE_LOGITS for row, token in enumerate(picked) if token < 0}
        return _batch(picked, both[1], failed)
    picked = picked_t.tolist()  # one device sync
    failed = {}
    for row, sampler in enumerate(samplers):
        if picked[row] < 0:
            failed[row] = NON_FINITE_LOGITS
        elif not sampler.params.greedy:
            try:
                if indices is not None:  # the draw for this token index (see draw_seed)
                    sampler.num_drawn = indices[row]
                picked[row] = sampler.pick(logits[row])
            except Exception as err:  # handled: this row's request fails, the batch goes on
                failed[row] = f"sampling raised {type(err).__name__}: {err}"[:_MAX_ERROR_CHARS]
                picked[row] = -1
                continue
            tokens[row] = picked[row]
    return _batch(picked, _logprobs(logits, tokens).tolist(), failed)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:  # [B]
    """Each row's log-probability of its token, from the unmodified distribution."""
    return torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]


def _batch(picked: list[int], logprobs: list[float], failed: dict[int, str]) -> SampledBatch:
    for row in failed:
        logprobs[row] = math.nan
    return SampledBatch(picked, logprobs, failed)
