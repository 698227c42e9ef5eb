"""The Ray Serve application: one deployment per model tier, and the gRPC gateway.

``build_app(config)`` binds them; ``app_builder`` is the entry point for
``serve run deploy/serve.yaml``. The deployments are thin hosts: the engine
lives in ``cluster.tier_replica`` and the request logic in ``deploy.gateway``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.expert_pool import ExpertPool, ShardSpec
from cluster.remote_experts import RemoteExperts
from cluster.telemetry import TelemetrySettings, setup_telemetry
from cluster.tier_client import ServeTierClient
from cluster.tier_messages import TierInfo, TierItem, TierRequest, TierStats
from cluster.tier_replica import TierReplica
from deploy.audit import AuditLog
from deploy.config import ClusterConfig, TierConfig, load_config
from deploy.edge_config import check_exposure
from deploy.expert_config import MIN_BUNDLE_CPU
from deploy.front_door import GRACE_S, start_server
from deploy.gateway import Gateway
from experts.checkpoint import CheckpointReader
from router.routing_table import RoutingTable, round_robin

APP_NAME = "moe-cluster"


class ExpertPoolHost:
    """Owns a tier's expert shard actors (Serve manages this replica, the shards share its fate).

    The shards start in the replica's placement group, one bundle each (bundle 0 is the
    replica itself), so ``strategy`` and per-shard resources decide their nodes.
    """

    def __init__(self, tier: TierConfig, telemetry: TelemetrySettings | None = None) -> None:
        from ray.util import get_current_placement_group

        spec = CheckpointReader(tier.model).spec
        settings = tier.experts
        shard_ids = [f"{tier.name}-shard-{i}" for i in range(settings.num_shards)]
        self.table = round_robin(spec.moe_layers, spec.num_experts, shard_ids)
        group = get_current_placement_group()
        self.pool = ExpertPool.start(
            tier.model,
            [
                ShardSpec(
                    shard_id,
                    tuple(self.table.experts_on(shard_id)),
                    num_gpus=settings.num_gpus_per_shard,
                    num_cpus=settings.num_cpus_per_shard,
                    device=tier.device,
                    placement_group=group,
                    bundle_index=i + 1,
                    telemetry=telemetry,
                )
                for i, shard_id in enumerate(shard_ids)
            ],
        )

    def describe(self) -> tuple[dict[str, Any], RoutingTable]:
        """The shard actor handles and the routing table, for backbone replicas."""
        return self.pool.handles, self.table

    def node_ids(self) -> dict[str, str]:
        return self.pool.node_ids()

    def check_health(self) -> None:
        self.pool.node_ids()  # raises if a shard died; Serve then replaces this replica


class TierHost:
    """A replica of one model tier: loads its checkpoint and runs the engine."""

    def __init__(
        self,
        tier: TierConfig,
        expert_pool: DeploymentHandle | None = None,
        telemetry: TelemetrySettings | None = None,
    ) -> None:
        if telemetry is not None:
            setup_telemetry(telemetry, role="tier", attributes=_replica_attributes(tier.name))
        if tier.torch_threads is not None:
            import torch

            torch.set_num_threads(tier.torch_threads)
        experts = None
        if expert_pool is not None:  # the experts live in the tier's shared shard pool
            # __init__ runs on the replica's event loop, where Serve forbids blocking on a
            # handle; the call's own router loop answers, so wait from a helper thread
            with ThreadPoolExecutor(max_workers=1) as waiter:
                handles, table = waiter.submit(
                    lambda: expert_pool.describe.remote().result()
                ).result()
            settings = tier.experts
            pool = ExpertPool(handles, settings.data_plane, settings.dispatch_timeout_s)
            experts = RemoteExperts(pool, table, tier.name)
        self.replica = TierReplica(
            tier.name,
            tier.model,
            tier.to_engine_config(),
            tier.device,
            experts,
            stream_interval=tier.stream_interval,
            stream_items_per_step=tier.stream_items_per_step,
            engine_process=tier.runs_engine_process,
            max_queue_wait_s=tier.max_queue_wait_s,
        )

    async def generate(self, request: TierRequest) -> AsyncGenerator[TierItem, None]:
        async for item in self.replica.generate(request):
            yield item

    def info(self) -> TierInfo:
        return self.replica.info()

    def stats(self) -> TierStats:
        return self.replica.stats()

    def check_health(self) -> None:
        """Serve restarts a replica whose engine loop (or engine process) died."""
        if not self.replica.engine.is_alive():
            raise RuntimeError(f"tier {self.replica.name!r}: the engine is not running")

    def __del__(self) -> None:
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.shutdown()


class GatewayHost:
    """The gRPC ingress: serves ``moecluster.v1.MoECluster`` itself (``deploy.front_door``)
    on ``grpc.host:grpc.port`` of its node; Serve starts, places and restarts it."""

    # Serve awaits an async constructor on the replica's event loop, where the server runs
    async def __init__(  # type: ignore[misc]
        self, config: ClusterConfig, tiers: dict[str, DeploymentHandle]
    ) -> None:
        setup_telemetry(
            config.telemetry.settings(), role="gateway", attributes=_replica_attributes("")
        )
        audit = AuditLog(config.audit) if config.audit.enabled else None
        self.gateway = Gateway(config, ServeTierClient(tiers), audit)
        # keys are read here, where the gateway runs: refuse to expose an open door
        state = check_exposure(config.grpc, config.auth, self.gateway.api_keys)
        print(f"[gateway] {state}", file=sys.stderr, flush=True)
        self.server = await start_server(self.gateway, config.grpc)

    async def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            await server.stop(GRACE_S)


TierDeployment = serve.deployment()(TierHost)
ExpertPoolDeployment = serve.deployment(ray_actor_options={"num_cpus": MIN_BUNDLE_CPU})(
    ExpertPoolHost
)
GatewayDeployment = serve.deployment(ray_actor_options={"num_cpus": 0})(GatewayHost)


def _replica_attributes(tier: str) -> dict[str, str]:
    """Resource attributes naming where this process runs: node, deployment replica, tier."""
    import ray

    attributes = {"moe.node": str(ray.get_runtime_context().get_node_id())}
    try:
        attributes["moe.replica"] = str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # not inside a Serve replica (tests construct hosts directly)
        pass
    if tier:
        attributes["moe.tier"] = tier
    return attributes


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
        tiers[tier.name] = TierDeployment.options(
            name=f"tier-{tier.name}",
            num_replicas=tier.replicas,
            ray_actor_options=options,
            max_ongoing_requests=tier.max_ongoing_requests,
            max_queued_requests=tier.max_queued_requests,
        ).bind(tier, pool, telemetry)
    return GatewayDeployment.options(
        name="gateway", num_replicas=config.grpc.gateway_replicas
    ).bind(config, tiers)


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
