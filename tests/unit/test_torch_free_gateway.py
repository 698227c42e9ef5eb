"""The gateway process never imports torch or the model (``../shared/ARCHITECTURE.md``).

Serve imports ``deploy.gateway_host`` in the gateway's replica; a fresh interpreter imports what
that deployment and the gRPC edge import, and must end without ``torch`` (or the model code) in
``sys.modules``. A regression here costs every gateway replica seconds of start-up and hundreds
of MiB, and couples the edge to the engine's dependencies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

GATEWAY_MODULES = (
    "deploy.gateway_host",
    "deploy.gateway",
    "deploy.tier_stream",
    "deploy.front_door",
    "deploy.api",
    "deploy.config",
    "deploy.tier_listing",
    "cluster.serving.tier_client",
    "cluster.serving.tier_messages",
    "cluster.engine.requests",
    "cluster.engine.config",
    "cluster.telemetry.setup",
    "cluster.telemetry.settings",
    "experts.sampling_params",
)
FORBIDDEN = ("torch", "transformers", "safetensors", "experts.model", "cluster.engine.llm_engine")

_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def test_gateway_imports_no_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *GATEWAY_MODULES],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert set(GATEWAY_MODULES) <= loaded
    leaked = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN)
    assert not leaked, f"the gateway's imports load {leaked[:10]}"
