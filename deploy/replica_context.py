"""Where a Serve replica runs, as OpenTelemetry resource attributes (torch-free)."""

from __future__ import annotations

from ray import serve


def replica_attributes(tier: str) -> dict[str, str]:
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
