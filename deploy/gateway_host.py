"""The gateway's Serve deployment: the gRPC ingress host.

Torch-free, like everything it imports: Serve imports this module (not ``deploy.app``) in the
gateway's replica, and ``tests/unit/test_torch_free_gateway.py`` checks that no import here
loads torch or the model.
"""

from __future__ import annotations

import sys

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.serving.tier_client import ServeTierClient
from cluster.telemetry.setup import setup_telemetry
from deploy.audit import AuditLog
from deploy.config import ClusterConfig
from deploy.edge_config import check_exposure
from deploy.front_door import GRACE_S, start_server
from deploy.gateway import Gateway
from deploy.replica_context import replica_attributes


class GatewayHost:
    """The gRPC ingress: serves ``moecluster.v1.MoECluster`` itself (``deploy.front_door``)
    on ``grpc.host:grpc.port`` of its node; Serve starts, places and restarts it."""

    # Serve awaits an async constructor on the replica's event loop, where the server runs
    async def __init__(  # type: ignore[misc]
        self, config: ClusterConfig, tiers: dict[str, DeploymentHandle]
    ) -> None:
        setup_telemetry(
            config.telemetry.settings(), role="gateway", attributes=replica_attributes("")
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


GatewayDeployment = serve.deployment(ray_actor_options={"num_cpus": 0})(GatewayHost)
