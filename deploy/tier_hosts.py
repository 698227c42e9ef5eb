"""The model tiers' Serve deployments: a tier replica's host and its expert shard pool's host.

Thin hosts: the engine lives in ``cluster.serving.tier_replica``, the shards in
``cluster.expert_parallel``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.engine.kv_events import KVEventBatch
from cluster.engine.launch import EngineKVLaunch
from cluster.expert_parallel.engine_experts import (
    EngineExperts,
    EngineShardRejoiner,
    arrange_engine_experts,
)
from cluster.expert_parallel.expert_pool import ExpertPool, ShardSpec
from cluster.expert_parallel.placement_controller import TierSetup
from cluster.expert_parallel.placement_host import start_controller
from cluster.expert_parallel.remote_experts import RemoteExperts
from cluster.expert_parallel.transports import TorchDistTransport
from cluster.kv_store.config import KVStoreConfig
from cluster.kv_store.event_hub import start_event_hub
from cluster.kv_store.relay import RayStoreFactory
from cluster.kv_store.shard_actor import start_store_shards
from cluster.serving.kv_event_pusher import KVEventPusher
from cluster.serving.placement_reporter import PlacementReporter
from cluster.serving.shard_rejoin_loop import ShardRejoinLoop
from cluster.serving.tier_messages import (
    TierInfo,
    TierItem,
    TierRejected,
    TierRequest,
    TierStats,
)
from cluster.serving.tier_replica import TierReplica
from cluster.telemetry.settings import TelemetrySettings
from cluster.telemetry.setup import setup_telemetry
from deploy.config import TierConfig
from deploy.expert_config import MIN_BUNDLE_CPU
from deploy.replica_context import replica_attributes
from experts.checkpoint import CheckpointReader
from router.routing_table import RoutingTable, replicated


class ExpertPoolHost:
    """Owns a tier's expert shard actors (Serve manages this replica, the shards share its fate).

    The shards start in the replica's placement group, one bundle each (bundle 0 is the
    replica itself), so ``strategy`` and per-shard resources decide their nodes; each holds
    ``experts.replication`` copies' worth of experts. A crashed shard is restarted alone by Ray
    (``max_restarts=-1``, same handle, so backbones reach it again), loading its slots from the
    safetensors files; with re-placement on, the controller then reconciles it to the table's
    slots. A dead shard never fails this replica's health check: no gang restart.
    """

    def __init__(self, tier: TierConfig, telemetry: TelemetrySettings | None = None) -> None:
        from ray.util import get_current_placement_group

        spec = CheckpointReader(tier.model).spec
        settings = tier.experts
        shard_ids = [f"{tier.name}-shard-{i}" for i in range(settings.num_shards)]
        self.table = replicated(spec.moe_layers, spec.num_experts, shard_ids, settings.replication)
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
        self._tier, self._spec = tier, spec
        self._node_of = self.pool.node_ids()  # where each shard started (a dead one: last known)
        self._controller: Any = None
        if settings.replan.enabled:  # the cluster's controller re-places this tier's experts
            # held for this replica's life: a named actor nobody holds a handle to is
            # collected (it restarts, empty, if its process dies; check_health re-registers)
            self._controller = start_controller()
            self._register(tier, spec)

    def _register(self, tier: TierConfig, spec: Any) -> None:
        """Hand the tier to the placement controller (started here if none runs yet)."""
        item = {"float32": 4, "float16": 2, "bfloat16": 2}.get(spec.dtype, 4)
        setup = TierSetup(
            tier.name,
            tuple(spec.moe_layers),
            spec.num_experts,
            self._node_of,
            3 * spec.hidden_size * spec.moe_intermediate_size * item,  # gate, up, down
            tier.experts.replan,
        )
        placement = tuple(self.table.placement.items())
        self._controller.register_tier.remote(
            setup, self.table.version, placement, self.pool.handles
        )

    def describe(self) -> tuple[dict[str, Any], RoutingTable]:
        """The shard actor handles and the routing table, for backbone replicas."""
        return self.pool.handles, self.table

    def node_ids(self) -> dict[str, str]:
        return self.pool.node_ids()

    def slots(self) -> dict[str, list[tuple[int, int]]]:
        """What each shard holds now, (layer, expert) sorted (operations, tests)."""
        return self.pool.slots()

    def shard_states(self) -> dict[str, tuple[str, list[tuple[int, int]]] | None]:
        """Per shard: (incarnation, slots), or None while dead or restarting (ops, tests)."""
        return self.pool.states()

    def check_health(self) -> None:
        # a dead shard is not this replica's death: Ray restarts the shard alone (and the
        # controller re-places its slots meanwhile); only a lost controller is re-told here
        if self._tier.experts.replan.enabled:  # a restarted controller: tell it of the tier
            import ray

            try:
                known = ray.get(self._controller.table.remote(self._tier.name), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return  # restarting: serving goes on with the last table; told next time
            if known is None:
                self._register(self._tier, self._spec)


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
        kv_store: KVStoreConfig | None = None,
    ) -> None:
        if telemetry is not None:
            setup_telemetry(telemetry, role="tier", attributes=replica_attributes(tier.name))
        if tier.torch_threads is not None:
            import torch

            torch.set_num_threads(tier.torch_threads)
        experts = None
        factory = None
        self._engine_experts: EngineExperts | None = None
        self._rejoiner: EngineShardRejoiner | None = None  # restarted shards, for the child
        if expert_pool is not None:  # the experts live in the tier's shared shard pool
            # __init__ runs on the replica's event loop, where Serve forbids blocking on a
            # handle; the call's own router loop answers, so wait from a helper thread
            with ThreadPoolExecutor(max_workers=1) as waiter:
                handles, table = waiter.submit(
                    lambda: expert_pool.describe.remote().result()
                ).result()
                if tier.experts.replan.enabled:  # a re-placement may have moved slots since
                    # joined before serving: the controller keeps this replica's table's
                    # slots until the replica acknowledges a newer one
                    table = waiter.submit(_join_controller, tier.name, table).result()
            settings = tier.experts
            pool = ExpertPool(handles, settings.data_plane, settings.dispatch_timeout_s)
            if tier.runs_engine_process:  # this replica opens the shards' side, its child ours
                attributes = replica_attributes(tier.name)
                starts = {s: st[0] if st else None for s, st in pool.states().items()}
                self._engine_experts = arrange_engine_experts(
                    pool.transport,
                    table,
                    tier.name,
                    telemetry,
                    attributes,
                    unavailable_wait_s=settings.unavailable_wait_s,
                )
                factory = self._engine_experts.factory
                if isinstance(pool.transport, TorchDistTransport):
                    joined = {sid for sid, _ in factory.tickets}
                    self._rejoiner = EngineShardRejoiner(
                        pool.transport,
                        pool.states,
                        {s: v for s, v in starts.items() if s in joined},
                    )
            else:
                near = getattr(pool.transport, "same_node", lambda: ())()  # torch_dist only
                experts = RemoteExperts(pool, table, tier.name, near, settings.unavailable_wait_s)
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
            count_routing=tier.experts.replan.enabled,
            kv=_kv_launch(kv_store),
        )
        self._kv_pusher: KVEventPusher | None = None
        if kv_store is not None and kv_store.enabled and kv_store.prefix_routing:
            self._kv_pusher = _kv_pusher(self.replica, tier.name, kv_store.detached)
            try:  # pushing from the start: a router resyncs from the engine's first snapshot
                asyncio.get_running_loop()
            except RuntimeError:  # no loop here: the first request starts it
                pass
            else:
                self._kv_pusher.start()
        self._reporter: PlacementReporter | None = None
        if expert_pool is not None and tier.experts.replan.enabled:
            self._reporter = _reporter(
                self.replica, tier.experts.replan.report_interval_s, table.version, self._rejoiner
            )
            try:  # reporting from the start (an idle replica must still be heard)
                asyncio.get_running_loop()
            except RuntimeError:  # no loop here: the first request starts it
                pass
            else:
                self._reporter.start()
        self._rejoin_loop: ShardRejoinLoop | None = None
        if self._rejoiner is not None and self._reporter is None:  # no reports to rejoin on
            self._rejoin_loop = ShardRejoinLoop(
                tier.name, _rejoin(self.replica, self._rejoiner), self.replica.engine.is_alive
            )
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # no loop here: the first request starts it
                pass
            else:
                self._rejoin_loop.start()

    async def generate(self, request: TierRequest) -> AsyncGenerator[TierItem, None]:
        if self._kv_pusher is not None:
            self._kv_pusher.start()  # on the replica's event loop, once
        if self._reporter is not None:
            self._reporter.start()  # on the replica's event loop, once
        if self._rejoin_loop is not None:
            self._rejoin_loop.start()
        async for item in self.replica.generate(request):
            if isinstance(item, TierRejected) and item.engine_stopped:
                _exit_soon()  # before the yield: a caller may stop reading at a refusal
            yield item

    def info(self) -> TierInfo:
        return self.replica.info()

    def kv_events(self) -> list[KVEventBatch]:
        """The engine's KV event batches since the last call (a router's feed)."""
        return self.replica.kv_events()

    def request_kv_snapshot(self) -> None:
        self.replica.request_kv_snapshot()

    def stats(self) -> TierStats:
        rejoined = self._rejoiner.num_rejoined if self._rejoiner is not None else 0
        return replace(self.replica.stats(), num_shards_rejoined=rejoined)

    def check_health(self) -> None:
        """Serve restarts a replica whose engine loop (or engine process) died."""
        if not self.replica.engine.is_alive():
            raise RuntimeError(f"tier {self.replica.name!r}: the engine is not running")

    def __del__(self) -> None:
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.shutdown()


# a replica whose engine is gone ends its process this long after telling its streams (their
# "engine stopped" items leave first): Serve's router drops a dead actor at once and its
# controller replaces it, where a live replica with a dead engine would keep drawing the
# requests resubmitted from it (it is the least loaded) until a health check failed
ENGINE_LOST_EXIT_S = 0.2


def _exit_soon() -> None:
    loop = asyncio.get_running_loop()
    loop.call_later(ENGINE_LOST_EXIT_S, os._exit, 1)


def _kv_pusher(replica: TierReplica, tier: str, detached: bool) -> KVEventPusher:
    """Pushes the replica's KV events to its tier's hub (started here if none runs yet)."""
    hub = start_event_hub(tier, detached)

    async def send(replica_id: str, batches: list[KVEventBatch]) -> bool:
        wants: bool = await hub.push.remote(replica_id, batches)
        return wants

    replica_id = serve.get_replica_context().replica_id.unique_id
    return KVEventPusher(replica_id, replica.kv_events, replica.request_kv_snapshot, send)


def _kv_launch(config: KVStoreConfig | None) -> EngineKVLaunch | None:
    """The engine's KV link when the cluster store is on: a shard on every node (started, or
    found by name), reached through their actor handles."""
    if config is None or not config.enabled:
        return None
    handles = start_store_shards(config)
    return EngineKVLaunch(config, RayStoreFactory(tuple(sorted(handles.items())), config))


def _join_controller(tier: str, fallback: RoutingTable) -> RoutingTable:
    """Report to the cluster's controller as this replica (registering it, at no table yet)
    and take its current table of ``tier`` (the pool's own until it has one)."""
    import ray

    from cluster.expert_parallel.placement_controller import ReportReply
    from cluster.expert_parallel.placement_host import CONTROLLER_NAME

    try:
        controller = ray.get_actor(CONTROLLER_NAME)
    except ValueError:  # no controller yet: the pool's table is the one in force
        return fallback
    replica_id = _replica_id()
    found: Any = ray.get(controller.report.remote(tier, replica_id, {}, -1), timeout=30)
    reply: ReportReply = found
    return reply.table or fallback


def _replica_id() -> str:
    import ray

    return ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"


def _rejoin(replica: TierReplica, rejoiner: EngineShardRejoiner) -> Callable[[], Awaitable[None]]:
    """Have ``replica``'s engine process join the shards that restarted since it last did."""

    async def rejoin() -> None:
        arranged = await asyncio.to_thread(rejoiner.arrange)  # Ray calls: off the event loop
        join = getattr(replica.engine, "join_shards", None)
        if arranged is not None and join is not None:
            join(*arranged)

    return rejoin


def _reporter(
    replica: TierReplica,
    interval_s: float,
    initial_version: int,
    rejoiner: EngineShardRejoiner | None = None,
) -> PlacementReporter:
    """A reporter sending ``replica``'s routed counts to the cluster's placement controller;
    with ``rejoiner`` (an engine process), it has the child join restarted shards first."""
    import ray

    from cluster.expert_parallel.placement_controller import ReportReply
    from cluster.expert_parallel.placement_host import CONTROLLER_NAME

    async def send(tier: str, rid: str, counts: dict[tuple[int, int], int], v: int) -> ReportReply:
        controller = ray.get_actor(CONTROLLER_NAME)  # found again after a restart
        reply: ReportReply = await controller.report.remote(tier, rid, counts, v)
        return reply

    reporter = PlacementReporter(
        replica.name,
        _replica_id(),
        replica.engine,
        send,
        interval_s,
        replica._flush_metrics,
        initial_version,
        _rejoin(replica, rejoiner) if rejoiner is not None else None,
    )
    replica.on_routed = reporter.add
    return reporter


# a replica whose engine died refuses every request until Serve replaces it: checked often
# (a cheap call), so requests resubmitted from it find a live replica sooner
TIER_HEALTH_CHECK_PERIOD_S = 2.0
TierDeployment = serve.deployment(health_check_period_s=TIER_HEALTH_CHECK_PERIOD_S)(TierHost)
ExpertPoolDeployment = serve.deployment(ray_actor_options={"num_cpus": MIN_BUNDLE_CPU})(
    ExpertPoolHost
)
