"""The tier policy's section of the cluster config: cascade and shadow routing.

``policy.cascade`` and ``policy.shadow`` are the router's own frozen dataclasses
(:class:`router.tier_policy.CascadeConfig`, :class:`router.shadow.ShadowConfig`): their
defaults and checks are the config file's, validated through pydantic by
:func:`deploy.sections.runtime_section`. Whether the tiers they name exist is checked
against the configured tiers by ``ClusterConfig``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from deploy.sections import Section, runtime_section
from router.shadow import ShadowConfig
from router.tier_policy import CascadeConfig, TierPolicyConfig


class PolicyConfig(Section):
    """Tier policy settings; ``default_tier`` None means the first tier listed."""

    default_tier: str | None = None
    cascade: Annotated[CascadeConfig, runtime_section(CascadeConfig)] = CascadeConfig()
    shadow: Annotated[ShadowConfig, runtime_section(ShadowConfig)] = ShadowConfig()

    def to_policy_config(self, tier_names: Sequence[str]) -> TierPolicyConfig:
        """The frozen dataclass the router uses; raises ValueError on an unknown tier name."""
        if not tier_names:
            raise ValueError("tier_names=[] must name at least one tier")
        return TierPolicyConfig(
            tiers=tuple(tier_names),
            default_tier=self.default_tier or tier_names[0],
            cascade=self.cascade,
            shadow=self.shadow,
        )
