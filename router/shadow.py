"""Shadow routing: run a share of a primary tier's traffic on a candidate tier and measure drift.

A request is shadowed when a stable hash of its id (blake2b, not Python's salted ``hash``)
maps below ``share``, so the same ids are sampled in every process and every run. Each
shadowed pair is compared over its first ``probe_tokens`` positions (token agreement and the
gap between mean logprobs) and kept in a bounded rolling window. A route marked for promotion
(candidate replaces primary as the default) is held until the window has ``min_samples``
results and its mean divergence is at most ``max_divergence``. Ids, tokens and floats only.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from router.policy_checks import check_at_least_one, check_distinct, check_unit_interval

PromotionState = Literal["none", "held", "active"]

_HASH_SPAN = float(2**64)


@dataclass(frozen=True)
class ShadowConfig:
    """Which tier shadows which, on what share of traffic, and when a promotion may go live;
    also the config file's ``policy.shadow`` (its defaults and checks live only here)."""

    enabled: bool = False
    candidate_tier: str = "strong"
    primary_tier: str = "fast"
    share: float = 0.0  # fraction of primary-tier requests also run on the candidate
    probe_tokens: int = 16  # positions compared per shadowed pair
    max_divergence: float = 0.25  # promotion held while the window's mean divergence exceeds it
    min_samples: int = 20  # promotion held until the window holds this many results
    promote: bool = False  # candidate_tier replaces primary_tier as the default when active
    window: int = 200  # results kept in the rolling window

    def __post_init__(self) -> None:
        check_unit_interval("shadow.share", self.share)
        check_at_least_one("shadow.probe_tokens", self.probe_tokens)
        check_unit_interval("shadow.max_divergence", self.max_divergence)
        check_at_least_one("shadow.min_samples", self.min_samples)
        if self.window < self.min_samples:
            raise ValueError(
                f"shadow.window={self.window!r} must be >= shadow.min_samples="
                f"{self.min_samples!r}, or a promotion could never leave 'held'"
            )
        if self.promote and not self.enabled:
            raise ValueError(
                "shadow.promote=True needs shadow.enabled=True: a promotion is earned from "
                "shadow samples, and a disabled shadow collects none"
            )
        if self.enabled:
            check_distinct(
                "shadow.candidate_tier",
                self.candidate_tier,
                "shadow.primary_tier",
                self.primary_tier,
            )


@dataclass(frozen=True)
class ShadowResult:
    """How far a shadow run strayed from its primary over the first ``k`` positions."""

    token_agreement: float  # in [0, 1]
    logprob_gap: float  # |mean primary logprob - mean shadow logprob|, >= 0
    divergence: float  # 1 - token_agreement


def stable_unit_hash(key: str) -> float:
    """Map ``key`` to [0, 1) with blake2b: the same in every process, unlike ``hash``."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPAN


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def divergence(
    primary_tokens: Sequence[int],
    primary_logprobs: Sequence[float],
    shadow_tokens: Sequence[int],
    shadow_logprobs: Sequence[float],
    k: int,
) -> ShadowResult:
    """Compare two generations over their first ``k`` positions.

    Agreement is matching positions over ``min(k, longer length)``: a position that only the
    longer run reached counts as a disagreement, and two empty runs agree fully. The logprob
    gap compares each side's mean over its first ``k`` logprobs; it is 0.0 when either side
    has none (the missing tokens already count against agreement).
    """
    if k < 1:
        raise ValueError(f"k={k!r} must be >= 1")
    a, b = primary_tokens[:k], shadow_tokens[:k]
    span = max(len(a), len(b))
    matches = sum(1 for x, y in zip(a, b, strict=False) if x == y)
    agreement = matches / span if span else 1.0
    mean_a, mean_b = _mean(primary_logprobs[:k]), _mean(shadow_logprobs[:k])
    gap = abs(mean_a - mean_b) if mean_a is not None and mean_b is not None else 0.0
    return ShadowResult(token_agreement=agreement, logprob_gap=gap, divergence=1.0 - agreement)


class ShadowTracker:
    """Samples requests for shadowing, keeps recent results and gates a promotion.

    The window is a bounded deque: old results fall out, so a candidate that drifts after
    being promoted goes back to 'held' once enough recent samples show it. Not thread-safe:
    one tracker per gateway event loop.
    """

    def __init__(self, config: ShadowConfig) -> None:
        self.config = config
        self._results: deque[ShadowResult] = deque(maxlen=config.window)
        self.num_recorded = 0  # all results ever recorded, including those that fell out

    def should_shadow(self, request_id: str) -> bool:
        """True if this request (served by the primary tier) should also run on the candidate."""
        if not self.config.enabled or self.config.share <= 0.0:
            return False
        return stable_unit_hash(request_id) < self.config.share

    def divergence(
        self,
        primary_tokens: Sequence[int],
        primary_logprobs: Sequence[float],
        shadow_tokens: Sequence[int],
        shadow_logprobs: Sequence[float],
        k: int | None = None,
    ) -> ShadowResult:
        """:func:`divergence` with ``k`` defaulting to the configured ``probe_tokens``."""
        k = self.config.probe_tokens if k is None else k
        return divergence(primary_tokens, primary_logprobs, shadow_tokens, shadow_logprobs, k)

    def record(self, result: ShadowResult) -> None:
        self._results.append(result)
        self.num_recorded += 1

    @property
    def num_samples(self) -> int:
        """Results in the rolling window (at most ``config.window``)."""
        return len(self._results)

    @property
    def mean_divergence(self) -> float:
        """Mean divergence over the window; 0.0 when it is empty (check ``num_samples``)."""
        return _mean([r.divergence for r in self._results]) or 0.0

    @property
    def mean_logprob_gap(self) -> float:
        """Mean logprob gap over the window; 0.0 when it is empty."""
        return _mean([r.logprob_gap for r in self._results]) or 0.0

    def held_reason(self) -> str | None:
        """Why a promotion marked with ``promote=True`` is not live; None if live or unmarked."""
        if not self.config.promote:
            return None
        if self.num_samples < self.config.min_samples:
            return f"num_samples={self.num_samples} < min_samples={self.config.min_samples}"
        if self.mean_divergence > self.config.max_divergence:
            return (
                f"mean_divergence={self.mean_divergence:.4f} > "
                f"max_divergence={self.config.max_divergence}"
            )
        return None

    def promotion_state(self) -> PromotionState:
        """'none' (no promotion marked), 'held' (see :meth:`held_reason`) or 'active'."""
        if not self.config.promote:
            return "none"
        return "held" if self.held_reason() is not None else "active"
