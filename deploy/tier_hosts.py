"""The model tiers' Serve deployments: a tier replica's host and its expert shard pool's host.

Thin hosts: the engine lives in ``cluster.serving.tier_replica``, the shards in
``cluster.expert_parallel``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.expert_parallel.engine_experts import EngineExperts, arrange_engine_experts
from cluster.expert_parallel.expert_pool import ExpertPool, ShardSpec
from cluster.expert_parallel.remote_experts import RemoteExperts
from cluster.serving.tier_messages import TierInfo, TierItem, TierRequest, TierStats
from cluster.serving.tier_replica import TierReplica
from cluster.telemetry.settings import TelemetrySettings
from cluster.telemetry.setup import setup_telemetry
from deploy.config import TierConfig
from deploy.expert_config import MIN_BUNDLE_CPU
from deploy.replica_context import replica_attributes
from experts.checkpoint import CheckpointReader
from router.routing_table import RoutingTable, round_robin


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
    """A replica of one model tier: loads its checkpoint and runs the engine.

    With sharded experts and an engine process, the replica does the Ray half of opening the
    engine's data-plane channel (``arrange_engine_experts``) and keeps its rendezvous store.
    """

    def __init__(
        self,
        tier: TierConfig,
        expert_pool: DeploymentHandle | None = None,
        telemetry: TelemetrySettings | None = None,
    ) -> None:
        if telemetry is not None:
            setup_telemetry(telemetry, role="tier", attributes=replica_attributes(tier.name))
        if tier.torch_threads is not None:
            import torch

            torch.set_num_threads(tier.torch_threads)
        experts = None
        factory = None
        self._engine_experts: EngineExperts | None = None
        if expert_pool is not None:  # the experts live in the tier's shared shard pool
            # __init__ runs on the replica's event loop, where Serve forbids blocking on a
            # handle; the call's own router loop answers, so wait from a helper thread
            with ThreadPoolExecutor(max_workers=1) as waiter:
                handles, table = waiter.submit(
                    lambda: expert_pool.describe.remote().result()
                ).result()
            settings = tier.experts
            pool = ExpertPool(handles, settings.data_plane, settings.dispatch_timeout_s)
            if tier.runs_engine_process:  # this replica opens the shards' side, its child ours
                attributes = replica_attributes(tier.name)
                self._engine_experts = arrange_engine_experts(
                    pool.transport, table, tier.name, telemetry, attributes
                )
                factory = self._engine_experts.factory
            else:
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
            expert_factory=factory,
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


TierDeployment = serve.deployment()(TierHost)
ExpertPoolDeployment = serve.deployment(ray_actor_options={"num_cpus": MIN_BUNDLE_CPU})(
    ExpertPoolHost
)
