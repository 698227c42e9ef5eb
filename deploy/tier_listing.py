"""``ListTiers`` and ``Health``: each configured tier, its role in the policy, and whether
its replicas answer."""

from __future__ import annotations

import asyncio

from cluster.tier_client import TierClient, TierUnavailableError
from deploy.config import ClusterConfig
from deploy.proto import moecluster_v1_pb2 as pb

INFO_TIMEOUT_S = 10.0


async def list_tiers(
    config: ClusterConfig, tiers: TierClient, promotion_state: str
) -> pb.ListTiersResponse:
    """Every tier in config order; a tier whose replicas do not answer is listed as
    ``unavailable: <why>``, never left out."""
    cascade = config.policy.cascade
    shadow = config.policy.shadow
    listed = []
    for tier in config.tiers:
        roles = []
        if cascade.enabled and tier.name == cascade.from_tier:
            roles.append("cascade start")
        if cascade.enabled and tier.name == cascade.to_tier:
            roles.append("escalation target")
        if shadow.enabled and tier.name == shadow.candidate_tier:
            roles.append(f"shadow candidate ({promotion_state})")
        entry = pb.Tier(name=tier.name, model=tier.model, replicas=tier.replicas)
        entry.role = ", ".join(roles) or "direct"
        try:
            info = await asyncio.wait_for(tiers.info(tier.name), timeout=INFO_TIMEOUT_S)
        except (TimeoutError, TierUnavailableError) as err:
            entry.state = f"unavailable: {str(err) or f'no answer within {INFO_TIMEOUT_S:g} s'}"
        else:
            entry.state, entry.family, entry.moe = "ready", info.family, info.moe
        listed.append(entry)
    return pb.ListTiersResponse(tiers=listed)


def health_of(listing: pb.ListTiersResponse) -> pb.HealthResponse:
    """Serving only when every tier is ready; the detail names the ones that are not."""
    down = [t.name for t in listing.tiers if t.state != "ready"]
    if down:
        return pb.HealthResponse(serving=False, detail=f"tiers not ready: {', '.join(down)}")
    return pb.HealthResponse(serving=True, detail=f"{len(listing.tiers)} tier(s) ready")
