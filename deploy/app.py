"""The Ray Serve application: one deployment per model tier, and the gRPC gateway.

``build_app(config)`` binds them; ``app_builder`` is the entry point for
``serve run deploy/serve.yaml``. The deployments live in ``deploy.tier_hosts`` (tiers and
their expert shard pools) and ``deploy.gateway_host`` (the torch-free gRPC ingress); the
engine lives in ``cluster.serving.tier_replica`` and the request logic in ``deploy.gateway``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from deploy.config import ClusterConfig, TierConfig, load_config
from deploy.gateway_host import GatewayDeployment
from deploy.tier_hosts import ExpertPoolDeployment, TierDeployment

APP_NAME = "moe-cluster"
PREFIX_ROUTER_CLASS = "cluster.serving.prefix_request_router.PrefixAwareRequestRouter"


def build_app(config: ClusterConfig) -> Any:
    """Bind a tier deployment per configured tier and the gateway in front of them."""
    telemetry = config.telemetry.settings()
    tiers = {}
    for tier in config.tiers:
        options: dict[str, Any] = {"num_cpus": tier.num_cpus}
        if tier.num_gpus:
            options["num_gpus"] = tier.num_gpus
        pool = None
        if tier.experts.placement == "sharded":
            pool = ExpertPoolDeployment.options(
                name=f"experts-{tier.name}",
                placement_group_bundles=tier.experts.bundles(),
                placement_group_strategy=tier.experts.strategy,
            ).bind(tier, telemetry)
        routing: dict[str, Any] = {}
        if config.kv_store.enabled and config.kv_store.prefix_routing:
            routing["request_router_config"] = prefix_router_config(tier)
        tiers[tier.name] = TierDeployment.options(
            name=f"tier-{tier.name}",
            num_replicas=tier.replicas,
            ray_actor_options=options,
            max_ongoing_requests=tier.max_ongoing_requests,
            max_queued_requests=tier.max_queued_requests,
            **routing,
        ).bind(tier, pool, telemetry, config.kv_store)
    return GatewayDeployment.options(
        name="gateway", num_replicas=config.grpc.gateway_replicas
    ).bind(config, tiers)


def prefix_router_config(tier: TierConfig) -> Any:
    """Serve's request router for a tier: by where each request's prefix lives."""
    from ray.serve.config import RequestRouterConfig

    kwargs = {"tier": tier.name, "model_dir": tier.model, "block_size": tier.engine.block_size}
    fields: dict[str, Any] = {
        "request_router_class": PREFIX_ROUTER_CLASS,
        "request_router_kwargs": kwargs,
    }
    return RequestRouterConfig(**fields)


def with_driver_keys(
    config: ClusterConfig, environ: Mapping[str, str] | None = None
) -> ClusterConfig:
    """The config with the API keys this process (the driver) sees in ``auth.api_keys_env``
    added to the file's, so that they reach a gateway on a node whose environment lacks
    them; the gateway still adds its own environment's."""
    keys = config.auth.resolve_api_keys(environ)
    if not keys:
        return config
    secrets = tuple(SecretStr(k) for k in sorted(keys))
    return config.model_copy(update={"auth": config.auth.model_copy(update={"api_keys": secrets})})


def app_builder(args: dict[str, Any]) -> Any:
    """``serve run`` entry point; ``args.config`` is a cluster config file (else the demo)."""
    path = args.get("config")
    return build_app(with_driver_keys(load_config(Path(path) if path else None)))
