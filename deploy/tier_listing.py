"""``ListTiers`` and ``Health``: each configured tier, its role in the policy, and whether
its replicas answer."""

from __future__ import annotations

import asyncio

from cluster.serving.tier_client import TierBusyError, TierClient, TierUnavailableError
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
        entry = pb.Tier(name=tier.name, model=tier.model_name, replicas=tier.replicas)
        entry.role = ", ".join(roles) or "direct"
        try:
            info = await asyncio.wait_for(tiers.info(tier.name), timeout=INFO_TIMEOUT_S)
        except TierBusyError:
            entry.state = "busy: its queue is full"
        except (TimeoutError, TierUnavailableError) as err:
            entry.state = f"unavailable: {str(err) or f'no answer within {INFO_TIMEOUT_S:g} s'}"
        else:
            entry.state, entry.family, entry.moe = "ready", info.family, info.moe
        listed.append(entry)
    return pb.ListTiersResponse(tiers=listed)


def health_of(listing: pb.ListTiersResponse) -> pb.HealthResponse:
    """Serving only when every tier is ready. Anyone may ask (no API key, for load
    balancers), so it says no more than that: ``ListTiers``, which needs a key, says which."""
    if any(t.state != "ready" for t in listing.tiers):
        return pb.HealthResponse(serving=False, detail="not serving")
    return pb.HealthResponse(serving=True, detail="serving")
