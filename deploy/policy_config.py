"""The tier policy's section of the cluster config: cascade and shadow routing."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationInfo as Info

from router.shadow import ShadowConfig
from router.tier_policy import CascadeConfig, TierPolicyConfig


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _differs_when_enabled(tier: str, other: str, info: Info) -> str:
    if info.data.get("enabled") and tier == info.data.get(other):
        raise ValueError(f"{info.field_name} must differ from {other}")
    return tier


class CascadeSettings(_Model):
    """Mirrors :class:`router.tier_policy.CascadeConfig`."""

    enabled: bool = True
    from_tier: str = "fast"
    to_tier: str = Field(default="strong", validate_default=True)
    probe_tokens: int = Field(default=8, ge=1)
    min_mean_logprob: float = Field(default=-2.5, le=0)
    min_retrieval_confidence: float = Field(default=0.5, ge=0, le=1)

    @field_validator("to_tier")
    @classmethod
    def _distinct(cls, to_tier: str, info: Info) -> str:
        return _differs_when_enabled(to_tier, "from_tier", info)


class ShadowSettings(_Model):
    """Mirrors :class:`router.shadow.ShadowConfig`."""

    enabled: bool = False
    candidate_tier: str = "strong"
    primary_tier: str = Field(default="fast", validate_default=True)
    share: float = Field(default=0.0, ge=0, le=1)
    probe_tokens: int = Field(default=16, ge=1)
    max_divergence: float = Field(default=0.25, ge=0, le=1)
    min_samples: int = Field(default=20, ge=1)
    promote: bool = False
    window: int = Field(default=200, ge=1, validate_default=True)

    @field_validator("primary_tier")
    @classmethod
    def _distinct(cls, primary: str, info: Info) -> str:
        return _differs_when_enabled(primary, "candidate_tier", info)

    @field_validator("promote")
    @classmethod
    def _needs_shadow(cls, promote: bool, info: Info) -> bool:
        if promote and not info.data.get("enabled"):
            raise ValueError("promote needs enabled: true (a promotion is earned from samples)")
        return promote

    @field_validator("window")
    @classmethod
    def _holds_min_samples(cls, window: int, info: Info) -> int:
        min_samples = info.data.get("min_samples", 1)
        if window < min_samples:
            raise ValueError(f"window must be >= min_samples={min_samples}")
        return window


class PolicyConfig(_Model):
    """Tier policy settings; ``default_tier`` None means the first tier listed."""

    default_tier: str | None = None
    cascade: CascadeSettings = CascadeSettings()
    shadow: ShadowSettings = ShadowSettings()

    def to_policy_config(self, tier_names: Sequence[str]) -> TierPolicyConfig:
        """The frozen dataclass the router uses; raises ValueError on an unknown tier name."""
        if not tier_names:
            raise ValueError("tier_names=[] must name at least one tier")
        return TierPolicyConfig(
            tiers=tuple(tier_names),
            default_tier=self.default_tier or tier_names[0],
            cascade=CascadeConfig(**self.cascade.model_dump()),
            shadow=ShadowConfig(**self.shadow.model_dump()),
        )
