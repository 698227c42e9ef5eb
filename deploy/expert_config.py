"""Where a tier's routed experts live: in each backbone replica, or in expert shards."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deploy.sections import runtime_section
from router.replan_policy import ReplanConfig

MIN_BUNDLE_CPU = 0.01


class ExpertsSettings(BaseModel):
    """``colocated``: every backbone replica holds all experts (the default).

    ``sharded``: the experts live in ``num_shards`` shard actors owned by one Serve
    deployment (``experts-<tier>``) and shared by all of the tier's backbone replicas;
    experts are spread round-robin. Shards are placed through a placement group
    (``strategy``), and ``shard_resources[i]`` can pin shard i to nodes that offer
    those custom resources. ``data_plane`` picks how a layer's tokens reach the shards:
    ``torch_dist`` (point-to-point channels that Ray only opens: shared memory to shards on
    the backbone's node, gloo to the others), ``gloo`` (the same channels, gloo for every
    pair) or ``ray`` (an actor call per shard per layer); ``dispatch_timeout_s`` bounds a
    layer's wait. With ``torch_dist`` or ``gloo`` the tier's engine can run in an engine
    process (the default), which joins the channels that its replica opened; ``ray`` needs
    the engine in the replica's process. ``replan`` (sharded only) turns on live re-placement
    by the cluster's placement controller and holds its thresholds (``ReplanConfig``).

    Faults: ``replication`` copies of every expert start on distinct shards (2 or more: a dead
    shard's share is recomputed on the others in the same step, no request notices). When an
    expert a step needs has no live copy, the layer waits up to ``unavailable_wait_s`` for its
    shard's restart (or a table that places it elsewhere), then the step fails with
    UNAVAILABLE naming the missing (layer, expert).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    placement: Literal["colocated", "sharded"] = "colocated"
    num_shards: int = Field(default=2, ge=1, le=1024)
    num_gpus_per_shard: float = Field(default=0.0, ge=0)
    num_cpus_per_shard: float = Field(default=0.0, ge=0)
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "SPREAD"
    shard_resources: tuple[dict[str, float], ...] = ()
    data_plane: Literal["torch_dist", "gloo", "ray"] = "torch_dist"
    dispatch_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    replication: int = Field(default=1, ge=1, le=16)
    unavailable_wait_s: float = Field(default=30.0, ge=0, le=3600)
    replan: Annotated[ReplanConfig, runtime_section(ReplanConfig)] = ReplanConfig()

    @model_validator(mode="after")
    def _resources_per_shard(self) -> ExpertsSettings:
        if self.shard_resources and len(self.shard_resources) != self.num_shards:
            raise ValueError(
                f"shard_resources has {len(self.shard_resources)} entries but num_shards is "
                f"{self.num_shards}: give one mapping per shard, or none"
            )
        if self.replication > self.num_shards:
            raise ValueError(
                f"replication={self.replication} needs at least that many shards, but "
                f"num_shards is {self.num_shards}: lower replication or add shards"
            )
        if self.replan.enabled and self.placement != "sharded":
            raise ValueError(
                "replan.enabled needs placement: sharded (colocated experts are never moved)"
            )
        return self

    @property
    def needs_ray_per_layer(self) -> bool:
        """Sharded on the ``ray`` data plane: every layer is a Ray actor call, so the engine
        must run in a Ray worker (the replica), not in an engine process."""
        return self.placement == "sharded" and self.data_plane == "ray"

    def bundles(self) -> list[dict[str, float]]:
        """Placement-group bundles: the pool's own replica first, then one per shard.

        Each reserves at least ``MIN_BUNDLE_CPU``: Ray refuses bundles of only zeros.
        """
        bundles: list[dict[str, float]] = [{"CPU": MIN_BUNDLE_CPU}]
        for i in range(self.num_shards):
            bundle = {"CPU": max(self.num_cpus_per_shard, MIN_BUNDLE_CPU)}
            if self.num_gpus_per_shard:
                bundle["GPU"] = self.num_gpus_per_shard
            if self.shard_resources:
                bundle.update(self.shard_resources[i])
            bundles.append(bundle)
        return bundles
