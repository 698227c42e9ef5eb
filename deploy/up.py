"""``moe-cluster up``: deploy the Serve application on a Ray cluster and serve until stopped.

With no ``--address`` a local Ray instance is started (and stopped on exit);
with no ``--config`` the demo cluster is served, its models built if missing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from deploy.config import DEFAULT_DEMO_DIR, ClusterConfig, load_config

DEMO_PRESETS = {"fast": "fast", "tiny": "tiny"}  # demo tier model dir -> preset


def say(message: str) -> None:
    print(f"[up] {message}", file=sys.stderr, flush=True)


def ensure_demo_models(demo_dir: Path) -> None:
    """Build the demo checkpoints the default config refers to, if missing."""
    from deploy.demo_model import build_demo_model

    for name, preset in DEMO_PRESETS.items():
        if not (demo_dir / name / "config.json").is_file():
            say(f"building demo model {demo_dir / name} (preset {preset})")
            build_demo_model(demo_dir / name, preset=preset, progress=lambda m: say(f"  {m}"))


def check_models(config: ClusterConfig) -> None:
    missing = [t for t in config.tiers if not (Path(t.model) / "config.json").is_file()]
    if missing:
        names = ", ".join(f"{t.name} ({t.model})" for t in missing)
        raise FileNotFoundError(
            f"checkpoint not found for tier(s) {names}; build one with "
            "`moe-cluster demo-model --out DIR` or fix tiers[].model in the config"
        )


def start(
    config: ClusterConfig, address: str | None, num_cpus: float | None, verbose: bool = False
) -> None:
    """Connect to (or start) Ray, start Serve with gRPC and deploy the application."""
    import ray
    from ray import serve

    from deploy.app import APP_NAME, build_app, with_driver_keys

    cpus = num_cpus if num_cpus is not None else config.ray.num_cpus
    if address is None and cpus is None:
        cpus = float(os.cpu_count() or 2)
    say(f"starting Ray ({'connecting to ' + address if address else f'local, {cpus:g} CPUs'})")
    # the standard OTEL_* variables set here reach every actor of the application
    otel = {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}
    ray.init(
        address=address,
        num_cpus=None if address or cpus is None else max(1, int(cpus)),
        namespace=config.ray.namespace,
        include_dashboard=False,
        log_to_driver=verbose,
        runtime_env={"env_vars": otel} if otel else None,
        # a local instance advertises loopback (Ray still binds its own servers to every
        # interface, guarded by its token authentication: README, Security)
        _node_ip_address="127.0.0.1" if address is None else None,
    )
    # the gateway serves gRPC itself (deploy/front_door.py): no Serve proxy listens anywhere
    serve.start(proxy_location="Disabled")
    config = with_driver_keys(config)  # keys in this environment reach the gateway too
    keys = len(config.auth.resolve_api_keys({}))
    say(
        f"auth: {f'{keys} API key(s)' if keys else 'no API key'} from the config and this "
        "environment (the gateway adds its own environment's)"
    )
    say(f"deploying tiers: {', '.join(config.tier_names)}")
    began = time.monotonic()
    serve.run(build_app(config), name=APP_NAME, route_prefix=None)
    say(f"ready in {time.monotonic() - began:.1f}s")


def stop(started_ray: bool) -> None:
    import ray
    from ray import serve

    say("shutting down")
    serve.shutdown()
    if started_ray:
        ray.shutdown()


def serve_forever(
    config_path: Path | None,
    address: str | None,
    num_cpus: float | None,
    demo_dir: Path = DEFAULT_DEMO_DIR,
    sample: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> int:
    if config_path is None:
        ensure_demo_models(demo_dir)
    config = load_config(config_path, demo_dir=demo_dir)
    check_models(config)
    start(config, address, num_cpus, verbose)
    target = f"{config.grpc.host}:{config.grpc.port}"
    print(f"serving gRPC on {target} (moecluster.v1.MoECluster); Ctrl-C to stop", flush=True)
    stopping = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        if sample is not None:
            sample(target)
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop(started_ray=address is None)
    return 0
