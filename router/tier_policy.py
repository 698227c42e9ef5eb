"""Which model tier serves a request: explicit choice, cascade escalation, shadow promotion.

The gateway calls :meth:`TierPolicy.choose` before generation. An explicit tier wins. With the
cascade on, a request whose retrieval confidence is below the bar goes straight to the strong
tier; any other starts on the fast tier for ``probe_tokens`` tokens, and the gateway hands
their logprobs to :meth:`TierPolicy.after_probe`, which escalates when their mean is below
``min_mean_logprob``. A promoted shadow route replaces its primary tier as the starting tier.
Strings and floats only: no tensors, no Ray.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from router.policy_checks import check_at_least_one, check_distinct, check_unit_interval
from router.shadow import PromotionState, ShadowConfig, ShadowTracker

# Every reason a TierDecision can carry.
REASONS: Final[tuple[str, ...]] = (
    "explicit",  # the request named its tier
    "default",  # no cascade, no promotion: the configured default tier
    "promoted",  # an active shadow promotion replaced the primary tier
    "cascade_pending",  # started on cascade.from_tier; call after_probe with the probe's logprobs
    "low_retrieval_confidence",  # retrieval confidence below the bar: straight to to_tier
    "low_confidence",  # the probe's mean logprob was below the bar: escalated to to_tier
    "confident",  # the probe's mean logprob cleared the bar: stays on from_tier
)


@dataclass(frozen=True)
class CascadeConfig:
    """Start on ``from_tier`` and escalate to ``to_tier`` when confidence is low.

    The one definition of the config file's ``policy.cascade``: defaults and checks.
    """

    enabled: bool = True
    from_tier: str = "fast"
    to_tier: str = "strong"
    probe_tokens: int = 8  # tokens generated on from_tier before deciding
    min_mean_logprob: float = -2.5  # escalate when the probe's mean logprob is below this
    min_retrieval_confidence: float = 0.5  # escalate at once when retrieval is less sure

    def __post_init__(self) -> None:
        check_at_least_one("cascade.probe_tokens", self.probe_tokens)
        if not (math.isfinite(self.min_mean_logprob) and self.min_mean_logprob <= 0.0):
            raise ValueError(
                f"cascade.min_mean_logprob={self.min_mean_logprob!r} must be a finite "
                "number <= 0 (a logprob is never positive)"
            )
        check_unit_interval("cascade.min_retrieval_confidence", self.min_retrieval_confidence)
        if self.enabled:
            check_distinct("cascade.to_tier", self.to_tier, "cascade.from_tier", self.from_tier)


@dataclass(frozen=True)
class TierPolicyConfig:
    """The tiers served and how requests are spread over them; checks every tier name."""

    tiers: tuple[str, ...]
    default_tier: str
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    shadow: ShadowConfig = field(default_factory=ShadowConfig)

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError("tiers=() must name at least one tier")
        if len(set(self.tiers)) != len(self.tiers):
            dupes = sorted({t for t in self.tiers if self.tiers.count(t) > 1})
            raise ValueError(f"tiers={self.tiers!r} repeats {dupes}; names must be unique")
        self._check_tier("default_tier", self.default_tier)
        if self.cascade.enabled:
            self._check_tier("cascade.from_tier", self.cascade.from_tier)
            self._check_tier("cascade.to_tier", self.cascade.to_tier)
        if self.shadow.enabled:
            self._check_tier("shadow.primary_tier", self.shadow.primary_tier)
            self._check_tier("shadow.candidate_tier", self.shadow.candidate_tier)

    def _check_tier(self, name: str, value: str) -> None:
        if value not in self.tiers:
            raise ValueError(f"{name}={value!r} is not a tier; known tiers: {list(self.tiers)}")


@dataclass(frozen=True)
class TierDecision:
    """The tier chosen for one request and why (``reason`` is one of :data:`REASONS`)."""

    tier: str
    reason: str
    confidence: float | None = None  # the figure decided on: retrieval confidence or mean logprob
    escalated: bool = False
    probe_tokens: int = 0  # tokens to generate before after_probe; 0 when no probe is needed

    def __post_init__(self) -> None:
        assert self.reason in REASONS, f"reason={self.reason!r} not in {REASONS}"
        assert self.probe_tokens >= 0, f"probe_tokens={self.probe_tokens}"


class TierPolicy:
    """Chooses a tier per request and counts the decisions for metrics.

    Precedence in :meth:`choose`: explicit tier, low retrieval confidence, active promotion,
    cascade probe, default. A promotion applies where the policy would start on the shadow's
    primary tier (the default tier or the cascade's from_tier); escalation targets stay as
    configured. Not thread-safe: one policy per gateway event loop.
    """

    def __init__(self, config: TierPolicyConfig) -> None:
        self.config = config
        self.shadow = ShadowTracker(config.shadow)
        self.num_decisions = 0  # settled decisions: every reason except cascade_pending
        self.num_escalations = 0
        self.num_by_reason: Counter[str] = Counter()

    def choose(
        self, requested_tier: str | None, retrieval_confidence: float | None
    ) -> TierDecision:
        """Pick the starting tier; follow a ``cascade_pending`` decision with after_probe."""
        cfg, cascade = self.config, self.config.cascade
        if requested_tier is not None:
            if requested_tier not in cfg.tiers:
                raise ValueError(f"unknown tier {requested_tier!r}; known tiers: {list(cfg.tiers)}")
            return self._count(TierDecision(requested_tier, "explicit"))
        if retrieval_confidence is not None:
            check_unit_interval("retrieval_confidence", retrieval_confidence)
        if (
            cascade.enabled
            and retrieval_confidence is not None
            and retrieval_confidence < cascade.min_retrieval_confidence
        ):
            return self._count(
                TierDecision(
                    cascade.to_tier,
                    "low_retrieval_confidence",
                    confidence=retrieval_confidence,
                    escalated=True,
                )
            )
        start = cascade.from_tier if cascade.enabled else cfg.default_tier
        if start == cfg.shadow.primary_tier and self.shadow.promotion_state() == "active":
            return self._count(TierDecision(cfg.shadow.candidate_tier, "promoted"))
        if cascade.enabled:
            return self._count(
                TierDecision(
                    start,
                    "cascade_pending",
                    confidence=retrieval_confidence,
                    probe_tokens=cascade.probe_tokens,
                )
            )
        return self._count(TierDecision(start, "default"))

    def after_probe(self, decision: TierDecision, logprobs: Sequence[float]) -> TierDecision:
        """Settle a ``cascade_pending`` decision from the logprobs of its probe tokens.

        Uses the mean of the first ``decision.probe_tokens`` logprobs (fewer if generation
        ended early; none counts as confident). Below ``min_mean_logprob`` escalates.
        """
        if decision.reason != "cascade_pending":
            raise ValueError(
                f"after_probe needs a 'cascade_pending' decision, got reason={decision.reason!r}"
            )
        probe = list(logprobs[: decision.probe_tokens])
        if any(math.isnan(x) for x in probe):
            raise ValueError(f"logprobs contain NaN: {probe}")
        if not probe:
            return self._count(TierDecision(decision.tier, "confident"))
        mean = math.fsum(probe) / len(probe)
        if mean < self.config.cascade.min_mean_logprob:
            return self._count(
                TierDecision(
                    self.config.cascade.to_tier, "low_confidence", confidence=mean, escalated=True
                )
            )
        return self._count(TierDecision(decision.tier, "confident", confidence=mean))

    def shadow_tier(self, decision: TierDecision, request_id: str) -> str | None:
        """The tier to shadow this request on, or None: only primary-tier requests are sampled."""
        shadow = self.config.shadow
        if decision.tier != shadow.primary_tier or decision.reason == "cascade_pending":
            return None
        return shadow.candidate_tier if self.shadow.should_shadow(request_id) else None

    def promotion_state(self) -> PromotionState:
        return self.shadow.promotion_state()

    def promotion_held_reason(self) -> str | None:
        return self.shadow.held_reason()

    def _count(self, decision: TierDecision) -> TierDecision:
        if decision.reason != "cascade_pending":
            self.num_decisions += 1
        self.num_by_reason[decision.reason] += 1
        if decision.escalated:
            self.num_escalations += 1
        return decision
