"""Serving: a tier's replicas and the one client the gateway calls them through.

Owns the tier replica (a Serve deployment hosting one engine), the tier client (every Serve
handle call, Ray errors mapped to the project's own), the typed messages that cross between
gateway and replica (torch-free: the gateway imports them), and the per-request trace.

May import ``cluster.engine``, ``cluster.expert_parallel`` and ``cluster.telemetry``; never
``deploy/``. ``tier_messages`` and ``tier_client`` must stay free of torch.
"""
