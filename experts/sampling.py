"""Sampling: greedy, temperature, top-k, top-p, with a per-request seeded generator.

Each request owns its ``torch.Generator``, so a seeded request samples the same
tokens whatever else shares its batch. Log-probabilities are taken from the
unmodified distribution (the model's own confidence, used by the tier policy).

Legend: B sequences, V vocab.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings; invalid values raise ``ValueError`` naming the field."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens, 1 <= self.max_tokens <= 1_000_000, "[1, 1000000]"),
            ("temperature", self.temperature, 0.0 <= self.temperature <= 100.0, "[0, 100]"),
            ("top_p", self.top_p, 0.0 < self.top_p <= 1.0, "(0, 1]"),
            ("top_k", self.top_k, self.top_k >= 0, ">= 0 (0 = off)"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} is out of range: allowed {allowed}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed!r} is out of range: allowed [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks the next token of one request."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else random.getrandbits(63)
        self._generator: torch.Generator | None = None

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def pick(self, logits: torch.Tensor) -> int:
        """Sample from one row of logits [V] (fp32) after temperature, top-k and top-p."""
        p = self.params
        scaled = logits / p.temperature  # [V]
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
        return int(torch.multinomial(probs, 1, generator=self._gen(logits.device)).item())


def sample_batch(
    logits: torch.Tensor,  # [B, V] fp32
    samplers: Sequence[Sampler],
) -> tuple[list[int], list[float]]:
    """Next token and its log-probability for each row."""
    assert logits.shape[0] == len(samplers), f"{logits.shape[0]} rows vs {len(samplers)} samplers"
    tokens = torch.argmax(logits, dim=-1)  # [B]
    picked = tokens.tolist()
    for row, sampler in enumerate(samplers):
        if not sampler.params.greedy:
            picked[row] = sampler.pick(logits[row])
            tokens[row] = picked[row]
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]  # [B]
    return picked, logprobs.tolist()
